"""Video in and out (PyAV / ffmpeg) and the face crop that training and sampling work on.

Frames are RGB uint8 numpy arrays, (H, W, 3) each or (T, H, W, 3) stacked. Frame rates are exact
Fractions (30000/1001 stays 30000/1001); any number is accepted where a rate goes in.
Boxes are (x0, y0, x1, y1) in pixels, x to the right and y down, x1 and y1 exclusive.
"""
import contextlib
import os
import queue
import threading
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter1d

from model.files import atomic_write


class VideoError(ValueError):
    """A video file that cannot be read or written; the message starts with the file's path."""

    def __init__(self, path, problem):
        super().__init__(f"{os.fspath(path)}: {problem}")
        self.path = path


class VideoNotFoundError(VideoError, FileNotFoundError):
    """The video file does not exist."""


def _open_video_stream(path):
    if not os.path.isfile(path):
        raise VideoNotFoundError(path, "is not a file" if os.path.exists(path) else "no such file")
    try:
        container = av.open(os.fspath(path))
    except av.FFmpegError as error:
        raise VideoError(path, f"not a readable video file ({error})") from error
    if not container.streams.video:
        container.close()
        raise VideoError(path, "contains no video stream")
    return container, container.streams.video[0]


@dataclass(frozen=True)
class VideoInfo:
    """What the container says of a video's first video stream, from one look at it (`probe_video`)."""

    fps: Fraction
    frames: int | None  # as the container declares them (None if it does not)
    height: int
    width: int


def probe_video(path):
    """The VideoInfo of a video file, opening it once; a missing or unreadable file raises VideoError."""
    container, stream = _open_video_stream(path)
    with container:
        return VideoInfo(_stream_fps(path, stream), stream.frames or None, stream.codec_context.height,
                         stream.codec_context.width)


def video_fps(path):
    """The frame rate of the first video stream, as a Fraction."""
    return probe_video(path).fps


def _stream_fps(path, stream):
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate:
        raise VideoError(path, "the video stream has no frame rate")
    return Fraction(rate)


def iter_frames(path, max_frames=None, start=0, prefetch=4):
    """Decode the first video stream frame by frame: an iterator of RGB uint8 arrays (H, W, 3).

    For long videos: memory stays at a few frames. Frames before `start` are decoded (a stream is
    read in order) but not converted or returned; the first frame returned is frame `start`.
    prefetch > 0: a background thread decodes up to that many frames ahead (the decoder releases
    the GIL, so decoding overlaps the caller's work); 0 decodes in the caller's thread. The file is
    opened (and checked) right away; a stream without a single decodable frame raises VideoError
    when iterated.
    """
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, got {max_frames}")
    container, stream = _open_video_stream(path)
    stream.thread_type = "AUTO"  # frame-level decoder threads as well as slice threads
    frames = _decode(path, container, stream, max_frames, start)
    return _prefetched(frames, prefetch) if prefetch > 0 else frames


def _decode(path, container, stream, max_frames, start):
    count = 0
    with container:
        try:
            for frame in container.decode(stream):
                if count >= start:
                    yield frame.to_ndarray(format="rgb24")
                count += 1
                if count == max_frames:
                    break
        except av.FFmpegError as error:
            raise VideoError(path, f"decoding failed after {count} frames ({error})") from error
    if count == 0:
        raise VideoError(path, "the video stream has no decodable frames")


_END = object()


def _prefetched(items, depth):
    """Iterate `items` in a background thread, at most `depth` items ahead; its exceptions are
    raised here. Closing the returned generator early stops the thread."""
    ready = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(entry):
        """Queue an entry unless the consumer has stopped; False once it has."""
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        try:
            for item in items:
                if not offer((item, None)):
                    return
            offer((_END, None))
        except BaseException as error:  # noqa: BLE001 -- handed to the consuming thread
            offer((_END, error))
        finally:
            items.close()

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item, error = ready.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        thread.join()


def read_video(path, max_frames=None):
    """Decode a whole video: (frames (T, H, W, 3) uint8 RGB, fps Fraction)."""
    fps = video_fps(path)
    return np.stack(list(iter_frames(path, max_frames))), fps


def _even_frame(path, frame, size):
    """Check one frame and pad it to even width and height (repeating the last row / column):
    H.264 in yuv420p stores colour at half resolution and needs even sizes."""
    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise VideoError(path, f"frames must be uint8 (H, W, 3) RGB arrays, got {frame.dtype} {frame.shape}")
    if size is not None and frame.shape[:2] != size:
        raise VideoError(path, f"frame size changed from {size} to {frame.shape[:2]}")
    pad = ((0, frame.shape[0] % 2), (0, frame.shape[1] % 2), (0, 0))
    return np.pad(frame, pad, mode="edge") if any(p[1] for p in pad) else frame


LIVE_X264 = {"preset": "superfast", "tune": "zerolatency"}


class VideoWriter:
    """Encode RGB uint8 frames (H, W, 3) one at a time as an H.264 mp4:

        with VideoWriter("out.mp4", fps) as video:
            for frame in frames:
                video.write(frame)

    fps: a Fraction or number (29.97 is kept as 2997/100). Odd widths or heights are padded by
    repeating the last column / row. The file is written under a temp name beside `path` and
    renamed by close(), which flushes the encoder and leaves a complete, playable file; an error
    inside the `with` block (or abort()) removes it, so a partial video is never left behind.
    crf: x264 quality (0 lossless, 18 visually lossless, 23 default). preset: x264's speed preset (None:
    its default, medium).
    live: x264's superfast preset, tuned for zero latency: less than half the encode time of its default
    (measured 6 against 15 ms for a 512x1024 frame) and no frames held back for look-ahead, for files
    about 4x larger; what a live run, where the encoder shares the CPU with the tracking, wants.
    """

    def __init__(self, path, fps, crf=18, live=False, preset=None):
        self.path = os.fspath(path)
        self.rate = Fraction(fps).limit_denominator(100_000)
        if self.rate <= 0:
            raise VideoError(self.path, f"frame rate must be positive, got {fps}")
        if not os.path.isdir(os.path.dirname(os.path.abspath(self.path))):
            raise VideoNotFoundError(self.path, "the output folder does not exist")
        self._atomic = atomic_write(self.path)
        temp = self._atomic.__enter__()
        self.container = av.open(temp, mode="w", format="mp4")
        options = {"crf": str(crf), **({"preset": preset} if preset else {}), **(LIVE_X264 if live else {})}
        self.stream = self.container.add_stream("libx264", rate=self.rate, options=options)
        self.stream.pix_fmt = "yuv420p"
        self.count, self.size = 0, None

    def write(self, frame):
        self.size = self.size or np.shape(frame)[:2]
        frame = _even_frame(self.path, frame, self.size)
        if self.count == 0:
            self.stream.height, self.stream.width = frame.shape[:2]
        video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
        video_frame.pts = self.count
        video_frame.time_base = 1 / self.rate
        self.container.mux(self.stream.encode(video_frame))
        self.count += 1

    def close(self):
        """Finish the file: flush the encoder's delayed frames, close it and rename it into place."""
        if self.count == 0:
            self.abort()
            raise VideoError(self.path, "no frames to write")
        try:
            self.container.mux(self.stream.encode())
            self.container.close()
        except BaseException:
            self.abort()
            raise
        self._atomic.__exit__(None, None, None)

    def abort(self):
        """Discard the file being written."""
        with contextlib.suppress(av.FFmpegError):  # a stream that never got a frame cannot finish
            self.container.close()
        self._atomic.__exit__(VideoError, VideoError(self.path, "writing aborted"), None)  # removes it

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if kind is None:
            self.close()
        else:
            self.abort()


def write_video(path, frames, fps, crf=18):
    """Encode RGB uint8 frames (an array (T, H, W, 3) or any iterable of (H, W, 3)) as H.264 mp4,
    atomically (see VideoWriter)."""
    with VideoWriter(path, fps, crf) as video:
        for frame in frames:
            video.write(frame)


def smooth_crop_boxes(face_boxes, image_size, margin=1.8, sigma=2.0):
    """Square, temporally smooth crop boxes (T, 4) int64 around per-frame face boxes (T, 4).

    The side is margin x the longer side of the face box. Centres and sides are smoothed over time
    with a Gaussian of `sigma` frames (zero-phase: no lag; 0 disables), frames without a face (a
    row of NaN) are interpolated from their neighbours. A box larger than the image shrinks to the
    image's shorter side, and boxes are shifted to lie inside the image, so every crop sees only
    real pixels. image_size: (H, W).
    """
    boxes = np.asarray(face_boxes, dtype=np.float64).reshape(-1, 4)
    height, width = image_size
    found = ~np.isnan(boxes).any(1)
    if not found.any():
        raise ValueError("smooth_crop_boxes: no frame has a face box")
    frame = np.arange(len(boxes))
    boxes = np.stack([np.interp(frame, frame[found], boxes[found, i]) for i in range(4)], 1)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    side = (boxes[:, 2:] - boxes[:, :2]).max(1) * margin
    if sigma > 0:
        centre = gaussian_filter1d(centre, sigma, axis=0, mode="nearest")
        side = gaussian_filter1d(side, sigma, mode="nearest")
    side = np.clip(np.rint(side), 1, min(height, width)).astype(np.int64)
    x0 = np.clip(np.rint(centre[:, 0] - side / 2).astype(np.int64), 0, width - side)
    y0 = np.clip(np.rint(centre[:, 1] - side / 2).astype(np.int64), 0, height - side)
    return np.stack([x0, y0, x0 + side, y0 + side], 1)


def _resize(image, height, width):
    """Resize an (h, w, 3) uint8 image with antialiased bilinear filtering (area-like downscaling).

    PyTorch's fixed-point kernel for uint8 channels-last images (torchvision's resize): about 10x faster
    than the same filter on a float copy (0.7 against 7 ms for a face crop of a 1080p frame to 512 px),
    which it matches within one level (its weights are rounded to 1/2^k, the float path rounds once).
    """
    if image.shape[:2] == (height, width):
        return image.copy()
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]  # a channels-last view
    x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return x[0].permute(1, 2, 0).numpy()  # an (H, W, 3) view of the planar result


def _check_box(box, height, width):
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"crop box {(x0, y0, x1, y1)} is not inside the {width}x{height} frame")
    return x0, y0, x1, y1


def crop_frames(frames, boxes, size=512):
    """Cut boxes (T, 4) out of frames (T, H, W, 3) and resize them to (T, size, size, 3) uint8."""
    crops = []
    for frame, box in zip(frames, np.asarray(boxes).reshape(-1, 4), strict=True):
        x0, y0, x1, y1 = _check_box(box, *frame.shape[:2])
        crops.append(_resize(frame[y0:y1, x0:x1], size, size))
    return np.stack(crops)


def paste_back(frame, crop, box, feather=0):
    """Paste a crop (any size, uint8) back into box of a copy of frame (H, W, 3) uint8.

    feather > 0 blends the outer `feather` pixels of the box linearly into the frame, hiding seams.
    """
    x0, y0, x1, y1 = _check_box(box, *frame.shape[:2])
    patch = _resize(crop, y1 - y0, x1 - x0).astype(np.float32)
    out = frame.copy()
    region = out[y0:y1, x0:x1].astype(np.float32)
    if feather > 0:
        ramp_y = np.minimum(np.arange(y1 - y0), np.arange(y1 - y0)[::-1]) + 0.5
        ramp_x = np.minimum(np.arange(x1 - x0), np.arange(x1 - x0)[::-1]) + 0.5
        alpha = np.clip(np.minimum(ramp_y[:, None], ramp_x[None, :]) / feather, 0, 1)[..., None]
        patch = alpha * patch + (1 - alpha) * region
    out[y0:y1, x0:x1] = np.rint(patch).astype(np.uint8)
    return out
