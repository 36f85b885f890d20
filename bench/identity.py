"""What knowing who is who costs the track command: dlib's face descriptor (tracking/identity.py) per face,
per shot, and the cut test per frame, on the CPU with one torch thread (as the track command runs).

    python bench/identity.py [--repeats 30]

A face's descriptor is its chip (cut from a 1080p frame) and the network's forward pass; a run of the track
(a shot, when the tracker holds the face through it) gets SAMPLES_PER_RUN of them. The cut test is the
per-frame thumbnail of a 1080p frame and its difference from the previous one. Medians of --repeats, with
the load average beside them (the machine is shared).
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tracking.demo import iter_demo_frames  # noqa: E402
from tracking.identity import FaceNet, face_chip  # noqa: E402
from tracking.landmarks import FaceTracker  # noqa: E402
from tracking.people import SAMPLES_PER_RUN, ShotCuts  # noqa: E402


def median_ms(work, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(1)
    frames = list(iter_demo_frames(2, size=720, frame_size=(1080, 1920)))
    result, _, _ = FaceTracker().step(frames[0])
    landmarks = result[0]
    start = time.perf_counter()
    net = FaceNet.load()
    load_ms = 1000 * (time.perf_counter() - start)
    chip = face_chip(frames[0], landmarks)
    chip_ms = median_ms(lambda: face_chip(frames[0], landmarks), args.repeats)
    net_ms = median_ms(lambda: net(chip[None]), args.repeats)
    cuts = ShotCuts()
    cut_ms = median_ms(lambda: [cuts(frame) for frame in frames], args.repeats) / len(frames)
    print(f"load average {os.getloadavg()[0]:.2f}; 1080p frames, face about "
          f"{np.ptp(landmarks[:, 0]):.0f} px wide, one torch thread, medians of {args.repeats}")
    print("| what | ms |\n|---|---|")
    print(f"| reading the network (once per command) | {load_ms:.0f} |")
    print(f"| face chip (150 px, from a 1080p frame) | {chip_ms:.1f} |")
    print(f"| network forward pass (one chip) | {net_ms:.1f} |")
    print(f"| descriptors of one shot ({SAMPLES_PER_RUN} faces) | {SAMPLES_PER_RUN * (chip_ms + net_ms):.0f} |")
    print(f"| cut test, per frame | {cut_ms:.2f} |")


if __name__ == "__main__":
    main()
