"""Temporal video denoising (model/temporal.py): exact chunking, frame ranges, and the strength-0 limit."""
import pytest
import torch

from model.config import SD1
from model.sampling import DDIMSampler, DPMSolverPP2MSampler, EulerSampler, EulerTrailingSampler, LCMSampler, NoiseSchedule
from model.temporal import coupling_depth, denoise, denoise_chunk, denoise_video, temporal_weights, warm_up_start

SHAPE = (4, 6, 6)
TARGETS = torch.randn(20, *SHAPE, generator=torch.Generator().manual_seed(0))


def toy_model(x, t, frame_ids):
    """A stand-in denoiser whose output depends on the input, the timestep and each frame's 'conditioning'."""
    target = TARGETS[frame_ids]
    cond_out = 0.3 * x * torch.cos(torch.tensor(t / 1000.0)) + 0.5 * target + 0.1 * torch.tanh(x)
    uncond_out = 0.2 * x
    return cond_out, uncond_out


SAMPLERS = {
    "ddim": lambda s: DDIMSampler(s, 8),
    "ddim_eta": lambda s: DDIMSampler(s, 8, eta=0.5),
    "euler": lambda s: EulerSampler(s, 8),
    "dpmpp_2m": lambda s: DPMSolverPP2MSampler(s, 8),
    "lcm": lambda s: LCMSampler(s, 4),  # few-step: its re-noising between steps is drawn per frame
    "euler_trailing": lambda s: EulerTrailingSampler(s, 4),
}


@pytest.mark.parametrize("name", SAMPLERS)
def test_chunked_equals_unchunked(name):
    sampler = SAMPLERS[name](NoiseSchedule.from_config(SD1))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    weights = temporal_weights(len(sampler), 0.5, 4)
    run = lambda chunk, frames=range(20): denoise_video(toy_model, sampler, noise, weights, frames,
                                                        warm_up_start(frames.start, weights), guidance=3.0,
                                                        chunk=chunk, seed=7, progress=False)
    whole = run(20)
    assert torch.isfinite(whole).all()
    for chunk in (1, 4, 7):
        assert torch.allclose(run(chunk), whole, atol=1e-5, rtol=1e-5)
    for chunk in (2, 5):  # a range mid-video: warm-up frames, then chunks
        assert torch.allclose(run(chunk, range(9, 16)), whole[9:16], atol=1e-5, rtol=1e-5)


def test_strength_zero_is_per_frame_sampling():
    """With no temporal pull every frame is the image sampler (model/temporal.denoise) from the shared noise."""
    sampler = DPMSolverPP2MSampler(NoiseSchedule.from_config(SD1), 6)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    video = denoise_video(toy_model, sampler, noise, temporal_weights(len(sampler), 0.0, 3), range(3), guidance=2.0,
                          chunk=3, progress=False)
    for f in range(3):
        single, _ = denoise(lambda x, t, f=f: toy_model(x, t, [f]), noise[None], sampler, guidance=2.0)
        assert torch.allclose(video[f:f + 1], single, atol=1e-5, rtol=1e-5)


def test_temporal_pull_brings_frames_together():
    sampler = DDIMSampler(NoiseSchedule.from_config(SD1), 10)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    change = lambda v: (v[1:] - v[:-1]).abs().mean().item()
    free = denoise_video(toy_model, sampler, noise, temporal_weights(10, 0.0, 5), range(8), chunk=8, progress=False)
    tied = denoise_video(toy_model, sampler, noise, temporal_weights(10, 0.8, 5), range(8), chunk=8, progress=False)
    assert change(tied) < 0.9 * change(free)


def test_weights_and_light_cone():
    """A frame depends on exactly coupling_depth predecessors: with that many before it, it is exact; with
    one fewer, it is not (so the warm-up is as short as it can be)."""
    sampler = DDIMSampler(NoiseSchedule.from_config(SD1), 10)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    for fade_steps in (2, 3, 4, 5, 8):
        weights = temporal_weights(10, 0.6, fade_steps)
        depth = coupling_depth(weights)
        assert depth == fade_steps // 2  # pulls at steps 1..fade_steps-1
        whole, _ = denoise_chunk(toy_model, range(0, 12), sampler, noise, weights, 1.0, seed=0)
        from_1, _ = denoise_chunk(toy_model, range(1, 12), sampler, noise, weights, 1.0, seed=0)
        assert torch.allclose(from_1[depth:], whole[1 + depth:], atol=1e-5, rtol=1e-5), fade_steps
        assert not torch.allclose(from_1[depth - 1], whole[depth], atol=1e-3, rtol=1e-3), fade_steps
    assert temporal_weights(10, 0.6, 4)[:5] == pytest.approx([0.6, 0.45, 0.3, 0.15, 0.0])
