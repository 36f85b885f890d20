"""Benchmark of svp's Triton kernels against PyTorch's ops, on the shapes SD runs; and the table that
decides, per op and shape class, which of the two `SVP_KERNELS=auto` runs (kernels/dispatch.py).

    python bench/kernels.py                          # needs a CUDA GPU; prints markdown tables
    python bench/kernels.py --write-table            # and writes kernels/sm<arch>.json from this run
    python bench/kernels.py --ops attention --dtypes float16

Each row runs our kernel (forced, as SVP_KERNELS=triton would) and PyTorch's op in the same process:
  fwd        eager forward under no_grad (triton.testing.do_bench, mean ms): GPU time plus launch cost
  graphed    the same forward replayed from a CUDA graph (do_bench_cudagraph): GPU time only
  fwd+bwd    eager forward and backward, as training runs it
speedup = PyTorch's time / ours. "auto fwd" / "auto train" say what SVP_KERNELS=auto runs for such a call
with the table as it was before this run: ours, torch, or "first use" (no entry: timed at the first call).
--write-table records this run's times in the table (ours must win eager and graphed to be picked), so
refreshing a GPU's table is one command. Also reported: relative error against PyTorch (worst of output
and gradients), throughput, and for attention the tiles the autotuner chose (forward / dK,dV / dQ):
  attention  (B, H, Lq, Lk, D) at 512 px with CFG batch 2   F.scaled_dot_product_attention
             TFLOP/s of the matmuls: fwd 4*B*H*Lq*Lk*D, fwd+bwd 3.5x that (the backward does 2.5x)
  groupnorm  UNet and VAE-decoder activations, 32 groups    F.group_norm then F.silu
             GB/s counting the compulsory traffic: read x, write y (fwd); + read x, dy, write dx (bwd)
  temporal   16 frames of latents, every input present      temporal_step_reference
             GB/s: read x, cond, uncond, x0_prev, noise, prev_frame_x0 (+ one frame), write x_next, x0
"""
import argparse
import datetime
import importlib
import sys
from pathlib import Path

if __name__ == "__main__":
    # Run as a script, this file's folder is sys.path[0], where its own name would shadow the kernels package.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
import torch.nn.functional as F

attention_module = importlib.import_module("kernels.attention")
groupnorm_module = importlib.import_module("kernels.groupnorm")
temporal_module = importlib.import_module("kernels.temporal")
dispatch = importlib.import_module("kernels.dispatch")

DEVICE = "cuda"
DTYPES = ("float16", "bfloat16")
OPS = ("attention", "groupnorm", "temporal")
# (batch, heads, Lq, Lk, head_dim): SD1 heads of 40/80/160, SD2 heads of 64; self- and cross-attention.
ATTENTION_SHAPES = [
    (2, 8, 4096, 4096, 40), (2, 8, 1024, 1024, 80), (2, 8, 256, 256, 160), (2, 8, 64, 64, 160),
    (2, 8, 4096, 77, 40), (2, 8, 1024, 77, 80), (2, 8, 256, 77, 160),
    (2, 5, 4096, 4096, 64), (2, 10, 1024, 1024, 64), (2, 20, 256, 256, 64), (2, 20, 64, 64, 64),
    (2, 5, 4096, 77, 64),
]
GROUP_NORM_SHAPES = [  # UNet at 64x64 latents (CFG batch 2), then the VAE decoder at 512 px
    (2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 1280, 8, 8),
    (1, 512, 64, 64), (1, 512, 128, 128), (1, 256, 256, 256), (1, 128, 512, 512),
]
TEMPORAL_SHAPES = [(16, 4, 64, 64), (16, 4, 96, 96)]
TIMING_FIELDS = ("ours_ms", "torch_ms", "graphed_ours_ms", "graphed_torch_ms")


def time_ms(fn) -> float:
    from triton.testing import do_bench  # triton is a runtime requirement of the kernels themselves
    return do_bench(fn, return_mode="mean")


def graphed_ms(fn) -> float:
    from triton.testing import do_bench_cudagraph
    return do_bench_cudagraph(fn, return_mode="mean")


def relative_error(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def worst_error(ours, baseline, inputs, grad_out) -> float:
    """Largest relative error over the output and the gradient of every input."""
    results = []
    for fn in (ours, baseline):
        out = fn(*inputs)
        results.append([out, *torch.autograd.grad(out, inputs, grad_out)])
    return max(relative_error(a, b) for a, b in zip(*results))


def table(title, header, rows):
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


class Recorder:
    """Times both implementations of one call, and keeps the measurements as table entries."""

    def __init__(self):
        self.entries: dict[str, dict] = {}

    def picks(self, op: dispatch.Op, training: bool, bucket: tuple) -> str:
        decision = dispatch.POLICY.known(torch.device(DEVICE, torch.cuda.current_device()), op.name,
                                         (training, *bucket))
        return "first use" if decision is None else "ours" if decision else "torch"

    def forward(self, op: dispatch.Op, bucket: tuple, ours, baseline) -> tuple[list, list]:
        """Eager and graphed forward ms of (ours, baseline), both under no_grad."""
        def no_grad(fn):
            def run():
                with torch.no_grad():
                    fn()
            return run
        eager = [time_ms(no_grad(f)) for f in (ours, baseline)]
        graphed = [graphed_ms(no_grad(f)) for f in (ours, baseline)]
        self.add(op, False, bucket, dict(zip(TIMING_FIELDS, eager + graphed)))
        return eager, graphed

    def training(self, op: dispatch.Op, bucket: tuple, ours, baseline, inputs, grad_out) -> list:
        both = [time_ms(lambda f=f: torch.autograd.grad(f(*inputs), inputs, grad_out)) for f in (ours, baseline)]
        self.add(op, True, bucket, dict(zip(TIMING_FIELDS, both)))
        return both

    def add(self, op, training, bucket, entry):
        """Rows of one shape class add up: the class goes to ours only if ours wins over all of them."""
        key = dispatch.entry_key(op.name, (training, *bucket))
        previous = self.entries.get(key, {})
        self.entries[key] = {field: round(entry[field] + previous.get(field, 0.0), 5) for field in entry}


def speedup(times) -> str:
    return f"{times[1] / times[0]:.2f}"


def tiles() -> str:
    def short(tuned):
        c = tuned.best_config
        return f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}w{c.num_warps}s{c.num_stages}"
    return " / ".join(short(t) for t in (attention_module._forward_tuned, attention_module._dkdv_tuned,
                                          attention_module._dq_tuned))


def bench_attention(recorder: Recorder, dtypes):
    rows, op = [], attention_module.ATTENTION
    for dtype in dtypes:
        for batch, heads, len_q, len_k, head_dim in ATTENTION_SHAPES:
            q = torch.randn(batch, heads, len_q, head_dim, device=DEVICE, dtype=dtype, requires_grad=True)
            k, v = (torch.randn(batch, heads, len_k, head_dim, device=DEVICE, dtype=dtype, requires_grad=True)
                    for _ in range(2))
            ours, baseline = attention_module.flash_attention, F.scaled_dot_product_attention
            grad_out = torch.randn_like(q)
            error = worst_error(ours, baseline, (q, k, v), grad_out)  # also autotunes ours for this shape
            chosen = tiles()
            bucket = op.bucket(q, k, v, False)
            picks = [recorder.picks(op, training, bucket) for training in (False, True)]
            flops = 4 * batch * heads * len_q * len_k * head_dim
            fwd, graphed = recorder.forward(op, bucket, *(lambda f=f: f(q, k, v) for f in (ours, baseline)))
            both = recorder.training(op, bucket, ours, baseline, (q, k, v), grad_out)
            rows.append([dispatch.dtype_name(dtype), f"{batch}x{heads}x{len_q}x{len_k}x{head_dim}",
                         f"{fwd[0]:.3f}", f"{flops / fwd[0] * 1e-9:.1f}", speedup(fwd), speedup(graphed),
                         f"{both[0]:.3f}", f"{3.5 * flops / both[0] * 1e-9:.1f}", speedup(both), *picks,
                         f"{error:.1e}", chosen])
    table("Attention (vs F.scaled_dot_product_attention)",
          ["dtype", "BxHxLqxLkxD", "fwd ms", "fwd TFLOP/s", "fwd speedup", "graphed fwd speedup", "fwd+bwd ms",
           "fwd+bwd TFLOP/s", "fwd+bwd speedup", "auto fwd", "auto train", "rel err", "tiles fwd / dkdv / dq"],
          rows)


def bench_group_norm(recorder: Recorder, dtypes, num_groups=32):
    rows, op = [], groupnorm_module.GROUP_NORM
    for dtype in dtypes:
        for shape in GROUP_NORM_SHAPES:
            x = torch.randn(shape, device=DEVICE, dtype=dtype, requires_grad=True)
            weight, bias = (torch.randn(shape[1], device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(2))

            def ours(x, weight, bias):
                return groupnorm_module.fused_group_norm(x, num_groups, weight, bias, 1e-5, True)

            def baseline(x, weight, bias):
                return F.silu(F.group_norm(x, num_groups, weight, bias, 1e-5))

            grad_out = torch.randn_like(x)
            error = worst_error(ours, baseline, (x, weight, bias), grad_out)
            bucket = op.bucket(x, num_groups, weight, bias, 1e-5, True)
            picks = [recorder.picks(op, training, bucket) for training in (False, True)]
            size = x.numel() * x.element_size()
            fwd, graphed = recorder.forward(op, bucket, *(lambda f=f: f(x, weight, bias) for f in (ours, baseline)))
            both = recorder.training(op, bucket, ours, baseline, (x, weight, bias), grad_out)
            path = "one program" if groupnorm_module.plan(x.shape, num_groups).one_program else "split"
            rows.append([dispatch.dtype_name(dtype), "x".join(map(str, shape)), path,
                         f"{fwd[0]:.3f}", f"{2 * size / fwd[0] * 1e-6:.0f}", speedup(fwd), speedup(graphed),
                         f"{both[0]:.3f}", f"{5 * size / both[0] * 1e-6:.0f}", speedup(both), *picks,
                         f"{error:.1e}"])
    table("GroupNorm + SiLU (vs F.group_norm then F.silu)",
          ["dtype", "shape", "path", "fwd ms", "fwd GB/s", "fwd speedup", "graphed fwd speedup", "fwd+bwd ms",
           "fwd+bwd GB/s", "fwd+bwd speedup", "auto fwd", "auto train", "rel err"], rows)


def bench_temporal(recorder: Recorder, dtypes):
    rows, op = [], temporal_module.TEMPORAL_STEP
    coefficients = dict(guidance=7.5, a=1.2, b=-0.5, c_x=0.8, c_0=0.3, c_1=-0.1, c_n=0.2, r_0=0.9, r_n=0.4, w=0.3)
    for dtype in dtypes:
        for shape in TEMPORAL_SHAPES:
            x, cond, uncond, x0_prev, noise, prev_frame_x0 = (torch.randn(shape, device=DEVICE, dtype=dtype)
                                                              for _ in range(6))
            shared_noise = torch.randn(shape[1:], device=DEVICE, dtype=dtype)
            args = (x, cond, uncond, x0_prev, noise, shared_noise, prev_frame_x0, *coefficients.values())
            ours, baseline = op.ours, op.theirs
            error = relative_error(ours(*args)[0], baseline(*args)[0])
            bucket = op.bucket(*args)
            picks = recorder.picks(op, False, bucket)
            size = x.numel() * x.element_size()
            times, graphed = recorder.forward(op, bucket, *(lambda f=f: f(*args) for f in (ours, baseline)))
            rows.append([dispatch.dtype_name(dtype), "x".join(map(str, shape)), f"{times[0]:.3f}",
                         f"{8 * size / times[0] * 1e-6:.0f}", speedup(times), speedup(graphed), picks, f"{error:.1e}"])
    table("Temporal denoising step (vs temporal_step_reference)",
          ["dtype", "shape", "ms", "GB/s", "speedup", "graphed speedup", "auto", "rel err"], rows)


def write_table(path: Path, entries: dict):
    """Merge this run's entries into the table at path (entries it did not measure stay)."""
    from model.files import write_json
    identity = dispatch.gpu_identity(torch.device(DEVICE, torch.cuda.current_device()))
    old = dispatch.read_entries(path) if path.exists() else None
    merged = dict(old["entries"] if old else {}, **entries)
    write_json(str(path), dict(identity, date=datetime.date.today().isoformat(),
                               source="python bench/kernels.py --write-table", entries=merged))
    wins = sum(dispatch.ours_faster(e) for e in merged.values())
    print(f"\nwrote {path}: {len(merged)} entries ({len(entries)} from this run), ours picked in {wins}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {', '.join(OPS)}")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated subset of float16, bfloat16")
    parser.add_argument("--write-table", nargs="?", const="", metavar="PATH",
                        help="write the measured table (default kernels/sm<arch>.json of this GPU)")
    args = parser.parse_args(argv)
    ops, dtypes = args.ops.split(","), args.dtypes.split(",")
    for name, given, known in (("--ops", ops, OPS), ("--dtypes", dtypes, DTYPES)):
        if not set(given) <= set(known):
            parser.error(f"{name} {','.join(given)}: expected a subset of {','.join(known)}")
    if not torch.cuda.is_available():
        print("bench/kernels.py: no CUDA device here; the Triton kernels only run on NVIDIA GPUs. Nothing to do.")
        return 0
    identity = dispatch.gpu_identity(torch.device(DEVICE, torch.cuda.current_device()))
    print(f"# svp kernels on {identity['gpu']} ({identity['arch']}, torch {identity['torch']}, "
          f"triton {identity['triton']})")
    recorder, dtypes = Recorder(), [getattr(torch, d) for d in dtypes]
    benches = dict(attention=bench_attention, groupnorm=bench_group_norm, temporal=bench_temporal)
    for name in ops:
        benches[name](recorder, dtypes)
    if args.write_table is not None:
        write_table(Path(args.write_table or dispatch.TABLE_DIR / f"{identity['arch']}.json"), recorder.entries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
