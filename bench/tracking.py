"""Tracking speed on the CPU: frames/s of FLAME fitting alone, and of the whole track command.

    python bench/tracking.py [--frames 300] [--threads 2] [--video-frames 48] [--skip-command]
                             [--hd-frames 600 3000] [--clip VIDEO ...] [--skip-fit] [--live-fit-frames 100]
                             [--stages 150]

Fitting runs on synthetic sequences (`synthetic_sequence`, also the tests' ground truth) of two models:
- the toy head (1973 vertices; its contour table repeats one row);
- a FLAME-sized model: the toy head padded to FLAME's exact layout (5023 vertices, 9976 faces,
  300 + 100 components) with a dynamic contour table whose rows move the jaw-line points across
  the cheek with the head's yaw (0.5 mm per degree), like a silhouette table: the fit's cost grows
  with the vertices such a table spans.
The live one-frame fit (`FrameFit`, what LiveTracker runs per frame) and its reference `fit_frame` are
timed frame by frame on the same synthetic sequences (0.5 px landmark noise), one after the other, each
warm-started from its own previous fit: median and p90 per frame on one thread; the first frame (no previous fit: the
Procrustes start and a rigid stage) and the time to build FrameFit apart. `--skip-fit --skip-command
--hd-frames` (nothing after it) times these rows alone.
The first row is the toy head's first fit in the process (cold: library and allocator start-up),
what a single track command pays; the rows after it are warm. The fit pins its own thread count
(FitConfig.threads, 1 by default); --fit-threads overrides it.
The whole command (`python -m tracking`: start-up, decode, landmarks, crops, fit, preview) runs in a
subprocess limited to --threads cores (taskset), with the toy head: on the offline demo video, and on
generated 1080p clips (the demo face drifting over a 1920x1080 frame, `--hd-frames`, by default 600
and 3,000 frames; `--clip` adds videos of your own), whose rows also give the command's peak resident
memory (ru_maxrss): it must not grow with the video's length. Each command row gives its wall and CPU
seconds (user + system, every thread) and the load average before and after it.
The live tracking side per frame (`--stages N`, first): a generated 1080p clip through `LiveTracker` on one
thread, its stages timed apart (median, p90, CPU time of this thread; the first 10 frames left out):
the 68 landmarks followed from the previous frame (`FaceTracker.step`), the 512 px crop
(`LiveTracker.crop`), the one-frame fit (the rest of the `LiveTracker` call), and the hint that
`Avatar.hints` renders from it (`render_conditioning` with a fixed identity).
"""
import argparse
import os
import pickle
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tracking.demo import write_demo_video  # noqa: E402
from tracking.fit import FitConfig, FrameFit, fit_frame, fit_sequence  # noqa: E402
from tracking.flame import CONTOUR_LUT_ROWS, N_CONTOUR  # noqa: E402
from tracking.conditioning import render_conditioning  # noqa: E402
from tracking.live import LiveTracker  # noqa: E402
from tracking.pipeline import load_flame  # noqa: E402
from tracking.render import opengl_to_opencv, project  # noqa: E402
from tracking.sequence import FlameSequence  # noqa: E402
from tracking.toyhead import build_toy_flame  # noqa: E402
from tracking.video import iter_frames, probe_video  # noqa: E402

FLAME_VERTICES, FLAME_FACES = 5023, 9976
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def seq_landmarks_2d(flame, seq):
    """Pixel landmarks (T,68,2) of a FlameSequence, as its camera sees them."""
    with torch.no_grad():
        _, lmk3d = flame(**seq.torch_params(), landmarks_only=True)
        return project(opengl_to_opencv(lmk3d), seq.focal, seq.image_size).numpy()


def _smooth_trajectory(rng, n_frames, n_dims, amplitude, fps, n_waves=3):
    """Sum of a few random slow sinusoids (0.2-0.8 Hz, like head motion) per dimension: (T, n_dims)."""
    t = np.arange(n_frames)[:, None, None] / fps
    freq = rng.uniform(0.2, 0.8, size=(n_waves, n_dims))
    phase = rng.uniform(0, 2 * np.pi, size=(n_waves, n_dims))
    waves = np.sin(2 * np.pi * freq * t + phase).sum(1) / np.sqrt(n_waves)
    return waves * np.asarray(amplitude)


def synthetic_sequence(flame, n_frames, image_size=(512, 512), focal=700.0, fps=25.0, seed=0):
    """A random smooth FlameSequence (known ground truth) for tests and benchmarks."""
    rng = np.random.default_rng(seed)
    exp_std = 1.0 / (1 + np.arange(flame.n_exp) / 5)
    wave = lambda n_dims, amplitude: _smooth_trajectory(rng, n_frames, n_dims, amplitude, fps)
    jaw = wave(3, [0.1, 0.01, 0.01])
    jaw[:, 0] = np.abs(jaw[:, 0]) + 0.02                                     # open, never through the skull
    translation = wave(3, [0.02, 0.02, 0.03]) + [0, 0, -0.6]
    f32 = lambda a: np.asarray(a, np.float32)
    return FlameSequence(
        shape=f32(rng.normal(size=flame.n_shape) * 0.8 / (1 + np.arange(flame.n_shape) / 10)),
        expression=f32(wave(flame.n_exp, 0.8 * exp_std)),
        global_rot=f32(wave(3, [0.15, 0.4, 0.08])),
        neck_rot=f32(wave(3, [0.05, 0.05, 0.02])),
        jaw_rot=f32(jaw), eye_rots=np.zeros((n_frames, 6), np.float32), translation=f32(translation),
        focal=focal, image_size=tuple(image_size), fps=fps)


def measure_fit_speed(flame, n_frames=300, threads=1, config=None, seed=0):
    """Fit a synthetic n_frames sequence with `threads` intra-op threads; returns {'fps', 'seconds',
    'cpu_seconds', 'frames'} (fit only; CPU time of this process, which on a busy machine says
    more than the wall clock)."""
    truth = synthetic_sequence(flame, n_frames, seed=seed)
    observed = seq_landmarks_2d(flame, truth)
    start, start_cpu = time.perf_counter(), time.process_time()
    fit_sequence(flame, observed, truth.image_size, truth.fps, config=replace(config or FitConfig(), threads=threads))
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    return {"fps": n_frames / seconds, "seconds": seconds, "cpu_seconds": cpu_seconds, "frames": n_frames}


def _pad_rows(a, n):
    """a with its first len(a) rows repeated until it has n rows (a copy of part of the mesh)."""
    return np.concatenate([a, a[np.arange(n - len(a)) % len(a)]])


def write_flame_sized_model(directory):
    """generic_model.pkl + landmark_embedding.npy of the FLAME-sized toy (see the module doc)."""
    model, (lmk_faces, lmk_bary) = build_toy_flame()
    n_verts, faces = len(model["v_template"]), model["f"].astype(np.int64)
    for key in ("v_template", "shapedirs", "posedirs", "weights"):  # copied vertices ...
        model[key] = _pad_rows(model[key], FLAME_VERTICES)
    copies = np.arange(n_verts, FLAME_VERTICES)
    model["J_regressor"] = model["J_regressor"].toarray()
    model["J_regressor"] = np.concatenate([model["J_regressor"], np.zeros((5, len(copies)))], 1)
    # ... and faces among them: the toy's faces whose corners all have a copy, shifted to the copies
    copied = faces[(faces < len(copies)).all(1)] + n_verts
    model["f"] = np.concatenate([faces, _pad_rows(copied, FLAME_FACES - len(faces))]).astype(np.uint32)

    # Row |yaw| = k: each contour point slides k * 0.5 mm towards the face's midline, to the face
    # nearest to that spot (the silhouette moving across the cheek as the head turns).
    centres = model["v_template"][faces].mean(1)
    row = np.arange(CONTOUR_LUT_ROWS)
    abs_yaw = np.where(row < 40, row, row - 39)  # rows: yaw 0..39 degrees, then -1..-39
    start = centres[lmk_faces[:N_CONTOUR]]                                           # (17,3)
    slide = np.stack([-np.sign(start[:, 0]), np.zeros(N_CONTOUR), np.zeros(N_CONTOUR)], 1) * 5e-4
    spots = start[None] + abs_yaw[:, None, None] * slide[None]                       # (79,17,3)
    contour_faces = ((spots[:, :, None] - centres[None, None]) ** 2).sum(-1).argmin(-1)  # (79,17)
    contour_bary = np.broadcast_to(lmk_bary[:N_CONTOUR], (CONTOUR_LUT_ROWS, N_CONTOUR, 3))
    embedding = {"full_lmk_faces_idx": lmk_faces[None], "full_lmk_bary_coords": lmk_bary[None],
                 "dynamic_lmk_faces_idx": contour_faces, "dynamic_lmk_bary_coords": contour_bary.copy()}
    path = os.path.join(directory, "generic_model.pkl")
    with open(path, "wb") as f:
        pickle.dump(model, f, protocol=2)
    np.save(os.path.join(directory, "landmark_embedding.npy"), np.array(embedding, dtype=object))
    return path


def run_command(video, out, size, threads):
    """`python -m tracking VIDEO --out OUT --size SIZE` in a subprocess with `threads` cores (its
    affinity): its figures as the notes of a row: wall and CPU seconds (user + system: on a shared machine
    the work done, where the wall clock also counts the waits for a core), peak RSS (ru_maxrss) and the load
    average before and after; and the wall seconds."""
    cores = sorted(os.sched_getaffinity(0))[:threads]
    command = ["taskset", "-c", ",".join(map(str, cores))] if threads < os.cpu_count() else []
    command += [sys.executable, "-m", "tracking", video, "--out", out, "--size", str(size)]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"the track command failed:\n{stderr[-2000:]}")
    seconds = time.perf_counter() - start
    return seconds, (f"wall {seconds:.1f} s, CPU {usage.ru_utime + usage.ru_stime:.1f} s, peak RSS "
                     f"{usage.ru_maxrss / 1024:.0f} MiB, load average {load:.1f} -> {os.getloadavg()[0]:.1f}")


def hd_clip(path, n_frames):
    """A generated 1080p 30 fps clip: the demo face (720 px) drifting over a 1920x1080 frame."""
    return write_demo_video(path, n_frames=n_frames, size=720, fps=30, frame_size=(1080, 1920))


def whole_command_rows(frame_counts, size, threads, tmp, clips=()):
    """The whole track command on generated 1080p clips, one per frame count, and on the given clips:
    time and peak memory (the memory rows)."""
    rows = []
    for video in [*clips, *(hd_clip(os.path.join(tmp, f"hd{n}.mp4"), n) for n in frame_counts)]:
        info = probe_video(video)
        n = info.frames
        seconds, notes = run_command(video, os.path.join(tmp, f"out{len(rows)}"), size, threads)
        rows.append(f"| whole track command ({os.path.basename(video)}, {info.width}x{info.height} "
                    f"{float(info.fps):g} fps, {size} px crops, with preview) | {n} "
                    f"| {threads} | {seconds:.1f} | {n / seconds:.1f} | {notes} |")
        if video.startswith(tmp):
            os.remove(video)
        print(rows[-1], flush=True)
    return rows


def _timed(times, name, fn):
    """fn wrapped to add its CPU time (this thread's) to times[name]."""
    def timed(*args):
        start = time.thread_time()
        result = fn(*args)
        times.setdefault(name, []).append(time.thread_time() - start)
        return result
    return timed


def stage_rows(n_frames, size, tmp, skip=10):
    """Per-frame stages of the live tracking side on a generated 1080p clip, one thread (module doc)."""
    video = hd_clip(os.path.join(tmp, "stages.mp4"), n_frames)
    flame = load_flame()
    reference = synthetic_sequence(flame, 1)
    tracker = LiveTracker(flame, reference, reference.shape, size, video)
    times = {}
    tracker.landmarks = _timed(times, "landmarks", tracker.landmarks)
    tracker.crop = _timed(times, "crop", tracker.crop)
    track, hint = _timed(times, "call", tracker), _timed(times, "hint", render_conditioning)
    for index, frame in enumerate(iter_frames(video)):
        if (tracked := track(index, frame)) is not None:
            hint(flame, tracked[1], size, slice(None), reference.shape)
    if len(times["call"]) != n_frames:
        raise RuntimeError(f"the face was lost on {n_frames - len(times['call'])} frames of the clip")
    calls, parts = np.array(times.pop("call")), np.array(times["landmarks"]) + np.array(times["crop"])
    times["fit (the rest of the LiveTracker call)"] = calls - parts
    times["sum: landmarks + crop + fit + hint"] = calls + np.array(times["hint"])
    load = os.getloadavg()[0]
    rows = []
    for name, seconds in times.items():
        ms = 1000 * np.asarray(seconds[skip:])
        rows.append(f"| {name} | {np.median(ms):.1f} | {np.percentile(ms, 90):.1f} | load average {load:.1f} |")
        print(rows[-1], flush=True)
    os.remove(video)
    return ["| live tracking stage, 1080p source, 512 px hint, 1 thread | median ms | p90 ms | notes |",
            "|---|---|---|---|", *rows]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=300, help="frames of the synthetic fitting benchmark")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads of the whole command")
    p.add_argument("--fit-threads", type=int, default=FitConfig.threads, help="threads of the fit")
    p.add_argument("--video-frames", type=int, default=48, help="frames of the demo video for the whole command")
    p.add_argument("--size", type=int, default=512, help="crop size of the whole command")
    p.add_argument("--skip-command", action="store_true", help="time the fit only")
    p.add_argument("--hd-frames", type=int, nargs="*", default=[600, 3000],
                   help="frames of the generated 1080p clips of the whole-command and memory rows (none: skip)")
    p.add_argument("--clip", nargs="*", default=[], help="videos to time the whole command on as well (e.g. a 1080p "
                   "clip made once by hd_clip, to compare runs without generating it again)")
    p.add_argument("--skip-fit", action="store_true", help="skip the (offline) fit rows")
    p.add_argument("--live-fit-frames", type=int, default=100, help="frames of the one-frame fit rows (0: skip)")
    p.add_argument("--stages", type=int, default=150, help="frames of the live stage rows (0: skip)")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.stages:
            torch.set_num_threads(1)
            stage_table = stage_rows(args.stages, args.size, tmp)
        torch.set_num_threads(args.threads)
        if not args.skip_fit:
            rows += fit_rows(args, tmp)
        if args.live_fit_frames:
            rows += live_fit_rows(args.live_fit_frames, tmp)
        if not args.skip_command:
            video = write_demo_video(os.path.join(tmp, "demo.mp4"), n_frames=args.video_frames)
            seconds, notes = run_command(video, os.path.join(tmp, "out"), args.size, args.threads)
            rows.append(f"| whole track command (demo video, 384 px, {args.size} px crops, with preview) "
                        f"| {args.video_frames} | {args.threads} | {seconds:.1f} | {args.video_frames / seconds:.1f} "
                        f"| {notes} |")
            print(rows[-1], flush=True)
        rows += whole_command_rows(args.hd_frames, args.size, args.threads, tmp, args.clip)
    print(f"load average {os.getloadavg()[0]:.2f}")
    if args.stages:
        print("\n".join(stage_table))
    print("| what | frames | threads | seconds | frames/s | notes |\n|---|---|---|---|---|---|")
    print("\n".join(rows))


def fit_rows(args, tmp):
    rows = []
    flame_sized = load_flame(write_flame_sized_model(tmp))
    toy = load_flame()
    # The first fit in a process is ~20% slower (library and allocator start-up): warm up once.
    cold = measure_fit_speed(toy, n_frames=args.frames, threads=args.fit_threads)
    rows.append(f"| FLAME fit, toy head, first fit in the process | {cold['frames']} | {args.fit_threads} "
                f"| {cold['seconds']:.1f} | {cold['fps']:.1f} | {cold['cpu_seconds']:.1f} CPU seconds |")
    for name, flame in (("toy head", toy), ("FLAME-sized", flame_sized)):
        contour = len(torch.unique(flame.contour_corners))
        fit = measure_fit_speed(flame, n_frames=args.frames, threads=args.fit_threads)
        rows.append(f"| FLAME fit, {name} ({len(flame.v_template)} vertices, {contour} contour-table vertices) "
                    f"| {fit['frames']} | {args.fit_threads} | {fit['seconds']:.1f} | {fit['fps']:.1f} "
                    f"| {fit['cpu_seconds']:.1f} CPU seconds |")
    return rows


def measure_live_fit(flame, n_frames, seed=0):
    """FrameFit and fit_frame frame by frame, as LiveTracker calls them, on one synthetic sequence, one fit
    after the other: ({name: (wall seconds, CPU seconds of this thread) per frame}, seconds to build
    FrameFit). Not interleaved: on a loaded machine a FrameFit call just after fit_frame's 100 ms of CPU
    waits for the core (the scheduler serves the other processes first) and finds its caches cold; it
    took 3-5x as long. On a loaded machine the CPU time says more than the wall clock."""
    truth = synthetic_sequence(flame, n_frames, seed=seed)
    observed = seq_landmarks_2d(flame, truth) + np.random.default_rng(seed).normal(scale=0.5, size=(n_frames, 68, 2))
    start = time.perf_counter()
    live = FrameFit(flame, truth.shape, truth.focal, truth.image_size)
    build = time.perf_counter() - start
    fits = {"FrameFit": live, "fit_frame (20 L-BFGS iterations)": lambda points, previous: fit_frame(
        flame, points, truth.image_size, truth.shape, truth.focal, previous)}
    seconds = {name: [] for name in fits}
    for name, fit_one in fits.items():
        previous = None
        for points in observed:
            start, start_cpu = time.perf_counter(), time.thread_time()
            previous = fit_one(points, previous)
            seconds[name].append((time.perf_counter() - start, time.thread_time() - start_cpu))
    return seconds, build


def live_fit_rows(n_frames, tmp):
    """The one-frame fit rows: FrameFit and fit_frame on the toy head and the FLAME-sized model."""
    rows = []
    for name, flame in (("toy head", load_flame()), ("FLAME-sized", load_flame(write_flame_sized_model(tmp)))):
        seconds, build = measure_live_fit(flame, n_frames)
        load = os.getloadavg()[0]
        for fit_name, times in seconds.items():
            ms, cpu_ms = np.array(times[1:]).T * 1e3
            rows.append(f"| one-frame fit (live), {fit_name}, {name} ({len(flame.v_template)} vertices) | {len(ms)} | 1 "
                        f"| {ms.sum() / 1e3:.2f} | {1e3 / np.median(ms):.0f} | median {np.median(ms):.1f} ms, "
                        f"p90 {np.percentile(ms, 90):.1f} ms (CPU {np.median(cpu_ms):.1f} ms); "
                        f"first frame {times[0][0] * 1e3:.0f} ms"
                        + (f"; built in {build * 1e3:.0f} ms" if fit_name == "FrameFit" else "")
                        + f"; load average {load:.1f} |")
            print(rows[-1], flush=True)
    return rows


if __name__ == "__main__":
    main()
