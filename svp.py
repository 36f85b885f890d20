"""svp's public API: the functions that train.py, sample.py and `python -m tracking` are shells around.

Example (runs offline in a few minutes on a CPU):

    import svp
    tracked = svp.track("demo", "runs/demo/tracking", size=128)   # offline demo video, toy head
    print(tracked.seq.n_frames, tracked.crops.shape)

    # after `python train.py --video demo --preset tiny --out runs/demo` (a few minutes on a CPU):
    avatar = svp.load_avatar("runs/demo")
    seq = svp.load_seq("runs/demo/tracking/seq.npz")             # or another person's, to re-enact
    frames, conditioning = avatar.render(seq, frames=range(8))   # uint8 (8, 64, 64, 3), temporally smooth
    morphed, _ = avatar.render(seq, frames=range(8), morph="Tom Cruise", morph_weight=0.5)
    print(svp.temporal_flicker(frames))

    sd = svp.load("v1-5-pruned-emaonly.safetensors")            # your own SD weights
    images = svp.text_to_image(sd, "a photo of an astronaut", steps=25)   # uint8 (1, 512, 512, 3)
"""
import os
from dataclasses import dataclass

import numpy as np
import torch

from model.avatar import fingerprint, load_avatar as read_avatar_weights, read_avatar_meta
from model.controlnet import ControlNet
from model.loading import StableDiffusion, load_stable_diffusion, load_stable_diffusion as load
from model.pipeline import encode_prompts, make_sampler, text_to_image, to_uint8
from model.temporal import denoise_video, temporal_weights, warm_up_start
from tracking.conditioning import render_conditioning
from tracking.pipeline import TrackedVideo, load_flame, track_video
from tracking.sequence import FlameSequence, load_seq

__all__ = ["load", "text_to_image", "track", "load_avatar", "Avatar", "VideoSampling", "load_seq",
           "temporal_flicker"]


def track(video: str, out_dir: str, flame: str | None = None, size: int = 512, **options) -> TrackedVideo:
    """Track `video` (a path, or "demo" for the offline demo video) into `out_dir`.

    flame: path of FLAME's generic_model.pkl (None: the built-in toy head); options: bbox, max_frames,
    max_gap, preview (see tracking.pipeline.track_video). Returns the FLAME sequence and the face crops.
    """
    if video == "demo":
        from tracking.demo import write_demo_video
        os.makedirs(out_dir, exist_ok=True)
        video = write_demo_video(os.path.join(out_dir, "demo.mp4"))
    return track_video(video, out_dir, load_flame(flame), size=size, **options)


# ----------------------------------------------------------------------------- the avatar

@dataclass
class Avatar:
    """A trained avatar on its base model: render FLAME sequences as video of the person."""
    sd: StableDiffusion
    controlnet: ControlNet
    meta: dict              # the avatar's config (train.py's avatar_meta)
    flame: object           # tracking.flame.FLAME the avatar was trained with
    shape: np.ndarray       # the person's identity shape (from the training video's seq.npz)

    @property
    def resolution(self) -> int:
        return int(self.meta["resolution"])

    def conditioning(self, seq: FlameSequence, frames: range) -> torch.Tensor:
        """Conditioning images of `seq`: its expression and pose, the avatar's identity shape."""
        if seq.shape.shape != self.shape.shape:
            raise ValueError(f"the sequence has {len(seq.shape)} shape components, the avatar {len(self.shape)}")
        return render_conditioning(self.flame, seq, self.resolution, frames=slice(frames.start, frames.stop),
                                   shape=self.shape)

    def text_context(self, prompt: str | None, morph: str | None = None, morph_weight: float = 0.0):
        """The prompt's text embedding, blended toward "a photo of <morph>" by `morph_weight` (0..1).

        Why a blend of embeddings: the fine-tuned UNet still understands the text, so moving the
        conditioning part of the way to a celebrity's prompt moves the identity part of the way, every
        frame alike, with the geometry still set by the 3DMM rendering. No test-time fine-tuning.
        """
        context = encode_prompts(self.sd, [prompt or self.meta["prompt"]])
        if morph and morph_weight:
            if not 0.0 <= morph_weight <= 1.0:
                raise ValueError(f"--morph-weight must be in [0, 1], got {morph_weight}")
            target = encode_prompts(self.sd, [f"a photo of {morph}"])
            context = (1 - morph_weight) * context + morph_weight * target
        return context

    @torch.no_grad()
    def render(self, seq: FlameSequence, prompt: str | None = None, morph: str | None = None,
               morph_weight: float = 0.0, negative_prompt: str = "", frames: range | None = None,
               settings: "VideoSampling | None" = None, progress: bool = True) -> tuple[np.ndarray, torch.Tensor]:
        """Frames (T, H, W, 3) uint8 for `frames` of `seq`, and their conditioning images (T, C, H, W)."""
        settings = settings or VideoSampling()
        frames = frames if frames is not None else range(seq.n_frames)
        if not (0 <= frames.start < frames.stop <= seq.n_frames):
            raise ValueError(f"frames {frames.start}:{frames.stop} are outside the sequence's 0:{seq.n_frames}")
        first = warm_up_start(frames.start, settings.weights)  # warm-up frames before the range
        hints = self.conditioning(seq, range(first, frames.stop))
        context = self.text_context(prompt, morph, morph_weight)
        uncond = encode_prompts(self.sd, [negative_prompt]) if settings.guidance != 1.0 else None
        images = self.sample(hints, first, frames, context, uncond, settings, progress)
        return images, hints[frames.start - first:]

    @torch.no_grad()
    def sample(self, hints: torch.Tensor, first: int, frames: range, context: torch.Tensor,
               uncond: torch.Tensor | None = None, settings: "VideoSampling | None" = None,
               progress: bool = True) -> np.ndarray:
        """Denoise and decode `frames` given the conditioning images `hints` of frames first, first+1, ...

        context, uncond: (1, 77, D) text embeddings of the prompt and of the negative prompt (classifier-free
        guidance; None when settings.guidance is 1). `hints` must start no later than
        `warm_up_start(frames.start, settings.weights)`: those warm-up frames make any sub-range exact
        (model/temporal.py).
        Returns uint8 (T, H, W, 3).
        """
        settings = settings or VideoSampling()
        device, dtype = next(self.sd.unet.parameters()).device, next(self.sd.unet.parameters()).dtype
        hints = hints.to(device, dtype)
        latent = self.resolution // self.sd.vae.downscale
        shared_noise = torch.randn((self.sd.config.unet.in_channels, latent, latent),
                                   generator=torch.Generator().manual_seed(settings.seed)).to(device, dtype)

        def model_fn(x, t, frame_ids):
            hint = hints[frame_ids[0] - first:frame_ids[-1] + 1 - first]  # a chunk's frames are consecutive
            n = len(frame_ids)
            scale = settings.conditioning_scale
            if uncond is None:
                ctx = context.expand(n, -1, -1)
                return self.sd.unet(x, t, ctx, *self.controlnet(x, t, ctx, hint, scale)), None
            ctx = torch.cat([uncond.expand(n, -1, -1), context.expand(n, -1, -1)])
            x2, hint2 = torch.cat([x, x]), torch.cat([hint, hint])
            out_uncond, out_cond = self.sd.unet(x2, t, ctx, *self.controlnet(x2, t, ctx, hint2, scale)).chunk(2)
            return out_cond, out_uncond

        sampler = make_sampler(self.sd, settings.sampler, settings.steps, settings.eta)
        latents = denoise_video(model_fn, first + len(hints), sampler,
                                shared_noise, settings.temporal_strength, settings.fade_steps, settings.guidance,
                                chunk=settings.batch_frames, seed=settings.seed, frames=frames, progress=progress)
        chunk = settings.batch_frames
        return torch.cat([to_uint8(self.sd.vae.decode_latents(latents[i:i + chunk]))
                          for i in range(0, len(latents), chunk)]).numpy()


@dataclass
class VideoSampling:
    """How a video is sampled (sample.py's flags of the same names).

    eta: DDIM's stochasticity (0 = deterministic; each frame draws its own step noise, which flickers);
    temporal_strength: pull of each frame toward the previous one (0 = independent frames);
    temporal_fade: the fraction of the steps over which that pull fades out (model/temporal.py explains
    both); batch_frames: frames denoised together in lock-step (one UNet batch); conditioning_scale:
    multiplies the ControlNet's residuals (how strongly the 3DMM rendering steers; 0 = plain text-to-image).
    """
    steps: int = 25
    guidance: float = 3.0
    sampler: str = "ddim"
    eta: float = 0.0
    seed: int = 0
    temporal_strength: float = 0.9
    temporal_fade: float = 0.8
    batch_frames: int = 8
    conditioning_scale: float = 1.0

    @property
    def fade_steps(self) -> int:
        return max(1, round(self.temporal_fade * self.steps))

    @property
    def weights(self) -> list[float]:
        """The pull's weight at every step (model/temporal.py)."""
        return temporal_weights(self.steps, self.temporal_strength, self.fade_steps)


def load_avatar(run_dir: str, base: str | None = None, flame: str | None = None, device=None,
                dtype: str = "fp32", tokenizer: str | None = None) -> Avatar:
    """The avatar that `python train.py --out run_dir` wrote, on its base model.

    base: the base checkpoint (default: the path recorded at training time); it must be the same file
    (checked by fingerprint). flame: FLAME generic_model.pkl (default: the one recorded, else the toy head).
    """
    path = os.path.join(run_dir, "avatar.safetensors")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run_dir}: no avatar.safetensors here; train one with python train.py --out {run_dir}")
    meta = read_avatar_meta(path)
    base = base or meta["base"]
    if not os.path.exists(base):
        raise FileNotFoundError(f"{path}: its base checkpoint {base} is missing; pass --base")
    if fingerprint(base) != meta["base_fingerprint"]:
        raise ValueError(f"{path} was trained on another base model than {base}")
    sd = load_stable_diffusion(base, dtype=dtype, tokenizer=tokenizer).to(device)
    controlnet, meta = read_avatar_weights(path, sd)
    shape = load_seq(meta["seq"]).shape
    return Avatar(sd, controlnet.eval(), meta, load_flame(flame or meta.get("flame")), shape)


def temporal_flicker(frames: np.ndarray) -> float:
    """Flicker of a video: the mean absolute difference between each frame and the average of its two
    neighbours, on [0, 1] pixels, halved (mean |x[t+1] - 2 x[t] + x[t-1]| / 2).

    Motion that is locally steady (a head turning, a mouth opening) cancels out; what a frame does on
    its own, against both neighbours (details that pop in and out), does not. It is a comparison
    between samplings of the same sequence: the motion of the sequence itself adds a floor."""
    if len(frames) < 3:
        raise ValueError(f"flicker needs at least 3 frames, got {len(frames)}")
    video = torch.from_numpy(frames).float() / 255
    return (video[2:] - 2 * video[1:-1] + video[:-2]).abs().mean().item() / 2
