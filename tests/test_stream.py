"""Stream batching (model/temporal.stream_latents, Avatar.stream): the wavefront gives the chunked sampler's frames."""
import pytest
import torch

from model.config import SD1
from model.sampling import NoiseSchedule, make_sampler
from model.temporal import denoise_video, stream_latents, temporal_weights

SHAPE = (4, 6, 6)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: a second intra-op thread makes each op wait for a busy core."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
TARGETS = torch.randn(12, *SHAPE, generator=torch.Generator().manual_seed(0))


def toy_model(x, t, frame_ids):
    """A stand-in denoiser that depends on the input, each row's timestep and each frame's 'conditioning'."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1)
    cond_out = 0.3 * x * torch.cos(t / 1000.0) + 0.5 * TARGETS[frame_ids] + 0.1 * torch.tanh(x)
    return cond_out, 0.2 * x + 0.01 * t / 1000.0


def chunked_case(name, steps, guidance, eta):
    """A sampler, the shared noise, the pull's weights, the toy model and the chunked sampler's 12 frames."""
    sampler = make_sampler(NoiseSchedule.from_config(SD1), name, steps, eta)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    weights = temporal_weights(steps, 0.9, max(1, round(0.8 * steps)))
    model = toy_model if guidance != 1.0 else lambda x, t, ids: (toy_model(x, t, ids)[0], None)
    offline = denoise_video(model, sampler, noise, weights, range(12), guidance=guidance, chunk=5, seed=3,
                            progress=False)
    return sampler, noise, weights, model, offline


@pytest.mark.parametrize("name, steps, guidance, eta", [
    ("ddim", 25, 3.0, 0.0), ("ddim", 6, 2.0, 0.7), ("lcm", 4, 1.0, 0.0), ("euler", 6, 3.0, 0.0),
    ("dpmpp_2m", 6, 3.0, 0.0), ("euler_trailing", 2, 1.0, 0.0), ("lcm", 1, 1.0, 0.0),
])
def test_stream_equals_chunked(name, steps, guidance, eta):
    sampler, noise, weights, model, offline = chunked_case(name, steps, guidance, eta)
    batches = []

    def counting(x, t, ids):
        batches.append(list(ids))
        return model(x, t, ids)
    streamed = torch.cat(list(stream_latents(counting, iter(range(12)), sampler, noise, weights, guidance, seed=3)))
    assert torch.isfinite(offline).all()
    assert torch.allclose(streamed, offline, atol=1e-5, rtol=1e-5), (streamed - offline).abs().max()
    # one model batch per tick, at most `steps` frames, each at another step: 12 arrivals + steps - 1 to drain
    assert len(batches) == 12 + steps - 1 and max(map(len, batches)) == min(steps, 12)
    assert batches[steps - 1] == list(range(min(steps, 12)))


@pytest.mark.parametrize("name, steps, guidance, eta", [("ddim", 6, 2.0, 0.7), ("lcm", 4, 1.0, 0.0),
                                                       ("dpmpp_2m", 6, 3.0, 0.0)])
def test_ticks_without_a_new_frame_give_the_chunked_frames_sooner(name, steps, guidance, eta):
    """Items None (no frame has arrived) tick the frames in flight without a new one: the same frames as the
    chunked sampler, and a frame followed by steps - 1 of them leaves before the next frame arrives."""
    sampler, noise, weights, model, offline = chunked_case(name, steps, guidance, eta)
    gaps = [0, steps - 1, 1, steps + 2, 0, 0, steps - 1, 3, steps - 1, 0, 2, steps - 1]  # Nones after frame f
    arrived, frames, arrived_when_out = [], [], []

    def arrivals():
        for f, gap in enumerate(gaps):
            arrived.append(f)
            yield f
            yield from [None] * gap
    for latents in stream_latents(model, arrivals(), sampler, noise, weights, guidance, seed=3):
        frames.append(latents)
        arrived_when_out.append(len(arrived))
    streamed = torch.cat(frames)
    assert torch.allclose(streamed, offline, atol=1e-5, rtol=1e-5), (streamed - offline).abs().max()
    for f, gap in enumerate(gaps[:-1]):
        assert (arrived_when_out[f] == f + 1) == (gap >= steps - 1), f  # out before the next one came in


def test_stream_yields_each_frame_after_steps_ticks():
    """Latency: frame f leaves on the tick after the arrival of frame f + steps - 1, never waiting for more."""
    sampler = make_sampler(NoiseSchedule.from_config(SD1), "lcm", 4)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    arrived = []

    def arrivals():
        for f in range(8):
            arrived.append(f)
            yield f
    stream = stream_latents(lambda x, t, ids: (toy_model(x, t, ids)[0], None), arrivals(), sampler, noise,
                            temporal_weights(4, 0.9, 3))
    for f in range(8):
        next(stream)
        assert len(arrived) == min(f + 4, 8)
    assert list(stream) == []
    assert list(stream_latents(toy_model, iter([]), sampler, noise, [0.0] * 4)) == []


@pytest.mark.parametrize("settings", [
    dict(sampler="ddim", steps=25, guidance=3.0),   # sample.py's defaults
    dict(sampler="lcm", steps=4, guidance=1.0),     # the live setting (LCM-LoRA)
])
def test_avatar_stream_equals_render(untrained_avatar_run, settings):
    """Avatar.stream, fed one FLAME frame at a time, gives Avatar.render's frames for the whole sequence:
    the latents to 1e-5 of their scale (fp32; the real UNet + ControlNet with per-frame timesteps), hence the same uint8
    frames up to one level of rounding (the VAE decodes one frame at a time instead of a chunk)."""
    import numpy as np

    import svp
    from model.temporal import video_noise
    avatar = svp.load_avatar(str(untrained_avatar_run))
    seq = svp.load_seq(str(untrained_avatar_run / "tracking" / "seq.npz"))
    settings = svp.VideoSampling(**settings, seed=5, batch_frames=3, conditioning_scale=1.0)
    n = 6
    one_by_one = [one_frame(seq, f) for f in range(n)]
    streamed = np.stack(list(avatar.stream(iter(one_by_one), settings)))
    rendered, hints = avatar.render(seq, frames=range(n), settings=settings, progress=False)
    assert streamed.shape == rendered.shape == (n, 64, 64, 3)
    assert np.abs(streamed.astype(int) - rendered).max() <= 1
    # a live source slower than the ticks: no frame yet (None) between the frames, the same frames
    gaps = [None] * (settings.steps - 1)
    sparse = np.stack(list(avatar.stream((item for frame in one_by_one for item in [frame, *gaps]), settings)))
    assert np.abs(sparse.astype(int) - rendered).max() <= 1

    # the latents themselves, through the avatar's real denoiser
    from model.pipeline import encode_prompts
    context = avatar.text_context(None)
    uncond = encode_prompts(avatar.sd, [""]) if settings.guidance != 1.0 else None
    denoiser = avatar.denoiser
    noise = video_noise(4, (8, 8), settings.seed, "cpu", torch.float32)
    sampler = make_sampler(NoiseSchedule.from_config(avatar.sd.config), settings.sampler, settings.steps)
    offline = denoise_video(lambda x, t, ids: denoiser.guided(x, t, context, uncond, hints[ids[0]:ids[-1] + 1]),
                            sampler, noise, settings.weights, range(n), guidance=settings.guidance, chunk=3,
                            seed=settings.seed, progress=False)
    streamed = torch.cat(list(stream_latents(lambda x, t, h: denoiser.guided(x, t, context, uncond, torch.stack(h)),
                                             iter(hints), sampler, noise, settings.weights, settings.guidance,
                                             settings.seed)))
    error = ((streamed - offline).abs().max() / offline.abs().max()).item()  # batches of other sizes round apart
    assert error <= 1e-5, error


def one_frame(seq, frame):
    """Frame `frame` of `seq` as a one-frame FlameSequence (what live tracking yields)."""
    from dataclasses import replace
    pick = slice(frame, frame + 1)
    return replace(seq, expression=seq.expression[pick], global_rot=seq.global_rot[pick],
                   neck_rot=seq.neck_rot[pick], jaw_rot=seq.jaw_rot[pick], eye_rots=seq.eye_rots[pick],
                   translation=seq.translation[pick], crop_boxes=None)
