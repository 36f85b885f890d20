"""Peak memory of `evaluate.py --video` on long generated takes: does scoring grow with the take's length?

For each --resolution, an untrained avatar run of the tiny preset at that resolution (a random tiny base, a
fresh ControlNet, a 12-frame synthetic tracking with its last 6 frames held out: seconds to build; memory
does not depend on training). For each clip (generated 1080p clips: tracking/demo.py's face drifting over a
1920x1080 frame, 30 fps; written once into --work), `/usr/bin/time -v python evaluate.py --avatar RUN --video
CLIP --steps 1 --guidance 1` three times: the first tracks the clip (into <run>/eval/, then reused) and
scores; the second scores only (its renders dropped first, so they are made again); with --before DIR, a
third runs DIR's evaluate.py (an older checkout) on the same tracking. Prints the peak RSS of each.
--repeat K: also takes of K times the first clip, its track repeated K times (tracking a long 1080p clip
takes long on a shared CPU, and scoring never reads the video), scored only.

    python bench/eval_memory.py --seconds 60 --repeat 2 5 --resolution 64 --before /tmp/svp-before

Without LPIPS / Inception weights (their features, 2 x 8 KB a frame, are what stays per frame; the CPU
time of the Inception on 2 x 9,000 frames is beyond this machine's share).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_run(folder: str, resolution: int) -> str:
    """An untrained avatar run at `resolution` (see the module doc); kept when it is there."""
    import svp
    from model.avatar import build_denoiser, fingerprint, save_avatar
    from model.config import config_to_dict
    from model.loading import load_stable_diffusion, write_tiny_base
    from tracking.pipeline import load_flame
    from tracking.sequence import FlameSequence, save_seq

    if os.path.exists(os.path.join(folder, "split.json")):
        return folder
    os.makedirs(os.path.join(folder, "tracking"), exist_ok=True)
    rng, n = np.random.default_rng(0), 12
    base = os.path.join(folder, "base.safetensors")
    write_tiny_base(base, seed=0, crops=rng.integers(0, 256, (2, resolution, resolution, 3), np.uint8), vae_steps=0)
    flame = load_flame(None)
    turn = np.sin(np.linspace(0, np.pi, n, dtype=np.float32))
    zeros = lambda width: np.zeros((n, width), np.float32)  # noqa: E731
    seq = FlameSequence(shape=np.zeros(flame.n_shape, np.float32), expression=zeros(flame.n_exp),
                        global_rot=np.stack([0 * turn, 0.3 * turn, 0 * turn], 1), neck_rot=zeros(3),
                        jaw_rot=np.stack([0.2 * turn, 0 * turn, 0 * turn], 1), eye_rots=zeros(6),
                        translation=np.tile(np.float32([0, 0, -0.5]), (n, 1)), focal=1.2 * resolution,
                        image_size=(resolution, resolution), fps=30.0)
    save_seq(os.path.join(folder, "tracking", "seq.npz"), seq)
    np.save(os.path.join(folder, "tracking", "crops.npy"), rng.integers(0, 256, (n, resolution, resolution, 3), np.uint8))
    sd = load_stable_diffusion(base)
    denoiser = build_denoiser(sd, "controlnet", hint_channels=8, checkpointing=False, seed=0)
    meta = {"base": "base.safetensors", "base_fingerprint": fingerprint(base), "family": config_to_dict(sd.config),
            "prompt": "a photo of sks person", "hint_channels": 8, "resolution": resolution, "train": "controlnet",
            "seq": "tracking/seq.npz", "identity_shape": seq.shape.tolist(), "flame": None, "step": 0}
    save_avatar(os.path.join(folder, "avatar.safetensors"), denoiser, meta)
    svp.save_split(folder, svp.last_frames_split(n, 0.5))
    return folder


def clip(work: str, seconds: int) -> str:
    from tracking.demo import write_demo_video
    path = os.path.join(work, f"hd{30 * seconds}.mp4")
    if not os.path.exists(path):
        write_demo_video(path, n_frames=30 * seconds, size=720, fps=30, frame_size=(1080, 1920))
    return path


def repeated_take(run: str, video: str, times: int) -> str:
    """A take of `times` x `video`'s frames for `run`: its cached track repeated, under the name of a copy of the
    video (source.json says what evaluate.py would track it from, so the track is used as it is)."""
    import dataclasses

    import svp
    from model.files import write_json
    from tracking.pipeline import DEFAULT_MAX_GAP, track_source
    from tracking.sequence import save_seq
    stem = os.path.splitext(os.path.basename(video))[0]
    copy = os.path.join(os.path.dirname(video), f"{stem}x{times}.mp4")
    shutil.copy(video, copy)
    src, dst = os.path.join(run, "eval", stem), os.path.join(run, "eval", f"{stem}x{times}")
    os.makedirs(dst, exist_ok=True)
    seq = svp.load_seq(os.path.join(src, "seq.npz"))
    tiled = {f.name: np.concatenate([getattr(seq, f.name)] * times) for f in dataclasses.fields(seq)
             if f.name != "shape" and isinstance(getattr(seq, f.name), np.ndarray)}
    save_seq(os.path.join(dst, "seq.npz"), dataclasses.replace(seq, **tiled))
    for name in ("crops.npy", "landmarks.npy"):
        np.save(os.path.join(dst, name), np.concatenate([np.load(os.path.join(src, name))] * times))
    avatar = svp.load_avatar(run)
    own = svp.load_seq(avatar.run_file("seq"))
    write_json(os.path.join(dst, "source.json"), track_source(
        copy, avatar.flame, avatar.resolution, None, None, DEFAULT_MAX_GAP, avatar.shape,
        own.focal * avatar.resolution / own.image_size[1]))
    return copy


def peak_rss_mb(checkout: str, run: str, video: str, extra: list[str]) -> tuple[float, float]:
    """(peak RSS MB, wall s) of one evaluate.py command, one torch thread."""
    command = ["/usr/bin/time", "-v", sys.executable, "evaluate.py", "--avatar", run, "--video", video, "--steps", "1",
               "--guidance", "1", *extra]
    result = subprocess.run(command, cwd=checkout, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        return float("nan"), float("nan")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", result.stderr).group(1)
    seconds = sum(float(part) * 60 ** i for i, part in enumerate(reversed(wall.split(":"))))
    return rss / 1024, seconds


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=int, nargs="+", default=[60], help="clip lengths (30 fps), tracked for real")
    p.add_argument("--resolution", type=int, nargs="+", default=[64])
    p.add_argument("--repeat", type=int, nargs="*", default=[], help="takes of K x the first clip (its track "
                   "repeated), scored only")
    p.add_argument("--work", default="/tmp/svp-eval-memory", help="clips and runs (kept between invocations)")
    p.add_argument("--before", default=None, help="an older checkout whose evaluate.py to measure too")
    args = p.parse_args()
    os.makedirs(args.work, exist_ok=True)
    print("| avatar px | clip | command | peak RSS MB | wall s |\n|---|---|---|---|---|")
    for resolution in args.resolution:
        run = make_run(os.path.join(args.work, f"run{resolution}"), resolution)
        takes = [(f"{seconds} s, {30 * seconds} frames", clip(args.work, seconds), True) for seconds in args.seconds]
        for what, video, tracked in takes:
            measure(args, run, resolution, what, video, tracked)
        for times in args.repeat:
            video = repeated_take(run, takes[0][1], times)
            measure(args, run, resolution, f"{times} x {takes[0][0]} (its track repeated)", video, False)


def measure(args, run: str, resolution: int, name: str, video: str, tracked: bool):
    rows = [("track + score", REPO, [])] if tracked else []
    rows.append(("score (tracking cached)", REPO, []))
    if args.before:
        rows.append(("before: score (tracking cached)", args.before, []))
    for what, checkout, extra in rows:
        shutil.rmtree(os.path.join(run, "eval", "renders"), ignore_errors=True)
        rss, wall = peak_rss_mb(checkout, run, video, extra)
        print(f"| {resolution} | {name} | {what} | {rss:.0f} | {wall:.0f} |", flush=True)

if __name__ == "__main__":
    main()
