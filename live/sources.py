"""Where a live run's frames come from: a video file played at its own frame rate, a camera, or a seq.npz.

A video or a camera is read by a thread that keeps only the newest frame, or the newest few (`NewestFrame`):
the loop takes the oldest of them whenever it is ready for another, and a frame pushed out by newer ones
before it was taken is dropped (and counted). Keeping two absorbs a slow frame (the loop catches up on
the one kept) at the price of one frame period of latency while the loop is behind. A seq.npz gives every
frame in order, with no clock and nothing dropped.
"""
import itertools
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from live.pipeline import Timings
from tracking.sequence import FlameSequence, load_seq
from tracking.video import VideoError, VideoNotFoundError, iter_frames, video_fps


@dataclass
class Frame:
    """One source frame on its way through the live loop; each stage fills in what it makes."""
    index: int                           # in the source
    read_at: float                       # time.monotonic() when the source delivered it (latency's start)
    image: np.ndarray | None = None      # the source frame (H, W, 3), let go once the face is cropped
    params: FlameSequence | None = None  # its FLAME parameters (one frame)
    box: np.ndarray | None = None        # the face crop's box in the source frame (x0, y0, x1, y1)
    crop: np.ndarray | None = None       # the driving image shown: the face crop (or a seq.npz frame's normals)
    hint: object = None                  # the conditioning image (C, S, S) torch tensor
    picture: np.ndarray | None = None    # what the run made of it: the avatar's frame, or the tracking overlay


class NewestFrame:
    """Frames of `frames` (an iterator) read by a thread; `get` returns the oldest of the newest `keep` frames
    not yet taken (keep=1: the newest).

    frame_rate: release frame k at k / frame_rate seconds after the first `get` (a video file played at
    its own speed); None: as fast as they come (a camera delivers in real time). A frame pushed out by newer
    ones before it was taken counts as `dropped`; `read_seconds`: the time each frame took to read (decode).
    """

    def __init__(self, frames, frame_rate: float | None, keep: int = 1):
        self.frames, self.frame_rate = frames, frame_rate
        self.dropped, self.read, self.read_seconds = 0, 0, Timings()
        self._kept, self._done, self._error, self._closed = deque(maxlen=keep), False, None, False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True, name="read")

    def _run(self):
        start, frames = time.monotonic(), iter(self.frames)
        try:
            for k in itertools.count():
                if self.frame_rate:
                    time.sleep(max(0.0, start + k / self.frame_rate - time.monotonic()))
                began = time.perf_counter()
                image = next(frames, None)
                if image is None or self._closed:
                    break
                self.read_seconds.add(time.perf_counter() - began)
                with self._changed:
                    self.dropped += len(self._kept) == self._kept.maxlen
                    self._kept.append(Frame(k, time.monotonic(), image))
                    self.read += 1
                    self._changed.notify()
        except Exception as error:  # noqa: BLE001  (handed to the reader)
            self._error = error
        finally:
            close = getattr(frames, "close", None)  # a generator's file or camera is closed now, on this thread
            if close is not None:
                close()
        with self._changed:
            self._done = True
            self._changed.notify()

    def get(self) -> Frame | None:
        """The next frame kept (waiting for one), or None once the source has ended."""
        if not self._thread.is_alive() and not self._done:
            self._thread.start()
        with self._changed:
            self._changed.wait_for(lambda: self._kept or self._done)
            if self._error is not None:
                raise self._error
            return self._kept.popleft() if self._kept else None

    def close(self):
        """Stop reading (the file or camera is closed after the frame being read)."""
        self._closed = True


def camera_frames(device: str):
    """Frames of a camera (/dev/video0) through PyAV's v4l2 input; one clear error when it cannot be read."""
    if not os.path.exists(device):
        raise VideoNotFoundError(device, "no such camera device")
    try:
        container = av.open(device, format="v4l2")
    except (av.FFmpegError, OSError) as error:
        raise VideoError(device, f"cannot read the camera ({error})") from error
    if not container.streams.video:
        container.close()
        raise VideoError(device, "the camera has no video stream")
    return _decode_camera(device, container), float(container.streams.video[0].average_rate or 30)


def _decode_camera(device: str, container):
    with container:
        try:
            for frame in container.decode(video=0):
                yield frame.to_ndarray(format="rgb24")
        except av.FFmpegError as error:
            raise VideoError(device, f"the camera stopped delivering frames ({error})") from error


@dataclass
class Source:
    """A live run's source, opened (and checked): `frames(stop)` yields Frames until it ends or stop() is true."""
    name: str
    fps: Fraction
    newest: NewestFrame | None = None   # a video or a camera
    seq: FlameSequence | None = None    # a seq.npz

    @property
    def dropped(self) -> int:
        return self.newest.dropped if self.newest else 0

    @property
    def read(self) -> int:
        return self.newest.read if self.newest else self.seq.n_frames

    def frames(self, stop):
        if self.seq is not None:
            for f in range(self.seq.n_frames):
                if stop():
                    return
                yield Frame(f, time.monotonic(), params=frame_of(self.seq, f))
            return
        while not stop() and (frame := self.newest.get()) is not None:
            yield frame

    def close(self):
        if self.newest is not None:
            self.newest.close()


def frame_of(seq: FlameSequence, f: int) -> FlameSequence:
    """Frame f of `seq` as a one-frame FlameSequence."""
    per_frame = {name: getattr(seq, name)[f:f + 1] for name in
                 ("expression", "global_rot", "neck_rot", "jaw_rot", "eye_rots", "translation")}
    boxes = None if seq.crop_boxes is None else seq.crop_boxes[f:f + 1]
    return FlameSequence(shape=seq.shape, focal=seq.focal, image_size=seq.image_size, fps=seq.fps,
                         crop_boxes=boxes, **per_frame)


def open_source(source: str, seq_allowed: bool = True, max_frames: int | None = None, keep: int = 1) -> Source:
    """A seq.npz, a camera (/dev/video*) or a video file (its first `max_frames`), opened now so that a bad one
    fails before any work; keep: the newest frames a camera or a video holds for the loop (NewestFrame)."""
    if source.endswith(".npz") and seq_allowed:
        seq = load_seq(source)
        return Source(source, Fraction(float(seq.fps)).limit_denominator(100_000), seq=seq)
    if source.startswith("/dev/"):
        frames, rate = camera_frames(source)
        return Source(source, Fraction(rate).limit_denominator(100_000), NewestFrame(frames, None, keep))
    fps = video_fps(source)  # raises VideoError / VideoNotFoundError naming the file
    # decoded on the reader's thread (no prefetch): its time is the read stage's, and it runs beside the loop
    return Source(source, fps, NewestFrame(iter_frames(source, max_frames, prefetch=0), float(fps), keep))
