"""Face search speed on the CPU: what a frame costs where the track is lost (FaceTracker.step without a
running track: the full-frame search, then the landmark fits of its candidates), one thread.

    python bench/detect.py [--repeats 15]

Frames (generated from scikit-image's photos): a faceless 640x360 frame and a faceless 1920x1080 frame
(the coffee photo, resized), and 640x360 frames with the astronaut's face (about 120 px high) upright
and rolled 25° (beyond the upright search: a turned view finds it). Each row is the median of --repeats
runs in this process; a followed frame (FaceTracker.step with a running track) is the row to compare
with. The machine's load average is printed with the figures.
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tracking.landmarks import FaceTracker  # noqa: E402


def resized(image, shape):
    from skimage.transform import resize
    return (resize(image, shape, anti_aliasing=True) * 255).round().astype(np.uint8)


def face_frame(roll_degrees=0.0, shape=(360, 640)):
    """The astronaut's face (about 120 px) turned by roll_degrees, pasted on the coffee photo."""
    from skimage import data
    from skimage.transform import rotate
    frame = resized(data.coffee(), shape)
    face = data.astronaut()[20:240, 110:330]           # the head, 220 px
    face = rotate(face, -roll_degrees, preserve_range=True, mode="edge").astype(np.uint8)
    face = resized(face, (180, 180))
    top, left = (shape[0] - 180) // 2, (shape[1] - 180) // 3
    frame[top:top + 180, left:left + 180] = face
    return frame


def median_ms(function, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    import torch
    torch.set_num_threads(1)
    from skimage import data
    tracker = FaceTracker()
    frames = {
        "faceless 640x360": resized(data.coffee(), (360, 640)),
        "faceless 1920x1080": resized(data.coffee(), (1080, 1920)),
        "face found, upright, 640x360": face_frame(0.0),
        "face found, rolled 25°, 640x360": face_frame(25.0),
    }
    for name, frame in frames.items():
        found = tracker.step(frame)[2] is not None
        assert found == name.startswith("face found"), f"{name}: found={found}"
    state = tracker.step(frames["face found, upright, 640x360"])[2]
    rows = [(name, median_ms(lambda frame=frame: tracker.step(frame), args.repeats)) for name, frame in frames.items()]
    followed = median_ms(lambda: tracker.step(frames["face found, upright, 640x360"], state), args.repeats)
    load = os.getloadavg()[0]
    print(f"| frame (lost track: full-frame search) | ms, median of {args.repeats} | load |")
    print("|---|---|---|")
    for name, ms in rows + [("followed face (for comparison), 640x360", followed)]:
        print(f"| {name} | {ms:.1f} | {load:.1f} |")


if __name__ == "__main__":
    main()
