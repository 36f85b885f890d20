"""Live driving: an avatar driven by a video file, a camera or a seq.npz while the frames come in.

    source (a reader thread keeps the newest frame: the ones the pipeline cannot keep up with are dropped)
      -> 68 landmarks (FaceTracker, the box from the previous frame's landmarks) -> square face crop
      -> FLAME fit of that one frame, warm-started from the previous one, the avatar's identity and camera
      -> its conditioning image -> Avatar.stream (one frame out per frame in, `steps` frames late)
      -> the mp4, written as it goes, and the MJPEG page (driving crop | avatar, live/page.py)

A seq.npz drives every frame in order (no clock, nothing dropped): the frames are `Avatar.render`'s.
Ctrl-C stops taking frames; the frames in flight are finished and the mp4 is closed, playable.
"""
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from tracking.fit import FrameFit
from tracking.landmarks import FaceTracker
from live.page import LivePage
from tracking.people import PersonLock, maybe_someone_new
from tracking.pipeline import DEFAULT_MAX_GAP, TrackingError, to_crop_pixels
from tracking.sequence import FlameSequence, load_seq
from tracking.video import (VideoError, VideoNotFoundError, VideoWriter, crop_frames, iter_frames, smooth_crop_boxes,
                            video_fps)

CROP_SMOOTHING = 0.5  # weight of the new crop box against the previous one: less jitter, little lag


# ----------------------------------------------------------------------------- sources

class NewestFrame:
    """Frames of `frames` (an iterator) read by a thread; `get` returns the newest one not yet taken, as
    (its index in the source, the frame).

    frame_rate: release frame k at k / frame_rate seconds after the first `get` (a video file played at
    its own speed); None: as fast as they come (a camera delivers in real time). A frame replaced before
    it was taken counts as `dropped`.
    """

    def __init__(self, frames, frame_rate: float | None):
        self.frames, self.frame_rate = frames, frame_rate
        self.dropped, self.read = 0, 0
        self._newest, self._done, self._error = None, False, None
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        start = time.monotonic()
        try:
            for k, frame in enumerate(self.frames):
                if self.frame_rate:
                    time.sleep(max(0.0, start + k / self.frame_rate - time.monotonic()))
                with self._changed:
                    self.dropped += self._newest is not None
                    self._newest, self.read = (k, frame), self.read + 1
                    self._changed.notify()
        except Exception as error:  # noqa: BLE001  (handed to the reader)
            self._error = error
        with self._changed:
            self._done = True
            self._changed.notify()

    def get(self):
        """(index, frame) of the newest frame (waiting for one), or None once the source has ended."""
        if not self._thread.is_alive() and not self._done:
            self._thread.start()
        with self._changed:
            self._changed.wait_for(lambda: self._newest is not None or self._done)
            if self._error is not None:
                raise self._error
            frame, self._newest = self._newest, None
            return frame


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


# ----------------------------------------------------------------------------- tracking, one frame at a time

class LiveTracker:
    """One video frame -> (its face crop, its FLAME parameters as a one-frame FlameSequence).

    The FLAME fit (tracking.fit.FrameFit, built once) keeps the avatar's identity shape and camera
    (`reference`: the seq.npz it was trained on, whose crops were `size` pixels) and starts from the
    previous frame's parameters. A frame without a face, or with only someone else's (the tracker follows
    the first person it sees), keeps the previous parameters (before the first face: it is skipped, None);
    more than `max_gap` frames in a row without one is an error.
    """

    def __init__(self, flame, reference: FlameSequence, shape: np.ndarray, size: int, source: str,
                 max_gap: int = DEFAULT_MAX_GAP):
        self.size, self.source, self.max_gap = size, source, max_gap
        self.fit = FrameFit(flame, shape, reference.focal * size / reference.image_size[1], (size, size))
        self.faces = FaceTracker(full_searches=0)  # a lost face costs a frame an upright and one turned search
        self.state = None     # FaceTracker's TrackState of the previous frame while the track holds
        self.box = None       # the previous crop box (float, smoothed)
        self.params = None    # the previous frame's fit
        self.faceless = []  # source indices of the frames without a face since the last face
        self.person = PersonLock()  # whom the tracker follows: the first face it sees

    def landmarks(self, frame: np.ndarray):
        """(68, 2) landmarks of the face in `frame`, followed from the previous frame, or None (no face, or
        not the person the tracker started with: tracking/people.py's PersonLock)."""
        if self.person.new_shot(frame):
            self.state = None  # a cut: the face is searched for afresh, and checked
        previous = self.state
        result, lost, self.state = self.faces.step(frame, previous)
        if result is None:
            return None
        if not self.person.accepts(frame, result[0],
                                   maybe_someone_new(previous, self.state, lost, self.faces.min_similarity)):
            self.state = None  # someone else: not followed, searched for again on the next frame
            return None
        return result[0]

    def crop(self, frame: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the face crop (size, size, 3), the landmarks in its pixels): the crop box around the landmarks,
        smoothed with the previous frames' boxes."""
        face_box = np.concatenate([landmarks.min(0), landmarks.max(0)])[None]
        box = smooth_crop_boxes(face_box, frame.shape[:2], sigma=0)[0].astype(np.float64)
        self.box = box if self.box is None else CROP_SMOOTHING * box + (1 - CROP_SMOOTHING) * self.box
        box = self.box.round().astype(np.int64)
        return crop_frames(frame[None], box[None], self.size)[0], to_crop_pixels(landmarks[None], box[None], self.size)[0]

    def __call__(self, index: int, frame: np.ndarray) -> tuple[np.ndarray, FlameSequence] | None:
        landmarks = self.landmarks(frame)
        if landmarks is None:
            self.faceless.append(index)
            if len(self.faceless) > self.max_gap:
                raise TrackingError(f"{self.source}: no face on frames {self.faceless[0]}-{index} (more than "
                                    f"{self.max_gap} frames in a row)")
            if self.params is None:
                return None
            return crop_frames(frame[None], self.box.round().astype(np.int64)[None], self.size)[0], self.params
        self.faceless = []
        crop, points = self.crop(frame, landmarks)
        self.params = self.fit(points, self.params)
        return crop, self.params


# ----------------------------------------------------------------------------- the feed

@dataclass
class Feed:
    """What drives the avatar: (driving image, hint image) per frame, the frame rate, and what was dropped."""
    frames: object          # iterator of (uint8 (S, S, 3), hint (C, S, S))
    fps: Fraction
    newest: NewestFrame | None = None

    @property
    def dropped(self) -> int:
        return self.newest.dropped if self.newest else 0

    @property
    def read(self) -> int | None:
        return self.newest.read if self.newest else None


def normals_image(hint) -> np.ndarray:
    """The conditioning's normals as a uint8 picture (what a seq.npz shows as its driving frame)."""
    return (hint[:3].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def open_feed(source: str, avatar) -> Feed:
    """A seq.npz, a camera (/dev/video*) or a video file, opened (and checked) now, tracked as it is read."""
    if source.endswith(".npz"):
        seq = load_seq(source)

        def from_seq():
            for f in range(seq.n_frames):
                hint = avatar.hints(seq, range(f, f + 1))[0]
                yield normals_image(hint), hint
        return Feed(from_seq(), Fraction(seq.fps).limit_denominator(100_000))
    if source.startswith("/dev/"):
        frames, rate = camera_frames(source)
        newest, fps = NewestFrame(frames, None), Fraction(rate).limit_denominator(100_000)
    else:
        fps = video_fps(source)
        newest = NewestFrame(iter_frames(source), float(fps))
    track = LiveTracker(avatar.flame, load_seq(avatar.run_file("seq")), avatar.shape, avatar.resolution, source)

    def from_video():
        while (taken := newest.get()) is not None:
            if (tracked := track(*taken)) is not None:
                crop, params = tracked
                yield crop, avatar.hints(params, range(1))[0]
        if track.params is None:
            raise TrackingError(f"{source}: no face found in the {newest.read} frames read")
    return Feed(from_video(), fps, newest)


# ----------------------------------------------------------------------------- outputs

class StopOnCtrlC:
    """The first Ctrl-C asks the run to stop (its mp4 is then finished properly); a second one interrupts."""

    def __init__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGINT, self._request)

    def _request(self, *_):
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)

    def restore(self):
        signal.signal(signal.SIGINT, self.previous)


# ----------------------------------------------------------------------------- the run

@dataclass
class LiveRun:
    frames: int             # avatar frames written
    dropped: int            # source frames the pipeline could not keep up with
    seconds: float
    stopped: bool           # by Ctrl-C


def drive(avatar, source: str, out: str, settings, server: LivePage | None = None, prompt: str | None = None,
          side_by_side: bool = False, on_frame=None) -> LiveRun:
    """Drive `avatar` (svp.Avatar) from `source` into the mp4 `out` (and onto the page `server`, closed when
    the run ends), see the module doc.

    A source that fails midway (no face for too long, a broken stream) raises after the frames made so
    far are written; with no frame made, nothing is written. on_frame(index, seconds) after each frame.
    """
    feed = open_feed(source, avatar)
    stop, shown, error, start = StopOnCtrlC(), deque(), None, time.monotonic()

    def hints():
        for driving, hint in feed.frames:
            shown.append(driving)
            yield hint
            if stop.requested:
                return
    try:
        with VideoWriter(out, feed.fps) as writer:
            try:
                for frame in avatar.stream(hints(), settings, prompt):
                    both = np.concatenate([shown.popleft(), frame], 1)
                    writer.write(both if side_by_side else frame)
                    if server is not None:
                        server.publish(both)
                    if on_frame is not None:
                        on_frame(writer.count - 1, time.monotonic() - start)
            except (ValueError, FileNotFoundError) as e:  # every svp input error; the frames so far are kept
                error = e
            if writer.count == 0:
                raise error or VideoError(out, f"no frames: {source} gave none")
    finally:
        stop.restore()
        if server is not None:
            server.close()
    if error is not None:
        raise error
    return LiveRun(writer.count, feed.dropped, time.monotonic() - start, stop.requested)

