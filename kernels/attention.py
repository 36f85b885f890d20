"""Attention: softmax(q k^T / sqrt(d)) v over (batch, heads, length, head_dim) tensors.

The Triton kernel is FlashAttention-2 (Dao, 2023).

Forward. One program owns BLOCK_M query rows of one (batch, head) and streams the keys and values
past them BLOCK_N at a time, so the Lq x Lk score matrix never exists in memory (at L = 4096 it would be
64 MiB per head). Softmax needs each row's maximum and sum over *all* keys, which are only known at the
end; the online softmax keeps a running maximum m and running sum l and, whenever a new block raises the
maximum, rescales what was accumulated so far by exp(m_old - m_new). The result is exact, not an
approximation. Exponentials are taken base 2 (exp2 is one instruction) with log2(e) folded into the
score scale. The kernel also writes each row's logsumexp, lse = m + log(l): all the backward needs.

Backward. Instead of storing the probabilities P, the backward recomputes them block by block from q, k
and the saved lse (P = exp(q k^T * scale - lse)): a few more FLOPs buy O(L) memory instead of O(L^2).
With dP = dO v^T, the softmax gradient is dS = P * (dP - delta), where delta = rowsum(dO * O) is computed
once by a small preprocess kernel. Two kernels then avoid atomics: one program per key block
accumulates dK = scale * dS^T q and dV = P^T dO over all query blocks; one program per query block
accumulates dQ = scale * dS k over all key blocks.

Head dims. SD uses head dims 40, 80 and 160 (SD1) and 64 (SD2), but tl.arange and tl.dot need power-of-two
extents of at least 16. Rather than pad to the next power of two (64, 128 and 256 lanes: 60% wasted dot
work at 80 and 160), the kernels split the head dim into two power-of-two chunks, HEAD_A + HEAD_B
(`head_chunks`: 32 + 16, 64 + 16, 128 + 32; 64 stays one chunk): every product over the head dim is the
sum of two dots, every output over it two tiles. The lanes past the real head dim (40 of 48) read as zero,
add nothing, and are never stored. The tensors are used in place through their strides (no padded copy,
no .contiguous()), so transposed views of a (B, L, H, D) projection go straight in. Ragged lengths
(cross-attention's 77 text tokens) are masked the same way along the length axis; masked scores are -inf
so they get zero probability.

Causal masking (CLIP's text encoder) is supported, with the top-left alignment of
F.scaled_dot_product_attention(is_causal=True): query i sees keys j <= i.

Precision: inputs fp16, bf16 or fp32; every accumulation is fp32. For fp32 inputs the dots use IEEE
fp32 (not TF32), so results match the reference to fp32 rounding.
"""
import functools
import math
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.dispatch import Op, dtype_name, on_device, size_class

LOG2E = 1.4426950408889634


def attention_reference(q, k, v, causal: bool = False):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


# ----------------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _load_tile(base, rows, cols, stride_row, stride_col, num_rows, num_cols):
    """A (len(rows), len(cols)) tile; entries outside num_rows x num_cols read as zero."""
    mask = (rows[:, None] < num_rows) & (cols[None, :] < num_cols)
    return tl.load(base + rows[:, None] * stride_row + cols[None, :] * stride_col, mask=mask, other=0.0)


@triton.jit
def _store_tile(base, value, rows, cols, stride_row, stride_col, num_rows, num_cols):
    mask = (rows[:, None] < num_rows) & (cols[None, :] < num_cols)
    tl.store(base + rows[:, None] * stride_row + cols[None, :] * stride_col, value, mask=mask)


@triton.jit
def _visible(rows, cols, len_k, CAUSAL: tl.constexpr):
    """Which (query row, key column) pairs take part: real keys, and with CAUSAL only keys j <= i.
    rows and cols are 2-D, (M, 1) and (1, N) or transposed, and broadcast to the mask's shape."""
    mask = (cols < len_k) & (rows >= 0)
    if CAUSAL:
        mask = mask & (cols <= rows)
    return mask


@triton.jit
def _head_offset(pid_bh, num_heads, stride_b, stride_h):
    # int64: batch * stride_b overflows int32 for large video batches.
    return (pid_bh // num_heads).to(tl.int64) * stride_b + (pid_bh % num_heads).to(tl.int64) * stride_h


@triton.jit
def _attention_forward_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    num_heads, len_q, len_k, head_dim, qk_scale,
    CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_A: tl.constexpr, HEAD_B: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims_a = tl.arange(0, HEAD_A)
    q_base = Q + _head_offset(pid_bh, num_heads, stride_qb, stride_qh)
    k_base = K + _head_offset(pid_bh, num_heads, stride_kb, stride_kh)
    v_base = V + _head_offset(pid_bh, num_heads, stride_vb, stride_vh)
    q_a = _load_tile(q_base, rows, dims_a, stride_qm, stride_qd, len_q, head_dim)
    acc_a = tl.zeros([BLOCK_M, HEAD_A], tl.float32)
    if HEAD_B:
        dims_b = HEAD_A + tl.arange(0, HEAD_B)
        q_b = _load_tile(q_base, rows, dims_b, stride_qm, stride_qd, len_q, head_dim)
        acc_b = tl.zeros([BLOCK_M, HEAD_B], tl.float32)

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    end_n = len_k
    if CAUSAL:  # key blocks right of this query block's diagonal are fully masked: skip them
        end_n = tl.minimum(len_k, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, end_n, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k_t = _load_tile(k_base, dims_a, cols, stride_kd, stride_kn, head_dim, len_k)
        scores = tl.dot(q_a, k_t, input_precision=PRECISION)
        if HEAD_B:
            k_t = _load_tile(k_base, dims_b, cols, stride_kd, stride_kn, head_dim, len_k)
            scores += tl.dot(q_b, k_t, input_precision=PRECISION)
        scores = tl.where(_visible(rows[:, None], cols[None, :], len_k, CAUSAL), scores * qk_scale, float("-inf"))
        # Column 0 is visible to every row, so new_max is finite from the first block on.
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        p = tl.exp2(scores - new_max[:, None])
        rescale = tl.exp2(row_max - new_max)
        row_sum = row_sum * rescale + tl.sum(p, 1)
        p = p.to(V.dtype.element_ty)
        v = _load_tile(v_base, cols, dims_a, stride_vn, stride_vd, len_k, head_dim)
        acc_a = acc_a * rescale[:, None] + tl.dot(p, v, input_precision=PRECISION)
        if HEAD_B:
            v = _load_tile(v_base, cols, dims_b, stride_vn, stride_vd, len_k, head_dim)
            acc_b = acc_b * rescale[:, None] + tl.dot(p, v, input_precision=PRECISION)
        row_max = new_max

    o_base = O + _head_offset(pid_bh, num_heads, stride_ob, stride_oh)
    _store_tile(o_base, (acc_a / row_sum[:, None]).to(O.dtype.element_ty), rows, dims_a, stride_om, stride_od,
                len_q, head_dim)
    if HEAD_B:
        _store_tile(o_base, (acc_b / row_sum[:, None]).to(O.dtype.element_ty), rows, dims_b, stride_om, stride_od,
                    len_q, head_dim)
    # logsumexp in base 2, the unit the backward's exp2 works in.
    tl.store(LSE + pid_bh * len_q + rows, row_max + tl.log2(row_sum), mask=rows < len_q)


@triton.jit
def _attention_backward_delta_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    num_heads, len_q, head_dim,
    BLOCK_M: tl.constexpr, HEAD_A: tl.constexpr, HEAD_B: tl.constexpr,
):
    """delta_i = sum_d dO_id * O_id: the row term of the softmax gradient."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_base = O + _head_offset(pid_bh, num_heads, stride_ob, stride_oh)
    do_base = DO + _head_offset(pid_bh, num_heads, stride_dob, stride_doh)
    dims = tl.arange(0, HEAD_A)
    o = _load_tile(o_base, rows, dims, stride_om, stride_od, len_q, head_dim).to(tl.float32)
    do = _load_tile(do_base, rows, dims, stride_dom, stride_dod, len_q, head_dim).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HEAD_B:
        dims = HEAD_A + tl.arange(0, HEAD_B)
        o = _load_tile(o_base, rows, dims, stride_om, stride_od, len_q, head_dim).to(tl.float32)
        do = _load_tile(do_base, rows, dims, stride_dom, stride_dod, len_q, head_dim).to(tl.float32)
        delta += tl.sum(o * do, 1)
    tl.store(DELTA + pid_bh * len_q + rows, delta, mask=rows < len_q)


@triton.jit
def _attention_backward_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    num_heads, len_q, len_k, head_dim, qk_scale, sm_scale,
    CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_A: tl.constexpr, HEAD_B: tl.constexpr,
):
    """One program per key block: dK and dV summed over every query block that sees it."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims_a = tl.arange(0, HEAD_A)
    k_base = K + _head_offset(pid_bh, num_heads, stride_kb, stride_kh)
    v_base = V + _head_offset(pid_bh, num_heads, stride_vb, stride_vh)
    k_a = _load_tile(k_base, cols, dims_a, stride_kn, stride_kd, len_k, head_dim)
    v_a = _load_tile(v_base, cols, dims_a, stride_vn, stride_vd, len_k, head_dim)
    dk_a = tl.zeros([BLOCK_N, HEAD_A], tl.float32)
    dv_a = tl.zeros([BLOCK_N, HEAD_A], tl.float32)
    if HEAD_B:
        dims_b = HEAD_A + tl.arange(0, HEAD_B)
        k_b = _load_tile(k_base, cols, dims_b, stride_kn, stride_kd, len_k, head_dim)
        v_b = _load_tile(v_base, cols, dims_b, stride_vn, stride_vd, len_k, head_dim)
        dk_b = tl.zeros([BLOCK_N, HEAD_B], tl.float32)
        dv_b = tl.zeros([BLOCK_N, HEAD_B], tl.float32)
    q_base = Q + _head_offset(pid_bh, num_heads, stride_qb, stride_qh)
    do_base = DO + _head_offset(pid_bh, num_heads, stride_dob, stride_doh)
    lse_base = LSE + pid_bh * len_q
    delta_base = DELTA + pid_bh * len_q

    start_m = 0
    if CAUSAL:  # query rows above this key block's diagonal never see it
        start_m = (pid_n * BLOCK_N) // BLOCK_M * BLOCK_M
    for block_start in range(start_m, len_q, BLOCK_M):
        rows = block_start + tl.arange(0, BLOCK_M)
        lse = tl.load(lse_base + rows, mask=rows < len_q, other=0.0)
        delta = tl.load(delta_base + rows, mask=rows < len_q, other=0.0)
        # Work transposed, (keys, queries), so every dot below takes its operands as loaded.
        q_a = _load_tile(q_base, rows, dims_a, stride_qm, stride_qd, len_q, head_dim)
        do_a = _load_tile(do_base, rows, dims_a, stride_dom, stride_dod, len_q, head_dim)
        scores_t = tl.dot(k_a, tl.trans(q_a), input_precision=PRECISION)
        dp_t = tl.dot(v_a, tl.trans(do_a), input_precision=PRECISION)
        if HEAD_B:
            q_b = _load_tile(q_base, rows, dims_b, stride_qm, stride_qd, len_q, head_dim)
            do_b = _load_tile(do_base, rows, dims_b, stride_dom, stride_dod, len_q, head_dim)
            scores_t += tl.dot(k_b, tl.trans(q_b), input_precision=PRECISION)
            dp_t += tl.dot(v_b, tl.trans(do_b), input_precision=PRECISION)
        visible_t = _visible(rows[None, :], cols[:, None], len_k, CAUSAL) & (rows[None, :] < len_q)
        p_t = tl.where(visible_t, tl.exp2(scores_t * qk_scale - lse[None, :]), 0.0)
        ds_t = (p_t * (dp_t - delta[None, :])).to(Q.dtype.element_ty)
        p_t = p_t.to(DO.dtype.element_ty)
        dv_a += tl.dot(p_t, do_a, input_precision=PRECISION)
        dk_a += tl.dot(ds_t, q_a, input_precision=PRECISION)
        if HEAD_B:
            dv_b += tl.dot(p_t, do_b, input_precision=PRECISION)
            dk_b += tl.dot(ds_t, q_b, input_precision=PRECISION)

    dk_base = DK + _head_offset(pid_bh, num_heads, stride_dkb, stride_dkh)
    dv_base = DV + _head_offset(pid_bh, num_heads, stride_dvb, stride_dvh)
    _store_tile(dk_base, (dk_a * sm_scale).to(DK.dtype.element_ty), cols, dims_a, stride_dkn, stride_dkd, len_k,
                head_dim)
    _store_tile(dv_base, dv_a.to(DV.dtype.element_ty), cols, dims_a, stride_dvn, stride_dvd, len_k, head_dim)
    if HEAD_B:
        _store_tile(dk_base, (dk_b * sm_scale).to(DK.dtype.element_ty), cols, dims_b, stride_dkn, stride_dkd, len_k,
                    head_dim)
        _store_tile(dv_base, dv_b.to(DV.dtype.element_ty), cols, dims_b, stride_dvn, stride_dvd, len_k, head_dim)


@triton.jit
def _attention_backward_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    num_heads, len_q, len_k, head_dim, qk_scale, sm_scale,
    CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_A: tl.constexpr, HEAD_B: tl.constexpr,
):
    """One program per query block: dQ summed over every key block it sees."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims_a = tl.arange(0, HEAD_A)
    q_base = Q + _head_offset(pid_bh, num_heads, stride_qb, stride_qh)
    do_base = DO + _head_offset(pid_bh, num_heads, stride_dob, stride_doh)
    q_a = _load_tile(q_base, rows, dims_a, stride_qm, stride_qd, len_q, head_dim)
    do_a = _load_tile(do_base, rows, dims_a, stride_dom, stride_dod, len_q, head_dim)
    dq_a = tl.zeros([BLOCK_M, HEAD_A], tl.float32)
    if HEAD_B:
        dims_b = HEAD_A + tl.arange(0, HEAD_B)
        q_b = _load_tile(q_base, rows, dims_b, stride_qm, stride_qd, len_q, head_dim)
        do_b = _load_tile(do_base, rows, dims_b, stride_dom, stride_dod, len_q, head_dim)
        dq_b = tl.zeros([BLOCK_M, HEAD_B], tl.float32)
    lse = tl.load(LSE + pid_bh * len_q + rows, mask=rows < len_q, other=0.0)
    delta = tl.load(DELTA + pid_bh * len_q + rows, mask=rows < len_q, other=0.0)
    k_base = K + _head_offset(pid_bh, num_heads, stride_kb, stride_kh)
    v_base = V + _head_offset(pid_bh, num_heads, stride_vb, stride_vh)

    end_n = len_k
    if CAUSAL:
        end_n = tl.minimum(len_k, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, end_n, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k_a = _load_tile(k_base, cols, dims_a, stride_kn, stride_kd, len_k, head_dim)
        v_t = _load_tile(v_base, dims_a, cols, stride_vd, stride_vn, head_dim, len_k)
        scores = tl.dot(q_a, tl.trans(k_a), input_precision=PRECISION)
        dp = tl.dot(do_a, v_t, input_precision=PRECISION)
        if HEAD_B:
            k_b = _load_tile(k_base, cols, dims_b, stride_kn, stride_kd, len_k, head_dim)
            v_t = _load_tile(v_base, dims_b, cols, stride_vd, stride_vn, head_dim, len_k)
            scores += tl.dot(q_b, tl.trans(k_b), input_precision=PRECISION)
            dp += tl.dot(do_b, v_t, input_precision=PRECISION)
        visible = _visible(rows[:, None], cols[None, :], len_k, CAUSAL) & (rows[:, None] < len_q)
        p = tl.where(visible, tl.exp2(scores * qk_scale - lse[:, None]), 0.0)
        ds = (p * (dp - delta[:, None])).to(K.dtype.element_ty)
        dq_a += tl.dot(ds, k_a, input_precision=PRECISION)
        if HEAD_B:
            dq_b += tl.dot(ds, k_b, input_precision=PRECISION)

    dq_base = DQ + _head_offset(pid_bh, num_heads, stride_dqb, stride_dqh)
    _store_tile(dq_base, (dq_a * sm_scale).to(DQ.dtype.element_ty), rows, dims_a, stride_dqm, stride_dqd, len_q,
                head_dim)
    if HEAD_B:
        _store_tile(dq_base, (dq_b * sm_scale).to(DQ.dtype.element_ty), rows, dims_b, stride_dqm, stride_dqd, len_q,
                    head_dim)


# ----------------------------------------------------------------------------------------------------
# Launchers


class AttentionBlocks(NamedTuple):
    """Tile sizes and launch settings of one attention kernel."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def triton_config(self) -> triton.Config:
        return triton.Config({"BLOCK_M": self.block_m, "BLOCK_N": self.block_n}, num_warps=self.num_warps,
                             num_stages=self.num_stages)


class AttentionConfig(NamedTuple):
    forward: AttentionBlocks
    backward: AttentionBlocks


@functools.lru_cache(maxsize=None)
def head_chunks(head_dim: int) -> tuple[int, int]:
    """The head dim as HEAD_A + HEAD_B lanes, each a power of two >= 16 (tl.arange and tl.dot need that)
    or HEAD_B = 0: 40 -> 32 + 16, 80 -> 64 + 16, 160 -> 128 + 32, 64 -> 64 + 0. One padded power of two
    would compute 64, 128 and 256 lanes for SD1's 40, 80 and 160; two chunks cost one more dot each."""
    whole = max(16, triton.next_power_of_2(head_dim))
    head_a = max(16, whole // 2)
    head_b = 0 if head_dim <= head_a else max(16, triton.next_power_of_2(head_dim - head_a))
    return (whole, 0) if head_b == 0 or head_a + head_b >= whole else (head_a, head_b)


def padded_head_dim(head_dim: int) -> int:
    """Head-dim lanes the kernels compute."""
    return sum(head_chunks(head_dim))


@functools.lru_cache(maxsize=None)
def default_attention_config(head_dim: int, dtype: torch.dtype) -> AttentionConfig:
    """Hand-picked tiles: what the interpreter runs, and one of the candidates the GPU autotunes over.
    Wider heads get smaller tiles and more warps, so the fp32 accumulators (tile x head dim) stay around
    64 registers per thread and the tiles fit an A100/H100's shared memory.
    """
    padded = padded_head_dim(head_dim)
    if padded <= 64:
        forward, backward = AttentionBlocks(128, 64, 4, 3), AttentionBlocks(64, 64, 4, 2)
    elif padded <= 128:
        forward, backward = AttentionBlocks(128, 32, 8, 2), AttentionBlocks(64, 32, 8, 2)
    else:
        forward, backward = AttentionBlocks(64, 32, 8, 2), AttentionBlocks(32, 32, 8, 1)
    if dtype == torch.float32:  # fp32 tiles take twice the SRAM: halve the query tile, no pipelining
        forward = forward._replace(block_m=max(16, forward.block_m // 2), num_stages=1)
        backward = backward._replace(num_stages=1)
    return AttentionConfig(forward, backward)


# Candidates the autotuner times on the GPU, per kernel (the backward's two kernels are tuned on their own).
# Forward: from the space Triton's fused-attention tutorial tunes over on an H100 (query tiles 64/128, key
# tiles 32-128, 3-4 pipeline stages, 8 warps only for 128x128 tiles), thinned so that tuning one head dim
# compiles about 20 kernels in all. dK/dV (one program per key block) and dQ (one per query block): the
# tutorial's Hopper tiles (32 queries x 128 keys for dK/dV, the transpose for dQ, 4 warps, 5 stages) and
# smaller ones for wide heads.
FORWARD_TILES = [AttentionBlocks(*t) for t in ((128, 64, 4, 3), (128, 64, 4, 4), (128, 32, 4, 3), (128, 128, 8, 3),
                                               (64, 64, 4, 3), (64, 64, 4, 4), (64, 32, 4, 3), (64, 128, 4, 3))]
DKDV_TILES = [AttentionBlocks(*t) for t in ((32, 128, 4, 5), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 2),
                                            (32, 32, 4, 2))]
DQ_TILES = [AttentionBlocks(*t) for t in ((128, 32, 4, 5), (128, 64, 8, 2), (64, 32, 4, 3), (64, 64, 4, 2),
                                          (32, 32, 4, 2))]
MAX_FP32_PER_THREAD = 192  # accumulators + one score tile, fp32 values per thread: beyond, registers spill
MAX_SHARED_BYTES = 160 * 1024  # pipelined tiles; an H100 has 227 KiB a block, the rest for the compiler


def _fits(blocks: AttentionBlocks, head_lanes: int, element_size: int, kernel: str) -> bool:
    """A rough resource check, so the autotuner compiles only candidates that can run well."""
    kept, streamed = {"forward": (blocks.block_m, blocks.block_n), "dkdv": (2 * blocks.block_n, blocks.block_m),
                      "dq": (blocks.block_m, blocks.block_n)}[kernel]
    registers = (kept * head_lanes + blocks.block_m * blocks.block_n) / (32 * blocks.num_warps)
    shared = blocks.num_stages * 2 * streamed * head_lanes * element_size
    return registers <= MAX_FP32_PER_THREAD and shared <= MAX_SHARED_BYTES


TILES = {"forward": FORWARD_TILES, "dkdv": DKDV_TILES, "dq": DQ_TILES}
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"  # as @triton.jit decided when this module loaded


def candidate_tiles(kernel: str, head_dim: int, dtype: torch.dtype) -> list[AttentionBlocks]:
    """The tiles the autotuner times for one kernel ("forward", "dkdv" or "dq"): the candidates that fit
    this head dim and dtype, and the hand-picked default. fp32 (tests, CLIP) keeps the safe default."""
    default = default_attention_config(head_dim, dtype)
    default = default.forward if kernel == "forward" else default.backward
    if dtype == torch.float32:
        return [default]
    element_size = torch.empty((), dtype=dtype).element_size()
    fit = [t for t in TILES[kernel] if _fits(t, padded_head_dim(head_dim), element_size, kernel)]
    return list(dict.fromkeys(fit + [default]))


def _tuned(kernel, name: str):
    def prune(configs, named_args, **kwargs):
        return [t.triton_config() for t in candidate_tiles(name, named_args["head_dim"], named_args["Q"].dtype)]

    return triton.autotune(configs=[t.triton_config() for t in TILES[name]],
                           key=["len_q", "len_k", "head_dim", "CAUSAL"],
                           prune_configs_by={"early_config_prune": prune}, cache_results=True)(kernel)


_forward_tuned = _tuned(_attention_forward_kernel, "forward")
_dkdv_tuned = _tuned(_attention_backward_dkdv_kernel, "dkdv")
_dq_tuned = _tuned(_attention_backward_dq_kernel, "dq")


def _launch(kernel, tuned, grid, blocks: AttentionBlocks | None, *args, **meta):
    """kernel with the given tiles, or its autotuned version when blocks is None. grid(BLOCK_M, BLOCK_N)."""
    if blocks is None:
        tuned[lambda m: grid(m["BLOCK_M"], m["BLOCK_N"])](*args, **meta)
    else:
        kernel[grid(blocks.block_m, blocks.block_n)](*args, **meta, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n,
                                                     num_warps=blocks.num_warps, num_stages=blocks.num_stages)


@functools.lru_cache(maxsize=None)
def _head_meta(head_dim: int) -> dict:  # read-only: passed on as keyword arguments
    head_a, head_b = head_chunks(head_dim)
    return dict(HEAD_A=head_a, HEAD_B=head_b)


def _dot_precision(dtype: torch.dtype) -> str:
    # TF32 would round fp32 inputs to 10 mantissa bits; for 16-bit inputs the setting changes nothing.
    return "ieee" if dtype == torch.float32 else "tf32"


def _attention_forward(q, k, v, causal: bool, blocks: AttentionBlocks | None):
    batch, heads, len_q, head_dim = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(batch * heads, len_q, device=q.device, dtype=torch.float32)
    _launch(_attention_forward_kernel, _forward_tuned, lambda m, n: (triton.cdiv(len_q, m), batch * heads), blocks,
            q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            heads, len_q, k.shape[2], head_dim, LOG2E / math.sqrt(head_dim),
            CAUSAL=causal, PRECISION=_dot_precision(q.dtype), **_head_meta(head_dim))
    return out, lse


DELTA_BLOCK_M = 64


def _attention_backward(q, k, v, out, lse, grad_out, causal: bool, blocks: AttentionBlocks | None):
    batch, heads, len_q, head_dim = q.shape
    len_k = k.shape[2]
    sm_scale = 1.0 / math.sqrt(head_dim)
    delta = torch.empty_like(lse)
    _attention_backward_delta_kernel[(triton.cdiv(len_q, DELTA_BLOCK_M), batch * heads)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), heads, len_q, head_dim,
        BLOCK_M=DELTA_BLOCK_M, num_warps=4, **_head_meta(head_dim),
    )
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    meta = dict(CAUSAL=causal, PRECISION=_dot_precision(q.dtype), **_head_meta(head_dim))
    _launch(_attention_backward_dkdv_kernel, _dkdv_tuned, lambda m, n: (triton.cdiv(len_k, n), batch * heads),
            blocks, q, k, v, grad_out, lse, delta, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(),
            heads, len_q, len_k, head_dim, LOG2E * sm_scale, sm_scale, **meta)
    _launch(_attention_backward_dq_kernel, _dq_tuned, lambda m, n: (triton.cdiv(len_q, m), batch * heads),
            blocks, q, k, v, grad_out, lse, delta, dq,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(),
            heads, len_q, len_k, head_dim, LOG2E * sm_scale, sm_scale, **meta)
    return dq, dk, dv


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool, config: AttentionConfig | None):
        with on_device(q):
            out, lse = _attention_forward(q, k, v, causal, config and config.forward)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.config = causal, config
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        with on_device(q):
            dq, dk, dv = _attention_backward(q, k, v, out, lse, grad_out, ctx.causal,
                                             ctx.config and ctx.config.backward)
        return dq, dk, dv, None, None


def flash_attention(q, k, v, causal: bool = False, config: AttentionConfig | None = None) -> torch.Tensor:
    """The Triton path of `attention`, on any device Triton can launch on (CUDA, or CPU when interpreted).
    config None: tiles autotuned per shape on the GPU (the hand-picked defaults when interpreted)."""
    if config is None and INTERPRETED:  # the interpreter cannot time configs (and each costs seconds)
        config = default_attention_config(q.shape[-1], q.dtype)
    return FlashAttention.apply(q, k, v, causal, config)


def _kernel_supports(q, k, v) -> bool:
    """Shapes and dtypes the kernel handles; anything else (never used by SD) takes the reference."""
    return (q.dim() == k.dim() == v.dim() == 4 and q.dtype == k.dtype == v.dtype
            and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and q.shape[:2] == k.shape[:2] == v.shape[:2] and k.shape[2] == v.shape[2]
            and q.shape[3] == k.shape[3] == v.shape[3] <= 256 and q.numel() > 0 and k.numel() > 0)


def _bucket(q, k, v, causal) -> tuple:
    """Shape class: dtype, causal, head dim, and query/key lengths and batch x heads up to powers of two."""
    batch, heads, len_q, head_dim = q.shape
    return dtype_name(q.dtype), causal, head_dim, size_class(len_q), size_class(k.shape[2]), size_class(batch * heads)


ATTENTION = Op("attention", ours=flash_attention, theirs=attention_reference, bucket=_bucket)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """q: (B, H, Lq, D), k and v: (B, H, Lk, D) -> (B, H, Lq, D). Scale 1/sqrt(D)."""
    if _kernel_supports(q, k, v) and ATTENTION.use_ours((q, k, v), q, k, v, causal):
        return flash_attention(q, k, v, causal)
    return attention_reference(q, k, v, causal)
