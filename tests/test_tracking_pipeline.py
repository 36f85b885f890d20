"""The tracking pipeline end to end on a real (demo) video, and its errors on bad input."""
import os
import subprocess
import sys

import numpy as np
import pytest

from bench.tracking import seq_landmarks_2d
from tracking.conditioning import CONDITIONING_CHANNELS, render_conditioning
from tracking.demo import write_demo_video
from tracking.pipeline import TrackingError, check_gaps, load_flame, track_video
from tracking.sequence import load_seq
from tracking.video import read_video, write_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def flame():
    return load_flame()


@pytest.fixture(scope="module")
def demo_video(tmp_path_factory):
    return write_demo_video(str(tmp_path_factory.mktemp("demo") / "demo.mp4"), n_frames=8)


def test_demo_video_tracks_end_to_end(demo_video, flame, tmp_path):
    out = str(tmp_path / "track")
    tracked = track_video(demo_video, out, flame, size=96)
    assert sorted(os.listdir(out)) == ["crops.npy", "landmarks.npy", "preview.mp4", "seq.npz", "source.json"]
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
    for video in (str(bad), str(tmp_path / "missing.mp4")):
        r = subprocess.run([sys.executable, "-m", "tracking", video, "--out", str(tmp_path / "o")], cwd=ROOT,
                           capture_output=True, text=True)
        assert r.returncode != 0 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert not (tmp_path / "o" / "seq.npz").exists()
