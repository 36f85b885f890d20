"""An avatar: the trained weights that turn a base Stable Diffusion into one person, and their file.

`Denoiser` is the UNet driven by the ControlNet, the one model that training, previews and sampling
call; `build_denoiser` makes a fresh one for training (train.py's --train modes), `diffusion_loss` and
`held_out_loss` are what training minimises and what it reports on the held-out frames.

`avatar.safetensors` holds only what training changed: the ControlNet under `control_model.*` and the
UNet tensors that were trained under `model.diffusion_model.*` (the single-file names), plus a JSON
config in the metadata key `svp_avatar` (base checkpoint path and fingerprint, family, caption, hint
channels, resolution, training mode, the person's identity shape, the tracked seq.npz and FLAME file).
Its paths are relative to the run folder when they lie inside it (the tiny preset's base.safetensors),
absolute otherwise, so a run folder works from any working directory and can be moved or copied whole.
"""
import hashlib
import json
import os
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from model.controlnet import CONTROLNET_PREFIX, ControlNet, init_hint_encoder, load_controlnet
from model.files import atomic_write
from model.loading import UNET_PREFIX, CheckpointError, StableDiffusion, open_safetensors, weights_file
from model.sampling import NoiseSchedule

FINGERPRINT_BYTES = 1 << 20


def fingerprint(path: str) -> str:
    """sha256 of the first MiB plus the byte size: cheap even for a 5 GB checkpoint, and enough to tell
    checkpoints apart (their headers and first tensors differ). A folder: its UNet weights file."""
    if os.path.isdir(path):
        path = weights_file(os.path.join(path, "unet"))
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read(FINGERPRINT_BYTES)).hexdigest()
    return f"{digest}:{os.path.getsize(path)}"


def run_relative(path: str, run_dir: str) -> str:
    """`path` as the avatar config stores it: relative to `run_dir` when inside it, else absolute."""
    path, run_dir = os.path.abspath(path), os.path.abspath(run_dir)
    return os.path.relpath(path, run_dir) if os.path.commonpath([path, run_dir]) == run_dir else path


def from_run(path: str, run_dir: str) -> str:
    """A path of the avatar config, resolved against its run folder (an absolute one stays as it is)."""
    return os.path.join(run_dir, path)


class Denoiser(nn.Module):
    """The UNet driven by the ControlNet: (noisy latents, t, text context, hint) -> model output.

    Every caller goes through here: the training and held-out losses, the previews, video sampling and
    (with no ControlNet) text-to-image. `scale` multiplies the ControlNet's residuals (the conditioning
    strength at inference).
    """

    def __init__(self, unet: nn.Module, controlnet: ControlNet | None = None):
        super().__init__()
        self.unet, self.controlnet = unet, controlnet

    def forward(self, x, t, context, hint=None, scale: float = 1.0):
        context = context.expand(len(x), -1, -1)
        residuals = self.controlnet(x, t, context, hint, scale) if self.controlnet is not None else ()
        return self.unet(x, t, context, *residuals)

    def guided(self, x, t, context, uncond_context=None, hint=None, scale: float | torch.Tensor = 1.0):
        """(cond_out, uncond_out) for classifier-free guidance (uncond_out None without `uncond_context`).

        Both branches run in one batch of 2B, like the reference pipelines; kernels/temporal.py combines them.
        context: (1 or B, 77, D); scale: a number, or (B, 1, 1, 1) per frame (a live stream's settings change).
        """
        if uncond_context is None:
            return self(x, t, context, hint, scale), None
        def twice(v):
            return None if v is None else torch.cat([v, v])
        contexts = torch.cat([uncond_context.expand(len(x), -1, -1), context.expand(len(x), -1, -1)])
        t = twice(t) if torch.is_tensor(t) and t.numel() > 1 else t  # per-frame timesteps (streaming)
        scale = twice(scale) if torch.is_tensor(scale) else scale
        uncond_out, cond_out = self(twice(x), t, contexts, twice(hint), scale).chunk(2)
        return cond_out, uncond_out

    def trainable_state(self) -> dict:
        """The trained tensors under their checkpoint names: all of the ControlNet, the UNet's trained ones."""
        state = {CONTROLNET_PREFIX + k: v for k, v in self.controlnet.state_dict().items()}
        state.update({UNET_PREFIX + k: p for k, p in self.unet.named_parameters() if p.requires_grad})
        return {k: v.detach().contiguous() for k, v in state.items()}

    def load_trainable_state(self, state: dict):
        load_trained_unet(self.unet, {k: v for k, v in state.items() if k.startswith(UNET_PREFIX)})
        self.controlnet.load_state_dict({k[len(CONTROLNET_PREFIX):]: v for k, v in state.items()
                                         if k.startswith(CONTROLNET_PREFIX)})


def load_trained_unet(unet: nn.Module, state: dict):
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for key, value in state.items():
            name = key[len(UNET_PREFIX):]
            if name not in params or params[name].shape != value.shape:
                raise CheckpointError(f"UNet tensor {key} {tuple(value.shape)} does not fit the base model")
            params[name].copy_(value)


def build_denoiser(sd: StableDiffusion, mode: str, hint_channels: int, checkpointing: bool, seed: int,
                   start_from: str | None = None) -> Denoiser:
    """The ControlNet (a copy of the UNet's encoder, or the `start_from` checkpoint) on the base UNet, with
    the parameters of train.py's --train `mode` trainable."""
    if start_from:
        param = next(sd.unet.parameters())
        controlnet = load_controlnet(start_from, sd.config.unet, param.dtype, hint_channels).to(param.device)
    else:
        controlnet = ControlNet.from_unet(sd.unet, hint_channels)
        init_hint_encoder(controlnet, seed)
    controlnet.train().requires_grad_(True)
    for name, param in sd.unet.named_parameters():
        param.requires_grad_(mode == "controlnet+unet" or (mode == "controlnet+attn" and
                                                          ("attn1" in name or "attn2" in name)))
    sd.unet.gradient_checkpointing = controlnet.gradient_checkpointing = checkpointing
    return Denoiser(sd.unet, controlnet).train()


VAL_TIMESTEP_FRACTIONS = (0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95)  # of num_train_timesteps


def diffusion_loss(model, schedule: NoiseSchedule, x0, hint, context, generator, dropout: float = 0.0):
    """The mean squared error to the checkpoint's training target at uniformly drawn timesteps.

    `model` is the Denoiser or its DistributedDataParallel wrapper: the loss must call the wrapper, whose
    forward is what synchronises the gradients across ranks, so this is a function and not a method.
    """
    t = torch.randint(0, schedule.num_train_timesteps, (len(x0),), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    keep = (torch.rand(len(x0), generator=generator) >= dropout).to(hint)
    out = model(schedule.add_noise(x0, noise, t), t, context, hint * keep[:, None, None, None])
    return F.mse_loss(out.float(), schedule.training_target(x0, noise, t))


@torch.no_grad()
def held_out_loss(denoiser: Denoiser, schedule: NoiseSchedule, data, context, seed: int,
                  batch_size: int, autocast=nullcontext, zero_hint: bool = False) -> float:
    """The diffusion loss on the held-out frames at fixed timesteps and fixed noise. `data` is train.py's
    FrameData: the latents, the hints (`hint_batch`) and the split."""
    device = context.device
    frames = data.split.held_out
    timesteps = [int(f * schedule.num_train_timesteps) for f in VAL_TIMESTEP_FRACTIONS]
    pairs = [(i, t) for i in frames for t in timesteps]
    noise = torch.randn((len(pairs),) + tuple(data.latents.shape[1:]), generator=torch.Generator().manual_seed(seed))
    was_training = denoiser.training
    denoiser.eval()
    total = 0.0
    for start in range(0, len(pairs), batch_size):
        idx, t = zip(*pairs[start:start + batch_size])
        x0, eps = data.latents[list(idx)].to(device), noise[start:start + len(idx)].to(device)
        t = torch.tensor(t, device=device)
        hint = data.hint_batch(list(idx), device) * (0.0 if zero_hint else 1.0)
        with autocast():
            out = denoiser(schedule.add_noise(x0, eps, t), t, context, hint)
        total += F.mse_loss(out.float(), schedule.training_target(x0, eps, t), reduction="sum").item()
    denoiser.train(was_training)
    return total / (len(pairs) * data.latents[0].numel())


def save_avatar(path: str, denoiser: Denoiser, meta: dict):
    with atomic_write(path) as tmp:
        save_file({k: v.cpu() for k, v in denoiser.trainable_state().items()}, tmp,
                  metadata={"svp_avatar": json.dumps(meta)})


def read_avatar_meta(path: str) -> dict:
    """The JSON config that train.py stores in an avatar's safetensors metadata (see its avatar_meta)."""
    with open_safetensors(path) as f:
        meta = (f.metadata() or {}).get("svp_avatar")
    if meta is None:
        raise CheckpointError(f"{path}: not an svp avatar (no 'svp_avatar' metadata)")
    return json.loads(meta)


def load_avatar_weights(path: str, sd: StableDiffusion) -> tuple[ControlNet, dict]:
    """Read an avatar onto a loaded base model: the trained UNet tensors go into sd.unet in place;
    returns the ControlNet and the avatar's config."""
    meta = read_avatar_meta(path)
    with open_safetensors(path) as f:
        unet_state = {k: f.get_tensor(k) for k in f.keys() if k.startswith(UNET_PREFIX)}
    param = next(sd.unet.parameters())
    load_trained_unet(sd.unet, {k: v.to(param.dtype) for k, v in unet_state.items()})
    controlnet = load_controlnet(path, sd.config.unet, param.dtype, hint_channels=meta["hint_channels"])
    return controlnet.to(param.device), meta
