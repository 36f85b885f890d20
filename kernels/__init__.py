"""The hot ops of svp, each behind one entry point.

Every attention and GroupNorm call in model/ goes through `attention` and `group_norm` below, and every
video sampler step through `temporal_step`. On CUDA tensors each call runs our Triton kernel or PyTorch's
own op, whichever kernels/dispatch.py finds faster for its shape (`SVP_KERNELS=auto`; `triton` forces
ours, `torch` PyTorch's); on the CPU always the plain-PyTorch reference of the same function.
"""
from kernels.attention import attention
from kernels.groupnorm import group_norm
from kernels.temporal import temporal_step

__all__ = ["attention", "group_norm", "temporal_step"]
