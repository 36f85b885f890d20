"""What only a real GPU can show about the CUDA paths (issue 24), checked: the first step of bench/gpu.sh.

    python bench/gpu_checks.py          # one line per check: PASS, FAIL or SKIP, with its figures

1. Kernel timing on the tensors' GPU (kernels/dispatch.cuda_time_ms): a matmul on cuda:1 timed while
   cuda:0 is current takes what it takes with cuda:1 current (within 2x). Needs two GPUs.
2. Side streams (model/graphs.py): 40 successive GraphedCalls of one layer, each warmed up, captured,
   replayed and dropped, leave allocated memory flat after the first few (a stream per warm-up would
   add a 32 MiB cuBLAS workspace each, up to 32 of them).
3. Graph lifetimes: graph A deleted, its memory taken by a large NaN fill, while graph B, captured after
   A by another GraphedCall, still replays what the eager call gives (no shared capture-stream workspace).
4. A capture that fails (a host sync inside the call) warns once, gives the eager result, leaves the
   caller on its own stream, and later captures still work.
5. `torchrun --nproc_per_node 2 sample.py` on two GPUs equals one process (tests/test_sample.py). Needs
   two GPUs.
Without CUDA it says "no GPU" and exits 0. Exit status 1 if a check fails.
"""
import gc
import logging
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels.dispatch import cuda_time_ms  # noqa: E402
from model.graphs import GraphedCall  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 2 ** 20


class Skip(Exception):
    pass


def layer(seed: int, device="cuda") -> torch.nn.Module:
    """Two fp16 matmuls (cuBLAS, with its workspace) around a GELU."""
    torch.manual_seed(seed)
    width = 1024
    return torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                               torch.nn.Linear(4 * width, width)).to(device, torch.float16).eval()


def batch(seed: int, device="cuda") -> torch.Tensor:
    return torch.randn(64, 1024, generator=torch.Generator().manual_seed(seed)).to(device, torch.float16)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.isfinite(a).all().item() and torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-3)


def check_timing_on_the_tensors_gpu() -> str:
    if torch.cuda.device_count() < 2:
        raise Skip("one GPU")
    a = torch.randn(4096, 4096, device="cuda:1", dtype=torch.float16)
    gpu1 = torch.device("cuda", 1)
    with torch.cuda.device(0):
        elsewhere = cuda_time_ms(lambda: a @ a, gpu1)
    with torch.cuda.device(1):
        here = cuda_time_ms(lambda: a @ a, gpu1)
    ratio = max(elsewhere, here) / min(elsewhere, here)
    assert ratio < 2, f"cuda:1 timed with cuda:0 current: {elsewhere:.3f} ms, with cuda:1 current: {here:.3f} ms"
    return f"4096^2 fp16 matmul on cuda:1: {elsewhere:.3f} ms with cuda:0 current, {here:.3f} ms with cuda:1 current"


def check_memory_flat_over_many_graphed_calls() -> str:
    net, x = layer(0), batch(0)
    allocated, reserved = [], []
    with torch.no_grad():
        for _ in range(40):
            call = GraphedCall(net)
            for _ in range(4):  # warm-up, capture + replay, replay, replay
                call(x)
            torch.cuda.synchronize()
            del call
            gc.collect()
            allocated.append(torch.cuda.memory_allocated())
            reserved.append(torch.cuda.memory_reserved())
    settled = slice(5, None)
    growth = max(allocated[settled]) - min(allocated[settled])
    shown = (f"allocated {allocated[0] / MiB:.1f} -> {allocated[5] / MiB:.1f} -> {allocated[-1] / MiB:.1f} MiB, "
             f"reserved {reserved[0] / MiB:.0f} -> {reserved[5] / MiB:.0f} -> {reserved[-1] / MiB:.0f} MiB "
             "(after GraphedCall 1, 6, 40)")
    assert growth < 4 * MiB, shown  # a cuBLAS workspace is 32 MiB (sm_90)
    return shown


def check_a_graph_outlives_another() -> str:
    net_a, net_b = layer(1), layer(2)
    with torch.no_grad():
        a, b = GraphedCall(net_a), GraphedCall(net_b)
        for seed in range(3):
            a(batch(seed))
        for seed in range(3):
            b(batch(seed))
        torch.cuda.synchronize()
        del a
        gc.collect()
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info()
        fill = [torch.full((64 * MiB // 2,), float("nan"), device="cuda", dtype=torch.float16)
                for _ in range(min(32, int(free * 0.5) // (64 * MiB)))]  # A's memory, and more, now NaN
        x = batch(7)
        replayed, eager = b(x), net_b(x)
        torch.cuda.synchronize()
    assert close(replayed, eager), f"B replayed {replayed.float().abs().max().item()} vs eager"
    return f"B replays the eager result after A was deleted and {len(fill) * 64} MiB were filled with NaN"


class Count(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def check_a_failed_capture_falls_back() -> str:
    net = layer(3)

    def syncs(x):
        y = net(x)
        if y.float().abs().sum().item() < 0:  # a host sync: not allowed while capturing
            y = -y
        return y
    syncs.__qualname__ = "syncs"
    counter = Count()
    logging.getLogger("model.graphs").addHandler(counter)
    try:
        with torch.no_grad():
            call = GraphedCall(syncs)
            results = [(call(batch(seed)), net(batch(seed))) for seed in range(5)]
            on_own_stream = torch.cuda.current_stream() == torch.cuda.default_stream()
            after = GraphedCall(net)
            later = [(after(batch(seed)), net(batch(seed))) for seed in range(3)]
            torch.cuda.synchronize()
    finally:
        logging.getLogger("model.graphs").removeHandler(counter)
    assert len(counter.messages) == 1 and "syncs" in counter.messages[0] and "--no-cuda-graphs" in \
        counter.messages[0], counter.messages
    assert all(close(got, want) for got, want in results), "the fallback's results differ from the eager call"
    assert on_own_stream, "the failed capture left the caller on the capture stream"
    assert len(after.graphs) == 1 and all(close(got, want) for got, want in later), "a later capture failed"
    return f"one warning ({counter.messages[0][:110]}...), eager results, later captures replay"


def check_torchrun_on_two_gpus() -> str:
    if torch.cuda.device_count() < 2:
        raise Skip("one GPU")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_sample.py",
                             "-k", "torchrun_on_two_gpus"], cwd=REPO, capture_output=True, text=True, timeout=300)
    summary = (result.stdout.strip().splitlines() or ["no output"])[-1]
    assert result.returncode == 0 and "1 passed" in summary, result.stdout[-1500:] + result.stderr[-1500:]
    return summary


CHECKS = [check_timing_on_the_tensors_gpu, check_memory_flat_over_many_graphed_calls, check_a_graph_outlives_another,
          check_a_failed_capture_falls_back, check_torchrun_on_two_gpus]


def main() -> int:
    if not torch.cuda.is_available():
        print(f"no GPU: torch {torch.__version__} sees no CUDA device; nothing checked")
        return 0
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    print(f"{torch.cuda.device_count()} GPU(s): {names}; torch {torch.__version__}")
    failed = 0
    for check in CHECKS:
        name, start = check.__name__.removeprefix("check_"), time.perf_counter()
        try:
            print(f"PASS {name}: {check()} ({time.perf_counter() - start:.1f} s)", flush=True)
        except Skip as why:
            print(f"SKIP {name}: {why}", flush=True)
        except Exception as error:  # every check runs and reports, whatever one of them does
            failed += 1
            print(f"FAIL {name}: {type(error).__name__}: {error}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
