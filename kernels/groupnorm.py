"""GroupNorm over NC... activations, optionally followed by SiLU.

GroupNorm normalises each (sample, group of C/G channels) by its own mean and variance, then applies a
per-channel affine. In the SD UNet and VAE it is almost always followed by SiLU, so the kernel fuses the
activation: one read and one write of the activation instead of three of each.

Forward, two passes in fp32:
1. Statistics. A group is up to a million elements (VAE decoder at 512 px), far too many for one
   program, so the grid is (sample x channel, split of the spatial axis). Each program reduces its slice
   tile by tile; within a tile mean and M2 = sum (x - mean)^2 are computed exactly, and tiles are merged
   with Chan's parallel formula. This avoids the cancellation of E[x^2] - E[x]^2 when |mean| >> std.
   A tiny kernel, one program per group, merges the group's (count, mean, M2) partials the same way.
2. Apply. One program per (sample x channel, spatial block): y = (x - mean) * rstd * w + b, then SiLU.

Backward. With x_hat = (x - mean) * rstd, z = w x_hat + b, y = silu(z) (or z) and dz = dy * dy/dz:
    dbias_c   = sum_{n, s} dz            dweight_c = sum_{n, s} dz * x_hat
    dx        = rstd * (w dz - mean_g(w dz) - x_hat * mean_g(w dz * x_hat))
The per-(sample, channel) sums of dz and dz * x_hat give all four reductions (the group means are
weight-weighted sums of them), so one reduction kernel plus one elementwise kernel suffice. z and x_hat
are recomputed from x and the saved (mean, rstd) rather than stored: memory stays one activation.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.dispatch import on_device, use_triton


def group_norm_reference(x, num_groups, weight, bias, eps=1e-5, silu=False):
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


# ----------------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _group_norm_stats_kernel(X, COUNT, MEAN, M2, row_len, chunk_len, num_chunks, BLOCK: tl.constexpr):
    """(count, mean, M2) of x[row, chunk * chunk_len : (chunk + 1) * chunk_len]."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    start = chunk * chunk_len
    end = tl.minimum(start + chunk_len, row_len)
    base = X + row.to(tl.int64) * row_len
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for tile_start in range(start, end, BLOCK):
        offsets = tile_start + tl.arange(0, BLOCK)
        inside = offsets < end
        x = tl.load(base + offsets, mask=inside, other=0.0).to(tl.float32)
        tile_count = tl.minimum(end - tile_start, BLOCK).to(tl.float32)
        tile_mean = tl.sum(x, 0) / tile_count
        tile_m2 = tl.sum(tl.where(inside, (x - tile_mean) * (x - tile_mean), 0.0), 0)
        # Chan et al.: merge (count, mean, m2) with the tile's.
        total = count + tile_count
        shift = tile_mean - mean
        mean = mean + shift * (tile_count / total)
        m2 = m2 + tile_m2 + shift * shift * (count * tile_count / total)
        count = total
    out = row * num_chunks + chunk
    tl.store(COUNT + out, count)
    tl.store(MEAN + out, mean)
    tl.store(M2 + out, m2)


@triton.jit
def _group_norm_finalize_kernel(COUNT, MEAN, M2, GROUP_MEAN, GROUP_RSTD, parts, eps, PARTS: tl.constexpr):
    """Merge one group's `parts` (count, mean, M2) partials (Chan et al.) into its mean and 1/std."""
    group = tl.program_id(0)
    offsets = group * parts + tl.arange(0, PARTS)
    inside = tl.arange(0, PARTS) < parts
    count = tl.load(COUNT + offsets, mask=inside, other=0.0)  # padding has count 0: it drops out
    mean = tl.load(MEAN + offsets, mask=inside, other=0.0)
    m2 = tl.load(M2 + offsets, mask=inside, other=0.0)
    total = tl.sum(count, 0)
    group_mean = tl.sum(count * mean, 0) / total
    group_m2 = tl.sum(m2 + count * (mean - group_mean) * (mean - group_mean), 0)
    tl.store(GROUP_MEAN + group, group_mean)
    tl.store(GROUP_RSTD + group, tl.rsqrt(group_m2 / total + eps))


@triton.jit
def _silu_and_grad(z):
    """silu(z) and d silu / dz."""
    sig = tl.sigmoid(z)
    return z * sig, sig * (1.0 + z * (1.0 - sig))


@triton.jit
def _group_norm_forward_kernel(X, Y, W, B, MEAN, RSTD, num_channels, group_channels, row_len,
                               SILU: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)  # sample * num_channels + channel
    offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < row_len
    channel = row % num_channels
    group = row // group_channels  # = sample * num_groups + group
    mean = tl.load(MEAN + group)
    rstd = tl.load(RSTD + group)
    w = tl.load(W + channel).to(tl.float32)
    b = tl.load(B + channel).to(tl.float32)
    base = row.to(tl.int64) * row_len
    x = tl.load(X + base + offsets, mask=inside, other=0.0).to(tl.float32)
    y = (x - mean) * rstd * w + b
    if SILU:
        y, _ = _silu_and_grad(y)
    tl.store(Y + base + offsets, y.to(Y.dtype.element_ty), mask=inside)


@triton.jit
def _recompute_dz(X, DY, W, B, MEAN, RSTD, row, offsets, inside, num_channels, group_channels, row_len,
                  SILU: tl.constexpr):
    """x_hat and dL/dz (z = w x_hat + b, before the activation) of one tile, recomputed from x."""
    channel = row % num_channels
    group = row // group_channels
    w = tl.load(W + channel).to(tl.float32)
    b = tl.load(B + channel).to(tl.float32)
    base = row.to(tl.int64) * row_len
    x = tl.load(X + base + offsets, mask=inside, other=0.0).to(tl.float32)
    dz = tl.load(DY + base + offsets, mask=inside, other=0.0).to(tl.float32)
    x_hat = (x - tl.load(MEAN + group)) * tl.load(RSTD + group)
    if SILU:
        _, silu_grad = _silu_and_grad(x_hat * w + b)
        dz = dz * silu_grad
    return x_hat, dz, w


@triton.jit
def _group_norm_backward_reduce_kernel(X, DY, W, B, MEAN, RSTD, SUM_DZ, SUM_DZ_XHAT,
                                       num_channels, group_channels, row_len, chunk_len, num_chunks,
                                       SILU: tl.constexpr, BLOCK: tl.constexpr):
    """Partial sums of dz and dz * x_hat over one chunk of one (sample, channel) row."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    start = chunk * chunk_len
    end = tl.minimum(start + chunk_len, row_len)
    sum_dz = tl.zeros([BLOCK], tl.float32)
    sum_dz_xhat = tl.zeros([BLOCK], tl.float32)
    for tile_start in range(start, end, BLOCK):
        offsets = tile_start + tl.arange(0, BLOCK)
        inside = offsets < end
        x_hat, dz, _ = _recompute_dz(X, DY, W, B, MEAN, RSTD, row, offsets, inside,
                                     num_channels, group_channels, row_len, SILU)
        sum_dz += dz  # dz is 0 outside (dy read as 0; silu_grad is finite)
        sum_dz_xhat += dz * x_hat
    out = row * num_chunks + chunk
    tl.store(SUM_DZ + out, tl.sum(sum_dz, 0))
    tl.store(SUM_DZ_XHAT + out, tl.sum(sum_dz_xhat, 0))


@triton.jit
def _group_norm_backward_dx_kernel(X, DY, DX, W, B, MEAN, RSTD, MEAN_WDZ, MEAN_WDZ_XHAT,
                                   num_channels, group_channels, row_len,
                                   SILU: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < row_len
    x_hat, dz, w = _recompute_dz(X, DY, W, B, MEAN, RSTD, row, offsets, inside,
                                 num_channels, group_channels, row_len, SILU)
    group = row // group_channels
    dx = tl.load(RSTD + group) * (w * dz - tl.load(MEAN_WDZ + group) - x_hat * tl.load(MEAN_WDZ_XHAT + group))
    tl.store(DX + row.to(tl.int64) * row_len + offsets, dx.to(DX.dtype.element_ty), mask=inside)


# ----------------------------------------------------------------------------------------------------
# Launchers


class GroupNormBlocks(NamedTuple):
    block: int  # elements per tile
    chunk_tiles: int  # tiles a reduction program handles (its split of a row)
    num_warps: int


def default_group_norm_blocks(row_len: int) -> GroupNormBlocks:
    block = min(1024, triton.next_power_of_2(row_len))
    return GroupNormBlocks(block=block, chunk_tiles=8, num_warps=4 if block <= 512 else 8)


def _chunks(row_len: int, blocks: GroupNormBlocks) -> tuple[int, int]:
    chunk_len = blocks.block * blocks.chunk_tiles
    return chunk_len, triton.cdiv(row_len, chunk_len)


def _group_norm_forward(x, num_groups, weight, bias, eps, silu, blocks):
    batch, channels = x.shape[:2]
    rows, row_len = batch * channels, x[0, 0].numel()
    chunk_len, num_chunks = _chunks(row_len, blocks)
    count, mean, m2 = (torch.empty(rows, num_chunks, device=x.device, dtype=torch.float32) for _ in range(3))
    _group_norm_stats_kernel[(rows, num_chunks)](x, count, mean, m2, row_len, chunk_len, num_chunks,
                                                 BLOCK=blocks.block, num_warps=blocks.num_warps)
    group_mean, group_rstd = (torch.empty(batch * num_groups, device=x.device, dtype=torch.float32) for _ in range(2))
    parts = channels // num_groups * num_chunks  # partials per group: its channels x chunks
    _group_norm_finalize_kernel[(batch * num_groups,)](count, mean, m2, group_mean, group_rstd, parts, eps,
                                                       PARTS=triton.next_power_of_2(parts))

    y = torch.empty_like(x)
    grid = (rows, triton.cdiv(row_len, blocks.block))
    _group_norm_forward_kernel[grid](x, y, weight, bias, group_mean, group_rstd, channels,
                                     channels // num_groups, row_len,
                                     SILU=silu, BLOCK=blocks.block, num_warps=blocks.num_warps)
    return y, group_mean, group_rstd


def _group_norm_backward(x, grad_y, weight, bias, mean, rstd, num_groups, silu, blocks):
    batch, channels = x.shape[:2]
    rows, row_len = batch * channels, x[0, 0].numel()
    group_channels = channels // num_groups
    chunk_len, num_chunks = _chunks(row_len, blocks)
    sum_dz, sum_dz_xhat = (torch.empty(rows, num_chunks, device=x.device, dtype=torch.float32) for _ in range(2))
    _group_norm_backward_reduce_kernel[(rows, num_chunks)](
        x, grad_y, weight, bias, mean, rstd, sum_dz, sum_dz_xhat, channels, group_channels, row_len,
        chunk_len, num_chunks, SILU=silu, BLOCK=blocks.block, num_warps=blocks.num_warps)
    sum_dz, sum_dz_xhat = sum_dz.sum(1).view(batch, channels), sum_dz_xhat.sum(1).view(batch, channels)
    w = weight.float()
    group_len = group_channels * row_len
    mean_wdz = (w * sum_dz).view(batch * num_groups, group_channels).sum(1) / group_len
    mean_wdz_xhat = (w * sum_dz_xhat).view(batch * num_groups, group_channels).sum(1) / group_len

    grad_x = torch.empty_like(x)
    grid = (rows, triton.cdiv(row_len, blocks.block))
    _group_norm_backward_dx_kernel[grid](
        x, grad_y, grad_x, weight, bias, mean, rstd, mean_wdz, mean_wdz_xhat, channels, group_channels,
        row_len, SILU=silu, BLOCK=blocks.block, num_warps=blocks.num_warps)
    return grad_x, sum_dz_xhat.sum(0), sum_dz.sum(0)


class FusedGroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps, silu, blocks):
        with on_device(x):
            y, mean, rstd = _group_norm_forward(x, num_groups, weight, bias, eps, silu, blocks)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.num_groups, ctx.silu, ctx.blocks = num_groups, silu, blocks
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        with on_device(x):
            grad_x, grad_weight, grad_bias = _group_norm_backward(
                x, grad_y.contiguous(), weight, bias, mean, rstd, ctx.num_groups, ctx.silu, ctx.blocks)
        return grad_x, None, grad_weight.to(weight.dtype), grad_bias.to(bias.dtype), None, None, None


def fused_group_norm(x, num_groups, weight, bias, eps=1e-5, silu=False, blocks: GroupNormBlocks | None = None):
    """The Triton path of `group_norm`, on any device Triton can launch on (CUDA, or CPU when interpreted)."""
    x = x.contiguous()  # the kernels index rows of (sample, channel) in NC... order
    channels = x.shape[1]
    if weight is None:  # the affine is part of the fused kernel; identity parameters keep it one kernel
        weight = torch.ones(channels, device=x.device, dtype=x.dtype)
    if bias is None:
        bias = torch.zeros(channels, device=x.device, dtype=x.dtype)
    if blocks is None:
        blocks = default_group_norm_blocks(x[0, 0].numel())
    return FusedGroupNorm.apply(x, num_groups, weight, bias, eps, silu, blocks)


def _kernel_supports(x, num_groups) -> bool:
    return (x.dim() >= 3 and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and x.shape[1] % num_groups == 0 and x.numel() > 0)


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float = 1e-5, silu: bool = False) -> torch.Tensor:
    """F.group_norm(x, num_groups, weight, bias, eps), then SiLU when `silu`."""
    tensors = [t for t in (x, weight, bias) if t is not None]
    if use_triton(*tensors) and _kernel_supports(x, num_groups):
        return fused_group_norm(x, num_groups, weight, bias, eps, silu)
    return group_norm_reference(x, num_groups, weight, bias, eps, silu)
