"""Face search speed on the CPU: what a frame costs where the track is lost (FaceTracker.step without a
running track: the full-frame search, then the landmark fits of its candidates), one thread.

    python bench/detect.py [--repeats 15] [--baseline REV] [--command-frames 120]

Frames (generated from scikit-image's photos): a faceless 640x360 frame and a faceless 1920x1080 frame
(the rocket photo, resized), and 640x360 frames with the astronaut's face (about 120 px high) upright
and rolled 25° (beyond the upright search: a turned view finds it). A faceless frame is timed as a
video's first frame (the tracker's first search: every view), as the first frame of a later stretch
without a face (the upright search and the ±30° one, see FaceTracker) and as a later frame of it (the
upright search and one turn, ±15° and ±30° in turn), and live (FaceTracker(one_view=True), as LiveTracker
runs it: one view a frame; the row is the slowest frame of the views' cycle); a face as found on a video's
first frame. Each row is
the median CPU time of --repeats runs in this process (one thread: what the work costs on a quiet machine,
whatever else shares it); a followed frame (FaceTracker.step with a running track) is the row to compare
with.
--baseline REV also times FaceTracker as tracking/landmarks.py was at git revision REV (one before the
detector had its own module: it must be self-contained), interleaved with ours in this process, and
prints the ratio; on a loaded machine only the ratio is worth comparing.
--command-frames N also times the whole track command (`python -m tracking`, toy head, 256 px crops, one
core) on an N-frame 640x360 demo clip (tracking/demo.py) whose frames are 10% without a face, in two
stretches. The machine's load average is printed with the figures.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tracking.demo import iter_demo_frames  # noqa: E402
from tracking.landmarks import ONE_VIEW_CYCLE, FaceTracker  # noqa: E402
from tracking.video import write_video  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resized(image, shape):
    from skimage.transform import resize
    return (resize(image, shape, anti_aliasing=True) * 255).round().astype(np.uint8)


def face_frame(roll_degrees=0.0, shape=(360, 640)):
    """The astronaut's face (about 120 px) turned by roll_degrees, pasted on the rocket photo."""
    from skimage import data
    from skimage.transform import rotate
    frame = resized(data.rocket(), shape)
    face = data.astronaut()[20:240, 110:330]           # the head, 220 px
    face = rotate(face, -roll_degrees, preserve_range=True, mode="edge").astype(np.uint8)
    face = resized(face, (180, 180))
    top, left = (shape[0] - 180) // 2, (shape[1] - 180) // 3
    frame[top:top + 180, left:left + 180] = face
    return frame


def clip_with_faceless_stretches(path, n_frames):
    """The demo face drifting over a 640x360 frame, with two stretches of n_frames / 20 frames without it."""
    from skimage import data
    faceless = resized(data.rocket(), (360, 640))
    stretch = max(1, n_frames // 20)
    gaps = {t for start in (n_frames // 3, 2 * n_frames // 3) for t in range(start, start + stretch)}
    frames = iter_demo_frames(n_frames, size=200, frame_size=(360, 640))
    write_video(path, (faceless if t in gaps else frame for t, frame in enumerate(frames)), fps=24)
    return len(gaps)


def command_seconds(n_frames):
    """Seconds of the whole track command on clip_with_faceless_stretches, on one core."""
    with tempfile.TemporaryDirectory() as tmp:
        video = os.path.join(tmp, "clip.mp4")
        faceless = clip_with_faceless_stretches(video, n_frames)
        command = ["taskset", "-c", str(min(os.sched_getaffinity(0))), sys.executable, "-m", "tracking", video,
                   "--out", os.path.join(tmp, "out"), "--size", "256"]
        start = time.perf_counter()
        subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - start, faceless


def baseline_tracker(revision, predictor):
    """FaceTracker of tracking/landmarks.py at a git revision (a self-contained file), on our predictor."""
    import importlib.util
    source = subprocess.check_output(["git", "show", f"{revision}:tracking/landmarks.py"], cwd=ROOT)
    with tempfile.NamedTemporaryFile("wb", suffix=".py", delete=False) as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("baseline_landmarks", f.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    os.remove(f.name)
    return module.FaceTracker(predictor)


def about_to_search(searched, misses):
    """median_ms's `prepare`: the tracker has searched `searched` frames so far (0: this is a video's first
    search, every view) and the last misses(k) of them in a row found no face."""
    def prepare(tracker, k):
        tracker.searched, tracker.misses = searched, misses(k)
    return prepare


def median_ms(trackers, step, repeats, prepare=lambda tracker, k: None):
    """Median CPU ms of step(tracker) per tracker, the trackers taking turns run by run. CPU time, not
    wall time: on a shared machine it is what one thread's work costs, whoever else runs."""
    times = [[] for _ in trackers]
    for k in range(repeats):
        for tracker, tracker_times in zip(trackers, times):
            prepare(tracker, k)
            start = time.process_time()
            step(tracker)
            tracker_times.append(time.process_time() - start)
    return [1000 * float(np.median(t)) for t in times]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--baseline", help="git revision whose FaceTracker to time beside ours")
    parser.add_argument("--command-frames", type=int, default=0, help="frames of the whole-command clip (0: skip)")
    args = parser.parse_args()
    import torch
    torch.set_num_threads(1)
    from skimage import data
    tracker = FaceTracker()
    faceless = {"640x360": resized(data.rocket(), (360, 640)), "1920x1080": resized(data.rocket(), (1080, 1920))}
    faces = {"upright": face_frame(0.0), "rolled 25°": face_frame(25.0)}
    video_start, stretch_start = about_to_search(0, lambda k: 0), about_to_search(1, lambda k: 0)
    stretch = about_to_search(1, lambda k: 1 + k)  # later frames of a stretch: the turns in rotation
    for frame in faceless.values():
        assert tracker.step(frame)[2] is None
    for frame in faces.values():
        video_start(tracker, 0)
        assert tracker.step(frame)[2] is not None
    trackers = [tracker] + ([baseline_tracker(args.baseline, tracker.predictor)] if args.baseline else [])
    live = [FaceTracker(tracker.predictor, full_searches=0, one_view=True)] + trackers[1:]  # as LiveTracker
    rows = []
    for size, frame in faceless.items():
        rows.append((f"no face, {size}, a video's first frame (every search)",
                     median_ms(trackers, lambda t: t.step(frame), args.repeats, video_start)))
        rows.append((f"no face, {size}, first frame of a later stretch without one (upright + ±30°)",
                     median_ms(trackers, lambda t: t.step(frame), args.repeats, stretch_start)))
        rows.append((f"no face, {size}, a later frame without one (upright + one turn)",
                     median_ms(trackers, lambda t: t.step(frame), args.repeats, stretch)))
        rows.append((f"no face, {size}, live (one view a frame): the cycle's slowest frame",
                     [max(ms) for ms in zip(*(median_ms(live, lambda t: t.step(frame), args.repeats,
                                                        about_to_search(1, lambda k: misses))
                                              for misses in range(len(ONE_VIEW_CYCLE))))]))
    for name, frame in faces.items():
        rows.append((f"face {name} found, 640x360, a video's first frame",
                     median_ms(trackers, lambda t: t.step(frame), args.repeats, video_start)))
    state = tracker.step(faces["upright"])[2]
    rows.append(("followed face (for comparison), 640x360",
                 median_ms(trackers, lambda t: t.step(faces["upright"], state), args.repeats)))
    load = os.getloadavg()[0]
    baseline = f" | {args.baseline}, CPU ms | ratio" if args.baseline else ""
    print(f"| frame where the track is lost (FaceTracker.step) | CPU ms, median of {args.repeats}{baseline} | load |")
    print("|---|---|" + ("---|---|" if args.baseline else "") + "---|")
    for name, ms in rows:
        compared = f" | {ms[1]:.1f} | {ms[1] / ms[0]:.1f}x" if args.baseline else ""
        print(f"| {name} | {ms[0]:.1f}{compared} | {load:.1f} |")
    if args.command_frames:
        load = os.getloadavg()[0]
        seconds, faceless = command_seconds(args.command_frames)
        print(f"| whole track command, {args.command_frames}-frame 640x360 clip, {faceless} frames without a face "
              f"(two stretches), 1 core: wall seconds | {seconds:.1f} | {load:.1f} |")


if __name__ == "__main__":
    main()
