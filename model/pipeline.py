"""Text-to-image with a loaded Stable Diffusion: prompt -> text embedding -> denoising -> pixels.

`encode_prompts` (tokenizer + text encoder), then the image sampler of model/temporal.py (the video
sampler with no pull) on the bare UNet (model/avatar.Denoiser without a ControlNet), then the VAE. On CUDA
the steps after the first replay a CUDA graph of the model call (model/graphs.py) unless cuda_graphs=False.
"""
import torch

from model.avatar import Denoiser
from model.graphs import GraphedCall, device_scalar
from model.loading import StableDiffusion
from model.sampling import NoiseSchedule, make_sampler
from model.temporal import denoise
from model.vae import to_uint8


@torch.no_grad()
def encode_prompts(sd: StableDiffusion, prompts: list[str]) -> torch.Tensor:
    """(B, 77, context_dim) text embeddings, on the text encoder's device and dtype."""
    param = next(sd.text_encoder.parameters())
    return sd.text_encoder(sd.tokenizer(prompts).to(param.device))


@torch.no_grad()
def text_to_image(sd: StableDiffusion, prompt: str, negative_prompt: str = "", steps: int = 30,
                  guidance: float = 7.5, sampler: str = "dpmpp_2m", height: int | None = None,
                  width: int | None = None, seed: int = 0, num_images: int = 1, eta: float = 0.0,
                  progress: bool = True, cuda_graphs: bool = True) -> torch.Tensor:
    """Generate `num_images` images for `prompt`; returns uint8 (N, H, W, 3)."""
    height = height or sd.config.image_size
    width = width or sd.config.image_size
    down = sd.vae.downscale
    if height % down or width % down:
        raise ValueError(f"height and width must be multiples of {down}, got {height}x{width}")
    param = next(sd.unet.parameters())
    context = encode_prompts(sd, [prompt] * num_images)
    uncond_context = encode_prompts(sd, [negative_prompt] * num_images) if guidance != 1.0 else None
    generator = torch.Generator(param.device).manual_seed(seed)
    shape = (num_images, sd.config.unet.in_channels, height // down, width // down)
    noise = torch.randn(shape, generator=generator, device=param.device, dtype=param.dtype)
    # the step reads the model's outputs before the next call: no copy for the caller needed
    guided = GraphedCall(Denoiser(sd.unet).guided, cuda_graphs, clone_outputs=False)
    latents, _ = denoise(lambda x, t: guided(x, device_scalar(t, x.device), context, uncond_context), noise,
                         make_sampler(NoiseSchedule.from_config(sd.config), sampler, steps, eta), guidance,
                         step_noise=lambda: torch.randn(shape, generator=generator, device=param.device,
                                                        dtype=param.dtype), progress=progress)
    return to_uint8(sd.vae.decode_latents(latents))
