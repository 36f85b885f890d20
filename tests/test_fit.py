"""FLAME fitting on a synthetic toy-head video with known parameters."""
import numpy as np
import pytest
import torch

from bench.tracking import seq_landmarks_2d, synthetic_sequence
from tracking import fit, flame, toyhead
from tracking.fit import FitConfig
from tracking.render import opengl_to_opencv, project

IMAGE_SIZE, FOCAL = (512, 512), 700.0


@pytest.fixture(scope="module")
def toy_flame(tmp_path_factory):
    paths = toyhead.write_toy_flame(str(tmp_path_factory.mktemp("toy")))
    return flame.FLAME.from_files(paths["generic_model.pkl"], paths["landmark_embedding.npy"],
                                  n_shape=100, n_exp=50)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def head_rotation(global_rot, neck_rot):
    """(T,3,3) rotation of the head in camera space: the global rotation composed with the neck."""
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float64)
    return (flame.axis_angle_to_matrix(t(global_rot)) @ flame.axis_angle_to_matrix(t(neck_rot))).numpy()


def rotation_error_degrees(rot_a, rot_b):
    """Geodesic angle (degrees) between two batches of rotation matrices."""
    cos = (np.einsum("tij,tij->t", rot_a, rot_b) - 1) / 2
    return np.degrees(np.arccos(np.clip(cos, -1, 1)))


def _noisy_observation(toy_flame, n_frames, seed):
    truth = synthetic_sequence(toy_flame, n_frames, IMAGE_SIZE, FOCAL, seed=seed)
    clean = seq_landmarks_2d(toy_flame, truth)
    noisy = clean + np.random.default_rng(seed).normal(scale=0.5, size=clean.shape)
    return truth, clean, noisy


def test_fit_recovers_synthetic_sequence(toy_flame):
    """60 frames of smooth random shape/expression/jaw/pose, 0.5 px landmark noise, known focal."""
    truth, clean, noisy = _noisy_observation(toy_flame, 60, seed=0)
    result = fit.fit_sequence(toy_flame, noisy, IMAGE_SIZE, fps=truth.fps,
                              config=FitConfig(focal=FOCAL, fit_focal=False))
    reprojection = np.linalg.norm(seq_landmarks_2d(toy_flame, result) - clean, axis=-1)
    rotation = rotation_error_degrees(head_rotation(result.global_rot, result.neck_rot),
                                      head_rotation(truth.global_rot, truth.neck_rot))
    assert reprojection.mean() <= 1.0, reprojection.mean()
    assert rotation.mean() <= 2.0, rotation.mean()
    assert np.abs(result.jaw_rot[:, 0] - truth.jaw_rot[:, 0]).mean() < np.abs(truth.jaw_rot[:, 0]).mean() / 2
    assert result.expression.shape == (60, 50) and result.shape.shape == (100,)
    assert not result.eye_rots.any()


def test_procrustes_init_recovers_rigid_pose(toy_flame):
    """On a neutral face seen from afar (nearly orthographic), the closed-form init is exact."""
    n_frames, focal = 5, 200000.0
    rng = np.random.default_rng(0)
    rot = torch.tensor(rng.normal(scale=0.3, size=(n_frames, 3)), dtype=torch.float32)
    trans = torch.tensor([[0.01, -0.02, -200.0]]).repeat(n_frames, 1)
    with torch.no_grad():
        _, lmk = toy_flame(torch.zeros(1, 1), torch.zeros(1, 1), global_rot=rot, translation=trans)
        neutral = toy_flame(torch.zeros(1, 1), torch.zeros(1, 1))[1][0]
    observed = project(opengl_to_opencv(lmk), focal, IMAGE_SIZE).numpy()
    got_rot, got_trans = fit._procrustes_init(neutral.double().numpy(), observed, np.ones((n_frames, 68)),
                                              focal, IMAGE_SIZE, toy_flame.J_template[0].double().numpy())
    want_rot = flame.axis_angle_to_matrix(rot.double()).numpy()
    assert rotation_error_degrees(got_rot, want_rot).max() < 0.1
    np.testing.assert_allclose(got_trans[:, :2], trans[:, :2].numpy(), atol=2e-3)
    np.testing.assert_allclose(got_trans[:, 2], trans[:, 2].numpy(), rtol=1e-3)


def test_missing_detections_are_bridged(toy_flame):
    truth, clean, noisy = _noisy_observation(toy_flame, 12, seed=1)
    confidence = np.ones((12, 68))
    confidence[5] = 0                  # a frame without a face
    noisy[7, 30] = np.nan              # and one missing point
    result = fit.fit_sequence(toy_flame, noisy, IMAGE_SIZE, config=FitConfig(
        focal=FOCAL, fit_focal=False, rigid_iters=20, shape_iters=20, full_iters=40), confidence=confidence)
    assert all(np.isfinite(v).all() for v in result.to_npz_dict().values())
    neighbours = (result.translation[4] + result.translation[6]) / 2
    assert np.abs(result.translation[5] - neighbours).max() < 0.01


def test_fit_runs_on_its_own_thread_count(toy_flame, monkeypatch):
    """Small tensors: the fit pins PyTorch to FitConfig.threads, and restores the caller's count."""
    seen, loss = [], fit._Fit.loss
    monkeypatch.setattr(fit._Fit, "loss", lambda self: seen.append(torch.get_num_threads()) or loss(self))
    torch.set_num_threads(2)
    _, _, noisy = _noisy_observation(toy_flame, 3, seed=2)
    fit.fit_sequence(toy_flame, noisy, IMAGE_SIZE, config=FitConfig(
        focal=FOCAL, fit_focal=False, rigid_iters=2, shape_iters=2, full_iters=2, threads=1))
    assert seen and set(seen) == {1} and torch.get_num_threads() == 2


def test_a_fixed_identity_shape_is_kept(toy_flame):
    """shape=...: the identity is not fitted (evaluate.py tracks another video of an avatar's person with the
    avatar's shape); the pose still is, as well as with the shape fitted."""
    truth, clean, noisy = _noisy_observation(toy_flame, 12, seed=3)
    config = FitConfig(focal=FOCAL, fit_focal=False, rigid_iters=20, shape_iters=20, full_iters=40)
    result = fit.fit_sequence(toy_flame, noisy, IMAGE_SIZE, config=config, shape=truth.shape)
    assert np.array_equal(result.shape, truth.shape)
    reprojection = np.linalg.norm(seq_landmarks_2d(toy_flame, result) - clean, axis=-1)
    assert reprojection.mean() <= 1.5, reprojection.mean()
