"""The Stable Diffusion autoencoder (LDM's AutoencoderKL): images <-> 8x smaller latents.

Module and parameter names mirror the original single-file checkpoint: `first_stage_model.X`
there is `X` here, so loading is a prefix strip and `load_state_dict(strict=True)`.
`diffusers_to_ldm_vae` renames a diffusers-layout VAE into the same names.

Latent scaling: `encode`/`decode` work on raw latents. The UNet sees latents multiplied by
`config.scale_factor` (0.18215 for SD1/SD2); `encode_latents`/`decode_latents` apply it.
"""
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from kernels import attention
from model.config import VAEConfig
from model.layers import GroupNorm, Upsample


def _norm(channels: int, config: VAEConfig, silu: bool = False) -> GroupNorm:
    return GroupNorm(config.norm_groups, channels, config.norm_eps, silu)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus a residual (1x1 `nin_shortcut` when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, config: VAEConfig):
        super().__init__()
        self.norm1 = _norm(in_channels, config, silu=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, config, silu=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = self.conv1(self.norm1(x))
        h = self.conv2(self.norm2(h))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions; q/k/v/proj_out are 1x1 convs as in LDM."""

    def __init__(self, channels: int, config: VAEConfig):
        super().__init__()
        self.norm = _norm(channels, config)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        normed = self.norm(x)

        def tokens(conv):  # (B, C, H, W) -> (B, heads=1, H*W, C)
            return conv(normed).flatten(2).transpose(1, 2).unsqueeze(1)

        out = attention(tokens(self.q), tokens(self.k), tokens(self.v))
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        # LDM pads only right and bottom (not 1 on every side): the weights were trained this way.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class MidBlock(nn.Module):
    """block_1 -> attn_1 -> block_2 at the lowest resolution (the only attention in the VAE)."""

    def __init__(self, channels: int, config: VAEConfig):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, config)
        self.attn_1 = AttnBlock(channels, config)
        self.block_2 = ResnetBlock(channels, channels, config)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> moments (B, 2*z_channels, H/f, W/f) with f = 2**(levels-1)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        self.conv_in = nn.Conv2d(config.in_channels, config.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = config.ch
        for level, width in enumerate(widths):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(config.num_res_blocks):
                stage.block.append(ResnetBlock(block_in, width, config))
                block_in = width
            if level != len(widths) - 1:
                stage.downsample = Downsample(width)
            self.down.append(stage)
        self.mid = MidBlock(block_in, config)
        self.norm_out = _norm(block_in, config, silu=True)
        self.conv_out = nn.Conv2d(block_in, 2 * config.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(self.norm_out(h))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, 3, h*f, w*f). `up[i]` is resolution level i, as in LDM,
    so it runs in reverse order; each level has num_res_blocks + 1 blocks."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        block_in = widths[-1]
        self.conv_in = nn.Conv2d(config.z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in, config)
        stages = []
        for level in reversed(range(len(widths))):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(config.num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, widths[level], config))
                block_in = widths[level]
            if level != 0:
                stage.upsample = Upsample(block_in)
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)
        self.norm_out = _norm(block_in, config, silu=True)
        self.conv_out = nn.Conv2d(block_in, config.out_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(self.norm_out(h))


class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)) per latent element."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)  # LDM's clamp: keeps exp() finite
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def kl(self) -> torch.Tensor:
        """KL divergence to N(0, 1), summed over a latent and averaged over the batch (LDM's KL term)."""
        kl = 0.5 * (self.mean ** 2 + self.std ** 2 - 1.0 - self.logvar)
        return kl.flatten(1).sum(1).mean()


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    @property
    def downscale(self) -> int:
        """Pixels per latent along each axis (8 for SD)."""
        return 2 ** (len(self.config.ch_mult) - 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x: images in [-1, 1], (B, 3, H, W) with H, W multiples of `downscale`."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor, tile_size: int | None = None, tile_overlap: int = 8) -> torch.Tensor:
        """Raw latents (B, embed_dim, h, w) -> images in about [-1, 1].

        With `tile_size` (in latent pixels), decodes overlapping tile_size^2 latent tiles one at a
        time and blends them linearly across the overlaps: peak memory follows the tile, not the
        frame. The price is seams: GroupNorm statistics, the mid attention and the conv receptive
        field all see only their tile, so tiles disagree slightly; a wider overlap hides more of it.
        When one tile covers the latent the result equals the untiled decode exactly.
        """
        if tile_size is None:
            return self._decode(z)
        return tiled_apply(self._decode, z, tile_size, tile_overlap, self.downscale)

    def _decode(self, z):
        return self.decoder(self.post_quant_conv(z))

    def encode_latents(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images -> a posterior sample scaled by `scale_factor`: the latents the UNet works on."""
        return self.encode(x).sample(generator) * self.config.scale_factor

    def decode_latents(self, latents: torch.Tensor, **tiling) -> torch.Tensor:
        """Inverse of `encode_latents`: UNet latents -> images (tiling kwargs as in `decode`)."""
        return self.decode(latents / self.config.scale_factor, **tiling)


def fit_vae(vae: AutoencoderKL, images: torch.Tensor, steps: int, seed: int, batch_size: int = 8, lr: float = 2e-3):
    """Train an autoencoder on `images` (N, 3, S, S) in [-1, 1]: L1 + L2 reconstruction of a posterior
    sample plus LDM's 1e-6-weighted KL (which only keeps the latents from drifting in scale).

    Why: a random decoder turns any latent into noise, so a tiny avatar's samples would show nothing.
    A few hundred steps on the person's own frames make them recognisable (about 27 dB PSNR on the
    demo's held-out frames after 300 steps)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    for _ in tqdm(range(steps), desc="fitting the VAE", leave=False):
        x = images[torch.randint(0, len(images), (batch_size,), generator=generator)]
        posterior = vae.encode(x)
        error = vae.decode(posterior.sample(generator)) - x
        loss = error.abs().mean() + error.square().mean() + 1e-6 * posterior.kl()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return vae.eval()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Decoder output in about [-1, 1], (B, 3, H, W) -> uint8 (B, H, W, 3) on the CPU."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


# --- tiled decoding ---------------------------------------------------------------------------

def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of equal tiles covering [0, length), spread evenly, neighbours overlapping >= overlap."""
    if length <= tile:
        return [0]
    count = math.ceil((length - tile) / (tile - overlap)) + 1
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def _ramp(width: int) -> torch.Tensor:
    """0 -> 1 across `width` pixels, strictly inside (0, 1) so that ramp + ramp.flip(0) == 1."""
    return (torch.arange(width, dtype=torch.float64) + 0.5) / max(width, 1)


def _blend_ramp(starts: list[int], tile: int, index: int, scale: int) -> torch.Tensor:
    """Weights along one axis of tile `index`: 1 inside, a linear ramp across each overlap.

    A tile's ramp down and its neighbour's ramp up span the same pixels and sum to 1 there, so two
    overlapping tiles cross-fade linearly; `tiled_apply` still normalises by the summed weights,
    which covers the corners where more tiles meet.
    """
    weight = torch.ones(tile * scale, dtype=torch.float64)
    if index > 0:
        width = (starts[index - 1] + tile - starts[index]) * scale
        weight[:width] = torch.minimum(weight[:width], _ramp(width))
    if index < len(starts) - 1:
        width = (starts[index] + tile - starts[index + 1]) * scale
        weight[tile * scale - width:] = torch.minimum(weight[tile * scale - width:], _ramp(width).flip(0))
    return weight


def tiled_apply(fn, z: torch.Tensor, tile_size: int, overlap: int, scale: int) -> torch.Tensor:
    """fn on overlapping (tile_size x tile_size) tiles of z (B, C, h, w), blended: the output is
    fn's (B, C', h*scale, w*scale) output, assembled from tiles."""
    if not 0 <= overlap < tile_size:
        raise ValueError(f"tile overlap must be in [0, tile_size={tile_size}), got {overlap}")
    height, width = z.shape[-2:]
    tile_h, tile_w = min(tile_size, height), min(tile_size, width)
    rows, cols = _tile_starts(height, tile_h, overlap), _tile_starts(width, tile_w, overlap)
    out = weights = None
    for i, top in enumerate(rows):
        for j, left in enumerate(cols):
            tile = fn(z[..., top:top + tile_h, left:left + tile_w])
            if out is None:
                out = tile.new_zeros(*tile.shape[:2], height * scale, width * scale)
                weights = tile.new_zeros(height * scale, width * scale)
            w = torch.outer(_blend_ramp(rows, tile_h, i, scale), _blend_ramp(cols, tile_w, j, scale)).to(tile)
            rows_px = slice(top * scale, (top + tile_h) * scale)
            cols_px = slice(left * scale, (left + tile_w) * scale)
            out[..., rows_px, cols_px] += w * tile
            weights[rows_px, cols_px] += w
    return out / weights


# --- diffusers layout -> LDM layout -------------------------------------------------------------

_DIFFUSERS_RENAMES = [  # applied in order to every key
    (r"\.conv_norm_out\.", ".norm_out."),
    (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
    (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
    (r"\.mid_block\.attentions\.0\.", ".mid.attn_1."),
    (r"\.down_blocks\.(\d+)\.", r".down.\1."),
    (r"\.resnets\.", ".block."),
    (r"\.downsamplers\.0\.", ".downsample."),
    (r"\.upsamplers\.0\.", ".upsample."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"\.attn_1\.group_norm\.", ".attn_1.norm."),
    # diffusers' current names, then its pre-0.14 names (query/key/value/proj_attn)
    (r"\.attn_1\.(to_q|query)\.", ".attn_1.q."),
    (r"\.attn_1\.(to_k|key)\.", ".attn_1.k."),
    (r"\.attn_1\.(to_v|value)\.", ".attn_1.v."),
    (r"\.attn_1\.(to_out\.0|proj_attn)\.", ".attn_1.proj_out."),
]


def _ldm_vae_key(key: str, levels: int) -> str:
    # diffusers numbers decoder blocks from the lowest resolution; LDM by resolution level.
    key = re.sub(r"\.up_blocks\.(\d+)\.", lambda m: f".up.{levels - 1 - int(m.group(1))}.", key)
    for pattern, replacement in _DIFFUSERS_RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def diffusers_to_ldm_vae(state_dict: dict, config: VAEConfig) -> dict:
    """Rename a diffusers AutoencoderKL state dict (vae/diffusion_pytorch_model.safetensors) into
    this module's (= LDM's) names. Tensors are not copied; the attention projections, stored by
    diffusers as Linear (C, C) weights, become (C, C, 1, 1) views for the 1x1 convs."""
    levels = len(config.ch_mult)
    renamed = {}
    for key, tensor in state_dict.items():
        new_key = _ldm_vae_key(key, levels)
        if ".attn_1." in new_key and new_key.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor.view(*tensor.shape, 1, 1)
        renamed[new_key] = tensor
    return renamed
