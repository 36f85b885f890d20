"""GroupNorm over NC... activations, optionally followed by SiLU."""
import torch
import torch.nn.functional as F

from kernels.dispatch import use_triton


def group_norm_reference(x, num_groups, weight, bias, eps=1e-5, silu=False):
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float = 1e-5, silu: bool = False) -> torch.Tensor:
    """F.group_norm(x, num_groups, weight, bias, eps), then SiLU when `silu`."""
    if use_triton(x):
        pass  # TODO(kernels issue): fused Triton GroupNorm(+SiLU)
    return group_norm_reference(x, num_groups, weight, bias, eps, silu)
