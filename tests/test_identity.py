"""tracking/identity.py against dlib itself: its face chips and descriptors for real photos, stored by
tests/data/make_identity_reference.py (dlib in a venv of its own; see there)."""
import importlib.util
import os

import numpy as np
import pytest

from tracking.identity import SAME_PERSON, FaceNet, FaceNetFormatError, face_chip, face_net_path

DATA = os.path.join(os.path.dirname(__file__), "data")
# dlib and PyTorch sum the same float32 products in different orders: measured 3.6e-7 at most on
# descriptors whose entries reach 0.41; 1e-5 is float rounding, far below what tells people apart (0.6).
DESCRIPTOR_TOLERANCE = 1e-5


def _reference_photos():
    spec = importlib.util.spec_from_file_location("make_identity_reference",
                                                  os.path.join(DATA, "make_identity_reference.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.identity_photos()


@pytest.fixture(scope="module")
def reference():
    with np.load(os.path.join(DATA, "identity_reference.npz")) as saved:
        return {key: saved[key] for key in saved.files}


@pytest.fixture(scope="module")
def net():
    return FaceNet.load()


def test_the_network_gives_dlibs_descriptors(reference, net):
    ours = net(reference["chips"]).numpy()
    np.testing.assert_allclose(ours, reference["chip_descriptors"], rtol=0, atol=DESCRIPTOR_TOLERANCE)


def test_the_face_chip_is_dlibs_bit_for_bit(reference):
    photos = _reference_photos()
    assert "astronaut_tripled" in photos  # a face over twice the chip's size: cut from dlib's image pyramid
    for name, landmarks, chip in zip(reference["names"], reference["landmarks"], reference["chips"]):
        np.testing.assert_array_equal(face_chip(photos[name], landmarks), chip, err_msg=name)


def test_photo_to_descriptor_tells_people_apart_as_dlib_does(reference, net):
    photos = _reference_photos()
    chips = np.stack([face_chip(photos[n], lm) for n, lm in zip(reference["names"], reference["landmarks"])])
    ours = net(chips).numpy()
    np.testing.assert_allclose(ours, reference["descriptors"], rtol=0, atol=DESCRIPTOR_TOLERANCE)
    distance = np.linalg.norm(ours[:, None] - ours[None], axis=-1)
    astronaut = np.char.startswith(reference["names"].astype(str), "astronaut")
    assert distance[np.ix_(astronaut, astronaut)].max() < SAME_PERSON < distance[np.ix_(astronaut, ~astronaut)].min()


def test_a_damaged_model_file_is_one_readable_error(tmp_path):
    with open(face_net_path(), "rb") as f:
        head = f.read(50_000)
    truncated = tmp_path / "truncated.dat"
    truncated.write_bytes(head)
    with pytest.raises(FaceNetFormatError, match=f"{truncated}: not dlib's face recognition network"):
        FaceNet.load(str(truncated))
    other = tmp_path / "other.dat"
    other.write_bytes(b"\x01\x01" + bytes(range(256)) * 10)
    with pytest.raises(FaceNetFormatError, match="other.dat"):
        FaceNet.load(str(other))
