"""The live loop as a pipeline: stages in threads of their own, joined by bounded queues.

    source -> stage -> queue -> stage -> queue -> ... -> last stage (the outputs) -> shown

A stage is a generator function, items in -> items out, in order (a stage may hold items back, as the
sampler's wavefront holds `steps` frames, and yields them once its input ends). Each stage runs in its own
thread; the queues between them hold QUEUE_SIZE items, so a stage that gets ahead waits, and that wait
reaches the source, which keeps only the newest frame (live/sources.py): the frames nobody took in time
are dropped there, oldest first, and counted. So the frame rate is that of the slowest stage, and a frame's
latency is the sum of the stages' times plus at most one period of the slowest stage spent in a queue.
`serial=True` chains the same generators in the calling thread (one frame through every stage before the
next is taken: the loop before pipelining, kept for bench/live.py's comparison).

Threads, not processes: the stages spend their time in torch, numpy, PyAV's codecs and PIL's JPEG
encoder, which release the GIL; measured (bench/live.py --contention, BENCHMARKS.md), the tracking beside
the sampler in another process slows as much as beside it in another thread, so a process per stage would
only add the copies of every frame between processes.

Stopping: `stop()` (the first Ctrl-C, see StopOnCtrlC) ends the source; every stage finishes what it holds
and the outputs close. An exception in a stage ends that stage's output as if its input had ended, so the
stages after it finish what they hold (the frames made are kept), and the stages before it stop; `run`
raises the first exception once every stage is done.
"""
import queue
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing

import numpy as np

QUEUE_SIZE = 1   # items waiting between two stages: more would only add latency
WINDOW = 120     # the live figures are those of the last WINDOW frames shown
_END = object()  # end of a stage's output


class StageClock:
    """A stage's own time per item it yields: the time spent in its generator minus the time it waited
    for its input (in a queue, or in the stages before it when they run serially)."""

    def __init__(self, name: str):
        self.name, self.seconds, self._waiting = name, [], 0.0

    def inputs(self, items: Iterable) -> Iterator:
        items = iter(items)
        while True:
            began = time.perf_counter()
            item = next(items, _END)
            self._waiting += time.perf_counter() - began
            if item is _END:
                return
            yield item

    def outputs(self, generator: Iterator, errors: list) -> Iterator:
        """The stage's items, timed; an exception in the stage is appended to `errors` and ends the output."""
        try:
            while True:
                began, self._waiting = time.perf_counter(), 0.0
                item = next(generator, _END)
                if item is _END:
                    return
                self.seconds.append(time.perf_counter() - began - self._waiting)
                yield item
        except Exception as error:  # noqa: BLE001  (the run raises it once the stages after this one are done)
            errors.append(error)
        finally:
            generator.close()  # its `finally` (an output file, a writer) runs now, on this thread


class Pipe:
    """A bounded queue from one stage to the next. `abandon` when the reader is gone: the writer then
    stops instead of waiting for room forever."""

    def __init__(self):
        self.queue, self.abandoned = queue.Queue(QUEUE_SIZE), threading.Event()

    def put(self, item) -> bool:
        while not self.abandoned.is_set():
            try:
                self.queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def items(self) -> Iterator:
        while (item := self.queue.get()) is not _END:
            yield item

    def abandon(self):
        self.abandoned.set()


class Pipeline:
    """Stages (name, generator function) run on the frames of `source(stopped)`; see the module doc."""

    def __init__(self, source: Callable[[Callable[[], bool]], Iterable], stages: list[tuple[str, Callable]],
                 serial: bool = False):
        self.source, self.serial = source, serial
        self.stages = [(StageClock(name), stage) for name, stage in stages]
        self.stopping = threading.Event()
        self.errors: list[Exception] = []
        self.shown_at, self.latencies = [], []

    @property
    def clocks(self) -> list[StageClock]:
        return [clock for clock, _ in self.stages]

    def stop(self):
        """End the source; the frames in the stages are finished."""
        self.stopping.set()

    def run(self, on_shown: Callable | None = None) -> int:
        """Run until the source ends or `stop()`; on_shown(frame) after each frame leaves the last stage.
        Returns the number of frames shown; raises the first stage's exception after all are done."""
        frames = self._serial() if self.serial else self._threaded()
        for frame in frames:
            now = time.monotonic()
            self.shown_at.append(now)
            self.latencies.append(now - frame.read_at)
            if on_shown is not None:
                on_shown(frame)
        self.stop()
        if self.errors:
            raise self.errors[0]
        return len(self.shown_at)

    def _serial(self) -> Iterator:
        items = self.source(self.stopping.is_set)
        for clock, stage in self.stages:
            items = clock.outputs(stage(clock.inputs(items)), self.errors)
        yield from items

    def _threaded(self) -> Iterator:
        pipes = [Pipe() for _ in self.stages]
        upstream = [None] + pipes[:-1]
        threads = [threading.Thread(target=self._run_stage, args=(clock, stage, before, pipe), daemon=True,
                                    name=clock.name)
                   for (clock, stage), before, pipe in zip(self.stages, upstream, pipes)]
        for thread in threads:
            thread.start()
        try:
            yield from pipes[-1].items()
        finally:
            pipes[-1].abandon()
            self.stop()
            for thread in threads:
                thread.join()

    def _run_stage(self, clock: StageClock, stage: Callable, before: Pipe | None, out: Pipe):
        items = self.source(self.stopping.is_set) if before is None else before.items()
        with closing(clock.outputs(stage(clock.inputs(items)), self.errors)) as outputs:
            for item in outputs:
                if not out.put(item):
                    break  # the stages after this one are gone
        if before is None:
            self.stop()
        else:
            before.abandon()  # the stage before stops instead of waiting for room
        out.put(_END)

    def stats(self, dropped: int, read_seconds: list[float], everything: bool = False) -> dict:
        """The figures the page shows: frames shown, dropped, frames/s, latency (frame read -> frame shown)
        and each stage's median ms, over the last WINDOW frames (everything: over the whole run)."""
        last = slice(None) if everything else slice(-WINDOW, None)
        shown = self.shown_at[last]
        fps = (len(shown) - 1) / (shown[-1] - shown[0]) if len(shown) > 1 and shown[-1] > shown[0] else 0.0
        latency = np.asarray(self.latencies[last]) * 1000
        stages = {"read": read_seconds[last]} if read_seconds else {}
        stages.update({clock.name: clock.seconds[last] for clock in self.clocks})
        return {"frames": len(self.shown_at), "dropped": dropped, "fps": fps,
                "latency_ms": {"median": float(np.median(latency)) if len(latency) else 0.0,
                               "p90": float(np.percentile(latency, 90)) if len(latency) else 0.0},
                "stages_ms": {name: 1000 * statistics.median(seconds) for name, seconds in stages.items() if seconds},
                "message": None}


class StopOnCtrlC:
    """The first Ctrl-C calls `stop` (the run then finishes its frames and closes its files properly); a
    second one interrupts."""

    def __init__(self, stop: Callable[[], None]):
        self.stop, self.requested = stop, False
        self.previous = signal.signal(signal.SIGINT, self._request)

    def _request(self, *_):
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)
        self.stop()

    def restore(self):
        signal.signal(signal.SIGINT, self.previous)
