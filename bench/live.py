"""The live loop's speed (live/): per-stage ms, frames/s, latency and dropped frames, serial against pipelined.

    python bench/live.py                         # CPU: tracking only, and with a tiny random avatar; 1080p and 720p
    python bench/live.py --device cuda           # GPU: SD1.5 shapes at 512 px, fp16, LCM 4 steps, tracking in front
    python bench/live.py --device cuda --decoder taesd_decoder.safetensors

Sources are generated clips at 30 frames/s (the demo face, 720 px, drifting over a 1920x1080 or 1280x720
frame, tracking/demo.py), played at their own rate: frames the loop cannot keep up with are dropped, as live.
Each run is live/loop.run, as `python -m tracking live` and `sample.py --drive` run it: read (the reader's
decode) -> track (landmarks, crop, one-frame fit, conditioning render) [-> sample (model/temporal.stream_video
on random weights of the avatar's shapes: speed does not depend on the values)] -> output (mp4 encode, the
page's JPEG). Serial: one frame through every stage before the next is taken (the loop before pipelining).

The tracker is warmed on the clip's first frame before the clock starts (the first face search takes
seconds), and the figures are the steady state's, in the source's time: frames/s = the frames shown per
second of the source between the first and the last frame shown (not the wavefront's drain after the
source ended); dropped = the source frames between those two that were not shown. "ceiling" = 1 / the slowest stage's median (the
rate a perfect pipeline reaches); "of ceiling" = frames/s over it (goal >= 0.9 pipelined). "cores" = the
process's CPU time (every thread's: x264's, the person lock's, the decoding of dropped frames) over the run's
wall time: near 2 on this machine, the loop wanted more CPU than it got.

--lock: the person lock's descriptor inline against on its worker thread (tracking/people.PersonLock): the
tracker's ms per frame, on the frames that check the person and on the others.

--contention: threads or processes? The tracking stage's ms alone, beside the sampler's ticks in a second
thread, and beside them in a second process (the avatar's shapes, as above): if a thread slows the tracking
more than a process does, the GIL binds and the stages want processes.
"""
import argparse
import datetime
import itertools
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.stream import HINT_CHANNELS, build  # noqa: E402
from live.loop import TRACKING_KEEP, camera, run, sampling_stage, tracking_stage  # noqa: E402
from live.page import LivePage  # noqa: E402
from live.sources import open_source  # noqa: E402
from model.config import SD1, TINY  # noqa: E402
from model.sampling import NoiseSchedule  # noqa: E402
from model.temporal import VideoSampling, stream_video  # noqa: E402
from tracking.conditioning import CONDITIONING_CHANNELS, render_conditioning  # noqa: E402
from tracking.demo import write_demo_video  # noqa: E402
from tracking.fit import default_focal  # noqa: E402
from tracking.live import LiveTracker  # noqa: E402
from tracking.pipeline import load_flame  # noqa: E402
from tracking.video import iter_frames  # noqa: E402


@dataclass
class RandomAvatar:
    """What the sampling stage asks of an avatar (Avatar.stream), on random weights of a config's shapes."""
    denoiser: torch.nn.Module
    decoder: torch.nn.Module
    context: torch.Tensor
    resolution: int

    def stream(self, hints, settings, negative_prompt="", frame_settings=None):
        latent = self.resolution // self.decoder.downscale
        return stream_video(self.denoiser, self.decoder, NoiseSchedule(), hints, (latent, latent), self.context, None,
                            settings, frame_settings)


def live_run(video: str, flame, size: int, avatar: RandomAvatar | None, settings, serial: bool, out_dir: str,
             inline_lock: bool = False, keep: int | None = None) -> dict:
    """One run of the live loop on `video`; the steady state's figures. inline_lock: the person lock's
    descriptor on the tracking stage's thread, each check's verdict on its own frame (as before it moved
    to a worker: tracking/people.PersonLock); keep: the source frames kept for the loop (default: as
    live/loop.py's runs keep them)."""
    keep = keep or (TRACKING_KEEP if avatar is None else 1)
    feed = open_source(video, seq_allowed=False, keep=keep)
    shape = np.zeros(flame.n_shape, np.float32)
    tracker = LiveTracker(flame, camera(default_focal((size, size)), size), shape, size, video,
                          wait_for_person=inline_lock)
    tracker(0, next(iter_frames(video, 1)))  # warm: the first face search and fit happen before the clock ...
    tracker.person.settle()  # ... and the person lock's first descriptor (its network loads then)
    hint = lambda params: render_conditioning(flame, params, size, shape=shape)[0]  # noqa: E731
    stages = [("track", tracking_stage(tracker, hint, feed, overlay=avatar is None))]
    if avatar is not None:
        stages.append(("sample", sampling_stage(avatar, settings, None)))
    shown, cpu = [], time.process_time()
    result = run(feed, stages, os.path.join(out_dir, "live.mp4"), LivePage(0), True, serial,
                 lambda frame, stats: shown.append(frame.index))
    cores = (time.process_time() - cpu) / result.seconds
    # the steady state, in the source's time: the frames shown per second of source that went by between the
    # first and the last of them (the wavefront's drain after the source ended takes none), the others dropped
    span = shown[-1] - shown[0] + 1
    stats = result.stats
    slowest = max(stats["stages_ms"].values())
    return {**stats, "fps": (len(shown) - 1) / (span - 1) * float(feed.fps) if span > 1 else 0.0,
            "dropped_share": 1 - len(shown) / span, "ceiling": 1000 / slowest, "cores": cores}


def tick_until(stop, avatar: RandomAvatar, ticks: list):
    """The sampler's steady work without a source: full wavefront ticks (4 frames) and one decode each."""
    torch.set_num_threads(1)
    param = next(avatar.denoiser.parameters())
    latent, size = avatar.resolution // avatar.decoder.downscale, avatar.resolution
    x = torch.randn(4, avatar.denoiser.unet.config.in_channels, latent, latent).to(param)
    t, hint = torch.tensor([999, 700, 400, 100], device=param.device), torch.rand(4, HINT_CHANNELS, size, size).to(param)
    with torch.no_grad():
        while not stop.is_set():
            began = time.perf_counter()
            avatar.denoiser.guided(x, t, avatar.context, None, hint)
            avatar.decoder.decode_latents(x[:1])
            ticks.append(time.perf_counter() - began)


def _ticks_in_process(stop, avatar, result):
    ticks = []
    tick_until(stop, avatar, ticks)
    result.put(statistics.median(ticks))


def contention_rows(video: str, flame, size: int, avatar: RandomAvatar, frames: int = 8):
    """Tracking ms per frame alone, beside a sampler thread, beside a sampler process (interleaved, twice)."""
    shape = np.zeros(flame.n_shape, np.float32)
    images = list(iter_frames(video, frames + 1))
    tracker = LiveTracker(flame, camera(default_focal((size, size)), size), shape, size, video)
    tracker(0, images[0])

    def track() -> float:
        seconds = []
        for k, image in enumerate(images[1:], 1):
            began = time.perf_counter()
            render_conditioning(flame, tracker(k, image)[1], size, shape=shape)
            seconds.append(time.perf_counter() - began)
        return 1000 * statistics.median(seconds)
    fork = multiprocessing.get_context("fork")
    print("| date | machine | tracking ms alone | beside a sampler thread (its tick ms) "
          "| beside a sampler process (its tick ms) | load |")
    print("|---|---|---|---|---|---|")
    for _ in range(2):
        alone = track()
        stop, ticks = threading.Event(), []
        thread = threading.Thread(target=tick_until, args=(stop, avatar, ticks))
        thread.start()
        beside_thread = track()
        stop.set()
        thread.join()
        stop, result = fork.Event(), fork.Queue()
        process = fork.Process(target=_ticks_in_process, args=(stop, avatar, result))
        process.start()
        beside_process = track()
        stop.set()
        process_tick = result.get()
        process.join()
        print(f"| {datetime.date.today()} | {os.cpu_count()}-core CPU | {alone:.0f} | {beside_thread:.0f} "
              f"({1000 * statistics.median(ticks):.0f}) | {beside_process:.0f} ({1000 * process_tick:.0f}) "
              f"| {os.getloadavg()[0]:.1f} |", flush=True)


def lock_rows(video: str, flame, size: int, frames: int = 300):
    """The tracker's ms per frame (landmarks, crop, fit; every frame of `video`, unpaced) with the person lock's
    descriptor inline (before) and on its worker thread, interleaved frame by frame (the same load for both),
    on the frames that ask for a check and on the others. The worker's check is waited for after each frame,
    so that it does not overlap the next timing."""
    images = list(iter_frames(video, frames))
    shape = np.zeros(flame.n_shape, np.float32)
    trackers = {inline: LiveTracker(flame, camera(default_focal((size, size)), size), shape, size, video,
                                    max_gap=len(images), wait_for_person=inline) for inline in (True, False)}
    ms, checks = {True: [], False: []}, {True: [], False: []}
    for k, image in enumerate(images):
        for inline, tracker in trackers.items():
            began = time.perf_counter()
            tracker(k, image)
            ms[inline].append(1000 * (time.perf_counter() - began))
            checks[inline].append(tracker.person.asked)
            tracker.person.settle()
    print("| date | machine | person lock | ms a frame: median / p90 / p99 / max | on the check frames (median) "
          "| on the others (median) | load |")
    print("|---|---|---|---|---|---|---|")
    for inline in (True, False):
        v, asked = np.array(ms[inline][1:]), np.array(checks[inline][1:])  # the first frame's search left out
        print(f"| {datetime.date.today()} | {os.cpu_count()}-core CPU | {'inline' if inline else 'worker thread'} "
              f"| {np.median(v):.1f} / {np.percentile(v, 90):.1f} / {np.percentile(v, 99):.1f} / {v.max():.1f} "
              f"| {np.median(v[asked]):.1f} ({asked.sum()} frames) | {np.median(v[~asked]):.1f} "
              f"| {os.getloadavg()[0]:.1f} |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--decoder", metavar="FILE", help="a tiny decoder (TAESD) file for the avatar rows (default: the VAE)")
    p.add_argument("--seconds", type=float, default=20.0, help="length of each generated clip")
    p.add_argument("--sources", default="1080,720", help="clip heights: 1080 and/or 720")
    p.add_argument("--modes", default="tracking,avatar", help="tracking (tracking only) and/or avatar")
    p.add_argument("--size", type=int, default=512, help="crop and conditioning size of the tracking-only rows")
    p.add_argument("--contention", action="store_true", help="only the threads-or-processes rows (module doc)")
    p.add_argument("--lock", action="store_true", help="only the person lock's rows: the tracker with its descriptor "
                   "inline and on a worker thread")
    p.add_argument("--inline-lock", action="store_true", help="also the tracking-only rows with the person lock's "
                   "descriptor inline (before: tracking/people.PersonLock)")
    p.add_argument("--keep", type=int, help="source frames the tracking-only rows keep for the loop (default: "
                   f"live/loop.TRACKING_KEEP, {TRACKING_KEEP}; 1 before)")
    args = p.parse_args()
    torch.set_num_threads(1)  # the live loop's stages share the cores; one torch thread each (the setting)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    config = SD1 if cuda else TINY
    assert HINT_CHANNELS == len(CONDITIONING_CHANNELS)
    avatar_size = 512 if cuda else TINY.image_size
    flame = load_flame(None)
    settings = VideoSampling(sampler="lcm", steps=4, guidance=1.0, batch_frames=4)
    avatar = None
    if "avatar" in args.modes or args.contention:
        denoiser, decoder = build(config, device, dtype)
        if args.decoder:
            from model.taesd import load_tiny_decoder
            decoder = load_tiny_decoder(args.decoder, device, dtype)
        context = torch.randn(1, 77, config.unet.context_dim, generator=torch.Generator().manual_seed(1)).to(device, dtype)
        avatar = RandomAvatar(denoiser, decoder, context, avatar_size)
    where = torch.cuda.get_device_name(device) if cuda else f"{os.cpu_count()}-core CPU, 1 torch thread per stage"
    load = os.getloadavg()[0]
    today = datetime.date.today().isoformat()
    print(f"{where}, {today}, load {load:.1f} at the start; avatar: {config.name} shapes {avatar_size} px, "
          f"{str(dtype).removeprefix('torch.')}, lcm 4 steps; torch {torch.__version__}")
    print()
    if args.lock:
        with tempfile.TemporaryDirectory() as tmp:
            video = write_demo_video(os.path.join(tmp, "1080p.mp4"), n_frames=300, size=720, fps=30,
                                     frame_size=(1080, 1920))
            lock_rows(video, flame, args.size)
        return
    if args.contention:
        with tempfile.TemporaryDirectory() as tmp:
            video = write_demo_video(os.path.join(tmp, "720p.mp4"), n_frames=10, size=480, fps=30, frame_size=(720, 1280))
            contention_rows(video, flame, args.size, avatar)
        return
    print("| date | machine | source | mode | loop | frames/s | ceiling | of ceiling | dropped | latency median / p90 ms "
          "| stage ms (median / p90) | cores | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for height in (int(h) for h in args.sources.split(",")):
            video = write_demo_video(os.path.join(tmp, f"{height}p.mp4"), n_frames=int(30 * args.seconds), size=720 if height > 720 else 480,
                                     fps=30, frame_size=(height, height * 16 // 9))
            for mode in args.modes.split(","):
                locks = [False, True] if mode == "tracking" and args.inline_lock else [False]
                for inline_lock, serial in itertools.product(locks, (True, False)):
                    r = live_run(video, flame, args.size if mode == "tracking" else avatar_size,
                                 avatar if mode == "avatar" else None, settings, serial, tmp, inline_lock,
                                 args.keep if mode == "tracking" else None)
                    stages = ", ".join(f"{name} {ms:.1f} / {r['stages_p90_ms'][name]:.1f}"
                                       for name, ms in r["stages_ms"].items())
                    label = mode + (", lock inline" if inline_lock else "") + \
                        (f", keep {args.keep}" if args.keep and mode == "tracking" else "")
                    print(f"| {today} | {where} | {height}p 30 fps | {label} | {'serial' if serial else 'pipelined'} "
                          f"| {r['fps']:.2f} | {r['ceiling']:.2f} | {r['fps'] / r['ceiling']:.2f} "
                          f"| {100 * r['dropped_share']:.1f}% | {r['latency_ms']['median']:.0f} / {r['latency_ms']['p90']:.0f} "
                          f"| {stages} | {r['cores']:.2f} | {os.getloadavg()[0]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
