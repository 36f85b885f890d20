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

Chunks are exact, not approximate. Frame f at step i depends on frame f-1 at step i-1 only while
w > 0, so its result depends on at most `fade_steps` predecessors (a light cone). Each chunk
therefore re-runs the `overlap = fade_steps - 1` frames before it as a warm-up and discards them:
chunked, unchunked and multi-process sampling give the same frames for the same seed.
"""
import torch
from tqdm.auto import tqdm

from kernels.temporal import temporal_step
from model.sampling import Sampler


def temporal_weights(num_steps: int, strength: float, fade_steps: int) -> list[float]:
    """w_i for every step: `strength` at step 0, fading linearly to 0 at step `fade_steps`."""
    return [strength * max(0.0, 1.0 - i / fade_steps) if fade_steps > 0 else 0.0 for i in range(num_steps)]


def coupling_depth(weights: list[float]) -> int:
    """How many earlier frames a frame's result depends on: steps i >= 1 with w_i > 0 each reach one further."""
    return sum(1 for w in weights[1:] if w > 0)


def chunk_plan(first: int, last: int, chunk: int, overlap: int) -> list[tuple[int, int, int]]:
    """(run_from, keep_from, stop) per chunk, covering frames first..last-1: each chunk denoises
    run_from..stop-1 (at most `chunk` frames), of which keep_from..stop-1 are exact and kept; the
    `overlap` frames before keep_from are its warm-up (none before frame 0)."""
    plan, keep_from = [], first
    while keep_from < last:
        run_from = max(0, keep_from - overlap)
        stop = min(run_from + chunk, last)
        if stop <= keep_from:
            raise ValueError(f"--batch-frames ({chunk}) must exceed the temporal overlap ({overlap} frames); "
                             "raise it, or shorten the temporal fade")
        plan.append((run_from, keep_from, stop))
        keep_from = stop
    return plan


def step_noise_generator(seed: int, frame: int, device) -> torch.Generator:
    """Per-frame generator for DDIM's step noise: the same draws however the frames are chunked."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + frame)


@torch.no_grad()
def denoise_chunk(model_fn, frames: range, sampler: Sampler, shared_noise: torch.Tensor, weights: list[float],
                  guidance: float, seed: int) -> torch.Tensor:
    """Denoise frames[0]..frames[-1] in lock-step; the first frame of the range gets no temporal pull.

    model_fn(x, t, frame_ids) -> (cond_out, uncond_out or None) for the batch x of those frames.
    Returns the clean latents (len(frames), C, H, W).
    """
    x = shared_noise.expand(len(frames), *shared_noise.shape).clone() * sampler.init_noise_sigma
    generators = [step_noise_generator(seed, f, shared_noise.device) for f in frames]
    x0_prev = None
    for i in range(len(sampler)):
        cond, uncond = model_fn(x * sampler.input_scale(i), sampler.timesteps[i], list(frames))
        p, c = sampler.x0_coefficients(i), sampler.coefficients(i)
        noise = None
        if c.c_n != 0:
            noise = torch.stack([torch.randn(shared_noise.shape, generator=g, device=x.device, dtype=x.dtype)
                                 for g in generators])
        w = weights[i] if x0_prev is not None else 0.0
        # Frame k is pulled toward frame k-1's estimate of the previous step. The range's first frame has no
        # predecessor here and is pulled toward its own: for frame 0 of the video that is the rule, and for
        # a chunk's first warm-up frame it does not matter (warm-up frames are discarded).
        pull_from = torch.cat([x0_prev[:1], x0_prev[:-1]]) if w > 0 else None
        r_0, r_n = sampler.renoise_coefficients(i)
        x_next, x0 = temporal_step(x, cond, uncond, x0_prev=x0_prev if c.c_1 != 0 else None, noise=noise,
                                   shared_noise=shared_noise if pull_from is not None else None,
                                   prev_frame_x0=pull_from, guidance=guidance, a=p.a, b=p.b, c_x=c.c_x,
                                   c_0=c.c_0, c_1=c.c_1, c_n=c.c_n, r_0=r_0, r_n=r_n, w=w)
        x, x0_prev = x_next, x0
    return x


def denoise_video(model_fn, num_frames: int, sampler: Sampler, shared_noise: torch.Tensor, strength: float,
                  fade_steps: int, guidance: float = 1.0, chunk: int = 8, seed: int = 0,
                  frames: range | None = None, progress: bool = True) -> torch.Tensor:
    """Clean latents for `frames` (default all `num_frames`) of a video, chunk by chunk (see module doc)."""
    frames = frames if frames is not None else range(num_frames)
    weights = temporal_weights(len(sampler), strength, fade_steps)
    overlap = coupling_depth(weights)
    out = []
    bar = tqdm(total=len(frames), disable=not progress, desc="frames", unit="frame")
    for run_from, keep_from, stop in chunk_plan(frames.start, frames.stop, chunk, overlap):
        latents = denoise_chunk(model_fn, range(run_from, stop), sampler, shared_noise, weights, guidance, seed)
        out.append(latents[keep_from - run_from:])
        bar.update(stop - keep_from)
    bar.close()
    return torch.cat(out)
