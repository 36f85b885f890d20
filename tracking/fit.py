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

Live tracking fits one frame at a time, the identity shape and focal fixed, warm-started from the
previous frame: `FrameFit` (a millisecond or two: Levenberg-Marquardt on tables folded once per track).
`fit_frame` states the same one-frame problem plainly, through `_Fit` and L-BFGS (about 100 ms a frame):
it is FrameFit's reference, for tests and benchmarks, the way kernels/ keeps a plain reference beside
each fast kernel.
"""
import contextlib
import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from .flame import GLOBAL, JAW, LEFT_EYE, N_CONTOUR, N_JOINTS, N_LANDMARKS, NECK, RIGHT_EYE, matrix_to_axis_angle
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
    """Fit one frame -> a one-frame FlameSequence, with the identity `shape` and the `focal` length fixed
    (the avatar's): head pose, translation, jaw, neck and expression. The reference of FrameFit, which
    live tracking uses: the same objective (`_Fit.loss` of one frame), minimised by L-BFGS through autograd.

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


# --------------------------------------------------------------------------- the live fit

# FLAME's kinematic tree read as three nested rotations: global, the neck under it, the jaw under the
# neck. The eyes hang from the neck and stay unrotated (not observable), so a landmark skinned to an
# eye joint moves exactly like one skinned to the neck: each joint's terms go to its rotation level.
_FLAME_PARENTS = [-1, GLOBAL, NECK, NECK, NECK]
_LEVEL = {GLOBAL: 0, NECK: 1, JAW: 2, LEFT_EYE: 1, RIGHT_EYE: 1}
# One frame's unknowns, in this order: global, neck and jaw axis-angles (rad), translation (m), expression.
_G, _N, _J, _T, _E = slice(0, 3), slice(3, 6), slice(6, 9), slice(9, 12), slice(12, None)
_RIGID_UNKNOWNS = np.r_[0:3, 9:12]


class FrameFit:
    """The live fit: one frame's 68 landmarks -> its FLAME parameters (a one-frame FlameSequence), with the
    identity `shape` and the `focal` length fixed (the avatar's): head pose, translation, jaw, neck and
    expression. Built once per track (flame, shape, focal, image size, config); a call takes a millisecond
    or two on one core (bench/tracking.py).

    It minimises `fit_frame`'s objective (the reference it is tested against): Charbonnier reprojection
    error with the contour weight on the jaw line, FitConfig's L2 priors on expression, jaw and neck, the
    same camera and the same dynamic contour. Not by L-BFGS through autograd but by Levenberg-Marquardt
    steps on the 136 residuals (the robust loss as iteratively reweighted least squares), from the
    previous frame's parameters. With the shape fixed, every landmark is affine in the frame's
    coefficients (expression, and the neck's and jaw's pose features R - I) at each rotation level, and
    so is every row of the contour table: those tables are folded once, here. A call needs no mesh: the
    landmarks are three nested 3x3 rotations of the tables, and their Jacobian is written out. In numpy,
    because at this size the per-operation overhead is the cost, and numpy's is a fraction of PyTorch's.
    """

    def __init__(self, flame, shape, focal, image_size, config=None, fps=25.0, max_steps=10, tolerance_px=0.05):
        if flame.parents != _FLAME_PARENTS:
            raise ValueError(f"FrameFit needs FLAME's kinematic tree (parents {_FLAME_PARENTS}), got {flame.parents}")
        config = config or FitConfig()
        self.focal, self.image_size, self.fps = float(focal), tuple(int(s) for s in image_size), float(fps)
        self.max_steps, self.tolerance_px, self.eps = max_steps, tolerance_px, config.charbonnier_px
        self.shape, self.n_exp = np.asarray(shape, np.float32), flame.n_exp
        weights = np.ones(N_LANDMARKS)
        weights[:N_CONTOUR] = config.contour_weight
        self.weights = weights / weights.sum()
        self.prior = np.zeros(12 + self.n_exp)
        self.prior[_N], self.prior[_J], self.prior[_E] = config.neck_prior, config.jaw_prior, config.expression_prior
        self._fold(flame)

    def _fold(self, flame):
        """The affine tables, columns (1, expression, neck R - I, jaw R - I), the identity shape folded in."""
        n_coeffs, shape = self.n_exp + 18, self.shape.astype(np.float64)
        f64 = lambda t: t.detach().double().numpy()

        def affine(template, shape_dirs, frame_dirs):  # flattened blendshapes -> (N, 1 + n_coeffs)
            return np.concatenate([(f64(template) + shape @ f64(shape_dirs))[:, None], f64(frame_dirs[:n_coeffs]).T], 1)

        joints = flame.lmk_joints
        points = affine(flame.lmk_points_template, flame.lmk_points_shape_dirs, flame.lmk_points_frame_dirs)
        self.points = _by_level(points.reshape(len(joints), 3, N_LANDMARKS, -1), joints)     # (level,3,68,1+C)
        self.weight_sums = _by_level(f64(flame.lmk_weight_sums), joints)                   # (level,68)
        rest = f64(flame.J_template) + np.einsum("s,sjk->jk", shape, f64(flame.J_dirs[:flame.n_shape]))
        dirs = np.zeros((N_JOINTS, 3, n_coeffs))
        dirs[..., :self.n_exp] = f64(flame.J_dirs[flame.n_shape:]).transpose(1, 2, 0)
        self.joints = np.concatenate([rest[..., None], dirs], 2)[[GLOBAL, NECK, JAW]]      # (level,3,1+C)
        self.contour, self._row, self._row_tables = None, None, None  # the tables of the last contour row used
        if flame.dynamic_contour:
            corners = affine(flame.contour_v_template, flame.contour_shape_dirs, flame.contour_frame_dirs)
            corners = corners.reshape(-1, 3, 1 + n_coeffs)[flame.contour_corners_local.numpy()]  # (row,17,corner,3,1+C)
            weights = f64(flame.contour_corner_weights)                                       # (row,17,corner,joint)
            points = np.einsum("rkcj,rkcaq->jrakq", weights, corners)
            self.contour = (np.moveaxis(_by_level(points, joints), 1, 0),                      # (row,level,3,17,1+C)
                            np.moveaxis(_by_level(weights.sum(2).transpose(2, 0, 1), joints), 1, 0))  # (row,level,17)

    def __call__(self, landmarks, previous=None):
        """landmarks (68, 2) pixels -> one-frame FlameSequence. previous: the previous frame's fit (its last
        frame is the warm start); None: the Procrustes pose, refined rigidly first, as in `fit_frame`."""
        target = np.asarray(landmarks, dtype=np.float64)
        if target.shape != (N_LANDMARKS, 2) or not np.isfinite(target).all():
            raise ValueError(f"landmarks must be finite with shape (68, 2), got {target.shape}")
        if previous is None:
            theta = self._solve(self._rigid_start(target), target, _RIGID_UNKNOWNS, 3 * self.max_steps)
            theta = self._solve(theta, target, slice(None), 3 * self.max_steps)
        else:
            names = ("global_rot", "neck_rot", "jaw_rot", "translation", "expression")
            theta = np.concatenate([np.asarray(getattr(previous, name)[-1], np.float64) for name in names])
            theta = self._solve(theta, target, slice(None), self.max_steps)
        one = lambda part: np.asarray(theta[part], np.float32)[None]
        return FlameSequence(shape=self.shape, expression=one(_E), global_rot=one(_G), neck_rot=one(_N),
                             jaw_rot=one(_J), eye_rots=np.zeros((1, 6), np.float32), translation=one(_T),
                             focal=self.focal, image_size=self.image_size, fps=self.fps)

    def _rigid_start(self, target):
        """The unknowns at the Procrustes pose of the neutral head (the start of fit_sequence and fit_frame)."""
        theta = np.zeros(12 + self.n_exp)
        rot, translation = _procrustes_init(self._pose(theta)[0].T, target[None], self.weights[None], self.focal,
                                            self.image_size, self.joints[0, :, 0])
        theta[_G], theta[_T] = matrix_to_axis_angle(rot[0]), translation[0]
        return theta

    def _solve(self, theta, target, free, max_steps):
        """Levenberg-Marquardt on the `free` unknowns: IRLS weights of the Charbonnier loss, Marquardt's
        diagonal damping, a step taken only when it lowers the objective. Stops when a step would move no
        landmark by more than `tolerance_px`, or when no step lowers the objective."""
        theta, pose = theta.copy(), self._pose(theta)
        loss, residual = self._loss(theta, pose, target)
        damping, prior = 1e-4, 2 * self.prior[free]
        for _ in range(max_steps):
            jacobian = self._jacobian(theta, pose)[:, free]
            irls = np.repeat(self.weights / np.sqrt((residual * residual).sum(1) + self.eps ** 2), 2)
            hessian = jacobian.T @ (irls[:, None] * jacobian) + np.diag(prior)
            gradient = jacobian.T @ (irls * residual.ravel()) + prior * theta[free]
            while True:
                step = np.linalg.solve(hessian + damping * np.diag(np.diag(hessian)), -gradient)
                if np.abs(jacobian @ step).max() < self.tolerance_px:
                    theta[free] += step
                    return theta
                trial = theta.copy()
                trial[free] += step
                trial_pose = self._pose(trial)
                trial_loss, trial_residual = self._loss(trial, trial_pose, target)
                if trial_loss < loss:
                    break
                damping *= 10  # (eventually the step is short enough to stop)
            theta, pose, loss, residual = trial, trial_pose, trial_loss, trial_residual
            damping = max(damping / 10, 1e-7)
        return theta

    def _loss(self, theta, pose, target):
        """fit_frame's objective (less its constant shape prior), and the residuals (68,2) in pixels."""
        residual = self._project(pose[0]) - target
        robust = np.sqrt((residual * residual).sum(1) + self.eps ** 2) - self.eps
        return self.weights @ robust + self.prior @ (theta * theta), residual

    def _project(self, points):
        """Pixels (68,2) of camera-space points (3,68) with OpenGL axes: opengl_to_opencv, then `project`."""
        height, width = self.image_size
        scale = self.focal / np.maximum(-points[2], 1e-4)
        return np.stack([points[0] * scale + width / 2, -points[1] * scale + height / 2], 1)

    def _pose(self, theta):
        """The landmarks (3,68) in camera space, and what their Jacobian reuses."""
        rots = [_rotation(theta[part]) for part in (_G, _N, _J)]
        points, sums = self._tables(rots[0] @ rots[1])
        coeffs = np.concatenate([[1.0], theta[_E], (rots[1] - np.eye(3)).ravel(), (rots[2] - np.eye(3)).ravel()])
        p, j, (a0, a1, a2) = points @ coeffs, self.joints @ coeffs, sums                  # (level,3,68), (level,3)
        # FLAME.skinned_landmarks' sum over joints of R_j p_j + a_j t_j, nested: jaw in neck in head
        jaw = p[2] - a2 * j[2, :, None]
        neck = p[1] - a1 * j[1, :, None] + rots[2] @ jaw + a2 * (j[2] - j[1])[:, None]
        head = p[0] - a0 * j[0, :, None] + rots[1] @ neck + (a1 + a2) * (j[1] - j[0])[:, None]
        world = rots[0] @ head + (a0 + a1 + a2) * j[0, :, None] + theta[_T, None]
        return world, rots, (head, neck, jaw), points, sums

    def _tables(self, head_rotation):
        """The landmark tables with the contour row that the head's yaw selects (as FLAME.contour_row)."""
        if self.contour is None:
            return self.points, self.weight_sums
        row = _contour_row(head_rotation)
        if row != self._row:
            points, sums = self.points.copy(), self.weight_sums.copy()
            points[:, :, :N_CONTOUR], sums[:, :N_CONTOUR] = self.contour[0][row], self.contour[1][row]
            self._row, self._row_tables = row, (points, sums)
        return self._row_tables

    def _jacobian(self, theta, pose):
        """d pixels / d unknowns (136, unknowns), rows (landmark, column | row)."""
        world, rots, parts, points, sums = pose
        levels = np.stack([rots[0], rots[0] @ rots[1], rots[0] @ rots[1] @ rots[2]])   # each level's world rotation
        # Affine in the coefficients: d/dcoeffs of sum_l W_l p_l and of the joints' terms of _pose,
        # (a0 + a1 + a2) (I - W_0) j_0 + (a1 + a2) (W_0 - W_1) j_1 + a2 (W_1 - W_2) j_2.
        turns = np.concatenate([np.eye(3)[None], levels])
        joint_terms = np.cumsum(sums[::-1], 0)[::-1].T @ ((turns[:-1] - turns[1:]) @ self.joints).reshape(3, -1)
        d_coeffs = ((levels.transpose(1, 0, 2).reshape(3, 9) @ points.reshape(9, -1)).reshape(3, N_LANDMARKS, -1)
                    + joint_terms.reshape(N_LANDMARKS, 3, -1).transpose(1, 0, 2))[..., 1:]
        d_world = np.empty((3, N_LANDMARKS, len(theta)))
        d_world[..., _E] = d_coeffs[..., :self.n_exp]
        d_world[..., _T] = np.eye(3)[:, None, :]
        # A level's rotation turns what hangs from it (head, neck, jaw) inside its parent's frame ...
        d_rots = np.stack([_rotation_derivatives(theta[part], rot) for part, rot in zip((_G, _N, _J), rots)])
        turned = (turns[:3, None] @ d_rots) @ np.stack(parts)[:, None]                  # (level,axis-angle,3,68)
        d_world[..., :9] = turned.reshape(9, 3, N_LANDMARKS).transpose(1, 2, 0)
        # ... and the neck's and jaw's drive the pose correctives through R - I.
        features = np.zeros((18, 6))
        features[:9, :3], features[9:, 3:] = d_rots[1].reshape(3, 9).T, d_rots[2].reshape(3, 9).T
        d_world[..., _N.start:_J.stop] += d_coeffs[..., self.n_exp:] @ features
        return self._project_jacobian(world, d_world)

    def _project_jacobian(self, points, d_points):
        """d pixels (136, unknowns) of `_project` from d points (3,68,unknowns)."""
        depth = -points[2]
        scale = np.where(depth > 1e-4, self.focal / depth, 0.0)[:, None]
        column = scale * (d_points[0] + (points[0] / depth)[:, None] * d_points[2])
        row = -scale * (d_points[1] + (points[1] / depth)[:, None] * d_points[2])
        return np.stack([column, row], 1).reshape(2 * N_LANDMARKS, -1)


def _by_level(per_joint, joints):
    """Arrays over the joints that move landmarks (first axis) -> over the 3 rotation levels (summed)."""
    levels = np.zeros((3,) + per_joint.shape[1:])
    for i, joint in enumerate(joints):
        levels[_LEVEL[joint]] += per_joint[i]
    return levels


def _rotation(axis_angle):
    """Rodrigues (3,3), as flame.axis_angle_to_matrix, in scalars (nine numbers cost less than numpy calls)."""
    x, y, z = axis_angle.tolist()
    angle = math.sqrt(x * x + y * y + z * z + 1e-16)  # smooth at zero, as axis_angle_to_matrix
    x, y, z, sin, cos = x / angle, y / angle, z / angle, math.sin(angle), math.cos(angle)
    c = 1 - cos
    return np.array([[cos + c * x * x, c * x * y - sin * z, c * x * z + sin * y],
                     [c * x * y + sin * z, cos + c * y * y, c * y * z - sin * x],
                     [c * x * z - sin * y, c * y * z + sin * x, cos + c * z * z]])


def _rotation_derivatives(axis_angle, rot):
    """dR/d axis_angle[i] (i,3,3) of R = _rotation(axis_angle): R [J_r e_i]x with J_r the right Jacobian of
    SO(3), J_r = I - (1 - cos)/angle K + (angle - sin)/angle K^2 (K: the axis' cross-product matrix), in scalars."""
    x, y, z = axis_angle.tolist()
    angle = math.sqrt(x * x + y * y + z * z + 1e-16)
    x, y, z = x / angle, y / angle, z / angle
    a, b = (1 - math.cos(angle)) / angle, (angle - math.sin(angle)) / angle
    columns = ((1 - b * (y * y + z * z), -a * z + b * x * y, a * y + b * x * z),
               (a * z + b * x * y, 1 - b * (x * x + z * z), -a * x + b * y * z),
               (-a * y + b * x * z, a * x + b * y * z, 1 - b * (x * x + y * y)))
    return rot @ np.array([[[0.0, -w, v], [w, 0.0, -u], [-v, u, 0.0]] for u, v, w in columns])


def _contour_row(rot):
    """flame.rotation_yaw_index of one rotation (3,3) in scalars: the head's yaw in whole degrees, rows 0..39
    for yaw 0..39 (clamped), 40..78 for -1..-39."""
    degrees = round(min(-math.degrees(math.atan2(-rot[2, 0], math.hypot(rot[0, 0], rot[1, 0]))), 39.0))
    return int(degrees if degrees >= 0 else min(39 - degrees, 78))


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
