"""Our UNet against diffusers' UNet2DConditionModel: same random SD-size weights, same input, same process.

    python bench/unet.py                                   # CPU, fp32, SD1.5 size, batch 2, 64x64 latent
    python bench/unet.py --device cuda --dtype bf16 --repeats 20

The weights are diffusers' random initialisation, handed to our UNet through `diffusers_to_ldm_unet`.
Forward passes alternate between the two models (so load changes on a shared machine hit both alike);
the time is the median over `--repeats` after one warm-up each. Peak memory is what one forward
adds on top of the weights: CUDA max_memory_allocated; on the CPU the process RSS, sampled every
millisecond by a thread, after returning freed heap pages to the OS (so the baseline is honest).
Prints a markdown table (header and one row). diffusers is a dev-only dependency; nothing at runtime
imports this file.
"""
import argparse
import ctypes
import gc
import os
import statistics
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model.config import SD1, SD2_BASE  # noqa: E402
from model.unet import UNet, diffusers_to_ldm_unet  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Our config and, beyond diffusers' defaults (SD1's shapes), the published unet/config.json of each family.
FAMILIES = {
    "sd1": (SD1.unet, dict(cross_attention_dim=768, attention_head_dim=8)),
    "sd2": (SD2_BASE.unet, dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                                use_linear_projection=True)),
}


def build_models(family: str, device, dtype):
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging
    logging.set_verbosity_error()   # silence its advice against casting a model with .to(dtype)
    config, diffusers_config = FAMILIES[family]
    reference = UNet2DConditionModel(**diffusers_config)
    ours = UNet(config)
    ours.load_state_dict(diffusers_to_ldm_unet(reference.state_dict(), ours.config), strict=True)
    return [m.to(device=device, dtype=dtype).eval().requires_grad_(False) for m in (ours, reference)]


class PeakRSS:
    """Peak resident memory above the level at entry, in bytes, sampled by a background thread."""

    def __enter__(self):
        gc.collect()
        try:  # give freed heap back to the OS, or earlier runs' leftovers hide this one's allocations
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.base = self.peak = self._rss()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        self.bytes = self.peak - self.base

    def _sample(self):
        while not self._done.wait(0.001):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakCUDA:
    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        self.bytes = torch.cuda.max_memory_allocated() - self.base


def timed_forward(forward, device) -> tuple[float, int, torch.Tensor]:
    """(seconds, peak extra bytes, output) of one forward pass."""
    with (PeakCUDA() if device.type == "cuda" else PeakRSS()) as memory:
        start = time.perf_counter()
        out = forward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return seconds, memory.bytes, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: fp32 on CPU, fp16 on CUDA")
    parser.add_argument("--family", choices=FAMILIES, default="sd1")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=64, help="latent height and width")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype_name = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[dtype_name]

    torch.manual_seed(0)
    ours, reference = build_models(args.family, device, dtype)
    x = torch.randn(args.batch, 4, args.size, args.size, device=device, dtype=dtype)
    t = torch.randint(0, 1000, (args.batch,), device=device)
    context = torch.randn(args.batch, 77, ours.config.context_dim, device=device, dtype=dtype)
    forwards = {"ours": lambda: ours(x, t, context),
                "diffusers": lambda: reference(x, t, context, return_dict=False)[0]}

    times, peaks, outputs = {name: [] for name in forwards}, {name: 0 for name in forwards}, {}
    with torch.inference_mode():
        for repeat in range(args.repeats + 1):            # repeat 0 is the warm-up
            for name, forward in forwards.items():
                seconds, peak, outputs[name] = timed_forward(forward, device)
                peaks[name] = max(peaks[name], peak)
                if repeat:
                    times[name].append(seconds)
    ms = {name: 1000 * statistics.median(v) for name, v in times.items()}
    mib = {name: v / 2**20 for name, v in peaks.items()}
    ref_out = outputs["diffusers"].float()
    rel_err = ((outputs["ours"].float() - ref_out).norm() / ref_out.norm()).item()

    print("| device | dtype | family | batch | latent | ours ms | diffusers ms | ours/diffusers time "
          "| ours peak MiB | diffusers peak MiB | rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {device.type} | {dtype_name} | {args.family} | {args.batch} | {args.size}x{args.size} "
          f"| {ms['ours']:.0f} | {ms['diffusers']:.0f} | {ms['ours'] / ms['diffusers']:.3f} "
          f"| {mib['ours']:.0f} | {mib['diffusers']:.0f} | {rel_err:.1e} |")


if __name__ == "__main__":
    main()
