"""What the live page costs the loop that publishes to it: ms per frame of `LivePage.publish` (JPEG encode
and hand-over) and `publish_stats`, paced at 30 frames/s, with nobody watching and with Chromium showing the
page. The MJPEG stream and the figures (polled four times a second) are served by threads of the
publisher's process, so a viewer competes with the loop for the GIL and the cores: this measures by how much.
Chromium (Debian's, through selenium, as tests/test_page.py drives it) runs headless beside it.

    python bench/page.py [--frames 300] [--size 512] [--rounds 3]
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(1, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from live.controls import Controls  # noqa: E402
from live.page import LivePage  # noqa: E402
from test_page import headless_chromium, open_page  # noqa: E402


def frames_like_photos(size: int) -> list[np.ndarray]:
    """Two driving | avatar images (size x 2*size): smooth shading and a little grain, as a JPEG encoder
    meets in a face; alternated so that every frame published differs from the one before."""
    y, x = np.mgrid[0:size, 0:2 * size] / size
    rng = np.random.default_rng(0)
    return [np.clip(np.stack([128 + 90 * np.sin(3 * x + k), 128 + 90 * np.cos(2 * y - k), 160 * x * y], -1)
                    + rng.normal(0, 4, (size, 2 * size, 3)), 0, 255).astype(np.uint8) for k in (0, 1)]


def publish_paced(page: LivePage, images, frames: int, fps: float = 30.0) -> np.ndarray:
    """(frames, 2) ms of publish and publish_stats for each frame, published at `fps`."""
    ms, start = [], time.perf_counter()
    for frame in range(frames):
        t0 = time.perf_counter()
        page.publish(images[frame % 2])
        t1 = time.perf_counter()
        page.publish_stats({"frames": frame + 1, "dropped": 0, "fps": fps, "latency_ms": {"median": 80.0, "p90": 95.0},
                            "stages_ms": {"read": 1.0, "track": 20.0, "sample": 30.0, "output": 5.0}, "message": None})
        ms.append((1e3 * (t1 - t0), 1e3 * (time.perf_counter() - t1)))
        time.sleep(max(0.0, start + (frame + 1) / fps - time.perf_counter()))
    return np.array(ms)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=300, help="frames per round and viewer")
    p.add_argument("--size", type=int, default=512, help="each half of the image is size x size")
    p.add_argument("--rounds", type=int, default=3, help="rounds, alternating nobody and Chromium watching")
    args = p.parse_args()
    images = frames_like_photos(args.size)
    page = LivePage(0, Controls()).start()
    ms = {"nobody": [], "Chromium": []}
    with headless_chromium() as browser:
        for _ in range(args.rounds):
            browser.get("about:blank")
            ms["nobody"].append(publish_paced(page, images, args.frames))
            open_page(browser, page.url)
            ms["Chromium"].append(publish_paced(page, images, args.frames))
            time.sleep(0.5)  # a poll or two after the last frame: the page must show it, or it was not watching
            assert browser.find_element("id", "frames").text == str(args.frames), "the page did not follow"
    page.close()
    print(f"{args.size}x{2 * args.size} images at 30 frames/s, load average {os.getloadavg()[0]:.1f}")
    print("| viewer | frames | publish ms median / p90 | publish_stats ms median / p90 |")
    print("|---|---|---|---|")
    for viewer, rounds in ms.items():
        both = np.concatenate(rounds)
        publish, stats = (np.percentile(both[:, i], [50, 90]) for i in (0, 1))
        print(f"| {viewer} | {len(both)} | {publish[0]:.2f} / {publish[1]:.2f} | {stats[0]:.3f} / {stats[1]:.3f} |")


if __name__ == "__main__":
    main()
