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
The image sampler is the same loop with no pull (`denoise`, used by text-to-image and train.py's previews).

Chunks are exact, not approximate. A chunk's first frame is pulled toward the previous chunk's last
frame: that chunk hands over its last frame's estimates of every step (`carry`), so chunked and
unchunked sampling do the same arithmetic. A range that starts mid-video (`frames`, or one torchrun
process's share) has no previous chunk; but frame f at step i depends on frame f-1 at step i-1 only
while w > 0, so f depends on at most `coupling_depth` predecessors (a light cone), and the range is
preceded once by that many warm-up frames, sampled and discarded. Every split of a video therefore
gives the same frames for the same seed.

Streaming (`stream_latents`, live driving) runs the same arithmetic as a wavefront: frames arrive one at
a time and each tick runs ONE model batch holding up to `steps` frames, each at a different step (the
newest frame at step 0 beside its predecessor at step 1, ...). Frame f at step i needs frame f-1's
estimate of step i-1, which the wavefront computed two ticks before, so the streamed frames equal the
chunked ones, and after `steps` ticks one finished frame leaves per tick (latency: `steps` ticks). A live
source that delivers frames more slowly than the ticks run says so (an item None: no frame yet), and the
frames in flight advance without a new one, so a frame's latency is `steps` ticks, not `steps` frames.

A live stream may change its settings between frames (`FrameSettings`: the text embedding, the temporal
strength, the conditioning scale; live/'s page controls). A frame takes the settings current when it
ENTERS the stream and keeps them until it leaves: its own pull toward its predecessor uses its own
strength, and the frames already in flight are not re-weighted. While frames of old and new settings share
a tick, each row of the model batch gets its own text embedding and scale (an eager call); once they agree
again the tick replays its graph (a new text embedding is an input of the same graph; a new
conditioning scale is a value baked into one, so each scale used gets its own capture). With fixed
settings every frame shares one FrameSettings and the arithmetic is the offline sampler's.

On CUDA the calls whose shapes repeat replay CUDA graphs (model/graphs.py; VideoSampling.cuda_graphs):
the model call of every step of a chunk (UNet + ControlNet, both guidance branches in one batch), the
stream's ticks (one graph per number of frames in flight, captured when it recurs: a tick with fewer than
`steps` frames is not only the wavefront's fill and drain, but every tick while a live source has no new
frame, and eager it would take longer than a full replayed one) and the decode. The fused step
(guidance, solver update, pull) stays one eager kernel launch per step: its coefficients are the step's,
passed as kernel scalars, which a graph would bake in (one capture of the whole network per step).
"""
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from tqdm.auto import tqdm

from kernels.temporal import temporal_step
from model.graphs import GraphedCall, device_scalar
from model.sampling import NoiseSchedule, Sampler, make_sampler
from model.vae import AutoencoderKL, to_uint8


@dataclass
class VideoSampling:
    """How a video is sampled (sample.py's flags of the same names).

    eta: DDIM's stochasticity (0 = deterministic; each frame draws its own step noise, which flickers);
    temporal_strength: pull of each frame toward the previous one (0 = independent frames);
    temporal_fade: the fraction of the steps over which that pull fades out (see the module doc);
    batch_frames: frames denoised together in lock-step (one UNet batch); conditioning_scale:
    multiplies the ControlNet's residuals (how strongly the 3DMM rendering steers; 0 = plain text-to-image);
    cuda_graphs: replay CUDA graphs where shapes repeat (see the module doc; no effect on the CPU).
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
    cuda_graphs: bool = True

    @property
    def weights(self) -> list[float]:
        """The pull's weight at every step."""
        return temporal_weights(self.steps, self.temporal_strength, max(1, round(self.temporal_fade * self.steps)))


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
def denoise(model_fn, noise: torch.Tensor, sampler: Sampler, guidance: float = 1.0, step_noise=None,
            weights: list[float] | None = None, shared_noise: torch.Tensor | None = None,
            carry: list[torch.Tensor] | None = None, callback=None, progress: bool = False):
    """Run `sampler` from the unit noise `noise` (N, C, H, W) to clean latents.

    model_fn(x, t) -> (cond_out, uncond_out or None), combined with classifier-free guidance `guidance`;
    step_noise() -> fresh unit noise like x (DDIM with eta > 0). Without `weights` the N samples are
    independent images; with them, sample k is pulled toward sample k-1 (frames of a video), and the
    first toward `carry`: the clean estimates of every step of the frame before (None: no frame before).
    callback(i, x_next, x0) after each step; progress: a progress bar over the steps.
    Returns the clean latents and the last sample's estimates of every step (the next chunk's carry).
    """
    x = noise * sampler.init_noise_sigma
    x0_prev, estimates = None, []
    for i in tqdm(range(len(sampler)), disable=not progress, desc="sampling"):
        cond_out, uncond_out = model_fn(x * sampler.input_scale(i), sampler.timesteps[i])
        p, c = sampler.x0_coefficients(i), sampler.coefficients(i)
        w = weights[i] if weights is not None and x0_prev is not None else 0.0
        # Frame k is pulled toward frame k-1's estimate of the previous step. Without a frame before the
        # range its first frame is pulled toward its own: for frame 0 of the video that is the rule, and
        # the first warm-up frame's pull does not reach the frames that are kept.
        pull_from = None
        if w > 0:
            before = carry[i - 1] if carry is not None else x0_prev[:1]
            pull_from = torch.cat([before, x0_prev[:-1]])
        r_0, r_n = sampler.renoise_coefficients(i)
        x_next, x0 = temporal_step(x, cond_out, uncond_out, x0_prev=x0_prev if c.c_1 != 0 else None,
                                   noise=step_noise() if c.c_n != 0 and step_noise else None,
                                   shared_noise=shared_noise if pull_from is not None else None,
                                   prev_frame_x0=pull_from, guidance=guidance, a=p.a, b=p.b, c_x=c.c_x,
                                   c_0=c.c_0, c_1=c.c_1, c_n=c.c_n, r_0=r_0, r_n=r_n, w=w)
        x, x0_prev = x_next, x0
        estimates.append(x0[-1:])
        if callback is not None:
            callback(i, x, x0)
    return x, estimates


def denoise_chunk(model_fn, frames: range, sampler: Sampler, shared_noise: torch.Tensor, weights: list[float],
                  guidance: float, seed: int, carry: list[torch.Tensor] | None = None):
    """Denoise frames[0]..frames[-1] in lock-step from the shared noise (see `denoise`).

    model_fn(x, t, frame_ids) -> (cond_out, uncond_out or None) for the batch x of those frames.
    """
    generators = [step_noise_generator(seed, f, shared_noise.device) for f in frames]

    def step_noise():
        return torch.stack([torch.randn(shared_noise.shape, generator=g, device=shared_noise.device,
                                        dtype=shared_noise.dtype) for g in generators])
    noise = shared_noise.expand(len(frames), *shared_noise.shape).clone()
    return denoise(lambda x, t: model_fn(x, t, list(frames)), noise, sampler, guidance, step_noise, weights,
                   shared_noise, carry)


def denoise_video(model_fn, sampler: Sampler, shared_noise: torch.Tensor, weights: list[float], frames: range,
                  first: int | None = None, guidance: float = 1.0, chunk: int = 8, seed: int = 0,
                  progress: bool = True) -> torch.Tensor:
    """Clean latents for `frames` of a video, chunk by chunk, after the warm-up frames first..frames.start-1
    (first: `warm_up_start(frames.start, weights)` for frames exactly as in the whole video; see module doc)."""
    return torch.cat(list(iter_denoise_video(model_fn, sampler, shared_noise, weights, frames, first, guidance, chunk,
                                             seed, progress)))


def iter_denoise_video(model_fn, sampler: Sampler, shared_noise: torch.Tensor, weights: list[float], frames: range,
                       first: int | None = None, guidance: float = 1.0, chunk: int = 8, seed: int = 0,
                       progress: bool = True) -> Iterator[torch.Tensor]:
    """`denoise_video`'s latents as each chunk is done: its frames of `frames` (none for a warm-up chunk)."""
    first = frames.start if first is None else first
    carry = None
    with tqdm(total=len(frames), disable=not progress, desc="frames", unit="frame") as bar:
        for start in range(first, frames.stop, chunk):
            stop = min(start + chunk, frames.stop)
            latents, carry = denoise_chunk(model_fn, range(start, stop), sampler, shared_noise, weights, guidance,
                                           seed, carry)
            kept = latents[max(0, frames.start - start):]
            bar.update(len(kept))
            if len(kept):
                yield kept


@dataclass
class _InFlight:
    """A frame in the wavefront: its conditioning, its current sample and its clean estimate of every step so far."""
    frame: int
    condition: object
    x: torch.Tensor
    generator: torch.Generator
    weights: list[float]               # the pull's weight at every step (this frame's temporal strength)
    before: "_InFlight | None" = None  # the frame whose estimates pull this one (frame 0: itself)
    estimates: list = field(default_factory=list)

    @property
    def step(self) -> int:
        return len(self.estimates)


def _stream_tick(model_fn, batch: list[_InFlight], sampler: Sampler, shared_noise: torch.Tensor, guidance: float):
    """One wavefront tick: one model call on every frame in flight (each at its own step), then each
    frame's sampler step with that step's coefficients (the same `temporal_step` as `denoise`)."""
    x = torch.cat([f.x * sampler.input_scale(f.step) for f in batch])
    t = torch.tensor([sampler.timesteps[f.step] for f in batch])  # each frame's own step
    if x.is_cuda:  # copied from page-locked memory, asynchronously: the host goes on queueing the tick's work
        t = t.pin_memory().to(x.device, non_blocking=True)
    cond_out, uncond_out = model_fn(x, t, [f.condition for f in batch])
    updates = []
    for row, f in enumerate(batch):
        i = f.step
        p, c = sampler.x0_coefficients(i), sampler.coefficients(i)
        w = f.weights[i] if i > 0 else 0.0
        pull_from = f.before.estimates[i - 1] if w > 0 else None  # computed two ticks ago
        noise = None
        if c.c_n != 0:
            noise = torch.randn(shared_noise.shape, generator=f.generator, device=x.device, dtype=x.dtype)[None]
        r_0, r_n = sampler.renoise_coefficients(i)
        updates.append(temporal_step(
            f.x, cond_out[row:row + 1], None if uncond_out is None else uncond_out[row:row + 1],
            x0_prev=f.estimates[-1] if c.c_1 != 0 else None, noise=noise,
            shared_noise=shared_noise if pull_from is not None else None, prev_frame_x0=pull_from,
            guidance=guidance, a=p.a, b=p.b, c_x=c.c_x, c_0=c.c_0, c_1=c.c_1, c_n=c.c_n, r_0=r_0, r_n=r_n, w=w))
    for f, (x_next, x0) in zip(batch, updates):  # after every row: a predecessor's estimates are read above
        f.x = x_next
        f.estimates.append(x0)


_END = object()  # `conditions` is exhausted


@torch.no_grad()
def stream_latents(model_fn, conditions: Iterable, sampler: Sampler, shared_noise: torch.Tensor,
                   weights: list[float] | Callable[[object], list[float]], guidance: float = 1.0,
                   seed: int = 0) -> Iterator[torch.Tensor]:
    """Clean latents (1, C, H, W) of frames 0, 1, 2, ... of a video whose conditioning arrives frame by
    frame (`conditions`, pulled one per tick), in order, the same as `denoise_video` gives (module doc).

    model_fn(x, t, conditions) -> (cond_out, uncond_out or None) for a batch x of frames at the timesteps
    t (a (B,) tensor: each frame at its own step) with those frames' conditioning items.
    weights: the pull's weight at every step, for every frame; or a function of a frame's conditioning item
    giving that frame's (per-frame settings, see the module doc).
    One tick per item of `conditions`, then ticks until the last frame is done. An item None says that no
    frame has arrived yet: the frames in flight advance a step without a new one (a live source slower
    than the ticks: a frame then leaves `steps` ticks after it arrived, not `steps` arrivals later; with
    none in flight, a None is passed over). The result is the same: a frame's step reads only its own
    earlier steps and its predecessor's estimate of the step before, which a frame that entered earlier
    has always made by then; only the model batches are made up differently (with batch-invariant model
    calls, bit for bit).

    The step itself runs per frame (its coefficients are its step's); a GPU path would hand
    `temporal_step` per-row coefficient vectors and run the tick as one kernel.
    """
    weights_of = weights if callable(weights) else lambda condition: weights
    in_flight: deque[_InFlight] = deque()
    conditions = iter(conditions)
    frame, arriving, last = 0, True, None
    while arriving or in_flight:
        condition = next(conditions, _END) if arriving else _END
        arriving = condition is not _END
        if arriving and condition is not None:
            f = _InFlight(frame, condition, shared_noise[None] * sampler.init_noise_sigma,
                          step_noise_generator(seed, frame, shared_noise.device), weights_of(condition))
            f.before, last = last or f, f
            in_flight.append(f)
            frame += 1
        if not in_flight:
            continue  # nothing to advance: the next item, or the end
        _stream_tick(model_fn, list(in_flight), sampler, shared_noise, guidance)
        if in_flight[0].step == len(sampler):
            done = in_flight.popleft()
            done.before = None  # its successor still reads its estimates; nothing reads further back
            yield done.x


def video_noise(channels: int, latent_size: tuple[int, int], seed: int, device, dtype) -> torch.Tensor:
    """The noise x_T shared by every frame of a video (one frame's worth), the same on every device."""
    return torch.randn((channels, *latent_size), generator=torch.Generator().manual_seed(seed)).to(device, dtype)


@torch.no_grad()
def sample_video(denoiser, vae: AutoencoderKL, schedule: NoiseSchedule, hints: torch.Tensor, frames: range,
                 context: torch.Tensor, uncond_context: torch.Tensor | None = None,
                 settings: VideoSampling | None = None, progress: bool = True) -> np.ndarray:
    """Frames uint8 (T, H, W, 3) of `frames`, denoised by `denoiser` (model/avatar.Denoiser) and decoded.

    hints: the hint images (3DMM renderings) of the frames frames.stop - len(hints) .. frames.stop - 1, at
    the images' resolution; the ones before frames.start are warm-up frames (sampled, then discarded),
    `warm_up_start(frames.start, settings.weights)` of them make any sub-range exact.
    context, uncond_context: (1, 77, D) text embeddings of the prompt and of the negative prompt
    (classifier-free guidance; None when settings.guidance is 1).
    """
    first = frames.stop - len(hints)
    return np.concatenate(list(iter_sample_video(denoiser, vae, schedule, lambda r: hints[r.start - first:r.stop - first],
                                                 hints.shape[-2:], first, frames, context, uncond_context, settings, progress)))


@torch.no_grad()
def iter_sample_video(denoiser, vae: AutoencoderKL, schedule: NoiseSchedule, hints_of, size: tuple[int, int],
                      first: int, frames: range, context: torch.Tensor, uncond_context: torch.Tensor | None = None,
                      settings: VideoSampling | None = None, progress: bool = True) -> Iterator[np.ndarray]:
    """`sample_video`'s frames, `settings.batch_frames` at a time as they are decoded (the same arithmetic,
    the same decoder batches), sampled from frame `first` on (the warm-up). hints_of(range) -> the hint
    images of those frames, asked once per chunk: rendered as they are needed, nothing grows with the video
    (evaluate.py scores takes of any length so)."""
    settings = settings or VideoSampling()
    decode = GraphedCall(vae.decode_latents, settings.cuda_graphs, clone_outputs=False)  # to_uint8 copies each chunk
    latent_size = (size[0] // vae.downscale, size[1] // vae.downscale)
    chunk, pending = settings.batch_frames, None
    for latents in _video_latents(denoiser, schedule, hints_of, first, frames, context, uncond_context, settings,
                                  latent_size, progress):
        pending = latents if pending is None else torch.cat([pending, latents])
        while len(pending) >= chunk:   # decoded in batches of `chunk` from frames.start on, as sample_video did
            yield to_uint8(decode(pending[:chunk])).numpy()
            pending = pending[chunk:]
    if pending is not None and len(pending):
        yield to_uint8(decode(pending)).numpy()


def _video_latents(denoiser, schedule: NoiseSchedule, hints_of, first: int, frames: range, context: torch.Tensor,
                   uncond_context: torch.Tensor | None, settings: VideoSampling, latent_size: tuple[int, int],
                   progress: bool):
    """iter_sample_video's latents, chunk by chunk (`iter_denoise_video`)."""
    param = next(denoiser.parameters())
    shared_noise = video_noise(denoiser.unet.config.in_channels, latent_size, settings.seed, param.device, param.dtype)
    # the step's temporal_step reads the outputs before the next call: no copy for the caller needed
    guided = GraphedCall(denoiser.guided, settings.cuda_graphs, clone_outputs=False)
    held = {}   # the hints of the chunk being denoised: every step of it reads them

    def model_fn(x, t, frame_ids):
        chunk = range(frame_ids[0], frame_ids[-1] + 1)  # a chunk's frames are consecutive
        if chunk not in held:
            held.clear()
            held[chunk] = hints_of(chunk).to(param.device, param.dtype)
        return guided(x, device_scalar(t, x.device), context, uncond_context, held[chunk],
                      settings.conditioning_scale)

    sampler = make_sampler(schedule, settings.sampler, settings.steps, settings.eta)
    return iter_denoise_video(model_fn, sampler, shared_noise, settings.weights, frames, first, settings.guidance,
                              settings.batch_frames, settings.seed, progress)


@dataclass(frozen=True)
class FrameSettings:
    """What a streamed frame is sampled with, fixed as it enters the stream (see the module doc)."""
    context: torch.Tensor        # (1, 77, D) text embedding of the prompt (blended toward a morph)
    temporal_strength: float
    conditioning_scale: float


@torch.no_grad()
def stream_video(denoiser, decoder, schedule: NoiseSchedule, hints: Iterable[torch.Tensor],
                 latent_size: tuple[int, int], context: torch.Tensor, uncond_context: torch.Tensor | None = None,
                 settings: VideoSampling | None = None,
                 frame_settings: Callable[[], FrameSettings] | None = None) -> Iterator[np.ndarray]:
    """Frames uint8 (H, W, 3) of a video whose hint images (C, H, W) arrive one at a time (live driving), each
    as soon as it is done: `stream_latents` on `denoiser`, every frame decoded as it leaves by `decoder`
    (its `decode_latents`: the VAE, or a smaller decoder). Arguments as for `sample_video`, but a hint
    None is no frame yet (the frames in flight advance a step: `stream_latents`); frame_settings()
    is asked as each hint arrives (a live run's current text embedding, temporal strength and conditioning
    scale); None: `context` and `settings`' for every frame.
    """
    settings = settings or VideoSampling()
    fixed = FrameSettings(context, settings.temporal_strength, settings.conditioning_scale)
    frame_settings = frame_settings or (lambda: fixed)
    param = next(denoiser.parameters())
    noise = video_noise(denoiser.unet.config.in_channels, latent_size, settings.seed, param.device, param.dtype)
    # a tick reads the model's outputs before the next tick, to_uint8 copies the decoded frame: no copies needed
    tick = GraphedCall(denoiser.guided, settings.cuda_graphs, clone_outputs=False)
    decode = GraphedCall(decoder.decode_latents, settings.cuda_graphs, clone_outputs=False)

    def model_fn(x, t, frames: list[tuple[torch.Tensor, FrameSettings]]):
        hint = torch.stack([h for h, _ in frames]).to(param.device, param.dtype)
        first = frames[0][1]
        if all(s is first for _, s in frames):
            return tick(x, t, first.context, uncond_context, hint, first.conditioning_scale)
        # frames of different settings in one tick (just after a live change): each row its own, eagerly
        context = torch.cat([s.context for _, s in frames])
        scale = torch.tensor([s.conditioning_scale for _, s in frames], device=x.device, dtype=x.dtype)
        return denoiser.guided(x, t, context, uncond_context, hint, scale.view(-1, 1, 1, 1))

    def weights(frame: tuple[torch.Tensor, FrameSettings]) -> list[float]:
        return replace(settings, temporal_strength=frame[1].temporal_strength).weights

    sampler = make_sampler(schedule, settings.sampler, settings.steps, settings.eta)
    # settings taken as the frame enters; None (no frame yet, see stream_latents) passes on
    arriving = (None if hint is None else (hint, frame_settings()) for hint in hints)
    for latents in stream_latents(model_fn, arriving, sampler, noise, weights, settings.guidance, settings.seed):
        yield to_uint8(decode(latents))[0].numpy()
