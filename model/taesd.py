"""A tiny decoder (TAESD, madebyollin): the UNet's latents -> images at a small fraction of the VAE's cost.

sample.py's `--decoder FILE` puts it in place of the full VAE's decoder, for live driving above all; the
frames lose fine detail. The user brings the weights: madebyollin's `taesd_decoder.safetensors` /
`taesd_decoder.pth` (the SD1/SD2 one), or the `diffusion_pytorch_model.safetensors` of diffusers'
`madebyollin/taesd` folder (an `AutoencoderTiny`; its encoder is not read).

The network is convolutions and ReLUs only (no GroupNorm, no attention): a soft clamp of the latents,
a 3x3 conv, then per stage a few residual `Block`s, a nearest-neighbour x2 upsample and a 3x3 conv
(the last stage: no upsample, and its conv makes the RGB image).

Names: modules mirror diffusers' DecoderTiny (`decoder.layers.N` there is `layers.N` here).
madebyollin's own files hold the same nn.Sequential numbered from 1, because its index 0 is the
parameter-free latent clamp (`forward` does it here), so loading them is an index shift.

Latents: TAESD was distilled on the latents the UNet works on, SD's raw latents already multiplied by
0.18215 (which is why diffusers' AutoencoderTiny config says scaling_factor 1.0), so `decode_latents` takes
them as they are, like `AutoencoderKL.decode_latents`. TAESD's images are in [0, 1]; they are mapped to
[-1, 1] as diffusers does, the VAE's range, so `model.vae.to_uint8` serves both.
"""
import pickle
import zipfile

import torch
import torch.nn as nn

from model.loading import DTYPES, CheckpointError, assign_weights, open_safetensors

PICKLE_SUFFIXES = (".pth", ".pt")  # madebyollin's releases; read as tensors only (weights_only=True)


class Block(nn.Module):
    """conv-ReLU-conv-ReLU-conv plus the input, then a ReLU (`fuse`). TAESD's `skip` is a 1x1 conv only
    where widths change, which they never do in its decoder, so here it is the identity."""

    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1))
        self.fuse = nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + x)


class TinyDecoder(nn.Module):
    """UNet latents (B, latent_channels, h, w) -> images (B, 3, h*f, w*f) in about [-1, 1], f = `downscale`.

    blocks: the number of `Block`s of each stage (TAESD: (3, 3, 3, 1), 64 wide, f = 8)."""

    def __init__(self, latent_channels: int = 4, width: int = 64, blocks: tuple[int, ...] = (3, 3, 3, 1)):
        super().__init__()
        self.latent_channels, self.downscale = latent_channels, 2 ** (len(blocks) - 1)
        layers = [nn.Conv2d(latent_channels, width, 3, padding=1), nn.ReLU()]
        for stage, count in enumerate(blocks):
            last = stage == len(blocks) - 1
            layers += [Block(width) for _ in range(count)]
            if not last:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
            layers.append(nn.Conv2d(width, 3 if last else width, 3, padding=1, bias=last))
        self.layers = nn.Sequential(*layers)

    def forward(self, latents):
        x = torch.tanh(latents / 3) * 3  # a soft clamp to (-3, 3): TAESD was trained behind it
        return self.layers(x) * 2 - 1

    def decode_latents(self, latents):
        """`AutoencoderKL.decode_latents`'s call, so that either one decodes an avatar's frames."""
        return self(latents)


def read_weights(path: str) -> dict:
    """The tensors of a .safetensors file, or of a .pth state dict loaded as tensors only (no pickled code
    runs); a file that is neither is one error naming it."""
    if not path.endswith(PICKLE_SUFFIXES):
        with open_safetensors(path) as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError) as e:
        reason = str(e).strip().split(". ")[0].splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch state dict (corrupt, or not only tensors): "
                              f"{reason}") from e
    if not (isinstance(state, dict) and all(torch.is_tensor(v) for v in state.values())):
        raise CheckpointError(f"{path}: not a state dict of tensors (names -> tensors)")
    return state


def to_our_names(state: dict, path: str) -> dict:
    """diffusers' `decoder.layers.N.*` (its `encoder.*` dropped) or madebyollin's `N.*` -> `layers.N.*`."""
    if any(k.startswith("decoder.layers.") for k in state):
        return {k[len("decoder."):]: v for k, v in state.items() if k.startswith("decoder.layers.")}
    if state and all(k.split(".", 1)[0].isdigit() for k in state):
        return {f"layers.{int(k.split('.', 1)[0]) - 1}.{k.split('.', 1)[1]}": v for k, v in state.items()}
    raise CheckpointError(f"{path}: not a tiny autoencoder decoder (TAESD): no `decoder.layers.*` tensors "
                          "(diffusers' AutoencoderTiny) nor madebyollin's `1.weight, 3.conv.0.weight, ...`")


def architecture(state: dict, path: str) -> tuple[int, int, tuple[int, ...]]:
    """(latent channels, width, blocks per stage) of a decoder in our names: layers.0 is the first conv,
    layers.1 its ReLU; then a layer with `conv.0.weight` is a Block, a bare `weight` the conv that ends a
    stage, and one without tensors an upsample."""
    if "layers.0.weight" not in state or not any(".conv.0.weight" in k for k in state):
        raise CheckpointError(f"{path}: the tiny decoder lacks its first conv (layers.0) or has no blocks")
    latent_channels, width = state["layers.0.weight"].shape[1], state["layers.0.weight"].shape[0]
    last = max(int(k.split(".")[1]) for k in state)
    blocks, count = [], 0
    for i in range(2, last + 1):
        if f"layers.{i}.conv.0.weight" in state:
            count += 1
        elif f"layers.{i}.weight" in state:
            blocks.append(count)
            count = 0
    return latent_channels, width, tuple(blocks)


def load_tiny_decoder(path: str, device=None, dtype: str | torch.dtype = torch.float32) -> TinyDecoder:
    """A TAESD decoder from `path` (see the module docstring for the files), strictly: every tensor used,
    none missing, every shape right; its architecture (width, blocks, latent channels) is read from the
    file. dtype: a torch dtype or fp32/fp16/bf16."""
    dtype = DTYPES.get(dtype, dtype)
    state = {k: v.to(dtype) for k, v in to_our_names(read_weights(path), path).items()}
    latent_channels, width, blocks = architecture(state, path)
    decoder = assign_weights(lambda: TinyDecoder(latent_channels, width, blocks), state, "tiny decoder", path,
                             f"TAESD's decoder with {blocks} blocks")
    return decoder.to(device)
