"""Decides, per call, whether a Triton kernel or the PyTorch reference runs.

The kernel modules import triton unconditionally (it is a runtime requirement); what varies per call is
the device: Triton kernels launch only on CUDA tensors. `SVP_KERNELS=torch` forces the reference
everywhere (to compare, or to debug); `SVP_KERNELS=auto` (or unset) is the default.
"""
import contextlib
import os

import torch

KERNEL_MODES = ("auto", "torch")


class KernelModeError(ValueError):
    pass


def kernel_mode() -> str:
    mode = os.environ.get("SVP_KERNELS", "auto").strip().lower() or "auto"
    if mode not in KERNEL_MODES:
        raise KernelModeError(f"SVP_KERNELS={mode!r}: expected one of {', '.join(KERNEL_MODES)}")
    return mode


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when every tensor lives on a CUDA device and kernels are not switched off."""
    return kernel_mode() == "auto" and all(t.is_cuda for t in tensors)


def on_device(tensor: torch.Tensor):
    """Make tensor's GPU the current one while launching: Triton launches on the current device, which
    need not be the tensor's (a process driving several GPUs). A no-op for CPU (interpreted) tensors."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
