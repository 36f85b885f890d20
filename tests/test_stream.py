"""Stream batching (model/temporal.stream_latents, Avatar.stream): the wavefront gives the chunked sampler's frames."""
import pytest
import torch

from model.config import SD1
from model.sampling import NoiseSchedule, make_sampler
from model.temporal import denoise_video, stream_latents, temporal_weights

SHAPE = (4, 6, 6)
TARGETS = torch.randn(12, *SHAPE, generator=torch.Generator().manual_seed(0))


def toy_model(x, t, frame_ids):
    """A stand-in denoiser that depends on the input, each row's timestep and each frame's 'conditioning'."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1)
    cond_out = 0.3 * x * torch.cos(t / 1000.0) + 0.5 * TARGETS[frame_ids] + 0.1 * torch.tanh(x)
    return cond_out, 0.2 * x + 0.01 * t / 1000.0


@pytest.mark.parametrize("name, steps, guidance, eta", [
    ("ddim", 25, 3.0, 0.0), ("ddim", 6, 2.0, 0.7), ("lcm", 4, 1.0, 0.0), ("euler", 6, 3.0, 0.0),
    ("dpmpp_2m", 6, 3.0, 0.0), ("euler_trailing", 2, 1.0, 0.0), ("lcm", 1, 1.0, 0.0),
])
def test_stream_equals_chunked(name, steps, guidance, eta):
    sampler = make_sampler(NoiseSchedule.from_config(SD1), name, steps, eta)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    weights = temporal_weights(steps, 0.9, max(1, round(0.8 * steps)))
    model = toy_model if guidance != 1.0 else lambda x, t, ids: (toy_model(x, t, ids)[0], None)
    offline = denoise_video(model, sampler, noise, weights, range(12), guidance=guidance, chunk=5, seed=3,
                            progress=False)
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
