"""The hot ops of svp, each behind one entry point.

Every attention and GroupNorm call in model/ goes through `attention` and `group_norm` below, and every
video sampler step through `temporal_step`. On CUDA tensors they run our Triton kernels; everywhere else
a plain-PyTorch reference of the same function. `SVP_KERNELS=torch` forces the reference.
"""
from kernels.attention import attention
from kernels.groupnorm import group_norm
from kernels.temporal import temporal_step

__all__ = ["attention", "group_norm", "temporal_step"]
