"""Layers shared by the UNet, the VAE and the ControlNet."""
import torch
import torch.nn.functional as F
from torch import nn

from kernels import group_norm


class GroupNorm(nn.Module):
    """nn.GroupNorm's parameters, computed by `kernels.group_norm`.

    `silu=True` fuses the SiLU that follows the norm in the LDM graph; the modules that do so keep an
    `nn.Identity` where LDM had its `nn.SiLU`, so the checkpoint's Sequential indices stay valid.
    """

    def __init__(self, num_groups: int, channels: int, eps: float, silu: bool = False):
        super().__init__()
        self.num_groups, self.eps, self.silu = num_groups, eps, silu
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, silu=self.silu)

    def extra_repr(self):
        return f"{self.num_groups}, {self.weight.shape[0]}, eps={self.eps}, silu={self.silu}"


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv (key: `conv`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
