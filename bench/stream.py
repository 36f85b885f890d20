"""Live rendering speed: the stream (wavefront, Avatar.stream's loop) beside the offline chunked sampler.

    python bench/stream.py                      # CPU: the tiny preset (64 px), 24 frames, eager
    python bench/stream.py --device cuda        # GPU: SD1.5 shapes at 512x512, fp16, 48 frames
    python bench/stream.py --device cuda --decoder taesd_decoder.safetensors   # also rows with a tiny decoder

Both denoise the same video (random 8-channel hints, a random text embedding, LCM with --steps steps,
guidance 1: the few-step live setting) with random weights of the chosen shapes (UNet + ControlNet + VAE;
speed does not depend on the values), temporal denoising on and off (--temporal), with CUDA graphs on and
off (on CUDA; model/graphs.py: the stream's steady ticks, the offline chunks' model calls and the
decodes replay graphs, captured during the run, so their capture is in the figures), then decode every
frame to uint8 with the VAE, or with the tiny decoder of `--decoder FILE` (model/taesd.load_tiny_decoder).

  * stream: model/temporal.stream_video fed one hint per tick as fast as it asks (a source that keeps up),
    each finished frame decoded as it leaves. Frames/s is sustained (frames after the first / the time
    between the first and the last frame out); latency is a frame's time from its hint going in to its
    uint8 frame coming out (median and p99), about `steps` ticks.
  * offline: model/temporal.sample_video with --steps frames per lock-step chunk (the stream's batch size);
    its latency is a chunk's time, since a frame waits for its chunk's last hint and then the whole chunk.

The configurations are interleaved after a warm-up of each; prints markdown rows with the date and the
device. --repeats N keeps each configuration's best sustained run.
"""
import argparse
import datetime
import itertools
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model.avatar import Denoiser  # noqa: E402
from model.config import SD1, TINY  # noqa: E402
from model.controlnet import ControlNet  # noqa: E402
from model.sampling import NoiseSchedule, make_sampler  # noqa: E402
from model.temporal import VideoSampling, sample_video, stream_video  # noqa: E402
from model.unet import UNet  # noqa: E402
from model.vae import AutoencoderKL  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HINT_CHANNELS = 8


def build(config, device, dtype):
    torch.manual_seed(0)
    unet = UNet(config.unet)
    controlnet = ControlNet.from_unet(unet, HINT_CHANNELS)
    denoiser = Denoiser(unet, controlnet).to(device, dtype).eval()
    return denoiser, AutoencoderKL(config.vae).to(device, dtype).eval()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def run_stream(denoiser, decoder, hints, context, settings: VideoSampling) -> dict:
    """Times of each frame's hint going in and its uint8 frame coming out of the wavefront."""
    latent = hints.shape[-1] // decoder.downscale
    arrived, left = [], []

    def arrivals():
        for hint in hints:
            arrived.append(time.perf_counter())
            yield hint
    # each uint8 frame is on the host (as a live viewer needs it) when it is yielded
    for _ in stream_video(denoiser, decoder, NoiseSchedule(), arrivals(), (latent, latent), context, None, settings):
        left.append(time.perf_counter())
    latency = [b - a for a, b in zip(arrived, left)]
    return {"fps": (len(left) - 1) / (left[-1] - left[0]), "median": statistics.median(latency),
            "p99": float(np.percentile(latency, 99))}


@torch.no_grad()
def run_offline(denoiser, decoder, hints, context, settings: VideoSampling) -> dict:
    start = time.perf_counter()
    sample_video(denoiser, decoder, NoiseSchedule(), hints, range(len(hints)), context, None, settings, progress=False)
    seconds = time.perf_counter() - start
    chunk = seconds * settings.batch_frames / len(hints)
    return {"fps": len(hints) / seconds, "median": chunk, "p99": chunk}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: fp16 on CUDA, fp32 on the CPU")
    p.add_argument("--frames", type=int, default=None, help="video length (default 48 on CUDA, 24 on the CPU)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--sampler", default="lcm")
    p.add_argument("--temporal", default="on,off", help="temporal denoising in the rows: on, off or on,off")
    p.add_argument("--decoder", metavar="FILE", help="a tiny decoder (TAESD) file: rows decoding with it too")
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("fp16" if cuda else "fp32")]
    config = SD1 if cuda else TINY
    size = 512 if cuda else TINY.image_size
    frames = args.frames or (48 if cuda else 24)
    denoiser, vae = build(config, device, dtype)
    decoders = {"VAE": vae}
    if args.decoder:
        from model.taesd import load_tiny_decoder  # the tiny decoder's loader, only when asked for
        decoders["tiny"] = load_tiny_decoder(args.decoder, device, dtype)
    gen = torch.Generator().manual_seed(1)
    hints = torch.rand(frames, HINT_CHANNELS, size, size, generator=gen).to(device, dtype)
    context = torch.randn(1, 77, config.unet.context_dim, generator=gen).to(device, dtype)
    where = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    dtype_name = str(dtype).removeprefix("torch.")
    today = datetime.date.today().isoformat()
    print(f"{where}, {today}: {config.name} shapes, {size}x{size}, {dtype_name}; {frames} frames, "
          f"{args.sampler} {args.steps} steps, guidance 1; torch {torch.__version__}")
    strengths = {"on": VideoSampling.temporal_strength, "off": 0.0}
    temporal = [strengths[v] for v in args.temporal.split(",")]
    graphs = (True, False) if cuda else (False,)  # no graphs on the CPU: the same eager run twice
    configs = list(itertools.product(("stream", "offline"), temporal, graphs, decoders))
    runs = {"stream": run_stream, "offline": run_offline}
    best = {}
    for repeat in range(args.repeats + 1):  # the first round warms up (kernels, allocator, caches)
        for how, strength, cuda_graphs, decoder in configs:
            settings = VideoSampling(steps=args.steps, guidance=1.0, sampler=args.sampler, batch_frames=args.steps,
                                     temporal_strength=strength, cuda_graphs=cuda_graphs)
            result = runs[how](denoiser, decoders[decoder], hints[:args.steps + 1] if repeat == 0 else hints, context,
                               settings)
            synchronize(device)
            key = how, strength, cuda_graphs, decoder
            if repeat and (key not in best or result["fps"] > best[key]["fps"]):
                best[key] = result
    print()
    print("| date | device | model | sampler | temporal | mode | CUDA graphs | decoder | frames/s | latency median ms "
          "| latency p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (how, strength, cuda_graphs, decoder), r in best.items():
        print(f"| {today} | {where} | {config.name} {size}px {dtype_name} "
              f"| {args.sampler} {args.steps} steps, guidance 1 "
              f"| {'on' if strength else 'off'} | {how} | {'on' if cuda_graphs else 'off'} | {decoder} "
              f"| {r['fps']:.2f} | {1e3 * r['median']:.0f} | {1e3 * r['p99']:.0f} |")


if __name__ == "__main__":
    main()
