"""CUDA graphs for calls whose shapes repeat: captured once per input signature, replayed after.

Eager, a UNet forward on a fast GPU is bound by launching its ~1,000 kernels from Python; replayed from
a CUDA graph the same kernels cost one launch (an H200, 2026-12-04: SD1.5 shapes, batch 2, 21-50 ms
eager, 12 ms replayed). `GraphedCall(fn)` is a drop-in for `fn` that does this, following the rules of
PyTorch's CUDA graph notes:

- A graph reads and writes the addresses it was captured with. Tensor arguments are copied into static
  buffers before every replay; the outputs are the same tensors at every replay, so they are cloned for
  the caller unless the call site says it is done with them before its next call (`clone_outputs`).
- Shapes and Python values are baked in: every signature (each tensor argument's shape, dtype and
  device, every other argument's value) gets its own graph, captured at its second call. Non-tensor
  arguments must be hashable, and few (each value is a capture); pass what changes per call as tensors
  (e.g. timesteps as device tensors, `device_scalar`).
- Before its capture, a signature's first call runs eagerly on the side stream it will be captured on
  (lazy initialisation, Triton compilation and autotuning, cuBLAS workspaces must not happen inside a
  capture). That warm-up is a real call, its result returned, so a graph costs one capture (host time,
  no GPU work) and nothing for a call made once (a single decode); it counts once it returned (a warm-up
  that ran out of memory is done again, not followed by a capture). The callable must not synchronise
  with the host or draw random numbers: our networks in eval mode do neither (the samplers' step noise
  is drawn outside the graphed call, per frame, from its own generator).
- Each GraphedCall has its own side stream, lent for its lifetime and reused by a later GraphedCall once
  it is gone. cuBLAS keeps a workspace per stream for the life of the process, and destroying a graph
  clears the workspaces of the stream it was captured on (torch >= 2.11): a stream per warm-up would
  pile up workspaces (32 MiB each), and one capture stream for all would let a dead graph free the
  workspace a live one replays on.
- The graphs of one GraphedCall share one memory pool: they are replayed one at a time, on one stream,
  and every graph's static outputs stay allocated, so no capture can place its buffers on them.
- Graphs hold the weights by address: a GraphedCall lives as long as one render or stream (built by the
  sampler that uses it), never across a change of weights or device.
- A capture that fails (an op that synchronises, a Triton error) costs no run: the stream is restored,
  the capture's memory freed, and that signature runs eagerly from then on, with one warning line per
  callable naming it and --no-cuda-graphs.

Anything else runs the plain call (the eager path): CPU tensors, grad mode on (training stays eager),
or enabled=False (sample.py's --no-cuda-graphs, VideoSampling.cuda_graphs).
"""
import logging
import weakref

import torch

log = logging.getLogger(__name__)


def map_tensors(value, fn):
    """`value` (a tensor, None, or tuples/lists of them) with fn applied to every tensor."""
    if torch.is_tensor(value):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(v, fn) for v in value)
    return value


def flat_tensors(value) -> list[torch.Tensor]:
    """The tensors of `value` (as in `map_tensors`), in order."""
    found = []
    map_tensors(value, found.append)
    return found


def device_scalar(value, device) -> torch.Tensor:
    """A Python number as a 0-d tensor made on `device` (a fill, not a host copy, which would synchronise):
    a graphed call reads it from its static buffer instead of baking the number in."""
    return torch.full((), value, device=device)


def signature(args: tuple) -> tuple:
    """What a graph is captured for: each tensor's shape, dtype and device; every other argument's value."""
    return tuple(("tensor", tuple(a.shape), a.dtype, a.device) if torch.is_tensor(a) else ("value", a) for a in args)


class GraphCaptureError(RuntimeError):
    """A capture failed; its message describes the error that made it fail."""


def describe(error: Exception) -> str:
    """An error in one line: its type and its message's first line."""
    if isinstance(error, GraphCaptureError):
        return str(error)
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"


class SideStreams:
    """Side streams lent to capture owners (CudaGraphCapture), one stream to one owner, per device.

    PyTorch hands out streams from a pool of 32 per device, round robin, so a new torch.cuda.Stream()
    can be one that a live owner holds: a stream drawn is checked against those lent out."""

    def __init__(self):
        self.free: dict[torch.device, list] = {}
        self.lent: set[int] = set()  # cuda_stream handles

    def lend(self, device: torch.device):
        if self.free.get(device):
            stream = self.free[device].pop()
        else:
            for _ in range(64):
                stream = torch.cuda.Stream(device)
                if stream.cuda_stream not in self.lent:
                    break
            else:
                raise RuntimeError(f"every side stream of {device} is lent out: too many CUDA-graph callables alive")
        self.lent.add(stream.cuda_stream)
        return stream

    def give_back(self, device: torch.device, stream):
        self.lent.discard(stream.cuda_stream)
        self.free.setdefault(device, []).append(stream)


SIDE_STREAMS = SideStreams()


class CudaGraphCapture:
    """Records a call into a CUDA graph: GraphedCall's way of capturing, on the GPU. One per GraphedCall
    (the owner of its graphs): its side stream and memory pool, made at its first call on its device."""

    def __init__(self):
        self.device, self.stream, self.pool = None, None, None

    def accepts(self, tensors: list[torch.Tensor]) -> bool:
        """Inference on one CUDA device, this owner's: training, CPU tensors and mixed devices run eagerly."""
        return (bool(tensors) and not torch.is_grad_enabled() and all(t.is_cuda for t in tensors)
                and len({t.device for t in tensors}) == 1 and self.device in (None, tensors[0].device))

    def _side_stream(self, device: torch.device):
        if self.stream is None:
            self.device, self.stream = device, SIDE_STREAMS.lend(device)
            weakref.finalize(self, SIDE_STREAMS.give_back, device, self.stream)  # when this owner's graphs are gone
        return self.stream

    def warm_up(self, run, device: torch.device):
        """run() on the side stream, ordered after and before the current stream's work; returns its outputs."""
        with torch.cuda.device(device):
            side = self._side_stream(device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                outputs = run()
            torch.cuda.current_stream().wait_stream(side)
        return outputs

    def __call__(self, run, device: torch.device):
        """Capture `run()` (the call on its static arguments, warmed up); returns (replay, static outputs)."""
        with torch.cuda.device(device):
            stream, caller = self._side_stream(device), torch.cuda.current_stream()
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph, problem = torch.cuda.CUDAGraph(), None
            try:
                # thread_local: another thread's CUDA work (a viewer, a tracker) does not abort this capture
                with torch.cuda.graph(graph, pool=self.pool, stream=stream, capture_error_mode="thread_local"):
                    try:
                        outputs = run()
                    except Exception as error:
                        problem = describe(error)  # the call's own error, not that of the capture's end it fails
                        raise
            except Exception as error:
                problem = problem or describe(error)
            finally:
                torch.cuda.set_stream(caller)  # torch.cuda.graph's exit does not when the capture's end fails
            if problem is not None:  # out of the handler: the error's traceback, holding the capture's tensors, is gone
                del graph
                torch.cuda.empty_cache()  # the failed capture's memory leaves the pool
                raise GraphCaptureError(problem)

        def replay():
            with torch.cuda.device(device):
                graph.replay()
        return replay, outputs


class _Graph:
    def __init__(self, inputs: list[torch.Tensor], replay, outputs):
        self.inputs, self.replay, self.outputs = inputs, replay, outputs


_WARNED: set[str] = set()  # callables whose failed capture was reported (once per process)


class GraphedCall:
    """fn(*args) through CUDA graphs where it can be (see the module doc), else fn(*args) itself.

    enabled: False runs fn eagerly always. clone_outputs: False returns the graph's own output tensors,
    which the next call overwrites (for call sites that use the outputs before calling again).
    capture: how a graph is made (default CudaGraphCapture; tests pass a CPU stand-in).
    """

    def __init__(self, fn, enabled: bool = True, clone_outputs: bool = True, capture=None):
        self.fn, self.enabled, self.clone_outputs = fn, enabled, clone_outputs
        self.capture = capture or CudaGraphCapture()
        self.graphs: dict[tuple, _Graph] = {}
        self.warm: set[tuple] = set()  # signatures called once (eagerly, the warm-up): captured at the next call
        self.eager: set[tuple] = set()  # signatures whose capture failed: eager from then on

    def __call__(self, *args):
        tensors = [a for a in args if torch.is_tensor(a)]
        if not (self.enabled and self.capture.accepts(tensors)):
            return self.fn(*args)
        key = signature(args)
        if key in self.eager:
            return self.fn(*args)
        if key not in self.graphs and key not in self.warm:
            outputs = self.capture.warm_up(lambda: self.fn(*args), tensors[0].device)
            self.warm.add(key)  # only now: after a failed warm-up (out of memory) the next call warms up again
            return outputs
        graph = self.graphs.get(key) or self._capture(key, args, tensors)
        if graph is None:
            return self.fn(*args)
        for static, value in zip(graph.inputs, tensors):
            static.copy_(value)
        graph.replay()
        return map_tensors(graph.outputs, torch.clone) if self.clone_outputs else graph.outputs

    def _capture(self, key: tuple, args: tuple, tensors: list[torch.Tensor]) -> _Graph | None:
        """The signature's graph, or None when it cannot be captured (then it runs eagerly from now on)."""
        inputs = [t.clone() for t in tensors]
        static = iter(inputs)
        static_args = [next(static) if torch.is_tensor(a) else a for a in args]
        try:
            replay, outputs = self.capture(lambda: self.fn(*static_args), tensors[0].device)
        except Exception as error:  # not only RuntimeError: Triton's compilation and out-of-resources errors too
            self.eager.add(key)
            self._report(error)
            return None
        self.graphs[key] = graph = _Graph(inputs, replay, outputs)
        return graph

    def _report(self, error: Exception):
        name = getattr(self.fn, "__qualname__", repr(self.fn))
        if name not in _WARNED:
            _WARNED.add(name)
            log.warning("svp: capturing %s into a CUDA graph failed (%s); it runs eagerly instead "
                        "(--no-cuda-graphs runs every call eagerly)", name, describe(error))
