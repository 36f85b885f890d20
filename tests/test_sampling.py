"""Sampler parity with diffusers' schedulers: same fake model, same x_T, every intermediate latent."""
import math

import pytest
import torch

from model.config import SD1, SD2_V
from kernels import temporal_step
from model.sampling import (DDIMSampler, DPMSolverPP2MSampler, EulerSampler, EulerTrailingSampler, LCMSampler,
                            NoiseSchedule, StepCoefficients)
from model.temporal import denoise

diffusers = pytest.importorskip("diffusers")
# diffusers' schedulers call np.array on tensors in a way numpy 2 flags; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SHAPE = (2, 4, 8, 8)
SD_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                           beta_schedule="scaled_linear", steps_offset=1)


def fake_model(fixed: torch.Tensor):
    """A deterministic stand-in for the UNet whose output depends on both x and t."""
    def model_fn(x, t):
        return 0.1 * x * math.cos(float(t) / 1000) + 0.05 * fixed
    return model_fn


def rel_err(ours, ref):
    return ((ours - ref).norm() / ref.norm()).item()


def diffusers_trajectory(scheduler, model_fn, noise, step_kwargs=None):
    x = noise * scheduler.init_noise_sigma
    states = []
    for t in scheduler.timesteps:
        out = model_fn(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x, **(step_kwargs or {})).prev_sample
        states.append(x)
    return states


def our_trajectory(sampler, model_fn, noise, generator=None):
    states = []
    final, _ = denoise(lambda x, t: (model_fn(x, t), None), noise, sampler,
                       step_noise=lambda: torch.randn(noise.shape, generator=generator),
                       callback=lambda i, x, x0: states.append(x))
    assert torch.equal(final, states[-1])
    return states


def schedule(prediction_type):
    return NoiseSchedule.from_config(SD1 if prediction_type == "epsilon" else SD2_V)


CASES = {  # name -> (our sampler, diffusers scheduler, extra step kwargs of a sampler that draws noise, else None)
    "ddim": (lambda s, n: DDIMSampler(s, n),
             lambda pt: diffusers.DDIMScheduler(**SD_SCHEDULER_CONFIG, clip_sample=False, set_alpha_to_one=False,
                                                prediction_type=pt), None),
    "ddim_eta": (lambda s, n: DDIMSampler(s, n, eta=0.7),
                 lambda pt: diffusers.DDIMScheduler(**SD_SCHEDULER_CONFIG, clip_sample=False, set_alpha_to_one=False,
                                                    prediction_type=pt), {"eta": 0.7}),
    "euler": (lambda s, n: EulerSampler(s, n),
              lambda pt: diffusers.EulerDiscreteScheduler(**SD_SCHEDULER_CONFIG, prediction_type=pt), None),
    "dpmpp_2m": (lambda s, n: DPMSolverPP2MSampler(s, n),
                 lambda pt: diffusers.DPMSolverMultistepScheduler(**SD_SCHEDULER_CONFIG, prediction_type=pt), None),
    "dpmpp_2m_karras": (lambda s, n: DPMSolverPP2MSampler(s, n, karras_sigmas=True),
                        lambda pt: diffusers.DPMSolverMultistepScheduler(**SD_SCHEDULER_CONFIG, prediction_type=pt,
                                                                         use_karras_sigmas=True), None),
    "euler_trailing": (lambda s, n: EulerTrailingSampler(s, n),
                       lambda pt: diffusers.EulerDiscreteScheduler(**SD_SCHEDULER_CONFIG, prediction_type=pt,
                                                                   timestep_spacing="trailing"), None),
    # LCM-LoRA's scheduler: LCMScheduler.from_config(SD's scheduler config), its own defaults otherwise
    "lcm": (lambda s, n: LCMSampler(s, n),
            lambda pt: diffusers.LCMScheduler(**SD_SCHEDULER_CONFIG, clip_sample=False, set_alpha_to_one=False,
                                              prediction_type=pt), {}),
}
FEW_STEP = ("euler_trailing", "lcm")


def check_trajectory(case: str, num_steps: int, prediction_type: str, tolerance: float):
    make_ours, make_theirs, noise_kwargs = CASES[case]
    ours, theirs = make_ours(schedule(prediction_type), num_steps), make_theirs(prediction_type)
    theirs.set_timesteps(num_steps)

    assert [float(t) for t in ours.timesteps] == theirs.timesteps.tolist()
    assert len(ours) == num_steps
    assert ours.init_noise_sigma == pytest.approx(float(theirs.init_noise_sigma), rel=1e-7)
    if hasattr(ours, "ve_sigmas"):
        assert torch.equal(torch.tensor(ours.ve_sigmas, dtype=torch.float32), theirs.sigmas)

    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(SHAPE, generator=generator)
    model_fn = fake_model(torch.randn(SHAPE, generator=generator))
    draws = noise_kwargs is not None
    step_kwargs = dict(noise_kwargs, generator=torch.Generator().manual_seed(1)) if draws else None
    expected = diffusers_trajectory(theirs, model_fn, noise, step_kwargs)
    got = our_trajectory(ours, model_fn, noise, torch.Generator().manual_seed(1) if draws else None)

    assert len(got) == len(expected)
    for step, (x_ours, x_ref) in enumerate(zip(got, expected)):
        assert rel_err(x_ours, x_ref) <= tolerance, f"step {step}"


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("num_steps", [10, 20])
@pytest.mark.parametrize("case", sorted(CASES))
def test_trajectory_matches_diffusers(case, num_steps, prediction_type):
    check_trajectory(case, num_steps, prediction_type, 1e-6 if case in FEW_STEP else 1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("num_steps", [1, 2, 3, 4])
@pytest.mark.parametrize("case", FEW_STEP)
def test_few_step_trajectory_matches_diffusers(case, num_steps, prediction_type):
    # One Euler step of a v-prediction model to s = 0: diffusers forms x0 as x + (x0 - x) in float32, and
    # with |x| ~ 15 |x0| that cancellation costs it 7.5e-6 (ours is 1.2e-7 from the float64 result).
    exception = (case, num_steps, prediction_type) == ("euler_trailing", 1, "v_prediction")
    check_trajectory(case, num_steps, prediction_type, 1e-5 if exception else 1e-6)


@pytest.mark.parametrize("make", [DDIMSampler, EulerSampler, DPMSolverPP2MSampler, EulerTrailingSampler, LCMSampler])
def test_bad_step_count_is_rejected(make):
    with pytest.raises(ValueError, match="num_steps"):
        make(schedule("epsilon"), 0)


def test_lcm_steps():
    """LCM's 4 steps of its 50 distilled ones, the boundary scalings near the clean end, fresh noise between
    steps only, and a last step that returns the clean estimate."""
    lcm = LCMSampler(schedule("epsilon"), 4)
    assert lcm.timesteps == [999, 759, 499, 259]
    assert LCMSampler(schedule("epsilon"), 1).timesteps == [999]
    c_skip, c_out = lcm.boundary_scalings(3)
    assert c_skip == pytest.approx(0.25 / (2590 ** 2 + 0.25))
    assert c_out == pytest.approx(2590 / (2590 ** 2 + 0.25) ** 0.5)
    assert [lcm.coefficients(i).c_n > 0 for i in range(4)] == [True, True, True, False]
    assert lcm.coefficients(3) == StepCoefficients(c_x=0.0, c_0=1.0)
    with pytest.raises(ValueError, match="original_inference_steps=50"):
        LCMSampler(schedule("epsilon"), 51)


def test_ddim_eta_draws_noise_and_eta0_does_not():
    s = schedule("epsilon")
    assert all(DDIMSampler(s, 10).coefficients(i).c_n == 0 for i in range(10))
    assert all(DDIMSampler(s, 10, eta=1.0).coefficients(i).c_n > 0 for i in range(10))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_schedule_matches_diffusers_training_process(prediction_type):
    ours = schedule(prediction_type)
    theirs = diffusers.DDPMScheduler(**SD_SCHEDULER_CONFIG, prediction_type=prediction_type)
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(SHAPE, generator=generator), torch.randn(SHAPE, generator=generator)
    t = torch.tensor([3, 777])
    x_t = ours.add_noise(x0, noise, t)
    torch.testing.assert_close(x_t, theirs.add_noise(x0, noise, t), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.v_target(x0, noise, t), theirs.get_velocity(x0, noise, t), rtol=1e-6, atol=1e-6)
    # a model that predicts its training target exactly recovers x0 and the noise
    x0_hat, eps_hat = ours.to_x0_eps(x_t, ours.training_target(x0, noise, t), t)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(eps_hat, noise, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("make", [lambda s: DDIMSampler(s, 10), lambda s: EulerSampler(s, 10),
                                  lambda s: DPMSolverPP2MSampler(s, 10)])
def test_x0_coefficients_invert_the_forward_process(make, prediction_type):
    """At every step, feeding the exact target for a known (x0, eps) gives back x0, and the renoise
    coefficients put x0 at the next step's level in the sampler's own domain."""
    s = schedule(prediction_type)
    sampler = make(s)
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(SHAPE, generator=generator), torch.randn(SHAPE, generator=generator)
    for i in range(len(sampler)):
        alpha, sigma = sampler.alphas[i], sampler.sigmas[i]
        x_vp = alpha * x0 + sigma * eps
        x = x_vp / sampler.input_scale(i)
        target = eps if prediction_type == "epsilon" else alpha * eps - sigma * x0
        p = sampler.x0_coefficients(i)
        torch.testing.assert_close(p.a * x + p.b * target, x0, rtol=1e-4, atol=1e-4)
        r_0, r_n = sampler.renoise_coefficients(i)
        scale = sampler.input_scale(i + 1) if i + 1 < len(sampler) else 1.0
        if sampler.sigmas[i + 1] > 0:
            expected_next = (sampler.alphas[i + 1] * x0 + sampler.sigmas[i + 1] * eps) / scale
            torch.testing.assert_close(r_0 * x0 + r_n * eps, expected_next, rtol=1e-5, atol=1e-5)


def test_the_step_is_the_documented_linear_combination():
    generator = torch.Generator().manual_seed(0)
    x, x0, x0_prev, noise = (torch.randn(SHAPE, generator=generator) for _ in range(4))
    step = dict(a=0.0, b=1.0, c_x=0.3, c_0=0.5)  # x0 = the model output, so the update is seen alone
    x_next, _ = temporal_step(x, x0, x0_prev=x0_prev, noise=noise, c_1=-0.2, c_n=0.1, **step)
    torch.testing.assert_close(x_next, 0.3 * x + 0.5 * x0 - 0.2 * x0_prev + 0.1 * noise)
    torch.testing.assert_close(temporal_step(x, x0, **step)[0], 0.3 * x + 0.5 * x0)


def test_classifier_free_guidance_extrapolates():
    x = torch.zeros(1, 4, 2, 2)
    uncond_out, cond_out = torch.ones_like(x), 3 * torch.ones_like(x)
    _, out = temporal_step(x, cond_out, uncond_out, guidance=7.5, a=0.0, b=1.0, c_x=0.0, c_0=1.0)  # x0 = guided
    assert out.shape == (1, 4, 2, 2)
    torch.testing.assert_close(out, torch.full_like(out, 1 + 7.5 * 2))
