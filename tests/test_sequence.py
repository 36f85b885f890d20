"""The seq.npz contract (tracking/sequence.py): its camera convention, round trip and bad files."""
import os

import numpy as np
import pytest
import torch

from tracking.render import opengl_to_opencv, project
from tracking.sequence import FlameSequence, SeqFileError, load_seq, save_seq


def test_project_convention():
    """The sequence's camera (OpenGL axes, tracking/sequence.py) through the one projection."""
    points = torch.tensor([[0.0, 0.0, -1.0], [0.1, 0.0, -1.0], [0.0, 0.1, -1.0]])
    pixels = project(opengl_to_opencv(points)[None], 100.0, (200, 300))[0]
    np.testing.assert_allclose(pixels.numpy(), [[150, 100], [160, 100], [150, 90]])


def _sequence(n_frames=4, crop=True):
    rng = np.random.default_rng(0)
    r = lambda *s: rng.normal(size=s).astype(np.float32)
    return FlameSequence(shape=r(100), expression=r(n_frames, 50), global_rot=r(n_frames, 3),
                         neck_rot=r(n_frames, 3), jaw_rot=r(n_frames, 3), eye_rots=r(n_frames, 6),
                         translation=r(n_frames, 3), focal=700.0, image_size=(512, 384), fps=30.0,
                         crop_boxes=r(n_frames, 4) if crop else None)


def test_seq_round_trip(tmp_path):
    path = str(tmp_path / "seq.npz")
    for seq in (_sequence(crop=True), _sequence(crop=False)):
        save_seq(path, seq)
        back = load_seq(path)
        for key, value in seq.to_npz_dict().items():
            np.testing.assert_array_equal(back.to_npz_dict()[key], value)
        assert back.image_size == (512, 384) and back.n_frames == 4
        assert (back.crop_boxes is None) == (seq.crop_boxes is None)
    assert os.listdir(tmp_path) == ["seq.npz"]  # no temporary file left behind
    d = np.load(path)
    assert d["expression"].dtype == np.float32 and d["version"].dtype == np.int64


def _write(path, d):
    np.savez(path, **d)
    return str(path)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("jaw_rot"), "'jaw_rot' is missing"),
    (lambda d: d["expression"].__setitem__((1, 2), np.nan), "'expression' contains NaN"),
    (lambda d: d.__setitem__("neck_rot", np.zeros((3, 3), np.float32)), r"'neck_rot' has shape \(3, 3\)"),
    (lambda d: d.__setitem__("shape", np.zeros(7, np.float32)), r"'shape' has shape \(7,\)"),
    (lambda d: d.__setitem__("version", np.int64(99)), "'version' is 99"),
    (lambda d: d.__setitem__("focal", np.float32(-1)), "'focal' must be positive"),
    (lambda d: d.__setitem__("fps", np.float32(0)), "'fps' must be positive"),
])
def test_load_seq_rejects_bad_files(tmp_path, change, message):
    d = _sequence().to_npz_dict()
    change(d)
    path = _write(tmp_path / "bad.npz", d)
    with pytest.raises(SeqFileError, match="bad.npz.*" + message):
        load_seq(path)


def test_load_seq_rejects_missing_and_garbage(tmp_path):
    with pytest.raises(SeqFileError, match="nothere.npz.*not found"):
        load_seq(str(tmp_path / "nothere.npz"))
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    with pytest.raises(SeqFileError, match="garbage.npz"):
        load_seq(str(garbage))


def test_load_seq_rejects_an_npy_and_an_empty_sequence(tmp_path):
    renamed = tmp_path / "renamed.npz"
    with open(renamed, "wb") as f:
        np.save(f, np.zeros((4, 50), np.float32))
    with pytest.raises(SeqFileError, match="renamed.npz: a single .npy array, not a seq.npz archive"):
        load_seq(str(renamed))
    empty = _sequence(n_frames=0)
    with pytest.raises(SeqFileError, match="empty.npz: holds 0 frames"):
        load_seq(_write(tmp_path / "empty.npz", empty.to_npz_dict()))
