"""Attention: softmax(q k^T / sqrt(d)) v over (batch, heads, length, head_dim) tensors."""
import torch
import torch.nn.functional as F

from kernels.dispatch import use_triton


def attention_reference(q, k, v, causal: bool = False):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """q: (B, H, Lq, D), k and v: (B, H, Lk, D) -> (B, H, Lq, D). Scale 1/sqrt(D)."""
    if use_triton(q, k, v):
        pass  # TODO(kernels issue): Triton flash attention
    return attention_reference(q, k, v, causal)
