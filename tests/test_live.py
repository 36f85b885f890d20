"""Live driving (sample.py --drive, tracking/live.py) and sample.py's --lora, on an untrained tiny avatar.

The avatar (tests/conftest.py) is random, so these check the plumbing, not the looks: frames come out as
the source plays, the page serves them as JPEGs, the mp4 is playable after Ctrl-C, bad sources fail cleanly.
"""
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

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
    assert "stopped by Ctrl-C" in stdout and "dropped" in stdout, stdout
    frames = mp4_frames(out)
    assert len(frames) >= 3 and frames.shape[1:] == (64, 64, 3)
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_drive_from_a_sequence_file_drives_every_frame(untrained_avatar_run, tmp_path):
    out = tmp_path / "seq.mp4"
    result = subprocess.run([sys.executable, "sample.py", "--drive", str(untrained_avatar_run / "tracking" / "seq.npz"),
                             *FEW_STEPS, "--side-by-side", "--out", str(out)], cwd=REPO, env=ENV,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "0 source frames dropped" in result.stdout
    assert mp4_frames(out).shape == (12, 64, 128, 3)  # every frame of the sequence, hint normals | avatar


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


def test_a_source_that_fails_midway_keeps_the_frames_made(untrained_avatar_run, tmp_path, monkeypatch):
    """The error surfaces (one line at the command) and the mp4 holds the frames made before it, playable."""
    import svp
    from tracking import live
    from tracking.pipeline import TrackingError
    avatar = svp.load_avatar(str(untrained_avatar_run))
    seq = svp.load_seq(str(untrained_avatar_run / "tracking" / "seq.npz"))

    def failing(source, avatar):
        def frames():
            for f in range(6):
                hint = avatar.hints(seq, range(f, f + 1))[0]
                yield live.normals_image(hint), hint
            raise TrackingError(f"{source}: no face on frames 6-16 (more than 10 frames in a row)")
        return live.Feed(frames(), 24)
    monkeypatch.setattr(live, "open_feed", failing)
    out = tmp_path / "partial.mp4"
    with pytest.raises(TrackingError, match="no face"):
        live.drive(avatar, "talk.mp4", str(out), svp.VideoSampling(sampler="lcm", steps=4, guidance=1.0))
    assert mp4_frames(out).shape == (3, 64, 64, 3)  # frames 0-2 had left the 4-step wavefront; 3-5 were in it


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
