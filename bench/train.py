"""Training steps of our UNet + ControlNet against diffusers' UNet2DConditionModel + ControlNetModel.

    python bench/train.py                                      # CPU: SD1-shaped, narrow (--channels 64)
    python bench/train.py --device cuda --channels 320 --size 64 --batch 4 --checkpointing

One step is what train.py does with --train controlnet+unet: the ControlNet's residuals into the UNet,
the MSE to a target, backward, a fused AdamW step (CUDA) over both networks; autocast bf16 on CUDA
with fp32 weights, fp32 on the CPU. Both pairs hold the same random weights (diffusers' initialisation,
renamed into ours). Steps alternate between the two so load changes on a shared machine hit both
alike; steps/s is from the median step time after `--warmup` steps each. Peak memory is what one step
adds above the weights and optimizer state: CUDA max_memory_allocated, or the process RSS on the CPU
(see bench/unet.py). Prints a markdown table. diffusers is a dev-only dependency.
"""
import argparse
import os
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import replace

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from unet import PeakCUDA, PeakRSS  # noqa: E402  (bench/unet.py)

from model.avatar import Denoiser  # noqa: E402
from model.config import SD1  # noqa: E402
from model.controlnet import HINT_WIDTHS, ControlNet, diffusers_to_ldm_controlnet  # noqa: E402
from model.unet import UNet, diffusers_to_ldm_unet  # noqa: E402

HINT_CHANNELS = 8  # tracking.conditioning.CONDITIONING_CHANNELS


def build_pairs(channels: int, device):
    """(ours, diffusers') as (unet, controlnet) pairs with the same weights, SD1's shape at `channels` wide."""
    from diffusers import ControlNetModel, UNet2DConditionModel
    config = replace(SD1.unet, model_channels=channels)
    ref_unet = UNet2DConditionModel(block_out_channels=[channels * m for m in config.channel_mult],
                                    cross_attention_dim=config.context_dim, attention_head_dim=config.num_heads,
                                    norm_num_groups=config.norm_groups)
    ref_controlnet = ControlNetModel.from_unet(ref_unet, conditioning_embedding_out_channels=HINT_WIDTHS,
                                               conditioning_channels=HINT_CHANNELS)
    unet, controlnet = UNet(config), ControlNet(config, HINT_CHANNELS)
    unet.load_state_dict(diffusers_to_ldm_unet(ref_unet.state_dict(), config), strict=True)
    controlnet.load_state_dict(diffusers_to_ldm_controlnet(ref_controlnet.state_dict(), config), strict=True)
    return [tuple(m.to(device).train() for m in pair) for pair in ((unet, controlnet), (ref_unet, ref_controlnet))]


def make_step(unet, controlnet, ours: bool, batch, device, autocast):
    x, t, context, hint, target = batch
    params = [*unet.parameters(), *controlnet.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")

    denoiser = Denoiser(unet, controlnet)

    def forward():
        if ours:
            return denoiser(x, t, context, hint)
        down, mid = controlnet(x, t, context, hint, return_dict=False)
        return unet(x, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                    return_dict=False)[0]

    def step():
        with autocast():
            loss = F.mse_loss(forward().float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return step


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--channels", type=int, default=None, help="UNet base width (SD: 320; default 320 on "
                   "CUDA, 64 on the CPU)")
    p.add_argument("--size", type=int, default=None, help="latent side (default 64 on CUDA, 16 on the CPU)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps per implementation")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in both")
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    channels, size = args.channels or (320 if cuda else 64), args.size or (64 if cuda else 16)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else nullcontext

    torch.manual_seed(0)
    pairs = build_pairs(channels, device)
    if args.checkpointing:
        for module in pairs[0]:
            module.gradient_checkpointing = True
        for module in pairs[1]:
            module.enable_gradient_checkpointing()
    batch = (torch.randn(args.batch, 4, size, size, device=device), torch.randint(0, 1000, (args.batch,), device=device),
             torch.randn(args.batch, 77, SD1.unet.context_dim, device=device),
             torch.rand(args.batch, HINT_CHANNELS, 8 * size, 8 * size, device=device),
             torch.randn(args.batch, 4, size, size, device=device))
    steps = {name: make_step(*pair, name == "ours", batch, device, autocast) for name, pair in zip(("ours", "diffusers"), pairs)}
    for step in steps.values():   # warm-up; also creates the optimizer state, which the peak below excludes
        for _ in range(args.warmup):
            step()
    times, peaks = {name: [] for name in steps}, {}
    for _ in range(args.steps):
        for name, step in steps.items():
            with (PeakCUDA() if cuda else PeakRSS()) as memory:
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
            peaks[name] = max(peaks.get(name, 0), memory.bytes)

    params = sum(p.numel() for m in pairs[0] for p in m.parameters())
    print(f"device {device} ({torch.cuda.get_device_name(device) if cuda else f'{torch.get_num_threads()} threads'}), "
          f"{'bf16 autocast' if cuda else 'fp32'}, UNet+ControlNet {params / 1e6:.0f}M params (width {channels}), "
          f"batch {args.batch}, latent {size}x{size}, checkpointing {args.checkpointing}\n")
    print("| implementation | steps/s | step ms (median) | peak memory per step MiB |")
    print("|---|---|---|---|")
    for name in steps:
        median = statistics.median(times[name])
        print(f"| {name} | {1 / median:.2f} | {1000 * median:.0f} | {peaks[name] / 2**20:.0f} |")


if __name__ == "__main__":
    main()
