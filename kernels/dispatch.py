"""Decides, per call, whether a Triton kernel or the PyTorch reference runs."""
import functools
import os

import torch


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when every tensor lives on a CUDA device and kernels are not switched off."""
    if os.environ.get("SVP_KERNELS", "").lower() == "torch":
        return False
    return all(t.is_cuda for t in tensors) and triton_available()
