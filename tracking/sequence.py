"""The FLAME sequence of a tracked video and its file, `seq.npz`: the contract between tracking,
training and sample.py.

Camera: camera space is FLAME space after the head rotation and translation (metres, x right,
y up, the camera at the origin looking along -z: OpenGL axes). A point (x, y, z) lands on pixel
u = cx + focal * x / -z, v = cy - focal * y / -z with (cx, cy) = (width / 2, height / 2), in
continuous pixel coordinates whose origin is the top-left corner of the image (the rasterizer's
projection after `tracking.render.opengl_to_opencv`).

seq.npz (version 1). T = frames.
  version        int64   ()          1
  image_size     int64   (2,)        (height, width) in pixels of the frames that were tracked
  focal          float32 ()          focal length in pixels (fx = fy); principal point = centre
  fps            float32 ()          frames per second
  flame_n_shape  int64   ()          number of identity components used (S)
  flame_n_exp    int64   ()          number of expression components used (E)
  shape          float32 (S,)        identity, shared by all frames
  expression     float32 (T, E)
  global_rot     float32 (T, 3)      axis-angle, radians: head rotation about the root joint
  neck_rot       float32 (T, 3)      axis-angle, radians
  jaw_rot        float32 (T, 3)      axis-angle, radians (+x opens the mouth)
  eye_rots       float32 (T, 6)      axis-angle, radians: left eye | right eye
  translation    float32 (T, 3)      camera space, metres (z < 0: in front of the camera)
  crop_boxes     float32 (T, 4)      optional, added by the pipeline: x0, y0, x1, y1 of each
                                     tracked frame in the original video's pixels
"""
import os
from dataclasses import dataclass

import numpy as np
import torch

from model.files import atomic_write

SEQ_VERSION = 1


class SeqFileError(ValueError):
    """A seq.npz file is missing, unreadable or does not follow the schema."""


@dataclass
class FlameSequence:
    """Per-video FLAME parameters (see the module docstring for shapes and units)."""
    shape: np.ndarray
    expression: np.ndarray
    global_rot: np.ndarray
    neck_rot: np.ndarray
    jaw_rot: np.ndarray
    eye_rots: np.ndarray
    translation: np.ndarray
    focal: float
    image_size: tuple
    fps: float
    crop_boxes: np.ndarray | None = None

    @property
    def n_frames(self):
        return len(self.expression)

    def to_npz_dict(self):
        d = {"version": np.int64(SEQ_VERSION), "image_size": np.asarray(self.image_size, np.int64),
             "focal": np.float32(self.focal), "fps": np.float32(self.fps),
             "flame_n_shape": np.int64(len(self.shape)), "flame_n_exp": np.int64(self.expression.shape[1])}
        for name in _PER_FRAME + ("shape",):
            d[name] = np.asarray(getattr(self, name), np.float32)
        if self.crop_boxes is not None:
            d["crop_boxes"] = np.asarray(self.crop_boxes, np.float32)
        return d

    def torch_params(self, frames=slice(None)):
        """Keyword arguments for FLAME.forward for the chosen frames (float32 tensors)."""
        t = lambda a: torch.as_tensor(np.asarray(a, np.float32))
        params = {name: t(getattr(self, name)[frames]) for name in _PER_FRAME}
        params["shape"] = t(self.shape)[None]
        return params


_PER_FRAME = ("expression", "global_rot", "neck_rot", "jaw_rot", "eye_rots", "translation")
_WIDTHS = {"global_rot": 3, "neck_rot": 3, "jaw_rot": 3, "eye_rots": 6, "translation": 3}


def save_seq(path, seq):
    """Write a FlameSequence to `path` (.npz) atomically."""
    with atomic_write(path) as tmp:
        np.savez(tmp, **seq.to_npz_dict())


def load_seq(path):
    """Read and validate a seq.npz -> FlameSequence; SeqFileError names the file and the bad key."""
    if not os.path.isfile(path):
        raise SeqFileError(f"{path}: file not found")
    try:
        f = np.load(path, allow_pickle=False)
        if isinstance(f, np.lib.npyio.NpzFile):
            with f:
                d = {k: f[k] for k in f.files}
    except (ValueError, OSError, EOFError) as e:
        raise SeqFileError(f"{path}: not a readable .npz file ({e})") from e
    if not isinstance(f, np.lib.npyio.NpzFile):  # np.load reads a bare .npy array whatever the file's name
        raise SeqFileError(f"{path}: a single .npy array, not a seq.npz archive of FLAME parameters")
    bad = lambda key, why: SeqFileError(f"{path}: key '{key}' {why}")
    for key in ("version", "image_size", "focal", "fps", "flame_n_shape", "flame_n_exp", "shape") + _PER_FRAME:
        if key not in d:
            raise bad(key, "is missing")
        if not np.all(np.isfinite(d[key])):
            raise bad(key, "contains NaN or infinite values")
    if int(d["version"]) != SEQ_VERSION:
        raise bad("version", f"is {int(d['version'])}, this code reads version {SEQ_VERSION}")
    n_frames, n_shape, n_exp = len(d["expression"]), int(d["flame_n_shape"]), int(d["flame_n_exp"])
    expected = {"image_size": (2,), "shape": (n_shape,), "expression": (n_frames, n_exp),
                **{k: (n_frames, w) for k, w in _WIDTHS.items()}}
    if "crop_boxes" in d:
        expected["crop_boxes"] = (n_frames, 4)
    for key, shape in expected.items():
        if d[key].shape != shape:
            raise bad(key, f"has shape {d[key].shape}, expected {shape}")
    for key in ("focal", "fps", "image_size"):
        if (d[key] <= 0).any():
            raise bad(key, "must be positive")
    if n_frames == 0:
        raise SeqFileError(f"{path}: holds 0 frames")
    return FlameSequence(
        shape=d["shape"], **{k: d[k] for k in _PER_FRAME}, focal=float(d["focal"]),
        image_size=tuple(int(n) for n in d["image_size"]), fps=float(d["fps"]),
        crop_boxes=d.get("crop_boxes"))
