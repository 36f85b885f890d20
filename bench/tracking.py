"""Tracking speed on the CPU: frames/s of FLAME fitting alone, and of the whole track command.

    python bench/tracking.py [--frames 300] [--threads 2] [--video-frames 48]

Fitting runs on a synthetic toy-head sequence (tracking.fit.synthetic_sequence); the whole command
(decode, landmarks, crops, fit, preview) runs on the offline demo video.
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tracking.demo import write_demo_video  # noqa: E402
from tracking.fit import measure_fit_speed  # noqa: E402
from tracking.pipeline import load_flame, track_video  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=300, help="frames of the synthetic fitting benchmark")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--video-frames", type=int, default=48, help="frames of the demo video for the whole command")
    p.add_argument("--size", type=int, default=512, help="crop size of the whole command")
    args = p.parse_args()
    flame = load_flame()
    fit = measure_fit_speed(flame, n_frames=args.frames, threads=args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        video = write_demo_video(os.path.join(tmp, "demo.mp4"), n_frames=args.video_frames)
        torch.set_num_threads(args.threads)
        start = time.perf_counter()
        track_video(video, os.path.join(tmp, "out"), flame, size=args.size)
        whole = time.perf_counter() - start
    print("| what | frames | threads | seconds | frames/s |\n|---|---|---|---|---|")
    print(f"| FLAME fit (synthetic) | {fit['frames']} | {args.threads} | {fit['seconds']:.1f} | {fit['fps']:.1f} |")
    print(f"| whole track command (demo video, {args.size} px, with preview) | {args.video_frames} | {args.threads} "
          f"| {whole:.1f} | {args.video_frames / whole:.1f} |")


if __name__ == "__main__":
    main()
