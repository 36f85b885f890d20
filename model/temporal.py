"""Temporal denoising: sample a sequence of frames so that consecutive frames agree.

Per-frame sampling from independent noise flickers: every frame picks its own details. Two things
tie the frames together here (SVP's temporal denoising):

  1. all frames start from the same noise x_T (`shared_noise`, one frame's worth);
  2. at step i, frame f is pulled toward frame f-1's clean estimate of step i-1, re-noised with the
     shared noise to the level that step i leads to:
        x_next = (1 - w_i) * x_next + w_i * (r_0 * x0[f-1] + r_n * shared_noise)
     with a strength w_i = strength * (1 - i / fade_steps) that fades to zero after `fade_steps`
     steps: early steps fix the layout, where agreement matters; late steps add detail, where the
     conditioning (this frame's 3DMM rendering) must win.

The whole step (guidance, x0 estimate, solver update, pull) is one fused kernel on the GPU
(kernels/temporal.py). Frames are denoised in lock-step chunks of `chunk` frames (one UNet batch).

Chunks are exact, not approximate. A chunk's first frame is pulled toward the previous chunk's last
frame: that chunk hands over its last frame's estimates of every step (`carry`), so chunked and
unchunked sampling do the same arithmetic. A range that starts mid-video (`frames`, or one torchrun
process's share) has no previous chunk; but frame f at step i depends on frame f-1 at step i-1 only
while w > 0, so f depends on at most `coupling_depth` predecessors (a light cone), and the range is
preceded once by that many warm-up frames, sampled and discarded. Every split of a video therefore
gives the same frames for the same seed.
"""
import torch
from tqdm.auto import tqdm

from kernels.temporal import temporal_step
from model.sampling import Sampler


def temporal_weights(num_steps: int, strength: float, fade_steps: int) -> list[float]:
    """w_i for every step: `strength` at step 0, fading linearly to 0 at step `fade_steps`."""
    return [strength * max(0.0, 1.0 - i / fade_steps) if fade_steps > 0 else 0.0 for i in range(num_steps)]


def coupling_depth(weights: list[float]) -> int:
    """How many earlier frames a frame's result depends on.

    The pull of step i uses the predecessor's estimate of step i-1, and that estimate depends on the
    predecessor's own pulls only up to step i-2: each frame further back is reached two steps earlier.
    With pulls up to step L (steps 1..L, w_0 is never used), frame f-d matters while L + 1 - 2d >= 0.
    """
    last = max((i for i, w in enumerate(weights) if i >= 1 and w > 0), default=0)
    return (last + 1) // 2


def warm_up_start(start: int, weights: list[float]) -> int:
    """The first frame that a range starting at frame `start` depends on (sampled, then discarded)."""
    return max(0, start - coupling_depth(weights))


def step_noise_generator(seed: int, frame: int, device) -> torch.Generator:
    """Per-frame generator for DDIM's step noise: the same draws however the frames are chunked."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + frame)


@torch.no_grad()
def denoise_chunk(model_fn, frames: range, sampler: Sampler, shared_noise: torch.Tensor, weights: list[float],
                  guidance: float, seed: int, carry: list[torch.Tensor] | None = None):
    """Denoise frames[0]..frames[-1] in lock-step.

    model_fn(x, t, frame_ids) -> (cond_out, uncond_out or None) for the batch x of those frames.
    carry: the clean estimates of every step of the frame before the range (the previous chunk's
    last frame), which the range's first frame is pulled toward; None: no frame before it.
    Returns the clean latents (len(frames), C, H, W) and the carry for the next chunk.
    """
    x = shared_noise.expand(len(frames), *shared_noise.shape).clone() * sampler.init_noise_sigma
    generators = [step_noise_generator(seed, f, shared_noise.device) for f in frames]
    x0_prev, estimates = None, []
    for i in range(len(sampler)):
        cond, uncond = model_fn(x * sampler.input_scale(i), sampler.timesteps[i], list(frames))
        p, c = sampler.x0_coefficients(i), sampler.coefficients(i)
        noise = None
        if c.c_n != 0:
            noise = torch.stack([torch.randn(shared_noise.shape, generator=g, device=x.device, dtype=x.dtype)
                                 for g in generators])
        w = weights[i] if x0_prev is not None else 0.0
        # Frame k is pulled toward frame k-1's estimate of the previous step. Without a frame before the
        # range its first frame is pulled toward its own: for frame 0 of the video that is the rule, and
        # the first warm-up frame's pull does not reach the frames that are kept.
        pull_from = None
        if w > 0:
            before = carry[i - 1] if carry is not None else x0_prev[:1]
            pull_from = torch.cat([before, x0_prev[:-1]])
        r_0, r_n = sampler.renoise_coefficients(i)
        x_next, x0 = temporal_step(x, cond, uncond, x0_prev=x0_prev if c.c_1 != 0 else None, noise=noise,
                                   shared_noise=shared_noise if pull_from is not None else None,
                                   prev_frame_x0=pull_from, guidance=guidance, a=p.a, b=p.b, c_x=c.c_x,
                                   c_0=c.c_0, c_1=c.c_1, c_n=c.c_n, r_0=r_0, r_n=r_n, w=w)
        x, x0_prev = x_next, x0
        estimates.append(x0[-1:])
    return x, estimates


def denoise_video(model_fn, num_frames: int, sampler: Sampler, shared_noise: torch.Tensor, strength: float,
                  fade_steps: int, guidance: float = 1.0, chunk: int = 8, seed: int = 0,
                  frames: range | None = None, progress: bool = True) -> torch.Tensor:
    """Clean latents for `frames` (default all `num_frames`) of a video, chunk by chunk (see module doc)."""
    frames = frames if frames is not None else range(num_frames)
    weights = temporal_weights(len(sampler), strength, fade_steps)
    warm_up_from = warm_up_start(frames.start, weights)
    out, carry = [], None
    bar = tqdm(total=len(frames), disable=not progress, desc="frames", unit="frame")
    for start in range(warm_up_from, frames.stop, chunk):
        stop = min(start + chunk, frames.stop)
        latents, carry = denoise_chunk(model_fn, range(start, stop), sampler, shared_noise, weights, guidance, seed,
                                       carry)
        kept = latents[max(0, frames.start - start):]
        out.append(kept)
        bar.update(len(kept))
    bar.close()
    return torch.cat(out)
