"""The tracking pipeline end to end on a real (demo) video, and its errors on bad input."""
import os
import shutil
import subprocess
import sys
import time
import weakref

import numpy as np
import pytest

from bench.tracking import seq_landmarks_2d
from tracking.conditioning import CONDITIONING_CHANNELS, render_conditioning
from tracking.demo import write_demo_video
from tracking.landmarks import FaceTracker
from tracking.people import PeopleLog
from model.files import read_json
from tracking import pipeline
from tracking.__main__ import main as tracking_main
from tracking.pipeline import TrackingError, check_gaps, load_flame, track_video
from tracking.sequence import load_seq
from tracking import video
from tracking.video import iter_frames, read_video, write_video

av_open = video.av.open  # the real one, for the test that counts the opens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def flame():
    return load_flame()


@pytest.fixture(scope="module")
def demo_video(tmp_path_factory):
    return write_demo_video(str(tmp_path_factory.mktemp("demo") / "demo.mp4"), n_frames=8)


def test_demo_video_tracks_end_to_end(demo_video, flame, tmp_path, monkeypatch):
    out = str(tmp_path / "track")
    opened = []  # the video is probed once (fps, frame count, size), then decoded by the two passes
    monkeypatch.setattr(video.av, "open", lambda path, *a, **k: opened.append(path) or av_open(path, *a, **k))
    tracked = track_video(demo_video, out, flame, size=96)
    assert opened.count(demo_video) == 3
    assert sorted(os.listdir(out)) == ["crops.npy", "landmarks.npy", "people.json", "preview.mp4", "report.png",
                                       "seq.npz", "source.json"]
    seq = load_seq(os.path.join(out, "seq.npz"))
    assert seq.n_frames == 8 and seq.crop_boxes.shape == (8, 4) and tracked.crops.shape == (8, 96, 96, 3)
    # The fitted model's landmarks land on the tracked ones (the toy head is not the astronaut, so a few px).
    error = np.linalg.norm(seq_landmarks_2d(flame, seq) - tracked.landmarks, axis=-1).mean()
    assert error < 96 * 0.04, f"mean landmark reprojection {error:.2f} px at 96 px"
    hints = render_conditioning(flame, seq, 96)
    assert hints.shape == (8, len(CONDITIONING_CHANNELS), 96, 96)
    foreground = hints[:, CONDITIONING_CHANNELS.index("foreground")].mean().item()
    assert 0.1 < foreground < 0.9  # the head fills a good part of the crop, not all of it
    frames, _ = read_video(os.path.join(out, "preview.mp4"))
    assert frames.shape == (8, 96, 96, 3)
    # A rerun re-uses the cache: same arrays, no tracking.
    again = track_video("/nonexistent.mp4", out, flame, size=96)
    assert np.array_equal(again.crops, tracked.crops)


def test_a_video_without_a_face_is_an_error(tmp_path, flame):
    ramp = np.linspace(0, 255, 64 * 64 * 3).reshape(64, 64, 3).astype(np.uint8)
    path = str(tmp_path / "noface.mp4")
    write_video(path, np.stack([ramp] * 4), 10)
    with pytest.raises(TrackingError, match="noface.mp4: no face"):
        track_video(path, str(tmp_path / "out"), flame, size=64)
    assert not os.path.exists(tmp_path / "out" / "seq.npz")


def test_gaps():
    check_gaps(np.array([True, False, False, True]), max_gap=2, video="v.mp4")
    with pytest.raises(TrackingError, match="v.mp4: no face on frames 1-3"):
        check_gaps(np.array([True, False, False, False, True]), max_gap=2, video="v.mp4")


def test_cli_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    for path in (str(bad), str(tmp_path / "missing.mp4")):
        r = subprocess.run([sys.executable, "-m", "tracking", path, "--out", str(tmp_path / "o")], cwd=ROOT,
                           capture_output=True, text=True)
        assert r.returncode != 0 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert not (tmp_path / "o" / "seq.npz").exists()


# ---- streaming, resuming, provenance ------------------------------------------------------------

def _track_in_subprocess(video, out, kill_after, size=64):
    """track_video in a fresh process that SIGKILLs itself at `kill_after` ("PASS:FRAMES"), saving its
    progress every 5 frames."""
    script = ("import sys, tracking.pipeline as p; p.CHECKPOINT_EVERY = 5; "
              f"p.track_video(sys.argv[1], sys.argv[2], p.load_flame(), size={size})")
    env = dict(os.environ, SVP_TRACK_KILL_AFTER=kill_after)
    return subprocess.run([sys.executable, "-c", script, video, out], cwd=ROOT, env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def clip16(tmp_path_factory):
    return write_demo_video(str(tmp_path_factory.mktemp("clip") / "clip16.mp4"), n_frames=16)


def test_an_interrupted_track_resumes_with_the_same_result(clip16, flame, tmp_path, monkeypatch):
    whole = track_video(clip16, str(tmp_path / "whole"), flame, size=64)
    out = str(tmp_path / "resumed")
    for kill_after in ("1:7", "2:12"):  # killed in pass 1 (landmarks), then in pass 2 (crops, preview)
        r = _track_in_subprocess(clip16, out, kill_after)
        assert r.returncode == -9, r.stderr[-2000:]
        assert not os.path.exists(os.path.join(out, "seq.npz"))
    assert read_json(os.path.join(out, "crops.progress.json")) == {"frames": 10}  # saved every 5 frames
    shutil.copytree(out, tmp_path / "other-size")
    monkeypatch.setattr(pipeline, "CHECKPOINT_EVERY", 5)
    resumed = track_video(clip16, out, flame, size=64)
    assert isinstance(resumed.crops, np.memmap)
    assert np.array_equal(resumed.crops, whole.crops) and np.array_equal(resumed.landmarks, whole.landmarks)
    for key, value in whole.seq.to_npz_dict().items():
        assert np.array_equal(resumed.seq.to_npz_dict()[key], value), key
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "whole"))  # no partial or temp files left
    assert read_video(os.path.join(out, "preview.mp4"))[0].shape == (16, 64, 64, 3)
    # The partial progress of a 64 px track is not resumed by a 48 px one: it tracks afresh.
    other = track_video(clip16, str(tmp_path / "other-size"), flame, size=48)
    assert other.crops.shape == (16, 48, 48, 3)
    np.testing.assert_allclose(other.landmarks, whole.landmarks * 48 / 64, rtol=1e-5, atol=1e-4)


def test_frames_stream_through_the_track(clip16, flame, tmp_path, monkeypatch):
    """No more than a couple of decoded frames are alive at any time, however long the video."""
    frames, most = [], [0]

    def counted(*args, **kwargs):
        for frame in iter_frames(*args, **kwargs):
            frames.append(weakref.ref(frame))
            most[0] = max(most[0], sum(ref() is not None for ref in frames))
            yield frame

    monkeypatch.setattr(pipeline, "iter_frames", counted)
    tracked = track_video(clip16, str(tmp_path / "out"), flame, size=48)
    assert tracked.seq.n_frames == 16 and isinstance(tracked.crops, np.memmap)
    assert most[0] <= 2, f"{most[0]} decoded frames were held at once"


def test_a_track_records_its_source_and_is_rebuilt_from_another(tmp_path, caplog):
    out = str(tmp_path / "x")
    run = lambda *flags: tracking_main(["demo", "--out", out, "--no-preview", *flags])  # noqa: E731
    run("--size", "64", "--max-frames", "6")
    source = read_json(os.path.join(out, "source.json"))
    assert source["size"] == 64 and source["max_frames"] == 6 and source["bbox"] is None
    assert source["video"]["path"] == os.path.abspath(os.path.join(out, "demo.mp4")) and len(source["flame"]) == 64
    with caplog.at_level("INFO"):
        run("--size", "48", "--max-frames", "5")
    assert "size was 64, now 48; max_frames was 6, now 5" in caplog.text
    again = track_video("demo", out, load_flame(), size=48, max_frames=5, preview=False)
    assert again.crops.shape == (5, 48, 48, 3) and again.seq.n_frames == 5
    other = str(tmp_path / "other.mp4")
    write_video(other, read_video(os.path.join(out, "demo.mp4"))[0][:4], 24)
    assert track_video(other, out, load_flame(), size=48, max_frames=5, preview=False).seq.n_frames == 4


def test_preview_batches_drawn_in_threads_are_written_in_order(tmp_path, monkeypatch):
    # Batches are drawn by PREVIEW_THREADS threads and may finish in any order; a batch that is slow to
    # draw (the first) must still come first. Each frame here is one grey level: its index.
    def draw(self, start, crops):
        time.sleep(0.05 if start == 0 else 0)
        return [np.full((32, 32, 3), 8 * (start + i), np.uint8) for i in range(len(crops))]

    monkeypatch.setattr(pipeline._PreviewDrawer, "draw", draw)
    drawer = pipeline._PreviewDrawer(None, None, None, str(tmp_path / "preview.mp4"), 10)
    for _ in range(3 * pipeline.PREVIEW_BATCH + 3):  # and a last, short batch
        drawer(np.zeros((32, 32, 3), np.uint8))
    drawer.close()
    frames, _ = read_video(str(tmp_path / "preview.mp4"))
    np.testing.assert_allclose(frames.mean((1, 2, 3)), 8 * np.arange(len(frames)), atol=2)
    assert len(frames) == 3 * pipeline.PREVIEW_BATCH + 3


def test_a_pass1_checkpoint_keeps_the_face_trackers_search_counts(tmp_path):
    """A resumed pass 1 searches each frame as an uninterrupted run would: the FaceTracker's counts (which
    searches a frame without a face runs) are saved with the landmarks and taken back."""
    tracker = FaceTracker(predictor=object())
    tracker.searched, tracker.misses = 7, 3
    path = str(tmp_path / "pass1.npz")
    pipeline._save_pass1(path, [None, None], [1], None, (36, 64), PeopleLog(), tracker, complete=False)
    resumed = FaceTracker(predictor=object())
    results, lost, state, shape, complete, _ = pipeline._load_pass1(path, resumed)
    assert (resumed.searched, resumed.misses) == (7, 3)
    assert results == [None, None] and lost == [1] and state is None and shape == (36, 64) and not complete
