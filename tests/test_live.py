"""The live loop (live/: the pipeline, its sources, outputs and take, the page's settings into the sampler),
live driving (sample.py --drive), the tracking-only mode (python -m tracking live) and sample.py's --lora.

The avatar (tests/conftest.py) is random, so these check the plumbing, not the looks: frames come out as
the source plays and in order, slow stages drop the oldest frames, the page serves them as JPEGs, the mp4
and the take are kept after Ctrl-C or an error, the take renders offline, a control change reaches the
sampler on the next frame, bad sources fail cleanly.
"""
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from test_page import jpegs_from  # the page's MJPEG stream, read as its own test reads it

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# one intra-op thread: on a shared 2-core machine a second one makes every small op wait for a busy core
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
FEW_STEPS = ("--sampler", "lcm", "--steps", "4", "--guidance", "1")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def load_seq(path):
    from tracking.sequence import load_seq
    return load_seq(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mp4_frames(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def wait_for_page(url: str, process, seconds: float) -> bytes:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-2000:]
        try:
            with urllib.request.urlopen(url, timeout=5) as page:
                return page.read()
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {seconds} s")


@pytest.fixture(scope="module")
def demo_video(tmp_path_factory) -> str:
    """The demo video looped to 240 frames at 8 frames/s (30 s): longer than the test needs, so the run is
    still going when the page is read, whatever the machine's load."""
    from tracking.demo import demo_frames
    from tracking.video import write_video
    frames = demo_frames(48)
    path = str(tmp_path_factory.mktemp("drive") / "demo.mp4")
    write_video(path, (frame for _ in range(5) for frame in frames), 8)
    return path


def test_live_from_the_demo_video_with_the_page(untrained_avatar_run, demo_video, tmp_path):
    """Done-when of issue 14: drive the avatar from the demo video with --serve on a free loopback port, read a
    few JPEG frames (driving crop | avatar) from the page, stop with Ctrl-C, and get a playable mp4."""
    port, out = free_port(), tmp_path / "live.mp4"
    process = subprocess.Popen([sys.executable, "sample.py", "--avatar", str(untrained_avatar_run), "--drive",
                                demo_video, *FEW_STEPS, "--out", str(out), "--serve", str(port)],
                               cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert b"/stream.mjpg" in wait_for_page(f"http://127.0.0.1:{port}/", process, 180)
        images = jpegs_from(f"http://127.0.0.1:{port}/stream.mjpg", 3, timeout=120)
        assert all(image.size == (128, 64) and image.format == "JPEG" for image in images)
        assert np.asarray(images[-1])[:, :64].std() > 10, "the left half should show the driving face crop"
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, stderr[-2000:]
    assert "stopped by Ctrl-C" in stdout and "dropped" in stdout and "latency median" in stdout, stdout
    frames = mp4_frames(out)
    assert len(frames) >= 3 and frames.shape[1:] == (64, 64, 3)
    take = load_seq(str(tmp_path / "live.seq.npz"))  # the take: one row per frame written, the source's fps
    assert take.n_frames == len(frames) and take.fps == 8 and take.crop_boxes.shape == (len(frames), 4)
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_drive_from_a_sequence_file_drives_every_frame(untrained_avatar_run, tmp_path):
    out = tmp_path / "seq.mp4"
    result = subprocess.run([sys.executable, "sample.py", "--drive", str(untrained_avatar_run / "tracking" / "seq.npz"),
                             *FEW_STEPS, "--side-by-side", "--out", str(out)], cwd=REPO, env=ENV,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "0 source frames dropped" in result.stdout
    assert mp4_frames(out).shape == (12, 64, 128, 3)  # every frame of the sequence, hint normals | avatar
    seq, take = (load_seq(str(path)) for path in (untrained_avatar_run / "tracking" / "seq.npz", tmp_path / "seq.seq.npz"))
    for name in ("expression", "global_rot", "jaw_rot", "translation", "shape"):
        assert np.array_equal(getattr(take, name), getattr(seq, name)), name


def assert_one_line_failure(result, out, *words):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr[-2000:]
    for word in words:
        assert word in lines[0], lines[0]
    assert not os.path.exists(out) and not [f for f in os.listdir(os.path.dirname(out)) if ".tmp" in f]


def test_a_video_without_a_face_and_a_missing_camera(untrained_avatar_run, tmp_path):
    from tracking.video import write_video
    blank = str(tmp_path / "blank.mp4")
    write_video(blank, np.full((16, 96, 96, 3), 90, np.uint8), 8)
    out = str(tmp_path / "none.mp4")
    for source, words in ((blank, ("blank.mp4", "no face")), ("/dev/video97", ("/dev/video97", "camera"))):
        result = subprocess.run([sys.executable, "sample.py", "--avatar", str(untrained_avatar_run), "--drive", source,
                                 *FEW_STEPS, "--out", out], cwd=REPO, env=ENV, capture_output=True, text=True)
        assert_one_line_failure(result, out, *words)


def tiny_lora(path, modules) -> str:
    """A kohya-layout LoRA on our (LDM-named) UNet modules."""
    gen, tensors = torch.Generator().manual_seed(0), {}
    for name, module in modules.items():
        stem = "lora_unet_" + name.replace(".", "_")
        tensors[stem + ".lora_down.weight"] = torch.randn(2, module.weight.shape[1], generator=gen)
        tensors[stem + ".lora_up.weight"] = torch.randn(module.weight.shape[0], 2, generator=gen)
        tensors[stem + ".alpha"] = torch.tensor(2.0)
    save_file(tensors, str(path))
    return str(path)


def test_lora_reaches_the_avatar_and_text_to_image(untrained_avatar_run, tmp_path):
    import svp
    plain = svp.load_avatar(str(untrained_avatar_run))
    targets = {n: m for n, m in plain.sd.unet.named_modules() if n.endswith("attn2.to_k")}
    path = tiny_lora(tmp_path / "lora.safetensors", targets)
    fused = svp.load_avatar(str(untrained_avatar_run), loras=[(path, 0.5)])
    fused_modules = dict(fused.sd.unet.named_modules())
    for name, module in targets.items():
        stem = "lora_unet_" + name.replace(".", "_")
        from safetensors.torch import load_file
        lora = load_file(path)
        delta = 0.5 * lora[stem + ".lora_up.weight"] @ lora[stem + ".lora_down.weight"]
        assert torch.allclose(fused_modules[name].weight, module.weight + delta, atol=1e-5)

    base = plain.run_file("base")
    for lora, ok in ((f"{path}:0.5", True), (tiny_lora(tmp_path / "other.safetensors", {"nowhere.to_k": targets[next(iter(targets))]}), False)):
        out = tmp_path / ("ok.png" if ok else "bad.png")
        result = subprocess.run([sys.executable, "sample.py", "--ckpt", base, "--prompt", "a face", "--steps", "2",
                                 "--lora", lora, "--out", str(out)], cwd=REPO, env=ENV, capture_output=True, text=True)
        if ok:
            assert result.returncode == 0 and out.exists(), result.stderr[-2000:]
        else:
            assert_one_line_failure(result, str(out), "other.safetensors", "nowhere")


def test_fit_frame_follows_a_synthetic_sequence_frame_by_frame():
    """Live fitting (tracking/fit.fit_frame): each frame alone, warm-started from the one before, with the
    identity shape and focal given, lands on the landmarks and the head pose of a known sequence."""
    from bench.tracking import seq_landmarks_2d, synthetic_sequence
    from tracking.fit import fit_frame
    from tracking.pipeline import load_flame
    flame, size, focal = load_flame(None), (256, 256), 350.0
    truth = synthetic_sequence(flame, 8, size, focal, seed=1)
    observed = seq_landmarks_2d(flame, truth) + np.random.default_rng(1).normal(scale=0.5, size=(8, 68, 2))
    previous, errors, turns = None, [], []
    for f in range(8):
        previous = fit_frame(flame, observed[f], size, truth.shape, focal, previous)
        assert previous.n_frames == 1 and np.array_equal(previous.shape, truth.shape) and previous.focal == pytest.approx(focal)
        errors.append(np.linalg.norm(seq_landmarks_2d(flame, previous)[0] - observed[f], axis=-1).mean())
        turns.append(np.degrees(np.arccos(np.clip((np.trace(head(previous, 0).T @ head(truth, f)) - 1) / 2, -1, 1))))
    assert max(errors) < 1.0, errors  # the landmarks carry 0.5 px of noise per axis
    assert max(turns) < 2.5, turns


def head(seq, f) -> np.ndarray:
    """The head's rotation in camera space on frame f: the global rotation composed with the neck."""
    from tracking.flame import axis_angle_to_matrix
    rotation = lambda a: axis_angle_to_matrix(torch.as_tensor(a[f], dtype=torch.float64)[None])[0].numpy()
    return rotation(seq.global_rot) @ rotation(seq.neck_rot)


def test_the_tracker_holds_the_last_fit_through_a_short_gap_and_fails_on_a_long_one(untrained_avatar_run):
    import svp
    from tracking.demo import demo_frames
    from tracking.live import LiveTracker
    from tracking.pipeline import TrackingError
    avatar = svp.load_avatar(str(untrained_avatar_run))
    tracker = LiveTracker(avatar.flame, svp.load_seq(avatar.run_file("seq")), avatar.shape, 64, "talk.mp4", max_gap=3)
    blank, face = np.full((384, 384, 3), 90, np.uint8), demo_frames(1)[0]
    assert tracker(0, blank) is None  # no face yet: skipped
    crop, params = tracker(1, face)
    assert crop.shape == (64, 64, 3) and params.n_frames == 1
    for index in (2, 3):
        assert tracker(index, blank)[1] is params
    crop, _ = tracker(4, face)  # the face again: the gap is over
    for index in (5, 6, 7):
        tracker(index, blank)
    with pytest.raises(TrackingError, match="talk.mp4: no face on frames 5-8"):
        tracker(8, blank)


# ----------------------------------------------------------------------------- the pipeline (live/pipeline.py, live/loop.py)

def numbered_frames(n: int, size: int = 32):
    """n frames whose content says their index k: red = 8 k (mod 256, so that it survives video coding)."""
    for k in range(n):
        frame = np.full((size, size, 3), 40, np.uint8)
        frame[..., 0] = 8 * k % 256
        yield frame


def test_stages_in_threads_give_every_frame_in_order_like_the_serial_loop():
    """Stages of uneven, jittering speed, joined by bounded queues: every frame of a source that does not drop
    comes out once, in order, with the same content as the serial chain of the same stages."""
    from live.pipeline import Pipeline
    from live.sources import Frame
    rng = np.random.default_rng(0)

    def source(stopped):
        for k, image in enumerate(numbered_frames(40)):
            yield Frame(k, time.monotonic(), image)

    def stage(name, scale):
        def work(frames):
            held = []  # holds two frames back, as the sampler's wavefront does, and flushes them at the end
            for frame in frames:
                time.sleep(scale * rng.random())
                frame.picture = (frame.picture if frame.picture is not None else frame.image) + 1
                held.append(frame)
                if len(held) > 2:
                    yield held.pop(0)
            yield from held
        return name, work
    results = {}
    for serial in (False, True):
        pipeline = Pipeline(source, [stage("a", 0.004), stage("b", 0.002), stage("c", 0.003)], serial)
        shown = []
        assert pipeline.run(shown.append) == 40
        results[serial] = [(f.index, int(f.picture[0, 0, 0])) for f in shown]
        stats = pipeline.stats(dropped=0, read=None)
        assert set(stats["stages_ms"]) == {"a", "b", "c"} and stats["latency_ms"]["p90"] >= stats["latency_ms"]["median"] > 0
    assert results[False] == results[True] == [(k, (8 * k % 256 + 3) % 256) for k in range(40)]


def test_the_sampler_ticks_while_no_frame_waits_so_a_frame_leaves_steps_ticks_after_it_came():
    """The sampling stage behind a stage that delivers a frame every 60 ms, its ticks 5 ms (a toy model, LCM 4
    steps): pipelined, the frames in flight advance while the next frame is awaited, so each frame is shown
    before the next one is read (latency ~4 ticks, not ~3 frames), the frames are still the offline
    sampler's, and the stage's time per frame is one tick (the idle ticks count as waiting). Serially the
    stage never idles: the frames leave 3 frames late."""
    from live.loop import sampling_stage
    from live.pipeline import Pipeline
    from live.sources import Frame
    from model.config import SD1
    from model.sampling import NoiseSchedule, make_sampler
    from model.temporal import denoise_video, stream_latents, temporal_weights
    sampler, weights = make_sampler(NoiseSchedule.from_config(SD1), "lcm", 4), temporal_weights(4, 0.9, 3)
    targets = torch.randn(10, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(4, 6, 6, generator=torch.Generator().manual_seed(1))

    def model(x, t, frame_ids):
        time.sleep(0.005)
        return 0.3 * x + 0.5 * targets[list(frame_ids)], None

    class ToyAvatar:
        def stream(self, hints, settings, negative_prompt="", frame_settings=None):
            return (latents[0] for latents in stream_latents(model, hints, sampler, noise, weights))

    def source(stopped):
        for k in range(10):
            yield Frame(k, 0.0, hint=k)

    def every_60_ms(frames):  # a source at its own frame rate, as live/sources.NewestFrame releases a video's
        for frame in frames:
            time.sleep(0.06)
            frame.read_at = time.monotonic()
            yield frame
    offline = denoise_video(model, sampler, noise, weights, range(10), chunk=10, progress=False)
    for serial in (False, True):
        pipeline = Pipeline(source, [("read", every_60_ms), ("sample", sampling_stage(ToyAvatar(), None, None))],
                            serial)
        shown = []
        assert pipeline.run(shown.append) == 10
        assert torch.allclose(torch.stack([f.picture for f in shown]), offline, atol=1e-5, rtol=1e-5)
        latency, stage = pipeline.stats(0, None)["latency_ms"]["median"], pipeline.stats(0, None)["stages_ms"]["sample"]
        if serial:
            assert latency > 150  # three frames late
        else:
            assert latency < 50 and stage < 15, (latency, stage)  # 4 ticks of 5 ms; one tick per frame


def test_the_figures_keep_a_window_and_the_whole_runs_quantiles_in_bounded_memory():
    """Timings: the last WINDOW values exactly (numpy's quantiles of them), the whole run's quantiles within
    half a bin (0.5%) of numpy's over every value, exact while the run fits the window; and no more memory
    after 200,000 values than after 2,000."""
    import tracemalloc

    from live.pipeline import WINDOW, Timings
    values = np.random.default_rng(0).lognormal(np.log(0.03), 0.6, 200_000)  # 30 ms frames with a long tail
    short = Timings()
    for v in values[:WINDOW]:
        short.add(v)
    for q in (0.0, 0.5, 0.9, 1.0):
        assert short.quantile(q) == short.quantile(q, everything=True) == np.quantile(values[:WINDOW], q)
    timings = Timings()
    tracemalloc.start()
    for k, v in enumerate(values):
        timings.add(v)
        if k == 2_000:
            after_2k = tracemalloc.get_traced_memory()[0]
    grown = tracemalloc.get_traced_memory()[0] - after_2k
    tracemalloc.stop()
    assert grown < 4_000, grown  # a list of floats would hold 200,000 x 32 bytes more
    for q in (0.1, 0.5, 0.9, 0.99):
        assert timings.quantile(q) == np.quantile(values[-WINDOW:], q)
        assert abs(timings.quantile(q, everything=True) / np.quantile(values, q) - 1) < 0.005, q
    assert len(timings) == len(values) and Timings().quantile(0.5) != Timings().quantile(0.5)  # NaN when empty


def test_a_slow_stage_drops_the_oldest_frames_at_the_source_and_counts_them():
    from live.pipeline import Pipeline
    from live.sources import NewestFrame, Source
    newest = NewestFrame(numbered_frames(60), frame_rate=200)
    feed = Source("fast.mp4", Fraction(200), newest)

    def slow(frames):
        for frame in frames:
            time.sleep(0.02)  # 50 frames/s against a 200 frames/s source
            yield frame
    shown = []
    Pipeline(feed.frames, [("slow", slow)]).run(shown.append)
    indices = [f.index for f in shown]
    assert indices == sorted(indices) and indices[-1] == 59  # in order; the newest is never the one dropped
    assert feed.dropped > 20 and len(shown) + feed.dropped == newest.read == 60
    assert [int(f.image[0, 0, 0]) for f in shown] == [8 * k % 256 for k in indices]


def test_a_second_frame_kept_rides_out_a_slow_frame_that_one_drops():
    """A 30 frames/s source and a stage of 15 ms a frame with every 10th frame 83 ms (a face search, a busy
    core): the stage keeps up on average, and with two frames kept (the tracking-only run's) it loses none;
    with the newest frame only, each slow frame pushes out the one that arrives during it."""
    from live.pipeline import Pipeline
    from live.sources import NewestFrame, Source
    dropped = {}
    for keep in (1, 2):
        newest = NewestFrame(numbered_frames(60), frame_rate=30, keep=keep)

        def uneven(frames):
            for frame in frames:
                time.sleep(0.083 if frame.index % 10 == 5 else 0.015)  # 2.5 periods
                yield frame
        shown = []
        Pipeline(Source("30fps.mp4", Fraction(30), newest).frames, [("track", uneven)]).run(shown.append)
        assert [f.index for f in shown] == sorted({f.index for f in shown})
        assert len(shown) + newest.dropped == 60
        dropped[keep] = newest.dropped
    assert dropped[2] == 0 and dropped[1] >= 3, dropped


def synthetic_take_source(n: int, frame_rate: float | None):
    """A Source of numbered frames and a stage that 'tracks' frame k as frame k % 12 of the tiny avatar's
    kind of sequence (known parameters)."""
    from live.sources import NewestFrame, Source, frame_of
    from tracking.sequence import FlameSequence
    turn = np.linspace(0, 1, 12, dtype=np.float32)[:, None] * np.float32([[0, 0.3, 0]])
    zeros = lambda width: np.zeros((12, width), np.float32)  # noqa: E731
    seq = FlameSequence(shape=np.zeros(5, np.float32), expression=zeros(4), global_rot=turn, neck_rot=zeros(3),
                        jaw_rot=zeros(3), eye_rots=zeros(6), translation=np.tile(np.float32([0, 0, -0.5]), (12, 1)),
                        focal=76.8, image_size=(64, 64), fps=25.0)

    def track(frames):
        for frame in frames:
            frame.crop = frame.picture = frame.image
            frame.params, frame.box = frame_of(seq, frame.index % 12), np.float32([0, 0, 32, 32])
            yield frame
    return Source("synthetic", Fraction(25), NewestFrame(numbered_frames(n), frame_rate)), ("track", track), seq


def test_an_error_in_a_stage_stops_the_run_in_one_line_and_keeps_the_frames_made(tmp_path):
    from live.loop import LiveError, run
    feed, track, seq = synthetic_take_source(30, frame_rate=200)

    def breaks(frames):
        for frame in frames:
            if frame.index >= 8:
                raise RuntimeError("CUDA out of memory\n(a long report)")
            yield frame
    out = tmp_path / "broken.mp4"
    with pytest.raises(LiveError) as error:
        run(feed, [track, ("sample", breaks)], str(out), None, False, serial=False, on_frame=None)
    assert "RuntimeError: CUDA out of memory)" in str(error.value) and "\n" not in str(error.value)
    frames, take = mp4_frames(out), load_seq(str(tmp_path / "broken.seq.npz"))
    assert 1 <= len(frames) <= 8 and take.n_frames == len(frames) and take.fps == 25
    shown = np.round(frames[:, 16, 16, 0] / 8).astype(int)  # the frames' indices, in order, each once
    assert list(shown) == sorted(set(shown)) and shown.max() < 8
    assert np.allclose(take.global_rot, seq.global_rot[shown % 12])


def test_ctrl_c_closes_the_mp4_and_writes_the_take(tmp_path):
    """SIGINT to this process during a run (the StopOnCtrlC path): the source stops, the frames taken are
    finished, the mp4 is closed playable and the take written; the handler is restored afterwards."""
    from live.loop import run
    feed, track, _ = synthetic_take_source(10_000, frame_rate=100)

    def interrupt_at_frame_5(frames):
        for frame in frames:
            if frame.index == 5:
                os.kill(os.getpid(), signal.SIGINT)
            yield frame
    before = signal.getsignal(signal.SIGINT)
    result = run(feed, [track, ("stage", interrupt_at_frame_5)], str(tmp_path / "take.mp4"), None, False,
                 serial=False, on_frame=None)
    assert result.stopped and signal.getsignal(signal.SIGINT) is before
    assert feed.newest.read < 10_000 and len(mp4_frames(tmp_path / "take.mp4")) == result.frames >= 5
    assert load_seq(result.take).n_frames == result.frames


def test_a_control_change_reaches_the_sampler_on_the_next_frame(untrained_avatar_run, monkeypatch):
    """Changes made while frame 3 arrives: its scale (and the temporal strength) are the new ones, the frames
    before keep theirs; the new prompt's embedding, computed by the steering's worker, reaches the model with
    the first frame that enters after it is ready (frame 4 here, which waits for it). Frames 0-2 equal an
    unchanged run's; the rest differ."""
    import svp
    from live.loop import live_controls
    from live.steering import Steering
    from model.avatar import Denoiser
    avatar = svp.load_avatar(str(untrained_avatar_run))
    settings = svp.VideoSampling(sampler="lcm", steps=4, guidance=1.0)
    seq = svp.load_seq(str(untrained_avatar_run / "tracking" / "seq.npz"))
    hints = avatar.hints(seq, range(8))
    calls, guided = [], Denoiser.guided

    def spy(self, x, t, context, uncond_context=None, hint=None, scale=1.0):
        calls.append((context, scale))
        return guided(self, x, t, context, uncond_context, hint, scale)
    monkeypatch.setattr(Denoiser, "guided", spy)

    def run(change: bool):
        controls = live_controls(settings)
        steering = Steering(avatar, controls)

        def arriving():
            for f, hint in enumerate(hints):
                if change and f == 3:
                    controls.update({"conditioning_scale": 0.5, "temporal_strength": 0.2, "prompt": "a red cube"})
                if change and f == 4:
                    steering.pending[1].result()  # the embedding is ready before frame 4 enters
                yield hint
        frames = np.stack(list(avatar.stream(arriving(), settings, frame_settings=steering)))
        steering.close()
        return frames, steering
    plain, _ = run(False)
    calls.clear()
    changed, steering = run(True)
    new_context = avatar.text_context("a red cube")
    # tick k holds frames max(0, k - 3)..k: tick 3 is the first with frame 3 (last row), tick 4 with frame 4
    context, scale = calls[3]
    assert torch.is_tensor(scale) and scale.flatten().tolist() == [1.0, 1.0, 1.0, 0.5]
    context, scale = calls[4]
    assert scale.flatten().tolist() == [1.0, 1.0, 0.5, 0.5]
    assert torch.equal(context[-1], new_context[0]) and not torch.equal(context[-2], new_context[0])
    assert all(s == 1.0 for _, s in calls[:3])
    assert np.array_equal(changed[:3], plain[:3]) and not np.array_equal(changed[3:], plain[3:])
    assert steering.now.temporal_strength == 0.2 and steering.message is None


def test_tracking_only_live_mode_on_the_demo_video(demo_video, tmp_path):
    """python -m tracking live: driving | the conditioning's normals over the face, into the mp4, and the take.
    (6 s of video: the first frame's face search takes seconds on the loaded test machine, the frames read
    meanwhile are dropped.)"""
    out = tmp_path / "track.mp4"
    result = subprocess.run([sys.executable, "-m", "tracking", "live", demo_video, "--size", "128", "--out", str(out),
                             "--max-frames", "48"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "frames/s" in result.stdout and "track" in result.stdout, result.stdout
    frames, take = mp4_frames(out), load_seq(str(tmp_path / "track.seq.npz"))
    assert frames.shape[1:] == (128, 256, 3) and take.n_frames == len(frames) >= 2 and take.fps == 8
    assert np.abs(frames[:, :, :128].astype(int) - frames[:, :, 128:]).mean() > 5  # the overlay shows
    assert take.image_size == (128, 128) and not take.shape.any()  # the mean shape: no avatar


def test_a_live_take_renders_offline_with_sample_params(untrained_avatar_run, demo_video, tmp_path):
    """A take recorded while tracking the demo video drives the avatar offline (sample.py --params)."""
    take = tmp_path / "track.seq.npz"
    subprocess.run([sys.executable, "-m", "tracking", "live", demo_video, "--size", "64", "--out",
                    str(tmp_path / "track.mp4"), "--max-frames", "10"], cwd=REPO, env=ENV, check=True, capture_output=True)
    seq = load_seq(str(take))
    out = tmp_path / "offline.mp4"
    result = subprocess.run([sys.executable, "sample.py", "--avatar", str(untrained_avatar_run), "--params", str(take),
                             *FEW_STEPS, "--out", str(out)], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert mp4_frames(out).shape == (seq.n_frames, 64, 64, 3)


def test_steering_keeps_the_embedding_it_has_until_the_new_one_is_ready_and_reports_a_failed_one():
    """live/steering.py with a stand-in text encoder: a change of text is embedded off the caller's thread;
    the frames entering meanwhile keep the old embedding; one that fails leaves a message and the old one."""
    import threading
    from live.controls import Controls
    from live.steering import Steering
    release = threading.Event()

    class Encoder:
        def text_context(self, prompt, morph=None, morph_weight=0.0):
            if prompt == "slow":
                release.wait(10)
            if prompt == "broken":
                raise ValueError("the tokenizer cannot read this")
            return torch.full((1, 77, 4), float(len(prompt or "")))
    controls = Controls()
    steering = Steering(Encoder(), controls)
    first = steering()
    controls.update({"prompt": "slow", "conditioning_scale": 2.0})
    during = steering()  # the scale applies now; the text is still being embedded
    assert during.context is first.context and during.conditioning_scale == 2.0
    release.set()
    steering.pending[1].result()
    assert steering().context[0, 0, 0] == 4.0
    controls.update({"prompt": "broken"})
    assert steering().context[0, 0, 0] == 4.0  # the change is seen as a frame enters; its embedding is asked
    steering.pending[1].exception()
    after = steering()
    assert after.context[0, 0, 0] == 4.0 and "tokenizer cannot read" in steering.message
    steering.close()
