"""GroupNorm over NC... activations, optionally followed by SiLU.

GroupNorm normalises each (sample, group of C/G channels) by its own mean and variance, then applies a
per-channel affine. In the SD UNet and VAE it is almost always followed by SiLU, so the kernel fuses the
activation: one read and one write of the activation instead of three of each.

Statistics in fp32: within a tile, mean and M2 = sum (x - mean)^2 are computed exactly, and tiles are
merged with Chan's parallel formula. This avoids the cancellation of E[x^2] - E[x]^2 when |mean| >> std.

Two ways to run the forward, chosen per shape (`plan`):
- One program per group (UNet sizes, up to `one_program_max` elements a group): the program reduces its
  group, then normalises it, in one launch. At UNet sizes a call is bound by launch cost, not by the GPU.
- Split (VAE-decoder sizes, up to a million elements a group): one program cannot stream that fast, so
  the statistics are split over (sample x channel, chunk of the spatial axis) programs, a tiny kernel
  merges each group's partials, and one program per (sample x channel, spatial block) normalises.

Backward. With x_hat = (x - mean) * rstd, z = w x_hat + b, y = silu(z) (or z) and dz = dy * dy/dz:
    dbias_c   = sum_{n, s} dz            dweight_c = sum_{n, s} dz * x_hat
    dx        = rstd * (w dz - mean_g(w dz) - x_hat * mean_g(w dz * x_hat))
The per-(sample, channel) sums of dz and dz * x_hat give all four reductions (the group means are
weight-weighted sums of them). One program per group computes them and then dx; the split path reduces
chunks in one kernel and computes dx in another. z and x_hat are recomputed from x and the saved
(mean, rstd) rather than stored: memory stays one activation.
"""
import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.dispatch import Op, dtype_name, on_device, size_class

# Groups up to this many elements run in one program (UNet at 512 px: 10 x 64 x 64 = 40960; at 768 px
# 92160); the VAE decoder's larger groups take the split path, measured 2.8-9.2x F.group_norm on an H200.
ONE_PROGRAM_MAX = 1 << 17


def group_norm_reference(x, num_groups, weight, bias, eps=1e-5, silu=False):
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


# ----------------------------------------------------------------------------------------------------
# Triton kernels. A "row" is one (sample, channel): row_len contiguous elements. Group g of sample n is
# rows (n * G + g) * group_channels ... + group_channels - 1, also contiguous.


@triton.jit
def _welford(base, start, end, BLOCK: tl.constexpr):
    """(count, mean, M2) of base[start:end], tile by tile, merged with Chan et al.'s formula."""
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
        total = count + tile_count
        shift = tile_mean - mean
        mean = mean + shift * (tile_count / total)
        m2 = m2 + tile_m2 + shift * shift * (count * tile_count / total)
        count = total
    return count, mean, m2


@triton.jit
def _silu_and_grad(z):
    """silu(z) and d silu / dz."""
    sig = tl.sigmoid(z)
    return z * sig, sig * (1.0 + z * (1.0 - sig))


@triton.jit
def _normalize_tile(X, Y, W, B, mean, rstd, row, offsets, inside, num_channels, row_len, SILU: tl.constexpr):
    channel = row % num_channels
    w = tl.load(W + channel).to(tl.float32)
    b = tl.load(B + channel).to(tl.float32)
    base = row.to(tl.int64) * row_len
    x = tl.load(X + base + offsets, mask=inside, other=0.0).to(tl.float32)
    y = (x - mean) * rstd * w + b
    if SILU:
        y, _ = _silu_and_grad(y)
    tl.store(Y + base + offsets, y.to(Y.dtype.element_ty), mask=inside)


@triton.jit
def _recompute_dz(X, DY, W, B, mean, rstd, row, offsets, inside, num_channels, row_len, SILU: tl.constexpr):
    """x_hat, dL/dz (z = w x_hat + b, before the activation) and w of one tile, recomputed from x."""
    channel = row % num_channels
    w = tl.load(W + channel).to(tl.float32)
    b = tl.load(B + channel).to(tl.float32)
    base = row.to(tl.int64) * row_len
    x = tl.load(X + base + offsets, mask=inside, other=0.0).to(tl.float32)
    dz = tl.load(DY + base + offsets, mask=inside, other=0.0).to(tl.float32)
    x_hat = (x - mean) * rstd
    if SILU:
        _, silu_grad = _silu_and_grad(x_hat * w + b)
        dz = dz * silu_grad
    return x_hat, dz, w


@triton.jit
def _row_sums(X, DY, W, B, mean, rstd, row, start, end, num_channels, row_len,
              SILU: tl.constexpr, BLOCK: tl.constexpr):
    """Sums of dz and dz * x_hat over row[start:end]."""
    sum_dz = tl.zeros([BLOCK], tl.float32)
    sum_dz_xhat = tl.zeros([BLOCK], tl.float32)
    for tile_start in range(start, end, BLOCK):
        offsets = tile_start + tl.arange(0, BLOCK)
        x_hat, dz, _ = _recompute_dz(X, DY, W, B, mean, rstd, row, offsets, offsets < end, num_channels, row_len,
                                     SILU)
        sum_dz += dz  # dz is 0 outside (dy read as 0; silu_grad is finite)
        sum_dz_xhat += dz * x_hat
    return tl.sum(sum_dz, 0), tl.sum(sum_dz_xhat, 0)


@triton.jit
def _dx_tile(X, DY, DX, W, B, mean, rstd, mean_wdz, mean_wdz_xhat, row, offsets, inside, num_channels, row_len,
             SILU: tl.constexpr):
    x_hat, dz, w = _recompute_dz(X, DY, W, B, mean, rstd, row, offsets, inside, num_channels, row_len, SILU)
    dx = rstd * (w * dz - mean_wdz - x_hat * mean_wdz_xhat)
    tl.store(DX + row.to(tl.int64) * row_len + offsets, dx.to(DX.dtype.element_ty), mask=inside)


@triton.jit
def _group_norm_one_program_forward_kernel(X, Y, W, B, MEAN, RSTD, num_channels, group_channels, row_len, eps,
                                           SILU: tl.constexpr, BLOCK: tl.constexpr):
    """The whole forward of one (sample, group): its statistics, then its normalisation."""
    group = tl.program_id(0)
    group_len = group_channels * row_len
    count, mean, m2 = _welford(X + group.to(tl.int64) * group_len, 0, group_len, BLOCK)
    rstd = tl.rsqrt(m2 / count + eps)
    tl.store(MEAN + group, mean)
    tl.store(RSTD + group, rstd)
    for channel in range(0, group_channels):
        row = group * group_channels + channel
        for tile_start in range(0, row_len, BLOCK):
            offsets = tile_start + tl.arange(0, BLOCK)
            _normalize_tile(X, Y, W, B, mean, rstd, row, offsets, offsets < row_len, num_channels, row_len, SILU)


@triton.jit
def _group_norm_one_program_backward_kernel(X, DY, DX, W, B, MEAN, RSTD, SUMS, num_rows, num_channels,
                                            group_channels, row_len, SILU: tl.constexpr, BLOCK: tl.constexpr):
    """The whole backward of one (sample, group): its rows' sums of dz * x_hat and dz (SUMS[0, row] and
    SUMS[1, row], for dweight and dbias), then dx."""
    group = tl.program_id(0)
    mean = tl.load(MEAN + group)
    rstd = tl.load(RSTD + group)
    sum_wdz = 0.0
    sum_wdz_xhat = 0.0
    for channel in range(0, group_channels):
        row = group * group_channels + channel
        sum_dz, sum_dz_xhat = _row_sums(X, DY, W, B, mean, rstd, row, 0, row_len, num_channels, row_len,
                                        SILU, BLOCK)
        tl.store(SUMS + row, sum_dz_xhat)
        tl.store(SUMS + num_rows + row, sum_dz)
        w = tl.load(W + row % num_channels).to(tl.float32)
        sum_wdz += w * sum_dz
        sum_wdz_xhat += w * sum_dz_xhat
    group_len = group_channels * row_len * 1.0
    for channel in range(0, group_channels):
        row = group * group_channels + channel
        for tile_start in range(0, row_len, BLOCK):
            offsets = tile_start + tl.arange(0, BLOCK)
            _dx_tile(X, DY, DX, W, B, mean, rstd, sum_wdz / group_len, sum_wdz_xhat / group_len, row, offsets,
                     offsets < row_len, num_channels, row_len, SILU)


@triton.jit
def _group_norm_stats_kernel(X, COUNT, MEAN, M2, row_len, chunk_len, num_chunks, BLOCK: tl.constexpr):
    """(count, mean, M2) of x[row, chunk * chunk_len : (chunk + 1) * chunk_len]."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    start = chunk * chunk_len
    count, mean, m2 = _welford(X + row.to(tl.int64) * row_len, start, tl.minimum(start + chunk_len, row_len), BLOCK)
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
def _group_norm_forward_kernel(X, Y, W, B, MEAN, RSTD, num_channels, group_channels, row_len,
                               SILU: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)  # sample * num_channels + channel
    offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    group = row // group_channels  # = sample * num_groups + group
    _normalize_tile(X, Y, W, B, tl.load(MEAN + group), tl.load(RSTD + group), row, offsets, offsets < row_len,
                    num_channels, row_len, SILU)


@triton.jit
def _group_norm_backward_reduce_kernel(X, DY, W, B, MEAN, RSTD, SUM_DZ, SUM_DZ_XHAT,
                                       num_channels, group_channels, row_len, chunk_len, num_chunks,
                                       SILU: tl.constexpr, BLOCK: tl.constexpr):
    """Partial sums of dz and dz * x_hat over one chunk of one (sample, channel) row."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    group = row // group_channels
    start = chunk * chunk_len
    sum_dz, sum_dz_xhat = _row_sums(X, DY, W, B, tl.load(MEAN + group), tl.load(RSTD + group), row, start,
                                    tl.minimum(start + chunk_len, row_len), num_channels, row_len, SILU, BLOCK)
    out = row * num_chunks + chunk
    tl.store(SUM_DZ + out, sum_dz)
    tl.store(SUM_DZ_XHAT + out, sum_dz_xhat)


@triton.jit
def _group_norm_backward_dx_kernel(X, DY, DX, W, B, MEAN, RSTD, MEAN_WDZ, MEAN_WDZ_XHAT,
                                   num_channels, group_channels, row_len,
                                   SILU: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    group = row // group_channels
    _dx_tile(X, DY, DX, W, B, tl.load(MEAN + group), tl.load(RSTD + group), tl.load(MEAN_WDZ + group),
             tl.load(MEAN_WDZ_XHAT + group), row, offsets, offsets < row_len, num_channels, row_len, SILU)


# ----------------------------------------------------------------------------------------------------
# Launchers


class GroupNormBlocks(NamedTuple):
    block: int  # elements per tile
    chunk_tiles: int  # tiles a split reduction program handles (its split of a row)
    num_warps: int
    one_program_max: int = ONE_PROGRAM_MAX  # largest group (elements) that runs in one program


def default_group_norm_blocks(row_len: int) -> GroupNormBlocks:
    block = min(1024, triton.next_power_of_2(row_len))
    return GroupNormBlocks(block=block, chunk_tiles=8, num_warps=4 if block <= 512 else 8)


class GroupNormPlan(NamedTuple):
    """Everything about a launch that depends only on the shape: worked out once per shape (`plan`)."""
    batch: int
    channels: int
    group_channels: int
    rows: int  # batch * channels
    row_len: int
    groups: int  # batch * num_groups
    one_program: bool
    chunk_len: int  # split path: elements a reduction program handles, and their number per row
    num_chunks: int
    apply_grid: tuple  # split path: (rows, spatial blocks)
    blocks: GroupNormBlocks


@functools.lru_cache(maxsize=None)
def plan(shape: tuple, num_groups: int, blocks: GroupNormBlocks | None = None) -> GroupNormPlan:
    batch, channels = shape[:2]
    row_len = 1
    for size in shape[2:]:
        row_len *= size
    blocks = blocks or default_group_norm_blocks(row_len)
    group_channels = channels // num_groups
    chunk_len = blocks.block * blocks.chunk_tiles
    return GroupNormPlan(batch, channels, group_channels, batch * channels, row_len, batch * num_groups,
                         group_channels * row_len <= blocks.one_program_max, chunk_len,
                         triton.cdiv(row_len, chunk_len), (batch * channels, triton.cdiv(row_len, blocks.block)),
                         blocks)


def _group_norm_forward(x, weight, bias, eps, silu, p: GroupNormPlan):
    y = torch.empty_like(x)
    stats = torch.empty(2, p.groups, device=x.device, dtype=torch.float32)  # mean, 1/std
    tile = dict(SILU=silu, BLOCK=p.blocks.block, num_warps=p.blocks.num_warps)
    if p.one_program:
        _group_norm_one_program_forward_kernel[(p.groups,)](x, y, weight, bias, stats[0], stats[1], p.channels,
                                                            p.group_channels, p.row_len, eps, **tile)
        return y, stats
    partials = torch.empty(3, p.rows, p.num_chunks, device=x.device, dtype=torch.float32)  # count, mean, M2
    _group_norm_stats_kernel[(p.rows, p.num_chunks)](x, *partials, p.row_len, p.chunk_len, p.num_chunks,
                                                     BLOCK=p.blocks.block, num_warps=p.blocks.num_warps)
    parts = p.group_channels * p.num_chunks  # partials per group: its channels x chunks
    _group_norm_finalize_kernel[(p.groups,)](*partials, stats[0], stats[1], parts, eps,
                                             PARTS=triton.next_power_of_2(parts))
    _group_norm_forward_kernel[p.apply_grid](x, y, weight, bias, stats[0], stats[1], p.channels, p.group_channels,
                                             p.row_len, **tile)
    return y, stats


def _group_norm_backward(x, grad_y, weight, bias, stats, silu, p: GroupNormPlan):
    """dx, and (2, C) fp32 per-channel sums of dz * x_hat and of dz: dweight and dbias."""
    grad_x = torch.empty_like(x)
    mean, rstd = stats
    tile = dict(SILU=silu, BLOCK=p.blocks.block, num_warps=p.blocks.num_warps)
    if p.one_program:
        sums = torch.empty(2, p.rows, device=x.device, dtype=torch.float32)
        _group_norm_one_program_backward_kernel[(p.groups,)](x, grad_y, grad_x, weight, bias, mean, rstd, sums,
                                                             p.rows, p.channels, p.group_channels, p.row_len, **tile)
        return grad_x, sums.view(2, p.batch, p.channels).sum(1)
    partials = torch.empty(2, p.rows, p.num_chunks, device=x.device, dtype=torch.float32)  # dz * x_hat, dz
    _group_norm_backward_reduce_kernel[(p.rows, p.num_chunks)](
        x, grad_y, weight, bias, mean, rstd, partials[1], partials[0], p.channels, p.group_channels, p.row_len,
        p.chunk_len, p.num_chunks, **tile)
    sums = partials.sum(2).view(2, p.batch, p.channels)
    sum_dz_xhat, sum_dz = sums
    w = weight.float()
    group_len = p.group_channels * p.row_len
    mean_wdz = (w * sum_dz).view(p.groups, p.group_channels).sum(1) / group_len
    mean_wdz_xhat = (w * sum_dz_xhat).view(p.groups, p.group_channels).sum(1) / group_len
    _group_norm_backward_dx_kernel[p.apply_grid](
        x, grad_y, grad_x, weight, bias, mean, rstd, mean_wdz, mean_wdz_xhat, p.channels, p.group_channels,
        p.row_len, **tile)
    return grad_x, sums.sum(1)


class FusedGroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, silu, p: GroupNormPlan):
        with on_device(x):
            y, stats = _group_norm_forward(x, weight, bias, eps, silu, p)
        ctx.save_for_backward(x, weight, bias, stats)
        ctx.silu, ctx.plan = silu, p
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, bias, stats = ctx.saved_tensors
        with on_device(x):
            grad_x, grad_affine = _group_norm_backward(x, grad_y.contiguous(), weight, bias, stats, ctx.silu,
                                                       ctx.plan)
        grad_weight, grad_bias = grad_affine.to(weight.dtype)  # one cast for both
        return grad_x, grad_weight, grad_bias.to(bias.dtype), None, None, None


def fused_group_norm(x, num_groups, weight, bias, eps=1e-5, silu=False, blocks: GroupNormBlocks | None = None):
    """The Triton path of `group_norm`, on any device Triton can launch on (CUDA, or CPU when interpreted)."""
    x = x.contiguous()  # the kernels index rows of (sample, channel) in NC... order
    channels = x.shape[1]
    if weight is None:  # the affine is part of the fused kernel; identity parameters keep it one kernel
        weight = torch.ones(channels, device=x.device, dtype=x.dtype)
    if bias is None:
        bias = torch.zeros(channels, device=x.device, dtype=x.dtype)
    return FusedGroupNorm.apply(x, weight, bias, eps, silu, plan(x.shape, num_groups, blocks))


def _kernel_supports(x, num_groups) -> bool:
    return (x.dim() >= 3 and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and x.shape[1] % num_groups == 0 and x.numel() > 0)


def _bucket(x, num_groups, weight, bias, eps, silu) -> tuple:
    """Shape class: dtype, SiLU, elements per group and number of groups (each up to a power of two)."""
    groups = x.shape[0] * num_groups
    return dtype_name(x.dtype), silu, size_class(x.numel() // groups), size_class(groups)


GROUP_NORM = Op("group_norm", ours=fused_group_norm, theirs=group_norm_reference, bucket=_bucket)


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float = 1e-5, silu: bool = False) -> torch.Tensor:
    """F.group_norm(x, num_groups, weight, bias, eps), then SiLU when `silu`."""
    tensors = [t for t in (x, weight, bias) if t is not None]
    if _kernel_supports(x, num_groups) and GROUP_NORM.use_ours(tensors, x, num_groups, weight, bias, eps, silu):
        return fused_group_norm(x, num_groups, weight, bias, eps, silu)
    return group_norm_reference(x, num_groups, weight, bias, eps, silu)
