"""Fit FLAME to a video's 2D landmarks -> FlameSequence (tracking/sequence.py, which also states the camera).

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
(`head_rotation` in tests/test_fit.py).

Landmarks are projected with the rasterizer's `project` after `opengl_to_opencv` (the sequence's
camera space has OpenGL axes), so the fitted mesh renders where the landmarks were seen.
"""
import contextlib
from dataclasses import dataclass, replace

import numpy as np
import torch

from .flame import GLOBAL, matrix_to_axis_angle
from .render import opengl_to_opencv, project
from .sequence import FlameSequence


def default_focal(image_size):
    """Initial focal length in pixels: a ~45 degree field of view across the larger side."""
    return 1.2 * max(image_size)


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
        residual = project(opengl_to_opencv(lmk3d), p["log_focal"].exp(), self.image_size) - self.target
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


def fit_sequence(flame, landmarks, image_size, fps=25.0, confidence=None, config=None, shape=None):
    """Fit FLAME to 2D landmarks -> FlameSequence.

    flame: tracking.flame.FLAME (its n_shape / n_exp are the fitted sizes).
    landmarks: (T,68,2) pixels; image_size: (height, width); confidence: optional (T,68) or (T,)
    weights in [0, 1] (0 = missing detection; a frame with < 6 valid points is filled in by the
    smoothness terms). config: FitConfig. shape: a fixed identity (n_shape,), e.g. an avatar's when
    tracking another video of its person; None: fitted.
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
    with torch.enable_grad(), intra_op_threads(config.threads):
        fit = _Fit(flame, landmarks, weights, tuple(image_size), config)
        identity = ("shape",) if shape is None else ()
        if shape is not None:
            with torch.no_grad():
                fit.vars["shape"].copy_(torch.as_tensor(np.asarray(shape, np.float32)) / fit.units["shape"])
        # Freedom is added in stages: the per-frame expression could otherwise absorb pose errors
        # of the neutral-face initialisation, so pose and the shared shape settle first.
        fit.optimise(_RIGID + focal, config.rigid_iters)
        fit.optimise(_RIGID + focal + identity + ("jaw_rot",), config.shape_iters)
        fit.optimise(_RIGID + focal + identity + ("jaw_rot", "expression", "neck_rot"), config.full_iters)
    return fit.result(fps)


def fit_frame(flame, landmarks, image_size, shape, focal, previous=None, iters=20, fps=25.0, config=None):
    """Fit one frame (live tracking) -> a one-frame FlameSequence, with the identity `shape` and the
    `focal` length fixed (the avatar's): head pose, translation, jaw, neck and expression.

    landmarks: (68, 2) pixels. previous: the previous frame's one-frame FlameSequence, the warm start
    (a frame moves little, so `iters` L-BFGS iterations from there suffice); None: the Procrustes pose,
    refined rigidly first as in `fit_sequence`.
    """
    config = replace(config or FitConfig(), focal=float(focal), fit_focal=False)
    landmarks = np.asarray(landmarks, dtype=np.float64)[None]
    if landmarks.shape != (1, 68, 2) or not np.isfinite(landmarks).all():
        raise ValueError(f"landmarks must be finite with shape (68, 2), got {landmarks.shape[1:]}")
    weights = np.ones(landmarks.shape[:2])
    weights[:, :17] *= config.contour_weight
    with torch.enable_grad(), intra_op_threads(config.threads):
        fit = _Fit(flame, landmarks, weights, tuple(image_size), config)
        with torch.no_grad():
            fit.vars["shape"].copy_(torch.as_tensor(np.asarray(shape, np.float32)) / fit.units["shape"])
            for name in ("expression", "global_rot", "neck_rot", "jaw_rot", "translation") if previous else ():
                fit.vars[name].copy_(torch.as_tensor(getattr(previous, name)) / fit.units[name])
        if previous is None:
            fit.optimise(_RIGID, config.rigid_iters)
        fit.optimise(_RIGID + ("jaw_rot", "expression", "neck_rot"), iters)
    return fit.result(fps)


@contextlib.contextmanager
def intra_op_threads(threads):
    """Run the block with `threads` PyTorch intra-op threads (None: unchanged), then restore."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
