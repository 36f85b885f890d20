"""Video sampling: our avatar sampler against diffusers' StableDiffusionControlNetPipeline, same random weights.

    python bench/sample.py                                   # CPU: 128 px, 8 frames, 4 steps, narrow nets
    python bench/sample.py --device cuda --dtype fp16        # GPU: 512 px, 16 frames, 25 steps, SD1.5 widths

Both sample the same video: `--frames` conditioning images (random 8-channel hints in [0, 1]), the same
random text embeddings for the prompt and the negative prompt, DDIM with `--steps` steps and guidance
`--guidance`, every frame starting from the same noise, `--batch-frames` frames per UNet batch, then the
VAE decode to uint8 frames. Ours is `model/temporal.sample_video`; diffusers' pipeline is called once per chunk of
`--batch-frames` frames with prompt_embeds / negative_prompt_embeds / latents repeated over the chunk (so
it needs no text encoder or tokenizer, and gets none). The hints go to diffusers as a float tensor of the
output size, which its control-image preprocessing passes through unchanged (no resize, do_normalize=False
for control images): the script checks that, so both ControlNets see the same values.

Weights: diffusers' random initialisation of an SD1-shaped UNet + ControlNet (bench/train.py's
`build_pairs`, with the ControlNet's zero convs given random weights so the hints reach the frames) and
VAE, renamed into ours. `--width` is the UNet's base width (SD: 320), `--vae-width` the VAE's (SD: 128).
The CPU defaults (64 and 32, at 128 px) keep a run near two minutes on a small machine; GPU numbers come
from the full SD1.5 shapes at 512 px.

Rows: ours with temporal denoising off, which does the same work as diffusers: the same scheduler
(DDIMScheduler as SD's scheduler_config.json: scaled-linear betas, steps_offset=1, set_alpha_to_one=False,
"leading" spacing, no clipping) from the same x_T, so the frames agree up to float rounding, and their max
abs difference (uint8) shows that the comparison is fair. Then ours with temporal denoising as sample.py
runs it (VideoSampling's default strength and fade); its frames differ by design. Runs alternate
between the three (so load changes on a shared machine hit all alike) after one warm-up each; frames/s is
given for the best and the median of `--repeats` runs (on a loaded machine the best is the steadier
figure). Peak memory is what one run adds on top of the weights: CUDA max_memory_allocated, or on the CPU
the process RSS sampled every millisecond by a thread after returning freed heap to the OS (bench/unet.py's
PeakRSS). diffusers is a dev-only dependency.
"""
import argparse
import os
import statistics
import sys
from dataclasses import replace

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train import HINT_CHANNELS, build_pairs  # noqa: E402  (bench/train.py)
from unet import DTYPES, timed_forward  # noqa: E402  (bench/unet.py)

from model.avatar import Denoiser  # noqa: E402
from model.config import SD1, VAEConfig  # noqa: E402
from model.controlnet import diffusers_to_ldm_controlnet  # noqa: E402
from model.sampling import NoiseSchedule  # noqa: E402
from model.temporal import VideoSampling, sample_video  # noqa: E402
from model.vae import AutoencoderKL, diffusers_to_ldm_vae  # noqa: E402


def build_vaes(width: int):
    """(ours, diffusers') SD-shaped VAE at base width `width`, with diffusers' random weights."""
    from diffusers import AutoencoderKL as DiffusersVAE
    config = VAEConfig(ch=width)
    levels = len(config.ch_mult)
    reference = DiffusersVAE(down_block_types=("DownEncoderBlock2D",) * levels,
                             up_block_types=("UpDecoderBlock2D",) * levels,
                             block_out_channels=tuple(width * m for m in config.ch_mult),
                             layers_per_block=config.num_res_blocks, latent_channels=config.z_channels,
                             norm_num_groups=config.norm_groups, scaling_factor=config.scale_factor)
    ours = AutoencoderKL(config)
    ours.load_state_dict(diffusers_to_ldm_vae(reference.state_dict(), config), strict=True)
    return ours, reference


def wake_controlnet(controlnet, reference):
    """Give diffusers' ControlNet randomly initialised zero convs, and ours the same weights.

    A fresh ControlNet's zero convs make its residuals zero, so the hints would not reach the output and
    the frame comparison could not catch hints that the two sides see differently. (The work is the same
    either way: nothing skips a zero conv.)"""
    for module in (*reference.controlnet_down_blocks, reference.controlnet_mid_block,
                   reference.controlnet_cond_embedding.conv_out):
        module.reset_parameters()
    controlnet.load_state_dict(diffusers_to_ldm_controlnet(reference.state_dict(), controlnet.config), strict=True)


def build(width: int, vae_width: int, size: int, device, dtype):
    """Our denoiser, VAE and noise schedule, and diffusers' pipeline, over the same random weights."""
    from diffusers import DDIMScheduler, StableDiffusionControlNetPipeline
    from diffusers.utils import logging
    logging.set_verbosity_error()   # silence its advice against casting a model with .to(dtype)
    (unet, controlnet), (ref_unet, ref_controlnet) = build_pairs(width, device)
    wake_controlnet(controlnet, ref_controlnet)
    vae, ref_vae = build_vaes(vae_width)
    for model in (unet, controlnet, vae, ref_unet, ref_controlnet, ref_vae):
        model.to(device=device, dtype=dtype).eval().requires_grad_(False)

    scheduler = DDIMScheduler(num_train_timesteps=SD1.num_train_timesteps, beta_start=SD1.beta_start,
                              beta_end=SD1.beta_end, beta_schedule="scaled_linear", steps_offset=1,
                              clip_sample=False, set_alpha_to_one=False, prediction_type=SD1.prediction_type)
    pipe = StableDiffusionControlNetPipeline(vae=ref_vae, text_encoder=None, tokenizer=None, unet=ref_unet,
                                             controlnet=ref_controlnet, scheduler=scheduler, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return Denoiser(unet, controlnet), vae, NoiseSchedule.from_config(SD1), pipe


def shared_noise(denoiser: Denoiser, vae, size: int, seed: int) -> torch.Tensor:
    """The x_T that sample_video gives every frame: one latent from a CPU generator seeded with `seed`."""
    latent = size // vae.downscale
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((denoiser.unet.config.in_channels, latent, latent), generator=generator)


def diffusers_video(pipe, hints, context, uncond, noise, settings: VideoSampling) -> np.ndarray:
    """uint8 (T, H, W, 3) frames from the pipeline, one call per chunk of settings.batch_frames frames."""
    size, chunk, frames = hints.shape[-1], settings.batch_frames, []
    for start in range(0, len(hints), chunk):
        hint = hints[start:start + chunk]
        n = len(hint)
        images = pipe(prompt_embeds=context.expand(n, -1, -1), negative_prompt_embeds=uncond.expand(n, -1, -1),
                      image=hint, height=size, width=size, num_inference_steps=settings.steps,
                      guidance_scale=settings.guidance, eta=0.0, latents=noise.expand(n, -1, -1, -1),
                      output_type="pt", return_dict=False)[0]            # (n, 3, H, W) in [0, 1]
        frames.append((images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu())
    return torch.cat(frames).numpy()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: fp32 on the CPU, fp16 on CUDA")
    p.add_argument("--size", type=int, default=None, help="frame side in pixels (default 512 on CUDA, 128 on the CPU)")
    p.add_argument("--frames", type=int, default=None, help="video length (default 16 on CUDA, 8 on the CPU)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default 25 on CUDA, 4 on the CPU)")
    p.add_argument("--guidance", type=float, default=VideoSampling.guidance)
    p.add_argument("--batch-frames", type=int, default=VideoSampling.batch_frames)
    p.add_argument("--temporal-strength", type=float, default=VideoSampling.temporal_strength,
                   help="of ours in the second row (the first has 0, to compare with diffusers); "
                   "the temporal fade is VideoSampling's default")
    p.add_argument("--width", type=int, default=None,
                   help="UNet base width (SD: 320; default 320 on CUDA, 64 on the CPU)")
    p.add_argument("--vae-width", type=int, default=None,
                   help="VAE base width (SD: 128; default 128 on CUDA, 32 on the CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs of each (default 5 on CUDA, 2 on the CPU)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    pick = lambda value, gpu, cpu: value if value is not None else (gpu if cuda else cpu)  # noqa: E731
    dtype_name = pick(args.dtype, "fp16", "fp32")
    size, num_frames, steps = pick(args.size, 512, 128), pick(args.frames, 16, 8), pick(args.steps, 25, 4)
    width, vae_width, repeats = pick(args.width, 320, 64), pick(args.vae_width, 128, 32), pick(args.repeats, 5, 2)
    dtype = DTYPES[dtype_name]

    torch.manual_seed(args.seed)
    denoiser, vae, schedule, pipe = build(width, vae_width, size, device, dtype)
    hints = torch.rand(num_frames, HINT_CHANNELS, size, size).to(device, dtype)
    context, uncond = (torch.randn(1, 77, SD1.unet.context_dim).to(device, dtype) for _ in range(2))
    independent = VideoSampling(steps=steps, guidance=args.guidance, sampler="ddim", seed=args.seed,
                                    temporal_strength=0.0, batch_frames=args.batch_frames)
    temporal = replace(independent, temporal_strength=args.temporal_strength)
    noise = shared_noise(denoiser, vae, size, args.seed).to(device, dtype)
    seen = pipe.prepare_image(hints, size, size, num_frames, 1, device, dtype)  # what its ControlNet gets
    if not torch.equal(seen, hints):
        raise RuntimeError("diffusers' control-image preprocessing changed the hints; the comparison would be unfair")
    frames = range(num_frames)
    runs = {
        "ours": lambda: sample_video(denoiser, vae, schedule, hints, frames, context, uncond, independent, False),
        "diffusers": lambda: diffusers_video(pipe, hints, context, uncond, noise, independent),
        "ours temporal": lambda: sample_video(denoiser, vae, schedule, hints, frames, context, uncond, temporal, False),
    }

    times, peaks, outputs = measure(runs, repeats, device)
    diff = np.abs(outputs["ours"].astype(np.int16) - outputs["diffusers"].astype(np.int16))

    params = sum(p.numel() for m in (denoiser, vae) for p in m.parameters())
    print(f"device {device} ({torch.cuda.get_device_name(device) if cuda else f'{torch.get_num_threads()} threads'}), "
          f"{dtype_name}, UNet+ControlNet+VAE {params / 1e6:.0f}M params (UNet width {width}, VAE width {vae_width}), "
          f"{num_frames} frames of {size}x{size}, DDIM {steps} steps, guidance {args.guidance}, "
          f"batch {args.batch_frames} frames, temporal fade {temporal.temporal_fade}, "
          f"ours with CUDA graphs {'on (VideoSampling default)' if cuda else 'off (CPU)'}; "
          f"frames/s of the best / median of {repeats} runs\n")
    print_table(num_frames, times, peaks, diff, {"ours": independent, "ours temporal": temporal})


def measure(runs: dict, repeats: int, device):
    """Seconds of each timed run, peak extra bytes and last output per name; the runs alternate."""
    times, peaks, outputs = {name: [] for name in runs}, {name: 0 for name in runs}, {}
    with torch.inference_mode():
        for repeat in range(repeats + 1):            # repeat 0 is the warm-up
            for name, run in runs.items():
                seconds, peak, outputs[name] = timed_forward(run, device)
                peaks[name] = max(peaks[name], peak)
                if repeat:
                    times[name].append(seconds)
    return times, peaks, outputs


def print_table(num_frames: int, times: dict, peaks: dict, diff: np.ndarray, ours: dict):
    """One markdown row per setting of ours, against diffusers; `diff`: |ours - diffusers| of the frames."""
    best = {name: num_frames / min(v) for name, v in times.items()}
    median = {name: num_frames / statistics.median(v) for name, v in times.items()}
    mib = {name: v / 2**20 for name, v in peaks.items()}
    print("| sampler | temporal strength | ours frames/s | diffusers frames/s | ours/diffusers frames/s "
          "| ours peak MiB | diffusers peak MiB | max abs diff (uint8) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, settings in ours.items():
        same_work = settings.temporal_strength == 0
        print(f"| {name} | {settings.temporal_strength} | {best[name]:.2f} / {median[name]:.2f} "
              f"| {best['diffusers']:.2f} / {median['diffusers']:.2f} "
              f"| {best[name] / best['diffusers']:.2f} / {median[name] / median['diffusers']:.2f} "
              f"| {mib[name]:.0f} | {mib['diffusers']:.0f} "
              f"| {f'{diff.max()} (mean {diff.mean():.3f})' if same_work else 'n/a (temporal pull)'} |")


if __name__ == "__main__":
    main()
