"""The Stable Diffusion UNet (SD 1.x and 2.x), written to mirror the original LDM checkpoint.

Module and parameter names are those of the single-file checkpoint after stripping
`model.diffusion_model.`, so an original checkpoint loads with a plain strict `load_state_dict`,
and a diffusers-layout one after the pure key rename `diffusers_to_ldm_unet`.

The network, for SD1 (model_channels 320, channel_mult 1,2,4,4, two ResBlocks per level):

    input_blocks   conv_in, then per level: 2 x (ResBlock [+ SpatialTransformer]), Downsample
                   between levels; every block's output is kept for a skip connection (12 for SD)
    middle_block   ResBlock, SpatialTransformer, ResBlock
    output_blocks  per level, deepest first: 3 x (ResBlock on [h, skip] [+ SpatialTransformer]),
                   Upsample after the last one of every level but the top
    out            GroupNorm, SiLU, conv

The timestep enters every ResBlock (sinusoidal features -> `time_embed` MLP), the text context
every SpatialTransformer's cross-attention. A ControlNet (model/controlnet.py) is a trainable copy of
`time_embed`, `input_blocks` and `middle_block` built by the same functions; its outputs enter
`UNet.forward` as `down_residuals` (added to the skips) and `mid_residual`.

Every attention runs through `kernels.attention`, every GroupNorm through `kernels.group_norm`
(with the SiLU that follows it fused in).
"""
import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kernels import attention
from model.config import UNetConfig
from model.layers import GroupNorm, Upsample

# LDM's SpatialTransformer normalises with eps=1e-6; the ResBlocks use config.norm_eps.
TRANSFORMER_NORM_EPS = 1e-6


# ----------------------------------------------------------------------------- layers

def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) timesteps -> (B, dim) float32 features [cos(t f_i), sin(t f_i)], f_i = max_period^(-i / (dim/2)).

    This is LDM's layout (cosines first), the same as diffusers' Timesteps(flip_sin_to_cos=True,
    downscale_freq_shift=0).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    args = timesteps.float()[:, None] * torch.exp(exponent)[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, plus the projected time embedding, GroupNorm-SiLU-conv, plus a skip."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, config: UNetConfig):
        super().__init__()
        groups, eps = config.norm_groups, config.norm_eps
        # Identity placeholders stand where LDM has SiLU (fused into the norm) and Dropout (p=0 in SD).
        self.in_layers = nn.Sequential(
            GroupNorm(groups, in_channels, eps, silu=True), nn.Identity(),
            nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm(groups, out_channels, eps, silu=True), nn.Identity(), nn.Identity(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if in_channels == out_channels
                                else nn.Conv2d(in_channels, out_channels, 1))

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention of x (B, L, query_dim) to context (B, Lc, context_dim); self-attention without context."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim))  # LDM: (Linear, Dropout) -> key to_out.0

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = (self._split_heads(t) for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = attention(q, k, v)                                   # (B, heads, L, head_dim)
        return self.to_out(out.transpose(1, 2).flatten(2))

    def _split_heads(self, t):
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)   # (B, L, inner) -> (B, heads, L, head_dim)


class GEGLU(nn.Module):
    """Linear to twice the width, then value * GELU(gate)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # LDM: (GEGLU, Dropout, Linear) -> keys net.0.proj and net.2
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the context, and GEGLU feed-forward, each residual."""

    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, head_dim)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, head_dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer blocks over the H*W positions of a feature map, as a residual around GroupNorm + proj_in.

    SD1 projects with 1x1 convs before flattening, SD2 (`use_linear_proj`) with Linears after it.
    """

    def __init__(self, channels: int, config: UNetConfig):
        super().__init__()
        heads, head_dim = config.heads_for(channels)
        inner = heads * head_dim
        self.use_linear_proj = config.use_linear_proj
        self.norm = GroupNorm(config.norm_groups, channels, TRANSFORMER_NORM_EPS)
        proj = nn.Linear if config.use_linear_proj else (lambda i, o: nn.Conv2d(i, o, 1))
        self.proj_in = proj(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, config.context_dim, heads, head_dim)
            for _ in range(config.transformer_depth))
        self.proj_out = proj(inner, channels)

    def forward(self, x, context):
        _, _, height, width = x.shape
        h = self.norm(x)
        if self.use_linear_proj:
            h = self.proj_in(h.flatten(2).transpose(1, 2))       # (B, C, H, W) -> (B, H*W, inner)
        else:
            h = self.proj_in(h).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear_proj:
            h = self.proj_out(h).transpose(1, 2).unflatten(2, (height, width))
        else:
            h = self.proj_out(h.transpose(1, 2).unflatten(2, (height, width)))
        return x + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class TimestepEmbedSequential(nn.Sequential):
    """One entry of input_blocks / middle_block / output_blocks: hands each layer what it consumes."""

    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def run_block(block: TimestepEmbedSequential, h, emb, context, use_checkpoint: bool):
    """block(h, emb, context), recomputed in the backward pass instead of stored when `use_checkpoint`."""
    if use_checkpoint:
        return checkpoint(block, h, emb, context, use_reentrant=False)
    return block(h, emb, context)


# ----------------------------------------------------------------------------- builders (shared with the ControlNet)

def time_embed_channels(config: UNetConfig) -> int:
    return 4 * config.model_channels


def build_time_embed(config: UNetConfig) -> nn.Sequential:
    """The MLP from sinusoidal timestep features to the embedding every ResBlock receives."""
    dim = time_embed_channels(config)
    return nn.Sequential(nn.Linear(config.model_channels, dim), nn.SiLU(), nn.Linear(dim, dim))


def _transformer_at(level: int, channels: int, config: UNetConfig) -> list[nn.Module]:
    """[SpatialTransformer] on the levels that carry attention, [] elsewhere."""
    return [SpatialTransformer(channels, config)] if level in config.attention_levels else []


def build_input_blocks(config: UNetConfig) -> tuple[nn.ModuleList, list[int]]:
    """The encoder half; returns the blocks and the channel count of each block's output (one skip each)."""
    emb = time_embed_channels(config)
    ch = config.model_channels
    blocks = [TimestepEmbedSequential(nn.Conv2d(config.in_channels, ch, 3, padding=1))]
    skip_channels = [ch]
    for level, mult in enumerate(config.channel_mult):
        out = mult * config.model_channels
        for _ in range(config.num_res_blocks):
            layers = [ResBlock(ch, out, emb, config), *_transformer_at(level, out, config)]
            blocks.append(TimestepEmbedSequential(*layers))
            ch = out
            skip_channels.append(ch)
        if level != len(config.channel_mult) - 1:
            blocks.append(TimestepEmbedSequential(Downsample(ch)))
            skip_channels.append(ch)
    return nn.ModuleList(blocks), skip_channels


def build_middle_block(config: UNetConfig) -> TimestepEmbedSequential:
    ch = config.channel_mult[-1] * config.model_channels
    emb = time_embed_channels(config)
    return TimestepEmbedSequential(ResBlock(ch, ch, emb, config), SpatialTransformer(ch, config),
                                   ResBlock(ch, ch, emb, config))


def build_output_blocks(config: UNetConfig, skip_channels: Sequence[int]) -> nn.ModuleList:
    """The decoder half: each block eats one skip (last stored, first eaten)."""
    emb = time_embed_channels(config)
    skips = list(skip_channels)
    ch = config.channel_mult[-1] * config.model_channels
    blocks = []
    for level in reversed(range(len(config.channel_mult))):
        out = config.channel_mult[level] * config.model_channels
        for i in range(config.num_res_blocks + 1):
            layers = [ResBlock(ch + skips.pop(), out, emb, config), *_transformer_at(level, out, config)]
            ch = out
            if level > 0 and i == config.num_res_blocks:
                layers.append(Upsample(ch))
            blocks.append(TimestepEmbedSequential(*layers))
    return nn.ModuleList(blocks)


# ----------------------------------------------------------------------------- the UNet

class UNet(nn.Module):
    """Noisy latent x (B, in_channels, H, W), timesteps, text context (B, L, context_dim) -> (B, out_channels, H, W).

    Set `gradient_checkpointing = True` to recompute each block in the backward pass rather than keep
    its activations (it acts only while autograd records).
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        self.time_embed = build_time_embed(config)
        self.input_blocks, skip_channels = build_input_blocks(config)
        self.middle_block = build_middle_block(config)
        self.output_blocks = build_output_blocks(config, skip_channels)
        ch = config.model_channels
        # LDM: (GroupNorm, SiLU, conv) -> keys out.0 and out.2; the SiLU is fused into the norm.
        self.out = nn.Sequential(GroupNorm(config.norm_groups, ch, config.norm_eps, silu=True), nn.Identity(),
                                 nn.Conv2d(ch, config.out_channels, 3, padding=1))

    def forward(self, x, timesteps, context, down_residuals: Sequence[torch.Tensor] | None = None,
                mid_residual: torch.Tensor | None = None):
        """`down_residuals` (one per input block) are added to the stored skips, `mid_residual` to the
        middle block's output: diffusers' down/mid_block_additional_residual(s), fed by a ControlNet."""
        self._check_inputs(x, down_residuals)
        emb = self.time_embed(timestep_features(timesteps, x, self.config))
        use_checkpoint = self.gradient_checkpointing and torch.is_grad_enabled()

        h, skips = x, []
        for block in self.input_blocks:
            h = run_block(block, h, emb, context, use_checkpoint)
            skips.append(h)
        h = run_block(self.middle_block, h, emb, context, use_checkpoint)

        if down_residuals is not None:
            skips = [s + r for s, r in zip(skips, down_residuals)]
        if mid_residual is not None:
            h = h + mid_residual
        for block in self.output_blocks:
            h = run_block(block, torch.cat([h, skips.pop()], dim=1), emb, context, use_checkpoint)
        return self.out(h)

    def _check_inputs(self, x, down_residuals):
        factor = 2 ** (len(self.config.channel_mult) - 1)
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"UNet: latent size {tuple(x.shape[-2:])} must be a multiple of {factor} "
                             f"(it is halved {factor.bit_length() - 1} times)")
        if down_residuals is not None and len(down_residuals) != len(self.input_blocks):
            raise ValueError(f"UNet: got {len(down_residuals)} down_residuals, expected one per skip "
                             f"connection ({len(self.input_blocks)})")


def timestep_features(timesteps, x: torch.Tensor, config: UNetConfig) -> torch.Tensor:
    """time_embed's input: sinusoidal features of `timesteps` for the batch of x, in x's dtype."""
    return timestep_embedding(batch_timesteps(timesteps, x), config.model_channels).to(x.dtype)


def batch_timesteps(timesteps, x: torch.Tensor) -> torch.Tensor:
    """A Python number, a 0-d, (1,) or (B,) tensor -> a (B,) tensor on x's device."""
    t = torch.as_tensor(timesteps, device=x.device)
    if t.ndim > 1 or t.numel() not in (1, x.shape[0]):
        raise ValueError(f"UNet: timesteps of shape {tuple(t.shape)} do not fit a batch of {x.shape[0]}")
    return t.reshape(-1).expand(x.shape[0])


# ----------------------------------------------------------------------------- diffusers layout

_RESNET_RENAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                   "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def diffusers_to_ldm_prefixes(config: UNetConfig) -> dict[str, str]:
    """diffusers module path -> LDM module path, for every module whose name differs."""
    table = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}

    def resnet(diffusers: str, ldm: str):
        table.update({f"{diffusers}.{d}": f"{ldm}.{o}" for d, o in _RESNET_RENAMES.items()})

    levels, per_level = len(config.channel_mult), config.num_res_blocks
    for level in range(levels):                           # input block 0 is conv_in, then per_level + 1 per level
        for j in range(per_level):
            index = 1 + level * (per_level + 1) + j
            resnet(f"down_blocks.{level}.resnets.{j}", f"input_blocks.{index}.0")
            table[f"down_blocks.{level}.attentions.{j}"] = f"input_blocks.{index}.1"
        if level < levels - 1:
            table[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{(level + 1) * (per_level + 1)}.0.op"

    resnet("mid_block.resnets.0", "middle_block.0")
    table["mid_block.attentions.0"] = "middle_block.1"
    resnet("mid_block.resnets.1", "middle_block.2")

    for up in range(levels):                              # up_blocks.0 is the deepest level
        for j in range(per_level + 1):
            index = up * (per_level + 1) + j
            resnet(f"up_blocks.{up}.resnets.{j}", f"output_blocks.{index}.0")
            table[f"up_blocks.{up}.attentions.{j}"] = f"output_blocks.{index}.1"
        if up < levels - 1:                               # the last block of a level upsamples, after its transformer
            slot = 2 if (levels - 1 - up) in config.attention_levels else 1
            table[f"up_blocks.{up}.upsamplers.0.conv"] = f"output_blocks.{index}.{slot}.conv"
    return table


def diffusers_to_ldm_unet(state_dict: dict, config: UNetConfig) -> dict:
    """Rename a diffusers UNet2DConditionModel state dict to our (LDM) keys; the tensors are not copied.

    Inside the transformers the two layouts share names. A key with no counterpart passes through
    unchanged, so the strict load that follows names it.
    """
    table = diffusers_to_ldm_prefixes(config)
    return {rename_key(key, table): tensor for key, tensor in state_dict.items()}


def rename_key(key: str, table: dict[str, str]) -> str:
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):                # longest module path first
        prefix = ".".join(parts[:n])
        if prefix in table:
            return ".".join([table[prefix], *parts[n:]])
    return key
