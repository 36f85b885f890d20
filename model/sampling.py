"""Noise schedule and samplers (DDIM, Euler, DPM-Solver++(2M), and the few-step LCM and trailing Euler) of
Stable Diffusion.

Every sampler step is the same two linear maps with per-step Python-float coefficients:

    x0     = a * x + b * model_out                            (X0Coefficients: model output -> clean estimate)
    x_next = c_x * x + c_0 * x0 + c_1 * x0_prev + c_n * noise (StepCoefficients: the solver update)

x0_prev is the previous step's x0 (only DPM-Solver++(2M) uses it) and noise is fresh N(0, I)
(DDIM with eta > 0; LCM re-noises its clean estimate with it). A sampler is therefore just a table of
coefficients; kernels/temporal.py evaluates it (a fused Triton kernel and its PyTorch reference) and
model/temporal.py runs the loop, for images and videos alike. The model is called on `input_scale(i) * x`
at timestep `timesteps[i]`.

Two domains for `x`, both describing x = (clean part) + (noise part) at step i:
  * VP (DDIM, DPM-Solver, LCM): x = alpha * x0 + sigma * eps with alpha^2 + sigma^2 = 1; the model sees x.
  * VE (Euler):                 x = x0 + s * eps with s = sigma / alpha; the model sees x / sqrt(1 + s^2)
                                (diffusers' `scale_model_input`), which is the VP sample again.
Schedules, timestep spacings and final-step handling follow diffusers' schedulers configured as
Stable Diffusion's scheduler_config.json (scaled-linear betas, steps_offset=1, set_alpha_to_one=False,
each scheduler's default timestep_spacing), so trajectories match diffusers to float rounding.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch

from model.config import SDConfig

PREDICTION_TYPES = ("epsilon", "v_prediction")


class NoiseSchedule:
    """The training-time forward process q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I), t in [0, N).

    Betas and their cumulative product are computed in float32 exactly as diffusers does: LDM's
    float64 schedule differs by up to 1e-5 in the noise level near t=0 (1 - abar_t is tiny there),
    which would show up in sampler parity with diffusers.
    """

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 prediction_type: str = "epsilon"):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.num_train_timesteps = num_train_timesteps
        self.prediction_type = prediction_type
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float32) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        # VE noise level s_t = sigma_t / alpha_t of every training timestep (increasing in t)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5

    @classmethod
    def from_config(cls, config: SDConfig) -> "NoiseSchedule":
        return cls(config.num_train_timesteps, config.beta_start, config.beta_end, config.prediction_type)

    def _alpha_sigma(self, t, like: torch.Tensor):
        """sqrt(abar_t), sqrt(1 - abar_t) for integer timesteps t (int or (B,)), shaped to broadcast over like."""
        abar = self.alphas_cumprod.to(like.device)[torch.as_tensor(t, device=like.device).long()].to(like.dtype)
        abar = abar.reshape(-1, *[1] * (like.ndim - 1))
        return abar.sqrt(), (1 - abar).sqrt()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        alpha, sigma = self._alpha_sigma(t, x0)
        return alpha * x0 + sigma * noise

    def v_target(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """v = alpha * eps - sigma * x0 (Salimans & Ho), the target of v-prediction models."""
        alpha, sigma = self._alpha_sigma(t, x0)
        return alpha * noise - sigma * x0

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """What the model learns to output at x_t = add_noise(x0, noise, t)."""
        return noise if self.prediction_type == "epsilon" else self.v_target(x0, noise, t)

    def to_x0_eps(self, x_t: torch.Tensor, model_out: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's output at (x_t, t) as (clean estimate x0, noise estimate eps)."""
        alpha, sigma = self._alpha_sigma(t, x_t)
        if self.prediction_type == "epsilon":
            return (x_t - sigma * model_out) / alpha, model_out
        return alpha * x_t - sigma * model_out, alpha * model_out + sigma * x_t


@dataclass(frozen=True)
class X0Coefficients:
    """x0 = a * x + b * model_out."""
    a: float
    b: float


@dataclass(frozen=True)
class StepCoefficients:
    """x_next = c_x * x + c_0 * x0 + c_1 * x0_prev + c_n * noise."""
    c_x: float
    c_0: float
    c_1: float = 0.0
    c_n: float = 0.0


class Sampler:
    """A sampler as tables over its step boundaries j = 0..num_steps: the VP signal and noise levels
    alphas[j], sigmas[j] of the state before step j (j = num_steps: the final state). Subclasses
    fill the tables and define `coefficients(i)`; everything else follows from them."""

    variance_exploding = False  # True: x lives in the VE domain (see the module doc)

    def __init__(self, schedule: NoiseSchedule, timesteps: list, alphas: list[float], sigmas: list[float]):
        self.prediction_type = schedule.prediction_type
        self.timesteps = timesteps  # the model's timestep at each step (int, or float for Euler)
        self.alphas, self.sigmas = alphas, sigmas

    def __len__(self) -> int:
        return len(self.timesteps)

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the pure-noise start x_T."""
        return 1.0

    def input_scale(self, i: int) -> float:
        """The model is called on input_scale(i) * x: the VP sample in either domain."""
        return self.alphas[i] if self.variance_exploding else 1.0

    def x0_coefficients(self, i: int) -> X0Coefficients:
        alpha, sigma = self.alphas[i], self.sigmas[i]
        if self.prediction_type == "epsilon":   # x_vp = alpha x0 + sigma eps
            a, b = 1 / alpha, -sigma / alpha
        else:                                   # v = alpha eps - sigma x0  =>  x0 = alpha x_vp - sigma v
            a, b = alpha, -sigma
        return X0Coefficients(a * self.input_scale(i), b)

    def renoise_coefficients(self, i: int) -> tuple[float, float]:
        """(r_0, r_n): r_0 * x0 + r_n * noise is a sample at the noise level that step i leads to,
        in this sampler's domain (the temporal pull of kernels/temporal.py re-noises with these)."""
        alpha, sigma = self.alphas[i + 1], self.sigmas[i + 1]
        return (1.0, sigma / alpha) if self.variance_exploding else (alpha, sigma)

    def coefficients(self, i: int) -> StepCoefficients:
        raise NotImplementedError


def _check_num_steps(schedule: NoiseSchedule, num_steps: int) -> None:
    if not 0 < num_steps <= schedule.num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {schedule.num_train_timesteps}], got {num_steps}")


def _levels_from_ve(sigmas: list[float]) -> tuple[list[float], list[float]]:
    """VE noise levels s -> VP (alpha, sigma) = (1, s) / sqrt(1 + s^2)."""
    alphas = [1 / math.sqrt(1 + s * s) for s in sigmas]
    return alphas, [s * a for s, a in zip(sigmas, alphas)]


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021) = diffusers DDIMScheduler with SD's config: "leading" timesteps
    (every N // steps-th, shifted by steps_offset=1), and the step past the last uses abar_0
    (set_alpha_to_one=False), so the output keeps a trace of noise like the original LDM sampler.
    eta=0 is deterministic; eta=1 has DDPM's posterior variance."""

    def __init__(self, schedule: NoiseSchedule, num_steps: int, eta: float = 0.0, steps_offset: int = 1):
        _check_num_steps(schedule, num_steps)
        stride = schedule.num_train_timesteps // num_steps
        timesteps = [k * stride + steps_offset for k in reversed(range(num_steps))]
        abar = schedule.alphas_cumprod
        levels = [abar[t].item() for t in timesteps]
        final = timesteps[-1] - stride
        levels.append(abar[final].item() if final >= 0 else abar[0].item())
        super().__init__(schedule, timesteps, [math.sqrt(a) for a in levels], [math.sqrt(1 - a) for a in levels])
        self.eta = eta

    def coefficients(self, i: int) -> StepCoefficients:
        abar, abar_next = self.alphas[i] ** 2, self.alphas[i + 1] ** 2
        variance = (1 - abar_next) / (1 - abar) * (1 - abar / abar_next)
        std = self.eta * math.sqrt(variance)
        # x_next = sqrt(abar_next) x0 + dir * eps + std * noise, with eps = (x - sqrt(abar) x0) / sqrt(1 - abar)
        direction = math.sqrt(1 - abar_next - std ** 2) / math.sqrt(1 - abar)
        return StepCoefficients(c_x=direction, c_0=math.sqrt(abar_next) - direction * math.sqrt(abar), c_n=std)


class EulerSampler(Sampler):
    """Euler's method on the probability-flow ODE dx/ds = (x - x0) / s in the VE domain = diffusers
    EulerDiscreteScheduler with its default "linspace" timesteps (fractional: s is interpolated
    linearly between training timesteps) and a final step to s = 0, which returns x0."""

    variance_exploding = True

    def __init__(self, schedule: NoiseSchedule, num_steps: int):
        _check_num_steps(schedule, num_steps)
        last = schedule.num_train_timesteps - 1
        timesteps = self.spaced_timesteps(schedule.num_train_timesteps, num_steps)
        sigmas = np.interp(timesteps, np.arange(last + 1), schedule.sigmas.numpy()).astype(np.float32)
        self.ve_sigmas = [float(s) for s in sigmas] + [0.0]
        super().__init__(schedule, [float(t) for t in timesteps], *_levels_from_ve(self.ve_sigmas))

    @staticmethod
    def spaced_timesteps(num_train_timesteps: int, num_steps: int) -> np.ndarray:
        """The "linspace" spacing: num_steps evenly spaced (fractional) timesteps from the last training timestep to 0."""
        return np.linspace(0, num_train_timesteps - 1, num_steps, dtype=np.float32)[::-1]

    @property
    def init_noise_sigma(self) -> float:
        return self.ve_sigmas[0]

    def coefficients(self, i: int) -> StepCoefficients:
        ratio = self.ve_sigmas[i + 1] / self.ve_sigmas[i]
        return StepCoefficients(c_x=ratio, c_0=1 - ratio)


class EulerTrailingSampler(EulerSampler):
    """Euler with diffusers' "trailing" timesteps (Lin et al. 2023, "Common Diffusion Noise Schedules and
    Sample Steps are Flawed", table 2) = EulerDiscreteScheduler(timestep_spacing="trailing"): integer
    timesteps N / steps apart that end at the last training timestep, so even one step starts from
    t = N - 1, where few-step distilled bases (SD-Turbo: 1-4 steps, guidance 1) expect pure noise."""

    @staticmethod
    def spaced_timesteps(num_train_timesteps: int, num_steps: int) -> np.ndarray:
        stride = num_train_timesteps / num_steps
        # arange with a float stride can yield one point too many (61 steps: t = -1); diffusers keeps it
        return np.arange(num_train_timesteps, 0, -stride).round().astype(np.float32)[:num_steps] - 1


class DPMSolverPP2MSampler(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022) = diffusers DPMSolverMultistepScheduler with
    algorithm_type="dpmsolver++", solver_order=2, midpoint solver, VP domain: second order from the
    last two x0 estimates, first order on the first step and on the last (to s = 0, which returns x0).
    Timesteps: "linspace" (num_steps of num_steps + 1 points, rounded), or Karras et al.'s rho=7
    noise levels with timesteps rounded to the nearest training timestep."""

    def __init__(self, schedule: NoiseSchedule, num_steps: int, karras_sigmas: bool = False):
        _check_num_steps(schedule, num_steps)
        train_sigmas = schedule.sigmas.numpy()
        if karras_sigmas:
            sigmas = _karras_sigmas(float(train_sigmas[0]), float(train_sigmas[-1]), num_steps)
            log_train_sigmas = np.log(train_sigmas)
            timesteps = [int(np.round(_sigma_to_t(s, log_train_sigmas))) for s in sigmas]
        else:
            points = np.linspace(0, schedule.num_train_timesteps - 1, num_steps + 1).round()
            timesteps = [int(t) for t in points[::-1][:-1]]
            sigmas = train_sigmas[timesteps]
        self.ve_sigmas = [float(s) for s in np.asarray(sigmas, dtype=np.float32)] + [0.0]
        super().__init__(schedule, timesteps, *_levels_from_ve(self.ve_sigmas))

    def _log_snr(self, j: int) -> float:
        """lambda_j = log(alpha_j / sigma_j), the "time" of the DPM-Solver ODE."""
        return math.log(self.alphas[j]) - math.log(self.sigmas[j])

    def coefficients(self, i: int) -> StepCoefficients:
        if self.sigmas[i + 1] == 0:  # the step to s = 0 lands on x0 (first-order limit h -> inf)
            return StepCoefficients(c_x=0.0, c_0=1.0)
        h = self._log_snr(i + 1) - self._log_snr(i)
        c_x = self.sigmas[i + 1] / self.sigmas[i]
        first_order = self.alphas[i + 1] * -math.expm1(-h)  # weight of x0 in the first-order update
        if i == 0:
            return StepCoefficients(c_x=c_x, c_0=first_order)
        # midpoint second order: D0 = x0, D1 = (x0 - x0_prev) / r, x_next = c_x x + k (D0 + D1 / 2)
        r = (self._log_snr(i) - self._log_snr(i - 1)) / h
        return StepCoefficients(c_x=c_x, c_0=first_order * (1 + 0.5 / r), c_1=-first_order * 0.5 / r)


class LCMSampler(Sampler):
    """Latent Consistency Models (Luo et al. 2023) = diffusers LCMScheduler with its defaults on SD's
    schedule (what LCM-LoRA ships): the timesteps are picked evenly from the `original_inference_steps`
    schedule the model was distilled on (t = k * N / original - 1), e.g. 999, 759, 499, 259 for 4 of 50.
    Each step evaluates the consistency function, the clean estimate
        denoised = c_skip * x + c_out * x0(x, model_out),
    with the boundary-condition scalings c_skip = s_d^2 / (T^2 + s_d^2), c_out = T / sqrt(T^2 + s_d^2),
    T = timestep_scaling * t, s_d = sigma_data = 0.5 (folded into the x0 coefficients, so x0 here IS
    `denoised`), then re-noises it to the next timestep with fresh noise:
        x_next = alpha_next * denoised + sigma_next * noise;
    the last step returns denoised (its target level is alpha = 1, sigma = 0)."""

    sigma_data = 0.5

    def __init__(self, schedule: NoiseSchedule, num_steps: int, original_inference_steps: int = 50,
                 timestep_scaling: float = 10.0):
        _check_num_steps(schedule, num_steps)
        if num_steps > original_inference_steps:
            raise ValueError(f"num_steps must be at most original_inference_steps={original_inference_steps} "
                             f"for LCM, got {num_steps}")
        stride = schedule.num_train_timesteps // original_inference_steps
        distilled = [k * stride - 1 for k in range(original_inference_steps, 0, -1)]  # descending
        picks = np.floor(np.linspace(0, original_inference_steps, num_steps, endpoint=False)).astype(np.int64)
        timesteps = [distilled[k] for k in picks]
        abar = [schedule.alphas_cumprod[t].item() for t in timesteps]
        super().__init__(schedule, timesteps, [math.sqrt(a) for a in abar] + [1.0],
                         [math.sqrt(1 - a) for a in abar] + [0.0])
        self.timestep_scaling = timestep_scaling

    def boundary_scalings(self, i: int) -> tuple[float, float]:
        """(c_skip, c_out) at step i."""
        scaled = self.timesteps[i] * self.timestep_scaling
        c_skip = self.sigma_data ** 2 / (scaled ** 2 + self.sigma_data ** 2)
        c_out = scaled / math.sqrt(scaled ** 2 + self.sigma_data ** 2)
        return c_skip, c_out

    def x0_coefficients(self, i: int) -> X0Coefficients:
        p = super().x0_coefficients(i)
        c_skip, c_out = self.boundary_scalings(i)
        return X0Coefficients(c_skip + c_out * p.a, c_out * p.b)

    def coefficients(self, i: int) -> StepCoefficients:
        return StepCoefficients(c_x=0.0, c_0=self.alphas[i + 1], c_n=self.sigmas[i + 1])


def _karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022: noise levels evenly spaced in sigma^(1/rho), from sigma_max down to sigma_min."""
    ramp = np.linspace(0, 1, num_steps)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def _sigma_to_t(sigma: float, log_train_sigmas: np.ndarray) -> float:
    """The fractional training timestep with noise level sigma (linear in log sigma between neighbours)."""
    log_sigma = math.log(max(sigma, 1e-10))
    low = int(np.clip(np.count_nonzero(log_train_sigmas <= log_sigma) - 1, 0, len(log_train_sigmas) - 2))
    low_log, high_log = float(log_train_sigmas[low]), float(log_train_sigmas[low + 1])
    w = min(max((low_log - log_sigma) / (low_log - high_log), 0.0), 1.0)
    return (1 - w) * low + w * (low + 1)


SAMPLER_NAMES = ("ddim", "euler", "dpmpp_2m", "dpmpp_2m_karras", "lcm", "euler_trailing")


def make_sampler(schedule: NoiseSchedule, name: str, steps: int, eta: float = 0.0) -> Sampler:
    """One of SAMPLER_NAMES with `steps` steps on `schedule` (eta: DDIM's stochasticity)."""
    if name == "ddim":
        return DDIMSampler(schedule, steps, eta=eta)
    if name == "euler":
        return EulerSampler(schedule, steps)
    if name in ("dpmpp_2m", "dpmpp_2m_karras"):
        return DPMSolverPP2MSampler(schedule, steps, karras_sigmas=name.endswith("karras"))
    if name == "lcm":  # few-step: LCM-LoRA or an LCM-distilled model
        return LCMSampler(schedule, steps)
    if name == "euler_trailing":  # few-step: SD-Turbo-style bases
        return EulerTrailingSampler(schedule, steps)
    raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLER_NAMES)}")
