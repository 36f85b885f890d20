"""The 3DMM conditioning encoder: a ControlNet (Zhang et al. 2023) in the original checkpoint layout.

A ControlNet is a trainable copy of the UNet's encoder half (`time_embed`, `input_blocks`,
`middle_block`, built by the UNet's own builders) that also sees a conditioning image, the "hint"
(here: renderings of the tracked FLAME mesh). The hint is encoded down to the latent grid by a small
conv stack (`input_hint_block`) and added to the output of the copy's first conv. Every block's
output passes a zero-initialised 1x1 conv (`zero_convs.N`, `middle_block_out`) and becomes a residual
that `UNet.forward(x, t, context, down_residuals, mid_residual)` adds to its skips and middle output.
Because those convs (and the hint stack's last conv) start at zero, a fresh ControlNet leaves the UNet
exactly as it was, and training grows the conditioning from there.

Parameter names are those of the original single-file checkpoint minus `control_model.`; a diffusers
`ControlNetModel` folder is read after the pure rename `diffusers_to_ldm_controlnet`.

Public ControlNets read a 3-channel RGB hint; ours has more channels (tracking/conditioning.py's
CONDITIONING_CHANNELS). `load_controlnet` widens such a checkpoint's first hint conv so that its filters
read our normal (or depth) channels and the other channels start at zero: the encoder then starts from
what the public model learned about geometry, and training adds the rest.
"""
import logging
import os
from collections.abc import Sequence

import torch
import torch.nn as nn
from safetensors.torch import save_file

from model.config import UNetConfig
from model.files import atomic_write, read_json
from model.loading import CheckpointError, assign_weights, open_safetensors, read_tensors, weights_file
from model.unet import (UNet, build_input_blocks, build_middle_block, diffusers_to_ldm_prefixes, rename_key,
                        build_time_embed, run_block, timestep_features)

CONTROLNET_PREFIX = "control_model."
HINT_WIDTHS = (16, 32, 96, 256)   # the original hint encoder; every width after the first halves the size
SHARED_WITH_UNET = ("time_embed", "input_blocks", "middle_block")
# The hint a public 3-channel ControlNet reads: which of our hint channels (tracking/conditioning.py's
# CONDITIONING_CHANNELS: normal x, y, z, depth, then masks) its R, G, B inputs become, and whether its
# value is 1 - ours. Ours are (n + 1) / 2 in OpenCV camera axes (x right, y down, z away from the camera);
# public normal ControlNets (1.1 normalbae, ScanNet's protocol, and 1.0 normal) use x left, y up, z
# toward the camera: every axis flipped. Depth ControlNets read grayscale (near bright, like ours) in
# all three channels, so their three filters add up on our one depth channel.
PUBLIC_HINTS = {
    "normal": ((0, 1, 2), True),
    "normal-opencv": ((0, 1, 2), False),   # a ControlNet trained on normal maps in our own convention
    "depth": ((3, 3, 3), False),
}

log = logging.getLogger(__name__)


def zero_conv(in_channels: int, out_channels: int, kernel_size: int = 1) -> nn.Conv2d:
    """A conv that starts at zero, so the branch it ends contributes nothing until it is trained."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def build_hint_block(hint_channels: int, widths: Sequence[int], out_channels: int) -> nn.Sequential:
    """The hint encoder: conv-SiLU pairs, halving the size at every new width, then a zero conv.

    With the default widths: (C,16) (16,16) (16,32)/2 (32,32) (32,96)/2 (96,96) (96,256)/2 zero(256,out),
    i.e. keys input_hint_block.0, .2, ..., .14 with the SiLUs in between.
    """
    layers = [nn.Conv2d(hint_channels, widths[0], 3, padding=1), nn.SiLU()]
    for width, next_width in zip(widths, widths[1:]):
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
                   nn.Conv2d(width, next_width, 3, padding=1, stride=2), nn.SiLU()]
    layers.append(zero_conv(widths[-1], out_channels, kernel_size=3))
    return nn.Sequential(*layers)


def init_hint_encoder(controlnet: "ControlNet", seed: int):
    """He-initialise the hint encoder's convs (all but its final zero conv), biases zero: a fresh ControlNet
    for training.

    PyTorch's default conv init scales a signal by about 1/sqrt(3) per conv, and its random biases
    soon dominate: after the encoder's seven convs the hint barely reaches the output (~1e-3 of it),
    and learning to use it takes thousands of steps. He init keeps the hint's features at unit scale.
    The final conv stays zero, so the fresh ControlNet still leaves the UNet unchanged.
    """
    generator = torch.Generator().manual_seed(seed)
    convs = [m for m in controlnet.input_hint_block if isinstance(m, nn.Conv2d)][:-1]
    for conv in convs:  # drawn on the CPU, so every device and every rank starts alike
        weight = torch.empty(conv.weight.shape)
        nn.init.kaiming_normal_(weight, nonlinearity="relu", generator=generator)  # SiLU is close enough to ReLU
        conv.weight.data.copy_(weight)
        nn.init.zeros_(conv.bias)


class ControlNet(nn.Module):
    """(x, timesteps, context, hint) -> (down_residuals, mid_residual) for a UNet of `config`.

    `hint` is (B, hint_channels, H * f, W * f) for latents of size H x W, where f = 2^(len(hint_widths) - 1)
    (8 by default, the VAE's factor, so the hint has the image's resolution). Set
    `gradient_checkpointing = True` to recompute the encoder blocks in the backward pass.
    """

    def __init__(self, config: UNetConfig, hint_channels: int, hint_widths: Sequence[int] = HINT_WIDTHS):
        super().__init__()
        self.config, self.hint_channels, self.hint_widths = config, hint_channels, tuple(hint_widths)
        self.gradient_checkpointing = False
        self.time_embed = build_time_embed(config)
        self.input_hint_block = build_hint_block(hint_channels, self.hint_widths, config.model_channels)
        self.input_blocks, skip_channels = build_input_blocks(config)
        self.zero_convs = nn.ModuleList(nn.Sequential(zero_conv(ch, ch)) for ch in skip_channels)
        self.middle_block = build_middle_block(config)
        mid_channels = config.channel_mult[-1] * config.model_channels
        self.middle_block_out = nn.Sequential(zero_conv(mid_channels, mid_channels))

    @classmethod
    def from_unet(cls, unet: UNet, hint_channels: int, hint_widths: Sequence[int] = HINT_WIDTHS) -> "ControlNet":
        """A fresh ControlNet whose encoder copy starts from `unet`'s weights (on its device and dtype)."""
        param = next(unet.parameters())
        controlnet = cls(unet.config, hint_channels, hint_widths).to(device=param.device, dtype=param.dtype)
        for name in SHARED_WITH_UNET:
            getattr(controlnet, name).load_state_dict(getattr(unet, name).state_dict())
        return controlnet

    def forward(self, x, timesteps, context, hint, scale: float = 1.0):
        """`scale` (the conditioning strength at inference) multiplies every residual."""
        self._check_hint(x, hint)
        emb = self.time_embed(timestep_features(timesteps, x, self.config))
        use_checkpoint = self.gradient_checkpointing and torch.is_grad_enabled()

        guided_hint = self.input_hint_block(hint)
        h, residuals = x, []
        for i, (block, out_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = run_block(block, h, emb, context, use_checkpoint)
            if i == 0:
                h = h + guided_hint        # the hint enters right after the first conv, as in the original
            residuals.append(out_conv(h))
        h = run_block(self.middle_block, h, emb, context, use_checkpoint)
        return [r * scale for r in residuals], self.middle_block_out(h) * scale

    def _check_hint(self, x, hint):
        factor = 2 ** (len(self.hint_widths) - 1)
        expected = (x.shape[0], self.hint_channels, x.shape[-2] * factor, x.shape[-1] * factor)
        if tuple(hint.shape) != expected:
            raise ValueError(f"ControlNet: hint of shape {tuple(hint.shape)}, expected {expected} "
                             f"({self.hint_channels} channels at {factor}x the latent size {tuple(x.shape[-2:])})")


# ----------------------------------------------------------------------------- diffusers layout

def diffusers_to_ldm_controlnet(state_dict: dict, config: UNetConfig) -> dict:
    """Rename a diffusers ControlNetModel state dict to our (original) keys; the tensors are not copied.

    The encoder copy shares its names with the UNet's, so the UNet's rename table covers it; only the
    hint encoder and the zero convs are added here. Unknown keys pass through for the strict load to name.
    """
    hint_convs = {key.split(".")[2] for key in state_dict if key.startswith("controlnet_cond_embedding.blocks.")}
    table = {
        **diffusers_to_ldm_prefixes(config),
        "controlnet_cond_embedding.conv_in": "input_hint_block.0",
        # blocks.i is the (i+1)-th conv of the stack; a SiLU sits after each conv in the Sequential
        **{f"controlnet_cond_embedding.blocks.{i}": f"input_hint_block.{2 * i + 2}" for i in range(len(hint_convs))},
        "controlnet_cond_embedding.conv_out": f"input_hint_block.{2 * len(hint_convs) + 2}",
        **{f"controlnet_down_blocks.{i}": f"zero_convs.{i}.0" for i in range(num_input_blocks(config))},
        "controlnet_mid_block": "middle_block_out.0",
    }
    return {rename_key(key, table): tensor for key, tensor in state_dict.items()}


def num_input_blocks(config: UNetConfig) -> int:
    """conv_in, then per level its ResBlocks and a Downsample (none after the last level)."""
    return len(config.channel_mult) * (config.num_res_blocks + 1)


# ----------------------------------------------------------------------------- loading and saving

def load_controlnet(path: str, unet_config: UNetConfig, dtype: torch.dtype = torch.float32,
                    hint_channels: int | None = None, public_hint: str = "normal") -> ControlNet:
    """A ControlNet for a UNet of `unet_config`, from an original single file or a diffusers folder
    (`config.json` + `diffusion_pytorch_model.safetensors`, or a pipeline folder holding `controlnet/`).

    The hint encoder's shape is read from the weights; `hint_channels`, when given, is what the caller
    will feed. A 3-channel checkpoint is widened to it (`widen_public_hint`, reading `public_hint`, a
    key of PUBLIC_HINTS); any other mismatch is refused. Like every loaded model it comes back frozen in
    eval mode; training calls `.train().requires_grad_(True)`.
    """
    if public_hint not in PUBLIC_HINTS:
        raise ValueError(f"public_hint {public_hint!r}: expected one of {', '.join(PUBLIC_HINTS)}")
    folder = diffusers_folder(path)
    if folder:
        path = weights_file(folder)
        state = diffusers_to_ldm_controlnet(read_tensors(open_safetensors(path), "", dtype), unet_config)
    else:
        state = read_single_file(path, dtype)
    file_hint_channels, widths = hint_shape(state, path)
    if hint_channels is not None and hint_channels != file_hint_channels:
        if file_hint_channels != 3:
            raise CheckpointError(f"{path}: this ControlNet takes {file_hint_channels}-channel hints, but ours have "
                                  f"{hint_channels} channels; start from a matching checkpoint, a public 3-channel "
                                  "(normal-map or depth) ControlNet, or from the UNet")
        state = widen_public_hint(state, hint_channels, public_hint, path)
        log.info(f"{os.path.basename(path)}: a 3-channel ControlNet, read as a {public_hint} ControlNet; "
                 f"the other {hint_channels - len(set(PUBLIC_HINTS[public_hint][0]))} hint channels start at zero")
        file_hint_channels = hint_channels
    expected_as = (f"the UNet it attaches to (model_channels={unet_config.model_channels}, "
                   f"channel_mult={unet_config.channel_mult}, context_dim={unet_config.context_dim})")
    controlnet = assign_weights(lambda: ControlNet(unet_config, file_hint_channels, widths), state,
                                "ControlNet", path, expected_as)
    if folder:
        check_diffusers_heads(os.path.join(folder, "config.json"), unet_config)
    return controlnet


def diffusers_folder(path: str) -> str | None:
    """The diffusers ControlNet folder `path` names (itself, or the controlnet/ of a pipeline), or None."""
    if not os.path.isdir(path):
        return None
    inner = os.path.join(path, "controlnet")
    return inner if not os.path.exists(os.path.join(path, "config.json")) and os.path.isdir(inner) else path


def widen_public_hint(state: dict, hint_channels: int, public_hint: str, path: str) -> dict:
    """`state` of a 3-channel ControlNet with its first hint conv reading `hint_channels` channels.

    Public channel i feeds our channel PUBLIC_HINTS[public_hint][0][i] with its filters; filters meeting on
    one channel add up (a grayscale image repeated in R, G, B). Our other channels get zero filters, so
    with them zero the encoder computes what the public one does. Where the public model reads 1 - ours,
    its filters are negated and their sums move into the bias: conv_W(1 - c) = conv_-W(c) + sum(W), exact
    except on the one-pixel image border, where the public conv's zero padding makes the constant smaller.
    """
    into, flipped = PUBLIC_HINTS[public_hint]
    if max(into) >= hint_channels:
        raise CheckpointError(f"{path}: a {public_hint} ControlNet feeds hint channel {max(into)}, but ours "
                              f"have only {hint_channels} channels")
    weight, bias = state["input_hint_block.0.weight"], state["input_hint_block.0.bias"]
    sign = -1 if flipped else 1
    wide = weight.new_zeros(weight.shape[0], hint_channels, *weight.shape[2:])
    for source, target in enumerate(into):
        wide[:, target] += sign * weight[:, source]
    if flipped:
        bias = bias + weight.float().sum(dim=(1, 2, 3)).to(bias.dtype)
    return {**state, "input_hint_block.0.weight": wide, "input_hint_block.0.bias": bias}


def read_single_file(path: str, dtype) -> dict:
    """The `control_model.*` tensors, or all of them in a file holding only a bare ControlNet."""
    handle = open_safetensors(path)
    keys = set(handle.keys())
    if any(key.startswith(CONTROLNET_PREFIX) for key in keys):
        return read_tensors(handle, CONTROLNET_PREFIX, dtype)
    if "input_hint_block.0.weight" in keys:      # some releases store the ControlNet without its prefix
        return read_tensors(handle, "", dtype)
    raise CheckpointError(f"{path}: no ControlNet in this file (neither '{CONTROLNET_PREFIX}*' nor "
                          "'input_hint_block.*' keys); for a diffusers ControlNet pass its folder")


def hint_shape(state: dict, path: str) -> tuple[int, tuple[int, ...]]:
    """(hint channels, hint encoder widths) of an original-layout state dict, from its conv shapes."""
    indices = sorted(int(key.split(".")[1]) for key in state
                     if key.startswith("input_hint_block.") and key.endswith(".weight"))
    if not indices or indices != list(range(0, 2 * len(indices), 2)) or len(indices) % 2:
        raise CheckpointError(f"{path}: the hint encoder (input_hint_block) is missing or malformed: "
                              f"conv indices {indices}")
    # convs 0, 2, 4, ...: the first conv at each width sits at key index 4 * i
    widths = tuple(state[f"input_hint_block.{4 * i}.weight"].shape[0] for i in range(len(indices) // 2))
    return state["input_hint_block.0.weight"].shape[1], widths


def check_diffusers_heads(config_path: str, unet_config: UNetConfig):
    """Refuse a folder whose attention heads differ from the UNet's: the weights' shapes cannot tell.

    Runs after the strict load, so the levels and widths are known to match.
    """
    config = read_json(config_path)
    try:
        widths = config["block_out_channels"]
        heads = config.get("num_attention_heads") or config["attention_head_dim"]  # diffusers' historic misnomer
        heads = [heads] * len(widths) if isinstance(heads, int) else heads
        file_heads = {level: heads[level] for level in unet_config.attention_levels}
    except (KeyError, IndexError, TypeError) as e:
        raise CheckpointError(f"{config_path}: no usable block_out_channels / attention_head_dim ({e!r})") from e
    for level, count in file_heads.items():
        ours = unet_config.heads_for(widths[level])[0]
        if count != ours:
            raise CheckpointError(f"{config_path}: {count} attention heads at level {level}, but the UNet has {ours}")


def save_controlnet(controlnet: ControlNet, path: str):
    """Write `controlnet` in the original single-file layout (`control_model.*`), atomically."""
    tensors = {CONTROLNET_PREFIX + k: v.detach().contiguous() for k, v in controlnet.state_dict().items()}
    with atomic_write(path) as tmp:
        save_file(tensors, tmp)
