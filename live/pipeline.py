"""The live loop as a pipeline: stages in threads of their own, joined by bounded queues.

    source -> stage -> queue -> stage -> queue -> ... -> last stage (the outputs) -> shown

A stage is a generator function, items in -> items out, in order (a stage may hold items back, as the
sampler's wavefront holds `steps` frames, and yields them once its input ends). Each stage runs in its own
thread; the queues between them hold QUEUE_SIZE items, so a stage that gets ahead waits, and that wait
reaches the source, which keeps only the newest frame or two (live/sources.py): the frames nobody took in time
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
import math
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, contextmanager

import numpy as np

QUEUE_SIZE = 1   # items waiting between two stages: more would only add latency
WINDOW = 120     # the live figures are those of the last WINDOW frames shown
_END = object()  # end of a stage's output
# The whole run's figures count every frame's seconds in bins this far apart (a ratio), from SHORTEST to
# LONGEST: its quantiles within half a bin (0.5%), in the same 15 KB a figure after a minute or a day.
BIN_RATIO, SHORTEST, LONGEST = 1.01, 1e-5, 1e3
BINS = math.ceil(math.log(LONGEST / SHORTEST, BIN_RATIO))


class Timings:
    """Seconds, one per frame (a stage's time, a latency), in bounded memory however long the run: the last
    WINDOW of them exactly (the page's figures), and all of them as counts in log-spaced bins (the whole
    run's quantiles; exact while the run is no longer than the window). Added on one thread, read on another."""

    def __init__(self):
        self.recent, self.count, self.bins = deque(maxlen=WINDOW), 0, np.zeros(BINS, np.int64)
        self.lock = threading.Lock()

    def add(self, seconds: float):
        k = min(BINS - 1, max(0, int(math.log(max(seconds, SHORTEST) / SHORTEST, BIN_RATIO))))
        with self.lock:
            self.recent.append(seconds)
            self.count += 1
            self.bins[k] += 1

    def __len__(self) -> int:
        return self.count

    def quantile(self, q: float, everything: bool = False) -> float:
        """The q-quantile (numpy's linear interpolation between the ranks) of the last WINDOW seconds, or of all
        of them; NaN before the first."""
        with self.lock:
            count, recent = self.count, list(self.recent)
            bins = self.bins.copy() if everything and count > len(recent) else None
        if bins is None:
            return float(np.quantile(recent, q)) if recent else math.nan
        rank = q * (count - 1)  # between the sorted values number floor(rank) and ceil(rank) (from 0)
        below, above = np.searchsorted(np.cumsum(bins), [math.floor(rank) + 1, math.ceil(rank) + 1])
        centre = lambda k: SHORTEST * BIN_RATIO ** (k + 0.5)  # noqa: E731  (geometric: half a bin either side)
        return centre(below) + (rank - math.floor(rank)) * (centre(above) - centre(below))


class StageClock:
    """A stage's own time per item it yields: the time spent in its generator minus the time it waited
    for its input (in a queue, or in the stages before it when they run serially)."""

    def __init__(self, name: str):
        self.name, self.seconds, self._waiting = name, Timings(), 0.0

    def inputs(self, items: Iterable, ready: Callable[[], bool] = lambda: True) -> "StageInputs":
        return StageInputs(self, iter(items), ready)

    def outputs(self, generator: Iterator, errors: list) -> Iterator:
        """The stage's items, timed; an exception in the stage is appended to `errors` and ends the output."""
        try:
            while True:
                began, self._waiting = time.perf_counter(), 0.0
                item = next(generator, _END)
                if item is _END:
                    return
                self.seconds.add(time.perf_counter() - began - self._waiting)
                yield item
        except Exception as error:  # noqa: BLE001  (the run raises it once the stages after this one are done)
            errors.append(error)
        finally:
            generator.close()  # its `finally` (an output file, a writer) runs now, on this thread


class StageInputs:
    """A stage's input items, their waits timed for its clock. `ready()`: whether the next item is there
    (always, serially: the stages before run on demand), so a stage with work it may do while it waits (the
    sampler advances the frames it holds) does it only then; that work, in `with inputs.idle():`, counts as
    waiting, not as the stage's time per item."""

    def __init__(self, clock: StageClock, items: Iterator, ready: Callable[[], bool]):
        self.clock, self.items, self.ready = clock, items, ready

    def __iter__(self):
        return self

    def __next__(self):
        with self.idle():
            return next(self.items)

    @contextmanager
    def idle(self):
        began = time.perf_counter()
        try:
            yield
        finally:
            self.clock._waiting += time.perf_counter() - began


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

    def ready(self) -> bool:
        """Whether an item (or the end) waits."""
        return not self.queue.empty()

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
        self.shown, self.first_shown = 0, None
        self.shown_at, self.latencies = deque(maxlen=WINDOW), Timings()  # the last WINDOW frames' times

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
            self.shown, self.first_shown = self.shown + 1, self.first_shown or now
            self.shown_at.append(now)
            self.latencies.add(now - frame.read_at)
            if on_shown is not None:
                on_shown(frame)
        self.stop()
        if self.errors:
            raise self.errors[0]
        return self.shown

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
        inputs = clock.inputs(self.source(self.stopping.is_set)) if before is None else \
            clock.inputs(before.items(), before.ready)
        with closing(clock.outputs(stage(inputs), self.errors)) as outputs:
            for item in outputs:
                if not out.put(item):
                    break  # the stages after this one are gone
        if before is None:
            self.stop()
        else:
            before.abandon()  # the stage before stops instead of waiting for room
        out.put(_END)

    def stats(self, dropped: int, read: Timings | None, everything: bool = False) -> dict:
        """The figures the page shows: frames shown, dropped, frames/s, latency (frame read -> frame shown)
        and each stage's median ms (read: the source's) and its p90 (the spikes that drop frames), over the
        last WINDOW frames (everything: over the whole run)."""
        if everything:
            frames, seconds = self.shown - 1, self.shown_at[-1] - self.first_shown if self.shown else 0.0
        else:
            frames, seconds = len(self.shown_at) - 1, self.shown_at[-1] - self.shown_at[0] if self.shown_at else 0.0
        stages = {"read": read} if read is not None else {}
        stages.update({clock.name: clock.seconds for clock in self.clocks})
        latency = lambda q: 1000 * self.latencies.quantile(q, everything) if len(self.latencies) else 0.0  # noqa: E731
        return {"frames": self.shown, "dropped": dropped, "fps": frames / seconds if seconds > 0 else 0.0,
                "latency_ms": {"median": latency(0.5), "p90": latency(0.9)},
                "stages_ms": {name: 1000 * timings.quantile(0.5, everything) for name, timings in stages.items()
                              if len(timings)},
                "stages_p90_ms": {name: 1000 * timings.quantile(0.9, everything) for name, timings in stages.items()
                                  if len(timings)},
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
