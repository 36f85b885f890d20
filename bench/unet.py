"""Our UNet against diffusers' UNet2DConditionModel, eager and replayed from CUDA graphs, in one process.

    python bench/unet.py --width 32 --size 16 --repeats 1     # CPU, smallest: the eager rows
    python bench/unet.py --device cuda                        # GPU: SD1.5 shapes, fp16, batch 2, 64x64 latent

Rows, all on the same random SD-shaped weights and the same input:
  * ours, for every SVP_KERNELS mode the dispatcher offers (kernels/dispatch.KERNEL_MODES, e.g. auto: its
    policy, triton: our kernels wherever one applies, torch: PyTorch's ops), eager and replayed from a CUDA
    graph (model/graphs.GraphedCall, as the samplers run it);
  * diffusers: eager, replayed from a CUDA graph, and torch.compile'd (--compile-mode; its first call
    compiles, about 70 s on an H200, so it runs last, after the other rows are printed): the strongest
    stock paths.
On the CPU only the eager rows run, ours once (no Triton kernel runs on CPU tensors); without diffusers
only ours, from our own random initialisation.

The weights are diffusers' random initialisation, handed to our UNet through `diffusers_to_ldm_unet`.
Every variant is called twice untimed (the warm-up; for a graph its capture, for torch.compile its
compilation: "first calls s"), then the variants take turns for `--repeats` rounds (so load changes on a
shared machine hit all alike); ms is the median. Peak memory is the most any one call (capture and
compilation included) adds on top of the weights: CUDA max_memory_allocated; on the CPU the process RSS,
sampled every millisecond by a thread, after returning freed heap pages to the OS (so the baseline is
honest). rel err: against diffusers eager (without diffusers: against the first row). Prints markdown rows
with the date and the device. diffusers is a dev-only dependency; nothing at runtime imports this file.
"""
import argparse
import contextlib
import ctypes
import datetime
import gc
import os
import statistics
import sys
import threading
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels.dispatch import KERNEL_MODES  # noqa: E402
from model.config import SD1, SD2_BASE  # noqa: E402
from model.graphs import GraphedCall  # noqa: E402
from model.unet import UNet, diffusers_to_ldm_unet  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Our config and, beyond diffusers' defaults (SD1's shapes), the published unet/config.json of each family.
FAMILIES = {
    "sd1": (SD1.unet, dict(cross_attention_dim=768, attention_head_dim=8)),
    "sd2": (SD2_BASE.unet, dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                                use_linear_projection=True)),
}


def build_models(family: str, width: int, device, dtype):
    """(ours, diffusers' or None when diffusers is missing) with the same weights, `width` channels wide."""
    config, diffusers_config = FAMILIES[family]
    config = replace(config, model_channels=width)
    ours = UNet(config)
    try:
        from diffusers import UNet2DConditionModel
        from diffusers.utils import logging
    except ImportError:
        reference = None
    else:
        logging.set_verbosity_error()   # silence its advice against casting a model with .to(dtype)
        reference = UNet2DConditionModel(**diffusers_config,
                                         block_out_channels=[width * m for m in config.channel_mult])
        ours.load_state_dict(diffusers_to_ldm_unet(reference.state_dict(), ours.config), strict=True)
    return [m and m.to(device=device, dtype=dtype).eval().requires_grad_(False) for m in (ours, reference)]


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


@contextlib.contextmanager
def kernels(mode: str | None):
    """SVP_KERNELS=mode while a variant runs (read at every call; a graph keeps the kernels it captured)."""
    before = os.environ.get("SVP_KERNELS")
    if mode is not None:
        os.environ["SVP_KERNELS"] = mode
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("SVP_KERNELS", None)
        else:
            os.environ["SVP_KERNELS"] = before


def variants(ours, reference, cuda: bool) -> list[tuple[str, str | None, str, object]]:
    """(implementation, SVP_KERNELS mode, how it is launched, forward(x, t, context)) for each row but the
    torch.compile one."""
    rows = []
    for mode in KERNEL_MODES if cuda else ("torch",):
        rows.append(("ours", mode, "eager", ours))
        if cuda:
            rows.append(("ours", mode, "CUDA graph", GraphedCall(ours, clone_outputs=False)))
    if reference is not None:
        rows.append(("diffusers", None, "eager", diffusers_forward(reference)))
        if cuda:
            graphed = GraphedCall(diffusers_forward(reference), clone_outputs=False)
            rows.append(("diffusers", None, "CUDA graph", graphed))
    return rows


def diffusers_forward(reference):
    return lambda x, t, context: reference(x, t, context, return_dict=False)[0]


def measure(rows, inputs, repeats: int, device) -> list[dict]:
    """Per row: median ms of `repeats` calls after two untimed ones (their seconds: "first"), the most one
    call adds to memory, the last output. The rows take turns."""
    results = [{"times": [], "first": 0.0, "peak": 0} for _ in rows]
    with torch.inference_mode():
        for repeat in range(repeats + 2):            # calls 0 and 1: warm-up, capture, compilation
            for (_, mode, _, forward), result in zip(rows, results):
                with kernels(mode):
                    seconds, peak, result["out"] = timed_forward(lambda: forward(*inputs), device)
                result["peak"] = max(result["peak"], peak)
                if repeat < 2:
                    result["first"] += seconds
                else:
                    result["times"].append(seconds)
    for result in results:
        result["ms"] = 1000 * statistics.median(result["times"])
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: fp32 on CPU, fp16 on CUDA")
    parser.add_argument("--family", choices=FAMILIES, default="sd1")
    parser.add_argument("--width", type=int, default=320, help="the UNet's base width (SD: 320)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=64, help="latent height and width")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode of diffusers' last row (default, reduce-overhead, max-autotune; "
                        "off: no such row); it runs after the others are printed")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype_name = args.dtype or ("fp16" if cuda else "fp32")
    dtype = DTYPES[dtype_name]

    torch.manual_seed(0)
    ours, reference = build_models(args.family, args.width, device, dtype)
    if reference is None:
        print("diffusers is not importable here: its rows are skipped")
    inputs = (torch.randn(args.batch, 4, args.size, args.size, device=device, dtype=dtype),
              torch.randint(0, 1000, (args.batch,), device=device),
              torch.randn(args.batch, 77, ours.config.context_dim, device=device, dtype=dtype))
    rows = variants(ours, reference, cuda)
    results = measure(rows, inputs, args.repeats, device)

    launches = [(name, launch) for name, _, launch, _ in rows]
    baseline = ("diffusers", "CUDA graph") if ("diffusers", "CUDA graph") in launches else ("diffusers", "eager")
    baseline_ms = results[launches.index(baseline)]["ms"] if baseline in launches else None
    truth = results[launches.index(("diffusers", "eager")) if reference is not None else 0]["out"].float()
    where = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    today = datetime.date.today().isoformat()
    print(f"{where}, {today}: {args.family} UNet width {args.width}, {dtype_name}, batch {args.batch}, latent "
          f"{args.size}x{args.size}; torch {torch.__version__}; ms: median of {args.repeats}")
    print()
    print(f"| date | device | implementation | SVP_KERNELS | launch | ms | time / {' '.join(baseline)} "
          "| first calls s | peak MiB | rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|")

    def print_row(name, mode, launch, result):
        ratio = f"{result['ms'] / baseline_ms:.2f}" if baseline_ms else "n/a"
        rel_err = ((result["out"].float() - truth).norm() / truth.norm()).item()
        print(f"| {today} | {where} | {name} | {mode or '-'} | {launch} | {result['ms']:.1f} | {ratio} "
              f"| {result['first']:.1f} | {result['peak'] / 2**20:.0f} | {rel_err:.1e} |", flush=True)
    for (name, mode, launch, _), result in zip(rows, results):
        print_row(name, mode, launch, result)
    if cuda and reference is not None and args.compile_mode != "off":  # last: a slow first call, the rest printed
        compiled = ("diffusers", None, f"torch.compile {args.compile_mode}",
                    torch.compile(diffusers_forward(reference), mode=args.compile_mode))
        print_row(*compiled[:3], measure([compiled], inputs, args.repeats, device)[0])


if __name__ == "__main__":
    main()
