"""Text-to-image with a loaded Stable Diffusion: prompt -> text embedding -> denoising -> pixels.

The pieces are small on purpose: `encode_prompts` (tokenizer + text encoder), `guided_denoiser`
(the UNet with classifier-free guidance, and optional extra residuals from a conditioning encoder),
`make_sampler`, and `text_to_image` that strings them together. Video sampling (sample.py's 3DMM mode)
reuses all of them.
"""
import torch

from model.loading import StableDiffusion
from model.sampling import SAMPLERS, NoiseSchedule, sample

SAMPLER_NAMES = ("ddim", "euler", "dpmpp_2m", "dpmpp_2m_karras")


@torch.no_grad()
def encode_prompts(sd: StableDiffusion, prompts: list[str]) -> torch.Tensor:
    """(B, 77, context_dim) text embeddings, on the text encoder's device and dtype."""
    param = next(sd.text_encoder.parameters())
    return sd.text_encoder(sd.tokenizer(prompts).to(param.device))


def make_sampler(sd: StableDiffusion, name: str, steps: int, eta: float = 0.0):
    """One of SAMPLER_NAMES with `steps` steps on the checkpoint's noise schedule."""
    schedule = NoiseSchedule.from_config(sd.config)
    if name == "ddim":
        return SAMPLERS["ddim"](schedule, steps, eta=eta)
    if name == "euler":
        return SAMPLERS["euler"](schedule, steps)
    if name in ("dpmpp_2m", "dpmpp_2m_karras"):
        return SAMPLERS["dpmpp_2m"](schedule, steps, karras_sigmas=name.endswith("karras"))
    raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLER_NAMES)}")


def guided_denoiser(unet, context: torch.Tensor, uncond_context: torch.Tensor | None, guidance: float,
                    residual_fn=None):
    """model_fn(x, t) for the samplers: the UNet, with classifier-free guidance when `uncond_context`.

    residual_fn(x, t, context) -> (down_residuals, mid_residual) adds a conditioning encoder's outputs
    (a ControlNet) to the UNet's skips. Both branches run in one batch of 2B, like the reference pipelines.
    """
    guided = uncond_context is not None and guidance != 1.0
    ctx = torch.cat([uncond_context, context]) if guided else context

    def model_fn(x, t):
        x_in = torch.cat([x, x]) if guided else x
        residuals = residual_fn(x_in, t, ctx) if residual_fn is not None else (None, None)
        out = unet(x_in, t, ctx, *residuals)
        if not guided:
            return out
        uncond, cond = out.chunk(2)
        return uncond + guidance * (cond - uncond)
    return model_fn


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Decoder output in about [-1, 1], (B, 3, H, W) -> uint8 (B, H, W, 3) on the CPU."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


@torch.no_grad()
def text_to_image(sd: StableDiffusion, prompt: str, negative_prompt: str = "", steps: int = 30,
                  guidance: float = 7.5, sampler: str = "dpmpp_2m", height: int | None = None,
                  width: int | None = None, seed: int = 0, num_images: int = 1, eta: float = 0.0,
                  progress: bool = True) -> torch.Tensor:
    """Generate `num_images` images for `prompt`; returns uint8 (N, H, W, 3)."""
    height = height or sd.config.image_size
    width = width or sd.config.image_size
    down = sd.vae.downscale
    if height % down or width % down:
        raise ValueError(f"height and width must be multiples of {down}, got {height}x{width}")
    param = next(sd.unet.parameters())
    context = encode_prompts(sd, [prompt] * num_images)
    uncond = encode_prompts(sd, [negative_prompt] * num_images) if guidance != 1.0 else None
    generator = torch.Generator(param.device).manual_seed(seed)
    shape = (num_images, sd.config.unet.in_channels, height // down, width // down)
    noise = torch.randn(shape, generator=generator, device=param.device, dtype=param.dtype)
    model_fn = guided_denoiser(sd.unet, context, uncond, guidance)
    latents = sample(model_fn, noise, make_sampler(sd, sampler, steps, eta), generator=generator, progress=progress)
    return to_uint8(sd.vae.decode_latents(latents))
