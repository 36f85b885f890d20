"""FLAME loading (safe unpickling, wrong files), the toy head files, and parity with smplx's FLAME."""
import os
import pickle
import shutil
import sys
import types

import numpy as np
import pytest
import torch

from tracking import flame, toyhead
from tracking.conditioning import REGION_LEFT_EYE, REGION_MOUTH, REGION_RIGHT_EYE, conditioning_image
from tracking.flame import FLAME, FlameFileError
from tracking.render import opengl_to_opencv


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("toy"))
    toyhead.write_toy_flame(directory, seed=0)
    return directory


def _rel_err(ours, ref):
    return float((ours - ref).norm() / ref.norm())


# --------------------------------------------------------------------------- toy files

def test_toy_files_have_flame_layout_and_are_deterministic(toy_dir, tmp_path):
    with open(os.path.join(toy_dir, "generic_model.pkl"), "rb") as f:
        raw = pickle.load(f)  # plain pickle works too: only numpy and scipy.sparse inside
    n = raw["v_template"].shape[0]
    assert raw["shapedirs"].shape == (n, 3, 400) and raw["posedirs"].shape == (n, 3, 36)
    assert raw["J_regressor"].shape == (5, n) and "sparse" in type(raw["J_regressor"]).__module__
    assert raw["weights"].shape == (n, 5) and np.allclose(raw["weights"].sum(1), 1)
    assert raw["kintree_table"].shape == (2, 5) and raw["f"].shape[1] == 3
    again = toyhead.write_toy_flame(str(tmp_path), seed=0)
    for name, path in again.items():
        with open(path, "rb") as a, open(os.path.join(toy_dir, name), "rb") as b:
            assert a.read() == b.read(), name


def test_both_embedding_formats_agree(toy_dir):
    deca = flame.load_landmark_embedding(os.path.join(toy_dir, "landmark_embedding.npy"))
    static = flame.load_landmark_embedding(os.path.join(toy_dir, "flame_static_embedding.pkl"))
    assert deca.faces_idx.shape == (68,) and deca.contour_faces_idx.shape == (79, 17)
    np.testing.assert_array_equal(deca.faces_idx, static.faces_idx)
    np.testing.assert_allclose(deca.bary_coords, static.bary_coords)


# --------------------------------------------------------------------------- parity with smplx

def _random_contour_table(directory, model, rng):
    """A flame_dynamic_embedding.npy whose 79 rows differ, so the yaw look-up is really exercised."""
    faces = rng.integers(0, len(model["f"]), size=(79, 17))
    bary = rng.uniform(0.1, 1, size=(79, 17, 3))
    bary /= bary.sum(-1, keepdims=True)
    np.save(os.path.join(directory, "flame_dynamic_embedding.npy"),
            np.array({"lmk_face_idx": faces, "lmk_b_coords": bary}, dtype=object))


@pytest.fixture(scope="module")
def oracle_dir(toy_dir, tmp_path_factory):
    """Files as smplx.create expects them: <dir>/FLAME_NEUTRAL.pkl + static and dynamic embeddings."""
    directory = os.path.join(str(tmp_path_factory.mktemp("smplx")), "flame")
    os.makedirs(directory)
    shutil.copy(os.path.join(toy_dir, "generic_model.pkl"), os.path.join(directory, "FLAME_NEUTRAL.pkl"))
    shutil.copy(os.path.join(toy_dir, "flame_static_embedding.pkl"), directory)
    model = flame.load_flame_model(os.path.join(toy_dir, "generic_model.pkl"))
    _random_contour_table(directory, model, np.random.default_rng(1))
    return directory


def _random_params(batch, gen, n_shape=300, n_exp=100):
    rnd = lambda *s, scale=1.0: torch.randn(*s, generator=gen) * scale
    params = dict(shape=rnd(batch, n_shape), expression=rnd(batch, n_exp),
                  global_rot=rnd(batch, 3, scale=0.4), neck_rot=rnd(batch, 3, scale=0.2),
                  jaw_rot=rnd(batch, 3, scale=0.2), eye_rots=rnd(batch, 6, scale=0.2),
                  translation=rnd(batch, 3, scale=0.1))
    params["global_rot"][:, 1] = torch.linspace(-1.0, 1.0, batch)  # yaw across all table rows
    return params


def _smplx_flame(directory, batch, contour):
    smplx = pytest.importorskip("smplx")
    oracle = smplx.create(os.path.dirname(directory), model_type="flame", num_betas=300, num_expression_coeffs=100,
                          use_face_contour=contour, batch_size=batch)
    if contour:
        oracle.neck_kin_chain = torch.tensor([1, 0])  # DECA's chain: yaw of global * neck
    return oracle


def _smplx_forward(oracle, p):
    out = oracle(betas=p["shape"], expression=p["expression"], global_orient=p["global_rot"],
                 neck_pose=p["neck_rot"], jaw_pose=p["jaw_rot"], leye_pose=p["eye_rots"][:, :3],
                 reye_pose=p["eye_rots"][:, 3:], transl=p["translation"])
    return out.vertices, out.joints[:, 5:]  # smplx appends the landmarks after the 5 joints


@pytest.mark.parametrize("contour", [False, True])
def test_matches_smplx(oracle_dir, contour):
    batch = 12
    params = _random_params(batch, torch.Generator().manual_seed(0))
    ours = FLAME.from_files(os.path.join(oracle_dir, "FLAME_NEUTRAL.pkl"),
                            os.path.join(oracle_dir, "flame_static_embedding.pkl"),
                            n_shape=300, n_exp=100, dynamic_contour=contour)
    verts, lmks = ours(**params)
    ref_verts, ref_lmks = _smplx_forward(_smplx_flame(oracle_dir, batch, contour), params)
    assert _rel_err(verts, ref_verts) <= 1e-5
    assert (verts - ref_verts).abs().max() <= 1e-5
    ref_inner, ref_contour = ref_lmks[:, :51], ref_lmks[:, 51:]   # smplx: static first, then contour
    assert _rel_err(lmks[:, 17:], ref_inner) <= 1e-5
    if contour:
        assert _rel_err(lmks[:, :17], ref_contour) <= 1e-5
        rows = flame.rotation_yaw_index(flame.axis_angle_to_matrix(params["global_rot"])
                                        @ flame.axis_angle_to_matrix(params["neck_rot"]))
        assert len(set(rows.tolist())) >= 8  # many different rows of the table were used


@pytest.mark.parametrize("contour", [False, True])
def test_landmarks_only_path_matches_full_mesh(oracle_dir, contour):
    ours = FLAME.from_files(os.path.join(oracle_dir, "FLAME_NEUTRAL.pkl"),
                            os.path.join(oracle_dir, "flame_static_embedding.pkl"),
                            n_shape=300, n_exp=100, dynamic_contour=contour)
    params = {k: v.requires_grad_() for k, v in _random_params(6, torch.Generator().manual_seed(5)).items()}
    _, full = ours(**params)
    none, fast = ours(**params, landmarks_only=True)
    assert none is None
    torch.testing.assert_close(fast, full, rtol=1e-6, atol=1e-6)
    # the gradients that fitting follows agree too
    weights = torch.randn(full.shape, generator=torch.Generator().manual_seed(6))
    grads = [torch.autograd.grad((lmks * weights).sum(), list(params.values())) for lmks in (full, fast)]
    for name, want, got in zip(params, *grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)


def test_fewer_components_equal_zero_padding(toy_dir):
    model = flame.load_flame_model(os.path.join(toy_dir, "generic_model.pkl"))
    emb = flame.load_landmark_embedding(os.path.join(toy_dir, "landmark_embedding.npy"))
    small, full = FLAME(model, emb, n_shape=20, n_exp=50), FLAME(model, emb, n_shape=300, n_exp=100)
    p = _random_params(3, torch.Generator().manual_seed(2), n_shape=20, n_exp=50)
    padded = dict(p, shape=torch.nn.functional.pad(p["shape"], (0, 280)),
                  expression=torch.nn.functional.pad(p["expression"], (0, 50)))
    torch.testing.assert_close(small(**p)[0], full(**padded)[0], rtol=1e-5, atol=1e-6)


def test_forward_is_differentiable(toy_dir):
    ours = FLAME.from_files(os.path.join(toy_dir, "generic_model.pkl"),
                            os.path.join(toy_dir, "landmark_embedding.npy"))
    params = {k: v.requires_grad_() for k, v in _random_params(2, torch.Generator().manual_seed(3), 100, 50).items()}
    params["global_rot"].data[0] = 0  # Rodrigues at the identity must have finite gradients
    verts, lmks = ours(**params)
    (verts.square().sum() + lmks.square().sum()).backward()
    for name, p in params.items():
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_axis_angle_round_trip():
    aa = torch.randn(50, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    aa = aa / aa.norm(dim=1, keepdim=True) * torch.linspace(0, 3.1, 50, dtype=torch.float64)[:, None]
    back = flame.matrix_to_axis_angle(flame.axis_angle_to_matrix(aa).numpy())
    np.testing.assert_allclose(back, aa.numpy(), atol=1e-6)
    half_turns = torch.tensor([[1.0, -1.0, 0.5], [0.2, 0.3, -1.0]], dtype=torch.float64)
    half_turns = half_turns / half_turns.norm(dim=1, keepdim=True) * np.pi  # axis sign is free at pi
    rot = flame.axis_angle_to_matrix(half_turns).numpy()
    again = flame.axis_angle_to_matrix(torch.tensor(flame.matrix_to_axis_angle(rot))).numpy()
    np.testing.assert_allclose(again, rot, atol=1e-6)


# --------------------------------------------------------------------------- render regions

def test_face_regions_find_eyes_and_mouth(toy_dir):
    ours = FLAME.from_files(os.path.join(toy_dir, "generic_model.pkl"),
                            os.path.join(toy_dir, "landmark_embedding.npy"))
    regions, faces = ours.face_regions, ours.render_faces
    weights = ours.lbs_weights
    for label, joint in ((REGION_LEFT_EYE, flame.LEFT_EYE), (REGION_RIGHT_EYE, flame.RIGHT_EYE)):
        eye_faces = faces[regions == label]
        assert len(eye_faces) > 0 and (weights[eye_faces, joint] > 0.5).all()
    mouth = faces[regions == REGION_MOUTH]
    assert len(mouth) > 0

    def mouth_area(jaw):
        verts, _ = ours(torch.zeros(1, 100), torch.zeros(1, 50), jaw_rot=torch.tensor([[jaw, 0.0, 0.0]]))
        tri = verts[0][mouth]
        return torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]).norm(dim=1).sum() / 2

    assert mouth_area(0.3) > 5 * mouth_area(0.0)  # opening the jaw opens the mouth-interior fan


def test_toy_head_is_wound_like_flame(toy_dir):
    """Counter-clockwise around outward normals, as FLAME: every closed part (eyeballs, the head with its
    mouth fan, open only at the neck) encloses a positive volume, and the rendered head looks the same
    with back faces culled (render_conditioning culls them)."""
    ours = FLAME.from_files(os.path.join(toy_dir, "generic_model.pkl"),
                            os.path.join(toy_dir, "landmark_embedding.npy"))
    verts, faces = ours.v_template.double(), ours.render_faces
    for label in (REGION_LEFT_EYE, REGION_RIGHT_EYE):
        tri = verts[faces[ours.face_regions == label]]
        assert torch.linalg.det(tri).sum() > 0  # 6x the enclosed volume
    assert torch.linalg.det(verts[faces]).sum() > 0
    camera = opengl_to_opencv(ours.v_template) + torch.tensor([0.0, 0.0, 0.5])  # facing the camera
    full = conditioning_image(camera[None], faces, 300.0, 96, ours.face_regions)
    culled = conditioning_image(camera[None], faces, 300.0, 96, ours.face_regions, cull_back_faces=True)
    assert full[:, -1].mean() > 0.2 and torch.equal(full, culled)


# --------------------------------------------------------------------------- safe loading

class _Evil:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("make", ["os_system", "eval"])
def test_code_in_pickles_is_refused(tmp_path, make):
    marker = tmp_path / "pwned"
    payload = (_Evil(os.system, f"touch {marker}") if make == "os_system"
               else _Evil(eval, f"open({str(marker)!r}, 'w').close()"))
    pkl = tmp_path / "generic_model.pkl"
    pkl.write_bytes(pickle.dumps({"v_template": payload}, protocol=2))
    npy = tmp_path / "landmark_embedding.npy"
    np.save(npy, np.array({"full_lmk_faces_idx": payload}, dtype=object))
    with pytest.raises(FlameFileError, match="generic_model.pkl.*refusing"):
        flame.load_flame_model(str(pkl))
    with pytest.raises(FlameFileError, match="landmark_embedding.npy.*refusing"):
        flame.load_landmark_embedding(str(npy))
    assert not marker.exists()


class _FakeChumpy:
    """Classes pickled under chumpy's module and class names, with chumpy's pickled state: the
    instance __dict__ without '_parents' and '_cache' (Ch.__getstate__), bookkeeping included."""

    def __init__(self, monkeypatch):
        self.monkeypatch, self.modules = monkeypatch, {}
        self.Ch = self.chumpy_class("chumpy.ch", "Ch")
        self.Select = self.chumpy_class("chumpy.reordering", "Select")
        self.add = self.chumpy_class("chumpy.ch_ops", "add")

    def chumpy_class(self, module, name):
        def __init__(obj, **terms):
            obj.__dict__.update(_dirty_vars=set(), _itr=None, _make_dense=False, _make_sparse=False,
                                _depends_on_deps={}, _parents={}, _cache={"r": None}, **terms)

        def __getstate__(obj):
            return {k: v for k, v in obj.__dict__.items() if k not in ("_parents", "_cache")}

        cls = type(name, (), {"__init__": __init__, "__getstate__": __getstate__, "__module__": module})
        for prefix in ("chumpy", module):
            if prefix not in self.modules:
                self.modules[prefix] = types.ModuleType(prefix)
                self.monkeypatch.setitem(sys.modules, prefix, self.modules[prefix])
        setattr(self.modules[module], name, cls)
        return cls

    def dump(self, path, data):
        """Pickle like the Python-2 era files (protocol 2: copy_reg/__builtin__ names), then
        uninstall the fake modules so that loading cannot import them."""
        path.write_bytes(pickle.dumps(data, protocol=2))
        for name in self.modules:
            self.monkeypatch.delitem(sys.modules, name)


def _raw_toy_model(toy_dir):
    with open(os.path.join(toy_dir, "generic_model.pkl"), "rb") as f:
        return pickle.load(f)


def test_chumpy_pickle_loads_without_chumpy(tmp_path, toy_dir, monkeypatch):
    """A Python-2-style pickle holding chumpy.ch.Ch objects (state {'x': array, ...}) loads as numpy."""
    chumpy, raw = _FakeChumpy(monkeypatch), _raw_toy_model(toy_dir)
    wrapped = {k: chumpy.Ch(x=v) if k in ("v_template", "shapedirs", "posedirs", "weights") else v
               for k, v in raw.items()}
    path = tmp_path / "generic_model.pkl"
    chumpy.dump(path, wrapped)
    model = flame.load_flame_model(str(path))
    np.testing.assert_array_equal(model["shapedirs"], raw["shapedirs"])
    np.testing.assert_array_equal(model["J_regressor"], raw["J_regressor"].toarray())


def test_chumpy_select_shapedirs_load(tmp_path, toy_dir, monkeypatch):
    """MANO-era files store shapedirs as chumpy.reordering.Select(a, idxs, preferred_shape): the
    array is a.ravel()[idxs] reshaped. Built here with the intended shapedirs scattered through a
    larger 2-D source array in a random order."""
    chumpy, raw = _FakeChumpy(monkeypatch), _raw_toy_model(toy_dir)
    rng = np.random.default_rng(0)
    wanted = raw["shapedirs"]
    source = rng.normal(size=(2, wanted.size))
    idxs = rng.permutation(source.size)[:wanted.size]
    source.ravel()[idxs] = wanted.ravel()
    raw["shapedirs"] = chumpy.Select(a=chumpy.Ch(x=source), idxs=idxs, preferred_shape=wanted.shape)
    raw["v_template"] = chumpy.Ch(x=raw["v_template"])
    path = tmp_path / "mano_era.pkl"
    chumpy.dump(path, raw)
    model = flame.load_flame_model(str(path))
    np.testing.assert_array_equal(model["shapedirs"], wanted)
    assert not np.array_equal(source.ravel()[:wanted.size], wanted.ravel())  # the test can fail


def test_unevaluable_chumpy_expression_is_named(tmp_path, toy_dir, monkeypatch):
    """A chumpy expression other than Ch / Select fails a load that needs it, naming the class, key
    and file; under a key the loader does not read it is harmless."""
    chumpy, raw = _FakeChumpy(monkeypatch), _raw_toy_model(toy_dir)
    expression = chumpy.add(a=chumpy.Ch(x=raw["posedirs"]), b=chumpy.Ch(x=0.0))
    unused, needed, nested = (tmp_path / f"{name}.pkl" for name in ("unused", "needed", "nested"))
    unused.write_bytes(pickle.dumps({**raw, "J": expression}, protocol=2))
    static = {"lmk_face_idx": chumpy.Select(a=expression, idxs=np.arange(51)),
              "lmk_b_coords": np.zeros((51, 3))}
    nested.write_bytes(pickle.dumps(static, protocol=2))
    chumpy.dump(needed, {**raw, "posedirs": expression})
    np.testing.assert_array_equal(flame.load_flame_model(str(unused))["posedirs"], raw["posedirs"])
    with pytest.raises(FlameFileError, match=r"needed.pkl: 'posedirs' is a chumpy chumpy.ch_ops.add"):
        flame.load_flame_model(str(needed))
    with pytest.raises(FlameFileError, match=r"nested.pkl: 'lmk_face_idx'.a is a chumpy chumpy.ch_ops.add"):
        flame.load_landmark_embedding(str(nested))


def test_deca_embedding_with_torch_tensors(tmp_path, toy_dir):
    """DECA's landmark_embedding.npy stores the dynamic table as torch tensors."""
    data = flame.load_npy(os.path.join(toy_dir, "landmark_embedding.npy"))
    data["dynamic_lmk_faces_idx"] = torch.from_numpy(data["dynamic_lmk_faces_idx"])
    data["dynamic_lmk_bary_coords"] = torch.from_numpy(data["dynamic_lmk_bary_coords"]).float()
    path = str(tmp_path / "landmark_embedding.npy")
    np.save(path, np.array(data, dtype=object))
    emb = flame.load_landmark_embedding(path)
    np.testing.assert_array_equal(emb.contour_faces_idx, data["dynamic_lmk_faces_idx"].numpy())


def test_wrong_files_give_clear_errors(tmp_path, toy_dir):
    with open(os.path.join(toy_dir, "generic_model.pkl"), "rb") as f:
        raw = pickle.load(f)
    del raw["shapedirs"]
    no_shapedirs = tmp_path / "no_shapedirs.pkl"
    no_shapedirs.write_bytes(pickle.dumps(raw))
    with pytest.raises(FlameFileError, match="no_shapedirs.pkl.*shapedirs"):
        flame.load_flame_model(str(no_shapedirs))
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(FlameFileError, match="garbage.pkl"):
        flame.load_flame_model(str(garbage))
    with pytest.raises(FlameFileError, match="missing.pkl.*not found"):
        flame.load_flame_model(str(tmp_path / "missing.pkl"))
    with pytest.raises(FlameFileError, match="generic_model.pkl.*not a landmark embedding"):
        flame.load_landmark_embedding(os.path.join(toy_dir, "generic_model.pkl"))
    lonely = tmp_path / "lonely" / "flame_static_embedding.pkl"
    lonely.parent.mkdir()
    shutil.copy(os.path.join(toy_dir, "flame_static_embedding.pkl"), lonely)
    with pytest.raises(FlameFileError, match="flame_dynamic_embedding.npy"):
        flame.load_landmark_embedding(str(lonely))
