"""Fit FLAME to a video's 2D landmarks, and the `seq.npz` file that carries the result.

Fitting: one identity shape and one pinhole camera per video; per frame the expression, jaw,
neck, head rotation and translation. Landmarks are the 68 iBUG points in pixels. The loss is a
robust (Charbonnier) reprojection error plus L2 priors on shape/expression/jaw/neck and
penalties on the second differences of every per-frame parameter over time. All frames are
optimised together (batched L-BFGS): a closed-form scaled-orthographic Procrustes fit gives each
frame's head rotation and translation, a rigid stage refines them (and the focal length), a
second stage adds the identity shape and jaw, a third the expression and neck. Because all
frames are solved at once and tied by the smoothness terms, no sequential frame-to-frame warm
start is needed. Eye rotations are not observable from the 68 iBUG points (no pupils) and stay
zero. Neck and global rotation are nearly interchangeable under landmarks (both turn the head);
the neck prior decides the split, and evaluation should compare their composition
(`head_rotation`).

Camera: camera space is FLAME space after the head rotation and translation (metres, x right,
y up, the camera at the origin looking along -z, OpenGL style). A point (x, y, z) lands on
pixel u = cx + focal * x / -z, v = cy - focal * y / -z with (cx, cy) = (width / 2, height / 2),
in continuous pixel coordinates whose origin is the top-left corner of the image.

seq.npz (version 1), the contract between tracking, training and sample.py. T = frames.
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
import contextlib
import os
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from .flame import GLOBAL, axis_angle_to_matrix, matrix_to_axis_angle

SEQ_VERSION = 1


class SeqFileError(ValueError):
    """A seq.npz file is missing, unreadable or does not follow the schema."""


# --------------------------------------------------------------------------- the sequence

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
    """Write a FlameSequence to `path` (.npz) atomically: a temp file, then os.replace."""
    tmp = f"{path}.tmp.npz"
    try:
        np.savez(tmp, **seq.to_npz_dict())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_seq(path):
    """Read and validate a seq.npz -> FlameSequence; SeqFileError names the file and the bad key."""
    if not os.path.isfile(path):
        raise SeqFileError(f"{path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as f:
            d = {k: f[k] for k in f.files}
    except (ValueError, OSError, EOFError) as e:
        raise SeqFileError(f"{path}: not a readable .npz file ({e})") from e
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
    if float(d["focal"]) <= 0 or (d["image_size"] <= 0).any():
        raise bad("focal" if float(d["focal"]) <= 0 else "image_size", "must be positive")
    return FlameSequence(
        shape=d["shape"], **{k: d[k] for k in _PER_FRAME}, focal=float(d["focal"]),
        image_size=tuple(int(n) for n in d["image_size"]), fps=float(d["fps"]),
        crop_boxes=d.get("crop_boxes"))


# --------------------------------------------------------------------------- camera

def project(points, focal, image_size):
    """Camera-space points (...,3) -> pixels (...,2) (convention in the module docstring)."""
    height, width = image_size
    depth = (-points[..., 2]).clamp(min=1e-4)
    u = width / 2 + focal * points[..., 0] / depth
    v = height / 2 - focal * points[..., 1] / depth
    return torch.stack([u, v], -1)


def default_focal(image_size):
    """Initial focal length in pixels: a ~45 degree field of view across the larger side."""
    return 1.2 * max(image_size)


# --------------------------------------------------------------------------- fitting

@dataclass
class FitConfig:
    rigid_iters: int = 40               # L-BFGS iterations: head pose (and focal) only ...
    shape_iters: int = 80               # ... + identity shape and jaw (expression held at zero) ...
    full_iters: int = 200               # ... + expression and neck
    fit_focal: bool = True
    focal: float | None = None          # initial (or, with fit_focal False, fixed) focal; None: default
    charbonnier_px: float = 1.0         # robust loss: quadratic below ~this many pixels, linear above
    contour_weight: float = 0.5         # jaw-line points (0..16) are the least reliable detections
    shape_prior: float = 0.03           # L2 weights per coefficient (FLAME coefficients ~ N(0, 1)),
    expression_prior: float = 0.03      # relative to the mean per-landmark robust error
    jaw_prior: float = 1.0
    neck_prior: float = 10.0            # neck and global rotation are nearly interchangeable
    smooth_rotation: float = 1e3        # second differences of rotations (rad) ...
    smooth_translation: float = 1e4     # ... translation (m) ...
    smooth_expression: float = 1.0      # ... and expression / jaw coefficients
    threads: int | None = 1             # PyTorch intra-op threads while fitting (None: as set). The
    # tensors are small (frames x 68 landmarks): a second thread gains little on an idle machine
    # and makes every op wait for a busy core when another process runs.


def _procrustes_init(model_points, observed, weights, focal, image_size, root):
    """Per-frame head rotation (T,3,3) and translation (T,3) from a scaled-orthographic fit.

    model_points (68,3): landmarks of the neutral head; observed (T,68,2) pixels; weights (T,68).
    """
    height, width = image_size
    up_right = np.stack([observed[..., 0] - width / 2, height / 2 - observed[..., 1]], -1)
    w = weights[..., None]
    w_sum = w.sum(1, keepdims=True).clip(1e-9)
    x_mean = (w * model_points).sum(1, keepdims=True) / w_sum               # (T,1,3)
    q_mean = (w * up_right).sum(1, keepdims=True) / w_sum                   # (T,1,2)
    x_c, q_c = model_points - x_mean, up_right - q_mean
    # least-squares affine camera q_c ~ A x_c, then its nearest scaled rotation
    xtx = np.einsum("tni,tnj->tij", w * x_c, x_c) + 1e-9 * np.eye(3)
    qtx = np.einsum("tni,tnj->tij", w * q_c, x_c)
    affine = qtx @ np.linalg.inv(xtx)                                        # (T,2,3)
    u, s, vt = np.linalg.svd(affine, full_matrices=False)
    rows = u @ vt                                                            # orthonormal (T,2,3)
    rot = np.concatenate([rows, np.cross(rows[:, 0], rows[:, 1])[:, None]], 1)
    scale = s.mean(1).clip(1e-9)                   # pixels per metre (0 for frames without points)
    depth = focal / scale
    centre = np.concatenate([q_mean[:, 0] * (depth / focal)[:, None], -depth[:, None]], 1)
    # FLAME rotates about the root joint: x -> R (x - root) + root + translation
    rotated_mean = np.einsum("tij,tj->ti", rot, x_mean[:, 0] - root) + root
    return rot, centre - rotated_mean


def _fill_invalid(values, frame_ok):
    """Copy each invalid frame's value from the nearest valid frame."""
    valid = np.nonzero(frame_ok)[0]
    nearest = valid[np.abs(np.arange(len(frame_ok))[:, None] - valid[None]).argmin(1)]
    return values[nearest]


def _charbonnier(residual, eps):
    return torch.sqrt((residual * residual).sum(-1) + eps * eps) - eps


def _second_diff(x):
    return (x[2:] - 2 * x[1:-1] + x[:-2]).square().sum() if len(x) > 2 else x.sum() * 0


# Optimisation variables are stored in units that move the landmarks by very roughly a pixel,
# so that one optimiser (and L-BFGS's curvature estimate) suits all of them.
_UNITS = {"global_rot": 0.01, "neck_rot": 0.01, "jaw_rot": 0.01, "translation": (1e-3, 1e-3, 1e-2),
          "shape": 1.0, "expression": 1.0, "log_focal": 0.01}
_RIGID = ("global_rot", "translation")


class _Fit:
    """Optimisation state: normalised variables (physical value = variable * unit) and the loss."""

    def __init__(self, flame, landmarks, weights, image_size, config):
        self.flame, self.config, self.image_size = flame, config, image_size
        self.target = torch.as_tensor(landmarks, dtype=torch.float32)
        self.weights = torch.as_tensor(weights, dtype=torch.float32)
        n_frames = len(landmarks)
        focal = config.focal or default_focal(image_size)
        global_rot, translation = self._rigid_init(landmarks, weights, focal)
        init = {"shape": torch.zeros(flame.n_shape), "expression": torch.zeros(n_frames, flame.n_exp),
                "jaw_rot": torch.zeros(n_frames, 3), "neck_rot": torch.zeros(n_frames, 3),
                "global_rot": global_rot, "translation": translation,
                "log_focal": torch.tensor(float(np.log(focal)))}
        self.units = {k: torch.tensor(_UNITS[k], dtype=torch.float32) for k in init}
        self.vars = {k: (v / self.units[k]).float().requires_grad_() for k, v in init.items()}

    def _rigid_init(self, landmarks, weights, focal):
        with torch.no_grad():
            neutral = self.flame(torch.zeros(1, 1), torch.zeros(1, 1), landmarks_only=True)[1][0]
        frame_ok = (weights > 0).sum(1) >= 6
        if not frame_ok.any():
            raise ValueError("no frame has 6 or more valid landmarks to fit")
        rot, trans = _procrustes_init(neutral.double().numpy(), landmarks, weights, focal,
                                      self.image_size, self.flame.J_template[GLOBAL].double().numpy())
        rot, trans = _fill_invalid(rot, frame_ok), _fill_invalid(trans, frame_ok)
        return torch.tensor(matrix_to_axis_angle(rot)), torch.tensor(trans)

    def values(self):
        return {k: v * self.units[k] for k, v in self.vars.items()}

    def loss(self):
        c, p = self.config, self.values()
        _, lmk3d = self.flame(p["shape"][None], p["expression"], p["global_rot"], p["neck_rot"],
                              p["jaw_rot"], translation=p["translation"], landmarks_only=True)
        residual = project(lmk3d, p["log_focal"].exp(), self.image_size) - self.target
        data = (self.weights * _charbonnier(residual, c.charbonnier_px)).sum() / self.weights.sum().clamp(min=1)
        n = len(self.target)
        prior = (c.shape_prior * p["shape"].square().sum()
                 + (c.expression_prior * p["expression"].square().sum()
                    + c.jaw_prior * p["jaw_rot"].square().sum()
                    + c.neck_prior * p["neck_rot"].square().sum()) / n)
        smooth = (c.smooth_rotation * (_second_diff(p["global_rot"]) + _second_diff(p["neck_rot"]))
                  + c.smooth_translation * _second_diff(p["translation"])
                  + c.smooth_expression * (_second_diff(p["expression"]) + _second_diff(p["jaw_rot"]))) / n
        return data + prior + smooth

    def optimise(self, names, iters):
        """L-BFGS with a strong-Wolfe line search over the named variables (the rest stay fixed)."""
        opt = torch.optim.LBFGS([self.vars[k] for k in names], max_iter=iters, history_size=20,
                                line_search_fn="strong_wolfe", tolerance_grad=1e-7, tolerance_change=1e-9)

        def closure():
            opt.zero_grad(set_to_none=True)
            loss = self.loss()
            loss.backward()
            return loss

        opt.step(closure)

    def result(self, fps):
        p = {k: v.detach() for k, v in self.values().items()}
        np32 = lambda name: p[name].numpy().astype(np.float32)
        return FlameSequence(
            shape=np32("shape"), expression=np32("expression"), global_rot=np32("global_rot"),
            neck_rot=np32("neck_rot"), jaw_rot=np32("jaw_rot"),
            eye_rots=np.zeros((len(self.target), 6), np.float32), translation=np32("translation"),
            focal=float(p["log_focal"].exp()), image_size=tuple(int(s) for s in self.image_size), fps=float(fps))


def fit_sequence(flame, landmarks, image_size, fps=25.0, confidence=None, config=None):
    """Fit FLAME to 2D landmarks -> FlameSequence.

    flame: tracking.flame.FLAME (its n_shape / n_exp are the fitted sizes).
    landmarks: (T,68,2) pixels; image_size: (height, width); confidence: optional (T,68) or (T,)
    weights in [0, 1] (0 = missing detection; a frame with < 6 valid points is filled in by the
    smoothness terms). config: FitConfig.
    """
    config = config or FitConfig()
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.ndim != 3 or landmarks.shape[1:] != (68, 2):
        raise ValueError(f"landmarks must have shape (T, 68, 2), got {landmarks.shape}")
    weights = np.ones(landmarks.shape[:2]) if confidence is None else np.asarray(confidence, np.float64)
    weights = np.broadcast_to(weights.reshape(len(landmarks), -1), landmarks.shape[:2]).copy()
    weights[~np.isfinite(landmarks).all(-1)] = 0
    landmarks = np.nan_to_num(landmarks)
    weights[:, :17] *= config.contour_weight
    focal = ("log_focal",) if config.fit_focal else ()
    with torch.enable_grad(), _intra_op_threads(config.threads):
        fit = _Fit(flame, landmarks, weights, tuple(image_size), config)
        # Freedom is added in stages: the per-frame expression could otherwise absorb pose errors
        # of the neutral-face initialisation, so pose and the shared shape settle first.
        fit.optimise(_RIGID + focal, config.rigid_iters)
        fit.optimise(_RIGID + focal + ("shape", "jaw_rot"), config.shape_iters)
        fit.optimise(_RIGID + focal + ("shape", "jaw_rot", "expression", "neck_rot"), config.full_iters)
    return fit.result(fps)


@contextlib.contextmanager
def _intra_op_threads(threads):
    """Run the block with `threads` PyTorch intra-op threads (None: unchanged), then restore."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --------------------------------------------------------------------------- evaluation helpers

def head_rotation(global_rot, neck_rot):
    """(T,3,3) rotation of the head in camera space: the global rotation composed with the neck."""
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float64)
    return (axis_angle_to_matrix(t(global_rot)) @ axis_angle_to_matrix(t(neck_rot))).numpy()


def rotation_error_degrees(rot_a, rot_b):
    """Geodesic angle (degrees) between two batches of rotation matrices."""
    cos = (np.einsum("tij,tij->t", rot_a, rot_b) - 1) / 2
    return np.degrees(np.arccos(np.clip(cos, -1, 1)))


def seq_landmarks_2d(flame, seq):
    """Pixel landmarks (T,68,2) of a FlameSequence, as its camera sees them."""
    with torch.no_grad():
        _, lmk3d = flame(**seq.torch_params(), landmarks_only=True)
        return project(lmk3d, seq.focal, seq.image_size).numpy()


def _smooth_trajectory(rng, n_frames, n_dims, amplitude, fps, n_waves=3):
    """Sum of a few random slow sinusoids (0.2-0.8 Hz, like head motion) per dimension: (T, n_dims)."""
    t = np.arange(n_frames)[:, None, None] / fps
    freq = rng.uniform(0.2, 0.8, size=(n_waves, n_dims))
    phase = rng.uniform(0, 2 * np.pi, size=(n_waves, n_dims))
    waves = np.sin(2 * np.pi * freq * t + phase).sum(1) / np.sqrt(n_waves)
    return waves * np.asarray(amplitude)


def synthetic_sequence(flame, n_frames, image_size=(512, 512), focal=700.0, fps=25.0, seed=0):
    """A random smooth FlameSequence (known ground truth) for tests and benchmarks."""
    rng = np.random.default_rng(seed)
    exp_std = 1.0 / (1 + np.arange(flame.n_exp) / 5)
    wave = lambda n_dims, amplitude: _smooth_trajectory(rng, n_frames, n_dims, amplitude, fps)
    jaw = wave(3, [0.1, 0.01, 0.01])
    jaw[:, 0] = np.abs(jaw[:, 0]) + 0.02                                     # open, never through the skull
    translation = wave(3, [0.02, 0.02, 0.03]) + [0, 0, -0.6]
    f32 = lambda a: np.asarray(a, np.float32)
    return FlameSequence(
        shape=f32(rng.normal(size=flame.n_shape) * 0.8 / (1 + np.arange(flame.n_shape) / 10)),
        expression=f32(wave(flame.n_exp, 0.8 * exp_std)),
        global_rot=f32(wave(3, [0.15, 0.4, 0.08])),
        neck_rot=f32(wave(3, [0.05, 0.05, 0.02])),
        jaw_rot=f32(jaw), eye_rots=np.zeros((n_frames, 6), np.float32), translation=f32(translation),
        focal=focal, image_size=tuple(image_size), fps=fps)


def measure_fit_speed(flame, n_frames=300, threads=1, config=None, seed=0):
    """Fit a synthetic n_frames sequence with `threads` intra-op threads; returns {'fps', 'seconds',
    'cpu_seconds', 'frames'} (fit only; CPU time of this process, which on a busy machine says
    more than the wall clock)."""
    truth = synthetic_sequence(flame, n_frames, seed=seed)
    observed = seq_landmarks_2d(flame, truth)
    start, start_cpu = time.perf_counter(), time.process_time()
    fit_sequence(flame, observed, truth.image_size, truth.fps, config=replace(config or FitConfig(), threads=threads))
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    return {"fps": n_frames / seconds, "seconds": seconds, "cpu_seconds": cpu_seconds, "frames": n_frames}
