"""Benchmark of svp's Triton kernels against their PyTorch baselines, on the shapes SD runs.

    python bench/kernels.py            # needs a CUDA GPU; prints markdown tables

Each row times our kernel and the baseline in the same run (triton.testing.do_bench, mean ms) and
reports throughput plus speedup = baseline time / our time. It also reports the relative error against
the baseline (worst of output and gradients), a first check of the compiled kernels:
  attention  (B, H, Lq, Lk, D) at 512 px with CFG batch 2   F.scaled_dot_product_attention
             TFLOP/s of the matmuls: fwd 4*B*H*Lq*Lk*D, fwd+bwd 3.5x that (the backward does 2.5x)
  groupnorm  UNet and VAE-decoder activations, 32 groups    F.group_norm then F.silu
             GB/s counting the compulsory traffic: read x, write y (fwd); + read x, dy, write dx (bwd)
  temporal   16 frames of latents, every input present      temporal_step_reference
             GB/s: read x, cond, uncond, x0_prev, noise, prev_frame_x0 (+ one frame), write x_next, x0
"""
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

DEVICE = "cuda"
DTYPES = (torch.float16, torch.bfloat16)
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


def time_ms(fn) -> float:
    from triton.testing import do_bench  # triton is a runtime requirement of the kernels themselves
    return do_bench(fn, return_mode="mean")


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


def forward_backward(fn, inputs, grad_out):
    return lambda: torch.autograd.grad(fn(*inputs), inputs, grad_out)


def bench_attention():
    rows = []
    for dtype in DTYPES:
        for batch, heads, len_q, len_k, head_dim in ATTENTION_SHAPES:
            q = torch.randn(batch, heads, len_q, head_dim, device=DEVICE, dtype=dtype, requires_grad=True)
            k, v = (torch.randn(batch, heads, len_k, head_dim, device=DEVICE, dtype=dtype, requires_grad=True)
                    for _ in range(2))
            ours, baseline = attention_module.flash_attention, F.scaled_dot_product_attention
            grad_out = torch.randn_like(q)
            error = worst_error(ours, baseline, (q, k, v), grad_out)
            flops = 4 * batch * heads * len_q * len_k * head_dim
            fwd = [time_ms(lambda f=f: f(q, k, v)) for f in (ours, baseline)]
            both = [time_ms(forward_backward(f, (q, k, v), grad_out)) for f in (ours, baseline)]
            rows.append([str(dtype).removeprefix("torch."), f"{batch}x{heads}x{len_q}x{len_k}x{head_dim}",
                         f"{fwd[0]:.3f}", f"{flops / fwd[0] * 1e-9:.1f}", f"{fwd[1] / fwd[0]:.2f}",
                         f"{both[0]:.3f}", f"{3.5 * flops / both[0] * 1e-9:.1f}", f"{both[1] / both[0]:.2f}",
                         f"{error:.1e}"])
    table("Attention (vs F.scaled_dot_product_attention)",
          ["dtype", "BxHxLqxLkxD", "fwd ms", "fwd TFLOP/s", "fwd speedup", "fwd+bwd ms", "fwd+bwd TFLOP/s",
           "fwd+bwd speedup", "rel err"], rows)


def bench_group_norm(num_groups=32):
    rows = []
    for dtype in DTYPES:
        for shape in GROUP_NORM_SHAPES:
            x = torch.randn(shape, device=DEVICE, dtype=dtype, requires_grad=True)
            weight, bias = (torch.randn(shape[1], device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(2))

            def ours(x, weight, bias):
                return groupnorm_module.fused_group_norm(x, num_groups, weight, bias, 1e-5, True)

            def baseline(x, weight, bias):
                return F.silu(F.group_norm(x, num_groups, weight, bias, 1e-5))

            grad_out = torch.randn_like(x)
            error = worst_error(ours, baseline, (x, weight, bias), grad_out)
            size = x.numel() * x.element_size()
            fwd = [time_ms(lambda f=f: f(x, weight, bias)) for f in (ours, baseline)]
            both = [time_ms(forward_backward(f, (x, weight, bias), grad_out)) for f in (ours, baseline)]
            rows.append([str(dtype).removeprefix("torch."), "x".join(map(str, shape)),
                         f"{fwd[0]:.3f}", f"{2 * size / fwd[0] * 1e-6:.0f}", f"{fwd[1] / fwd[0]:.2f}",
                         f"{both[0]:.3f}", f"{5 * size / both[0] * 1e-6:.0f}", f"{both[1] / both[0]:.2f}",
                         f"{error:.1e}"])
    table("GroupNorm + SiLU (vs F.group_norm then F.silu)",
          ["dtype", "shape", "fwd ms", "fwd GB/s", "fwd speedup", "fwd+bwd ms", "fwd+bwd GB/s", "fwd+bwd speedup",
           "rel err"], rows)


def bench_temporal():
    rows = []
    coefficients = dict(guidance=7.5, a=1.2, b=-0.5, c_x=0.8, c_0=0.3, c_1=-0.1, c_n=0.2, r_0=0.9, r_n=0.4, w=0.3)
    for dtype in DTYPES:
        for shape in TEMPORAL_SHAPES:
            x, cond, uncond, x0_prev, noise, prev_frame_x0 = (torch.randn(shape, device=DEVICE, dtype=dtype)
                                                              for _ in range(6))
            shared_noise = torch.randn(shape[1:], device=DEVICE, dtype=dtype)
            args = (x, cond, uncond, x0_prev, noise, shared_noise, prev_frame_x0, *coefficients.values())
            ours, baseline = temporal_module.fused_temporal_step, temporal_module.temporal_step_reference
            error = relative_error(ours(*args)[0], baseline(*args)[0])
            size = x.numel() * x.element_size()
            times = [time_ms(lambda f=f: f(*args)) for f in (ours, baseline)]
            rows.append([str(dtype).removeprefix("torch."), "x".join(map(str, shape)), f"{times[0]:.3f}",
                         f"{8 * size / times[0] * 1e-6:.0f}", f"{times[1] / times[0]:.2f}", f"{error:.1e}"])
    table("Temporal denoising step (vs temporal_step_reference)",
          ["dtype", "shape", "ms", "GB/s", "speedup", "rel err"], rows)


def main() -> int:
    if not torch.cuda.is_available():
        print("bench/kernels.py: no CUDA device here; the Triton kernels only run on NVIDIA GPUs. Nothing to do.")
        return 0
    print(f"# svp kernels on {torch.cuda.get_device_name()} (torch {torch.__version__})")
    bench_attention()
    bench_group_norm()
    bench_temporal()
    return 0


if __name__ == "__main__":
    sys.exit(main())
