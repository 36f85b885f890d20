"""The live runs: an avatar driven by a video, a camera or a seq.npz (`drive`, sample.py --drive), and the
tracking alone (`track_live`, python -m tracking live), as stages of a pipeline (live/pipeline.py):

    read (live/sources.py: the newest frame, decoded on the reader's thread)
      -> track: 68 landmarks followed from the previous frame -> square face crop -> FLAME fit of that one
         frame, warm-started from the previous one (tracking/live.LiveTracker) -> its conditioning image
         (a seq.npz source: its frame's conditioning image, no tracking)
      -> sample: Avatar.stream, one frame out per frame in, `steps` ticks late (it ticks while it waits for
         a frame too), with the page's settings as each frame enters (live/steering.py)    [drive only]
      -> output: the mp4, written as it goes; the page (driving | avatar, or driving | the conditioning's
         normals over the face); the take's parameters (live/take.py)

Every run with an mp4 keeps its take, `<mp4 stem>.seq.npz` beside it, one row per frame in the mp4, also
when it is stopped by Ctrl-C or by an error in a stage. Without an avatar (`track_live`) there is no
identity shape and no camera to fit to: the mean shape (all zero) and the offline tracker's first guess
of the focal (tracking/fit.default_focal: about a 45-degree view across the crop) stand in, so the take's
expressions and poses are those of a generic head; `python -m tracking VIDEO` fits both for a video you
train on.
"""
import os
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from live.controls import Controls, LiveSettings
from live.pipeline import Pipeline, StopOnCtrlC
from live.sources import Frame, Source, open_source
from live.steering import Steering
from live.take import Take, take_path
from tracking.conditioning import render_conditioning
from tracking.fit import default_focal
from tracking.live import LiveTracker
from tracking.pipeline import DEFAULT_MAX_GAP, TrackingError
from tracking.sequence import FlameSequence, load_seq
from tracking.video import VideoError, VideoWriter

OVERLAY_OPACITY = 0.6  # of the conditioning's normals over the face, tracking only
# Source frames the tracking alone keeps for the loop (live/sources.NewestFrame): it records a performance, so
# it rides out a slow frame (a face search, a busy core) on a second one rather than drop it. Driving an
# avatar keeps one: the sampler usually sets the pace there, and a second frame would only add latency.
TRACKING_KEEP = 2


class LiveError(ValueError):
    """A stage of a live run failed on something other than its input (one line at the command; the frames
    made until then are kept)."""


@dataclass
class LiveRun:
    frames: int             # frames shown (and written)
    dropped: int            # source frames the loop could not keep up with
    seconds: float
    stopped: bool           # by Ctrl-C
    stats: dict             # the page's figures over the whole run (Pipeline.stats)
    take: str | None        # the take's seq.npz, when written


# ----------------------------------------------------------------------------- stages

def tracking_stage(tracker: LiveTracker, hint, source: Source, overlay: bool = False):
    """Track each frame (frames before the first face are skipped) and render its conditioning image;
    overlay: the picture is the conditioning's normals over the face crop (tracking only)."""
    def track(frames):
        for frame in frames:
            tracked = tracker(frame.index, frame.image)
            frame.image = None  # the source frame is big; the crop is what is shown
            if tracked is None:
                continue
            frame.crop, frame.params = tracked
            frame.box = tracker.box.round().astype(np.float32)
            frame.hint = hint(frame.params)
            if overlay:
                frame.picture = normals_over(frame.crop, frame.hint)
            yield frame
        if tracker.params is None:
            raise TrackingError(f"{source.name}: no face found in the {source.read} frames read")
    return track


def replay_stage(hint):
    """A seq.npz's frame: its conditioning image, whose normals are the driving picture."""
    def replay(frames):
        for frame in frames:
            frame.hint = hint(frame.params)
            frame.crop = normals_image(frame.hint)
            frame.box = None if frame.params.crop_boxes is None else frame.params.crop_boxes[0]
            yield frame
    return replay


def sampling_stage(avatar, settings, steering: Steering, negative_prompt: str = ""):
    """Avatar.stream over the frames' hints; each frame leaves with its avatar picture, in order. While no
    frame waits and frames are in flight, the stream ticks without a new one (a hint None): a frame leaves
    `steps` ticks after it came, not `steps` frames later (model/temporal.stream_latents)."""
    def sample(frames):
        entered = deque()  # in the stream, not yet out

        def hints():
            while True:
                if entered and not frames.ready():
                    with frames.idle():  # the ticks while no frame waits are not this stage's time per frame
                        yield None
                    continue
                frame = next(frames, None)
                if frame is None:
                    return
                entered.append(frame)
                yield frame.hint
        for picture in avatar.stream(hints(), settings, negative_prompt=negative_prompt, frame_settings=steering):
            frame = entered.popleft()
            frame.picture = picture
            yield frame
    return sample


def output_stage(out: str | None, source: Source, take: Take | None, page, side_by_side: bool):
    """Write each frame to the mp4 (opened with the first frame; closed, playable, however the run ends),
    add it to the take (saved then too) and publish driving | picture to the page (it encodes the JPEG)."""
    def output(frames):
        writer = None
        try:
            for frame in frames:
                both = np.concatenate([frame.crop, frame.picture], 1)
                if out is not None:
                    writer = writer or VideoWriter(out, source.fps, live=True)
                    writer.write(both if side_by_side else frame.picture)
                    take.add(frame.params, frame.box)
                if page is not None:
                    page.publish(both)
                yield frame
        finally:
            if writer is not None:
                writer.close()
            if take is not None:
                take.save()
    return output


def normals_image(hint) -> np.ndarray:
    """The conditioning's normals as a uint8 picture (what a seq.npz shows as its driving frame)."""
    return (hint[:3].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def normals_over(crop: np.ndarray, hint) -> np.ndarray:
    """The conditioning's normals over the face crop, where its foreground mask (last channel) is."""
    alpha = OVERLAY_OPACITY * hint[-1].numpy()[..., None]
    return (crop * (1 - alpha) + normals_image(hint) * alpha).round().astype(np.uint8)


# ----------------------------------------------------------------------------- the runs

def live_controls(settings, prompt: str | None = None, morph: str | None = None, morph_weight: float = 0.5) -> Controls:
    """The page's controls, starting from the command's flags."""
    return Controls(LiveSettings(prompt=prompt, morph=morph, morph_weight=morph_weight,
                                 temporal_strength=settings.temporal_strength,
                                 conditioning_scale=settings.conditioning_scale))


def drive(avatar, source: str, out: str, settings, controls: Controls | None = None, page=None,
          side_by_side: bool = False, negative_prompt: str = "", serial: bool = False, on_frame=None) -> LiveRun:
    """Drive `avatar` (svp.Avatar) from `source` into the mp4 `out` and its take (and onto `page`, closed
    when the run ends); see the module doc. controls: what the page changes (default: `settings`' values
    and the avatar's prompt). on_frame(frame, stats) after each frame shown (live/sources.Frame, the page's
    figures)."""
    feed = open_source(source)
    steering = Steering(avatar, controls or live_controls(settings))
    hint = lambda params: avatar.hints(params, range(1))[0]  # noqa: E731
    if feed.seq is not None:
        first = "replay", replay_stage(hint)
    else:
        tracker = LiveTracker(avatar.flame, load_seq(avatar.run_file("seq")), avatar.shape, avatar.resolution,
                              source)
        first = "track", tracking_stage(tracker, hint, feed)
    stages = [first, ("sample", sampling_stage(avatar, settings, steering, negative_prompt))]
    try:
        return run(feed, stages, out, page, side_by_side, serial, on_frame, lambda: steering.message)
    finally:
        steering.close()


def track_live(source: str, flame, size: int = 512, out: str | None = None, page=None,
               max_gap: int = DEFAULT_MAX_GAP, max_frames: int | None = None, serial: bool = False,
               on_frame=None) -> LiveRun:
    """The tracking alone, live: driving | the conditioning's normals over the face, into `out` (and its
    take) and onto `page`; the identity shape and focal are generic (module doc). max_frames: of a video file."""
    feed = open_source(source, seq_allowed=False, max_frames=max_frames, keep=TRACKING_KEEP)
    shape, focal = np.zeros(flame.n_shape, np.float32), default_focal((size, size))
    tracker = LiveTracker(flame, camera(focal, size), shape, size, source, max_gap)
    hint = lambda params: render_conditioning(flame, params, size, shape=shape)[0]  # noqa: E731
    return run(feed, [("track", tracking_stage(tracker, hint, feed, overlay=True))], out, page, True, serial,
               on_frame)


def camera(focal: float, size: int) -> FlameSequence:
    """A sequence of no frames that only says the camera: LiveTracker's `reference`."""
    empty = lambda width: np.zeros((0, width), np.float32)  # noqa: E731
    return FlameSequence(shape=np.zeros(0, np.float32), expression=empty(1), global_rot=empty(3), neck_rot=empty(3),
                         jaw_rot=empty(3), eye_rots=empty(6), translation=empty(3), focal=focal,
                         image_size=(size, size), fps=30.0)


def run(feed: Source, stages: list, out: str | None, page, side_by_side: bool, serial: bool, on_frame,
        message=lambda: None) -> LiveRun:
    """The pipeline of `stages` and the output stage on `feed`, until it ends, Ctrl-C or an error."""
    take = None
    if out is not None:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        take = Take(take_path(out), feed.fps)
    pipeline = Pipeline(feed.frames, stages + [("output", output_stage(out, feed, take, page, side_by_side))],
                        serial)
    read_seconds = feed.newest.read_seconds if feed.newest else None

    def shown(frame: Frame):
        stats = {**pipeline.stats(feed.dropped, read_seconds), "message": message()}
        if page is not None:
            page.publish_stats(stats)
        if on_frame is not None:
            on_frame(frame, stats)
    ctrl_c, start = StopOnCtrlC(pipeline.stop), time.monotonic()
    try:
        frames = pipeline.run(shown)
    except (ValueError, OSError):
        raise
    except Exception as error:  # noqa: BLE001  (a bug or the device: one line, the frames made are kept)
        first_line = (str(error).splitlines() or [""])[0]
        raise LiveError(f"the live run failed after {pipeline.shown} frames "
                        f"({type(error).__name__}: {first_line})") from error
    finally:
        ctrl_c.restore()
        feed.close()
        if page is not None:
            page.close()
    if frames == 0:
        raise VideoError(out or feed.name, f"no frames: {feed.name} gave none")
    return LiveRun(frames, feed.dropped, time.monotonic() - start, ctrl_c.requested,
                   pipeline.stats(feed.dropped, read_seconds, everything=True), take.path if take else None)
