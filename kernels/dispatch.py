"""Decides, per call, whether our Triton kernel or PyTorch's own op runs: ours only where it is faster.

`SVP_KERNELS` picks the policy:
- `auto` (default): on CUDA tensors, ours runs for an op and shape class only where it was measured faster
  than PyTorch's op on this kind of GPU; everywhere else PyTorch's op runs.
- `triton`: ours on every CUDA tensor the kernel supports (tests and benchmarks).
- `torch`: PyTorch's op everywhere.
CPU tensors always take PyTorch's op (the reference).

Where the measurements come from, first found wins:
1. The repo's table for the GPU's architecture, kernels/sm<major><minor>.json (sm90.json: an H200),
   written by `python bench/kernels.py --write-table`.
2. This machine's cache, kernels-<gpu>.json in svp's cache folder (`cache_dir`), valid for one GPU name
   and one torch and triton version; a corrupt or stale cache is rebuilt.
3. One timing of both at the first call of a new shape class, added to that cache. The timing runs on
   the tensors' GPU, made current, between events on its stream (a timing on another GPU would time an
   idle one). Never while a CUDA graph is being captured (timing would break the capture): then
   PyTorch's op runs, undecided.
Table entries hold the eager times of both (forward, or forward+backward for training) and, forward,
their times replayed from a CUDA graph: ours must win both. A decision is then one dict lookup per call.
Shapes are bucketed (`size_class`) so one measurement covers a class of shapes, and a call that trains
(autograd on) is decided by forward+backward time.
"""
import contextlib
import json
import os
import statistics
import warnings
from pathlib import Path
from typing import Callable

import torch

KERNEL_MODES = ("auto", "triton", "torch")
TABLE_DIR = Path(__file__).resolve().parent
CACHE_VERSION = 1


class KernelModeError(ValueError):
    pass


def kernel_mode() -> str:
    mode = os.environ.get("SVP_KERNELS", "auto").strip().lower() or "auto"
    if mode not in KERNEL_MODES:
        raise KernelModeError(f"SVP_KERNELS={mode!r}: expected one of {', '.join(KERNEL_MODES)}")
    return mode


def on_device(tensor: torch.Tensor):
    """Make tensor's GPU the current one while launching: Triton launches on the current device, which
    need not be the tensor's (a process driving several GPUs). A no-op for CPU (interpreted) tensors."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def size_class(n: int) -> int:
    """The power of two at or above n: shapes within a factor of two share a measurement."""
    return 1 << max(0, n - 1).bit_length()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def entry_key(op: str, bucket: tuple) -> str:
    """A decision's key in the table and cache files: op and bucket, '|'-separated."""
    return "|".join((op, *map(str, bucket)))


def cuda_time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, repeats: int = 10) -> float:
    """Median GPU time of fn() on `device` in ms. The warm-up compiles (and autotunes) Triton kernels first.

    `device` is made current while timing: fn's launches (PyTorch's and Triton's) then go to its current
    stream, where the events are recorded, whichever GPU the caller had current."""
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device)
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            fn()
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def gpu_identity(device: torch.device) -> dict:
    major, minor = torch.cuda.get_device_capability(device)
    import triton  # a runtime requirement; imported here so this module stays importable without it
    return dict(gpu=torch.cuda.get_device_name(device), arch=f"sm{major}{minor}",
                torch=torch.__version__, triton=triton.__version__)


def cache_dir() -> Path:
    """svp's cache folder, for every cache of svp (kernel timings, the parsed landmark model, the toy
    head): $SVP_CACHE, else $XDG_CACHE_HOME/svp, else ~/.cache/svp. Everything in it is rebuilt when
    missing. Defined here because kernels/ imports nothing else of svp; tracking/ reads it from here."""
    if os.environ.get("SVP_CACHE"):
        return Path(os.environ["SVP_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "svp"


def default_cache_path(gpu: str) -> Path:
    slug = "".join(c if c.isalnum() else "-" for c in gpu).strip("-").lower()
    return cache_dir() / f"kernels-{slug}.json"


def read_entries(path: Path) -> dict | None:
    """A table or cache file's {key: {"ours_ms", "torch_ms"}} with its header, or None if unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    entries = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(entries, dict) or not all(
            isinstance(e, dict) and {"ours_ms", "torch_ms"} <= e.keys() for e in entries.values()):
        return None
    return data


def ours_faster(entry: dict) -> bool:
    """Ours must win eager and, where the bench measured it, replayed from a CUDA graph too."""
    graphed = entry.get("graphed_ours_ms", 0.0) < entry.get("graphed_torch_ms", 1.0)
    return entry["ours_ms"] < entry["torch_ms"] and graphed


class Op:
    """One op with both implementations, and the shape class (bucket) of a call's arguments."""

    def __init__(self, name: str, ours: Callable, theirs: Callable, bucket: Callable[..., tuple]):
        self.name, self.ours, self.theirs, self.bucket = name, ours, theirs, bucket

    def use_ours(self, tensors, *args) -> bool:
        """Whether this call (tensors: every tensor argument; args: the op's arguments) runs our kernel."""
        mode = kernel_mode()
        if mode == "torch" or not all(t.is_cuda for t in tensors):
            return False
        return mode == "triton" or POLICY.prefers_ours(self, tensors, args)


def is_training(tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class KernelPolicy:
    """Per GPU: which implementation of each (op, bucket) is faster, from the table, the cache or a timing.

    timer(fn) -> ms and identify(device) -> dict(gpu, arch, torch, triton) are injectable, so the logic
    is tested on the CPU with a fake GPU and fake timings.
    """

    def __init__(self, timer=cuda_time_ms, identify=gpu_identity, table_dir: Path = TABLE_DIR,
                 cache_path: Callable[[str], Path] = default_cache_path):
        # timer(fn, device) -> ms of fn() on device, which it makes current (cuda_time_ms)
        self.timer, self.identify, self.table_dir, self.cache_path = timer, identify, table_dir, cache_path
        self.decisions: dict[tuple, bool] = {}  # (device index, op, bucket) -> ours?
        self.devices: dict[int, "DeviceMeasurements"] = {}

    def prefers_ours(self, op: Op, tensors, args) -> bool:
        device = tensors[0].device
        key = (device.index, op.name, is_training(tensors), *op.bucket(*args))
        decision = self.decisions.get(key)
        if decision is None:
            decision = self._decide(key, op, device, args)
        return decision

    def known(self, device: torch.device, op_name: str, bucket: tuple) -> bool | None:
        """The decision for (op, bucket) on device from the table or cache, None if not measured there."""
        entry = self._measurements(device).lookup(entry_key(op_name, bucket))
        return None if entry is None else ours_faster(entry)

    def _measurements(self, device: torch.device) -> "DeviceMeasurements":
        index = device.index or 0
        if index not in self.devices:
            self.devices[index] = DeviceMeasurements(self.identify(device), self.table_dir, self.cache_path)
        return self.devices[index]

    def _decide(self, key: tuple, op: Op, device: torch.device, args) -> bool:
        measurements = self._measurements(device)
        name = entry_key(op.name, key[2:])
        entry = measurements.lookup(name)
        if entry is None:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                return False  # undecided: PyTorch's op, and measure at the next eager call
            entry = self._time_both(op, args, device, training=key[2])
            measurements.remember(name, entry)
        self.decisions[key] = ours_faster(entry)
        return self.decisions[key]

    def _time_both(self, op: Op, args, device: torch.device, training: bool) -> dict:
        """Both implementations timed on `device`, the tensors' GPU (the one this entry is for)."""
        def timed(fn):
            try:
                return self.timer(_runner(fn, args, training), device)
            except Exception as error:  # a kernel that cannot run here (e.g. out of resources) never wins
                if fn is op.theirs:
                    raise
                warnings.warn(f"svp kernels: {op.name} failed its timing ({error}); PyTorch's op runs instead")
                return float("inf")

        theirs_ms = timed(op.theirs)
        return dict(ours_ms=timed(op.ours), torch_ms=theirs_ms)


def _runner(fn, args, training: bool):
    """fn(*args) as the caller would run it: forward only, or forward and backward when training.
    Runs on detached copies of the tensor arguments, outside the caller's autograd graph."""
    inputs = [a.detach().requires_grad_(a.requires_grad) if torch.is_tensor(a) else a for a in args]
    if not training:
        def forward():
            with torch.no_grad():
                fn(*inputs)
        return forward
    wrt = [a for a in inputs if torch.is_tensor(a) and a.requires_grad]

    def forward_backward():
        with torch.enable_grad():
            out = fn(*inputs)
            torch.autograd.grad(out, wrt, torch.ones_like(out))
    return forward_backward


class DeviceMeasurements:
    """One GPU's measurements: the repo's table for its architecture, then its own cache file."""

    def __init__(self, identity: dict, table_dir: Path, cache_path: Callable[[str], Path]):
        self.identity = identity
        table = read_entries(table_dir / f"{identity['arch']}.json")
        self.table = table["entries"] if table else {}
        self.path = cache_path(identity["gpu"])
        self.cache = self._load_cache()

    def _load_cache(self) -> dict:
        if not self.path.exists():
            return {}
        data = read_entries(self.path)
        if data is None:
            warnings.warn(f"{self.path}: not a kernel timing cache; rebuilt")
            return {}
        if any(data.get(k) != self.identity[k] for k in ("gpu", "torch", "triton")) \
                or data.get("version") != CACHE_VERSION:
            return {}  # timed with another GPU or library version: measure again
        return data["entries"]

    def lookup(self, name: str) -> dict | None:
        return self.table.get(name) or self.cache.get(name)

    def remember(self, name: str, entry: dict):
        self.cache[name] = entry
        # whole or not at all: a temporary file beside it (named per process: torchrun ranks share the cache)
        tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(dict(version=CACHE_VERSION, **self.identity, entries=self.cache), indent=1))
            os.replace(tmp, self.path)
        except OSError as error:  # the decision still holds for this process
            warnings.warn(f"{self.path}: cannot write the kernel timing cache ({error})")
        finally:
            tmp.unlink(missing_ok=True)


POLICY = KernelPolicy()
