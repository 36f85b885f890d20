"""The hot ops of svp, each behind one entry point.

Every attention and GroupNorm call in model/ goes through `attention` and `group_norm` below.
On CUDA tensors (with triton importable) they run our Triton kernels; everywhere else they run
a plain-PyTorch reference of the same function. `SVP_KERNELS=torch` forces the reference.
"""
from kernels.attention import attention
from kernels.groupnorm import group_norm

__all__ = ["attention", "group_norm"]
