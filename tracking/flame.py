"""FLAME head model: safe loading of the official files and a batched, differentiable forward pass.

Files (downloaded by users under the FLAME licence, or written by tracking/toyhead.py):

- `generic_model.pkl` (FLAME 2020 / 2023): a Python-2-era pickle of chumpy arrays and a scipy
  sparse `J_regressor`. We read it with `SafeUnpickler`, which maps chumpy and scipy.sparse
  classes to inert stand-ins and refuses every other global, so a crafted file cannot run code.
  Of chumpy it evaluates plain arrays (`Ch`) and `Select` (MANO-era shapedirs) and names any
  other chumpy expression it meets, with its key, instead of guessing.
- a landmark embedding, mapping the mesh to the 68 iBUG points:
  * DECA's `landmark_embedding.npy` (preferred): `full_lmk_*` gives all 68 points, and
    `dynamic_lmk_*` a look-up table of jaw-contour points per head yaw;
  * or FLAME's `flame_static_embedding.pkl` (the 51 inner points 17..67) next to
    `flame_dynamic_embedding.npy`, whose 0-degree row supplies the 17 contour points 0..16.

Landmarks: by default the 68 points are fixed positions on the mesh (the "full" embedding).
With `dynamic_contour=True` the contour points 0..16 follow the head yaw through the look-up
table, like DECA: a profile view sees the silhouette, not the frontal jaw line.

Conventions: FLAME units are metres, y up, the face looks along +z. Rotations are axis-angle
(radians). Joints: 0 global (neck base, root), 1 neck, 2 jaw, 3 left eye, 4 right eye.
"""
import functools
import io
import os
import pickle
import _compat_pickle
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from .conditioning import REGION_LEFT_EYE, REGION_MOUTH, REGION_RIGHT_EYE, REGION_SKIN

N_JOINTS = 5
GLOBAL, NECK, JAW, LEFT_EYE, RIGHT_EYE = range(N_JOINTS)
SHAPE_SPACE_DIM = 300      # shapedirs[..., :300] is identity shape, [..., 300:] expression
N_LANDMARKS = 68
N_CONTOUR = 17             # iBUG points 0..16: the jaw line
CONTOUR_LUT_ROWS = 79      # dynamic contour table: yaw 0..39 degrees, then -1..-39


class FlameFileError(ValueError):
    """A FLAME model or landmark file is missing, of the wrong kind, or unsafe."""


# --------------------------------------------------------------------------- safe unpickling

class _ChumpyStandIn:
    """Takes the place of a chumpy class (named by `chumpy_class`): keeps the pickled state, which
    `_chumpy_array` evaluates."""
    chumpy_class, state = None, None

    def __setstate__(self, state):
        self.state = state


@functools.cache
def _chumpy_stand_in(module, name):
    return type(f"_{name}_stand_in", (_ChumpyStandIn,), {"chumpy_class": f"{module}.{name}"})


class _Unevaluable:
    """Left in place of a chumpy expression we cannot evaluate: an error only if the key is read."""

    def __init__(self, reason):
        self.reason = reason


class _SparseStandIn:
    """Takes the place of a scipy.sparse matrix class: keeps the pickled state, rebuilt later."""
    format = None

    def __setstate__(self, state):
        self.state = state


def _sparse_stand_in(fmt):
    return type(f"_{fmt}_matrix_stand_in", (_SparseStandIn,), {"format": fmt})


_SPARSE_STAND_INS = {fmt: _sparse_stand_in(fmt) for fmt in ("csc", "csr", "coo")}


def _load_tensor_bytes(data):
    """Stand-in for torch.storage._load_from_bytes: torch's own restricted (weights-only) loader."""
    return torch.load(io.BytesIO(data), weights_only=True)


# Globals a FLAME / landmark file legitimately references: array reconstruction only.
_ALLOWED = {
    ("copyreg", "_reconstructor"), ("copyreg", "__newobj__"), ("builtins", "object"),
    ("builtins", "set"), ("builtins", "frozenset"),
    ("collections", "OrderedDict"), ("_codecs", "encode"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("torch._utils", "_rebuild_tensor_v2"),
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that only builds arrays: chumpy/scipy.sparse become stand-ins, the rest is refused."""

    def find_class(self, module, name):
        # Python 2 names (copy_reg, __builtin__) -> Python 3 names; Python 3 names pass unchanged
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if module.split(".")[0] == "chumpy":
            return _chumpy_stand_in(module, name)
        if module.startswith("scipy.sparse") and name[:3] in _SPARSE_STAND_INS and name.endswith("_matrix"):
            return _SPARSE_STAND_INS[name[:3]]
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _load_tensor_bytes
        if (module, name) in _ALLOWED:
            if module.startswith("numpy.core.") and hasattr(np, "_core"):
                module = "numpy._core." + module[len("numpy.core."):]  # numpy 2 renamed it
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _to_numpy(obj, where=None):
    """Stand-ins, tensors and containers -> numpy arrays (recursively); `where` names obj in errors
    (its key path in the file, None for the file's top-level object)."""
    if isinstance(obj, _ChumpyStandIn):
        return _chumpy_array(obj, where)
    if isinstance(obj, _SparseStandIn):
        return _dense_from_sparse_state(obj.format, obj.state)
    if isinstance(obj, torch.Tensor):
        return obj.numpy()
    if isinstance(obj, dict):
        return {k: _to_numpy(v, repr(k) if where is None else f"{where}[{k!r}]")
                for k, v in obj.items()}
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.ndim == 0:
        return _to_numpy(obj.item(), where)   # np.save of a dict: a 0-d object array
    return obj


def _chumpy_array(obj, where):
    """The array a chumpy object evaluates to, for the two kinds FLAME/MANO-era files hold.

    A plain `Ch` is its state's 'x'. A `Select` (MANO-era shapedirs) is `a.ravel()[idxs]`,
    reshaped to `preferred_shape` when it has one (chumpy's Select.compute_r). Any other chumpy
    class is an expression (sum, product, ...) we do not re-implement: it becomes an _Unevaluable
    naming the class and the key, which fails only a loader that needs that key.
    """
    where = where or "the top-level object"
    state = obj.state if isinstance(obj.state, dict) else {}
    kind = obj.chumpy_class.rsplit(".", 1)[-1]
    if kind == "Ch" and "x" in state:
        return np.asarray(_to_numpy(state["x"], where))
    if kind == "Select" and "a" in state and "idxs" in state:
        source, idxs = _to_numpy(state["a"], f"{where}.a"), _to_numpy(state["idxs"], f"{where}.idxs")
        for part in (source, idxs):
            if isinstance(part, _Unevaluable):
                return part
        picked = np.asarray(source).ravel()[np.asarray(idxs)]
        return picked.reshape(state["preferred_shape"]) if "preferred_shape" in state else picked
    return _Unevaluable(
        f"{where} is a chumpy {obj.chumpy_class} object, which cannot be evaluated without chumpy "
        f"(only chumpy.ch.Ch arrays and chumpy.reordering.Select are read): re-save it as numpy")


def _check_evaluated(path, data, keys):
    """Raise for the first of `keys` that holds a chumpy expression we could not evaluate."""
    for key in keys:
        if isinstance(data.get(key), _Unevaluable):
            raise FlameFileError(f"{path}: {data[key].reason}")


def _dense_from_sparse_state(fmt, state):
    state = {k: _to_numpy(v) for k, v in state.items()}
    shape = tuple(int(n) for n in state.get("_shape", state.get("shape")))
    dense = np.zeros(shape, dtype=np.float64)
    if fmt == "coo":
        np.add.at(dense, (state["row"], state["col"]), state["data"])
        return dense
    indptr, indices, data = state["indptr"], state["indices"], state["data"]
    for major in range(len(indptr) - 1):  # compressed axis: columns for csc, rows for csr
        sl = slice(indptr[major], indptr[major + 1])
        if fmt == "csc":
            dense[indices[sl], major] += data[sl]
        else:
            dense[major, indices[sl]] += data[sl]
    return dense


def _safe_unpickle(path, stream):
    try:
        data = _to_numpy(SafeUnpickler(stream, encoding="latin1").load())
    except (pickle.UnpicklingError, EOFError, AttributeError, KeyError, TypeError,
            ValueError, IndexError, ImportError, RuntimeError) as e:
        raise FlameFileError(f"{path}: not a readable FLAME pickle ({e})") from e
    if isinstance(data, _Unevaluable):
        raise FlameFileError(f"{path}: {data.reason}")
    return data


def load_pickle(path):
    """Safely load a FLAME-style pickle; chumpy arrays and sparse matrices come back as numpy."""
    if not os.path.isfile(path):
        raise FlameFileError(f"{path}: file not found")
    with open(path, "rb") as f:
        return _safe_unpickle(path, f)


def load_npy(path):
    """np.load for .npy files, but object (pickled) payloads go through SafeUnpickler."""
    if not os.path.isfile(path):
        raise FlameFileError(f"{path}: file not found")
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            _, _, dtype = read_header(f)
        except ValueError as e:
            raise FlameFileError(f"{path}: not a .npy file ({e})") from e
        if dtype.hasobject:
            return _safe_unpickle(path, f)
        f.seek(0)
        return np.load(f, allow_pickle=False)


# --------------------------------------------------------------------------- model file

_MODEL_KEYS = {  # key -> expected shape, with V = vertex count (5023 for FLAME; the toy head has fewer)
    "v_template": ("V", 3), "shapedirs": ("V", 3, None), "posedirs": ("V", 3, 9 * (N_JOINTS - 1)),
    "J_regressor": (N_JOINTS, "V"), "kintree_table": (2, N_JOINTS), "weights": ("V", N_JOINTS),
    "f": (None, 3),
}


def load_flame_model(path):
    """Read generic_model.pkl -> dict of numpy arrays (float64 / int64), shapes validated."""
    data = load_pickle(path)
    if not isinstance(data, dict):
        raise FlameFileError(f"{path}: expected a dict of FLAME arrays, got {type(data).__name__}")
    missing = [k for k in _MODEL_KEYS if k not in data]
    if missing:
        raise FlameFileError(f"{path}: not a FLAME model, missing keys {missing}")
    _check_evaluated(path, data, _MODEL_KEYS)
    model = {k: np.asarray(data[k]) for k in _MODEL_KEYS}
    n_verts = model["v_template"].shape[0]
    for key, expected in _MODEL_KEYS.items():
        got = model[key].shape
        want = tuple(n_verts if d == "V" else d for d in expected)
        if len(got) != len(want) or any(w is not None and g != w for g, w in zip(got, want)):
            raise FlameFileError(f"{path}: '{key}' has shape {got}, expected {want}")
    if model["shapedirs"].shape[2] <= SHAPE_SPACE_DIM:
        raise FlameFileError(f"{path}: shapedirs has {model['shapedirs'].shape[2]} components, "
                             f"expected {SHAPE_SPACE_DIM} shape + expression components")
    if model["f"].min() < 0 or model["f"].max() >= n_verts:
        raise FlameFileError(f"{path}: faces 'f' index outside the {n_verts} vertices")
    for key in ("v_template", "shapedirs", "posedirs", "J_regressor", "weights"):
        model[key] = model[key].astype(np.float64)
    model["f"] = model["f"].astype(np.int64)
    model["kintree_table"] = model["kintree_table"].astype(np.int64)
    return model


# --------------------------------------------------------------------------- landmark embedding

@dataclass
class LandmarkEmbedding:
    """68 iBUG points as (face index, barycentric coords); optional yaw-dependent contour table."""
    faces_idx: np.ndarray                       # (68,) int64
    bary_coords: np.ndarray                     # (68, 3)
    contour_faces_idx: np.ndarray | None = None  # (79, 17) int64, rows by yaw (see module doc)
    contour_bary_coords: np.ndarray | None = None  # (79, 17, 3)


def _embedding_arrays(path, data, face_key, bary_key, n_points):
    if not isinstance(data, dict) or face_key not in data or bary_key not in data:
        raise FlameFileError(f"{path}: not a landmark embedding, missing '{face_key}' / '{bary_key}'")
    _check_evaluated(path, data, (face_key, bary_key))
    faces = np.asarray(data[face_key]).astype(np.int64).reshape(-1, n_points)
    bary = np.asarray(data[bary_key], dtype=np.float64).reshape(-1, n_points, 3)
    if faces.shape[0] != bary.shape[0]:
        raise FlameFileError(f"{path}: '{face_key}' and '{bary_key}' disagree in size")
    return faces, bary


def load_landmark_embedding(path):
    """DECA landmark_embedding.npy, or flame_static_embedding.pkl (+ flame_dynamic_embedding.npy)."""
    if path.endswith(".npy"):
        data = load_npy(path)
        faces, bary = _embedding_arrays(path, data, "full_lmk_faces_idx", "full_lmk_bary_coords",
                                        N_LANDMARKS)
        contour = None
        if "dynamic_lmk_faces_idx" in data:
            contour = _embedding_arrays(path, data, "dynamic_lmk_faces_idx",
                                        "dynamic_lmk_bary_coords", N_CONTOUR)
        return _make_embedding(path, faces[0], bary[0], contour)
    data = load_pickle(path)
    inner_faces, inner_bary = _embedding_arrays(path, data, "lmk_face_idx", "lmk_b_coords",
                                                N_LANDMARKS - N_CONTOUR)
    dynamic_path = os.path.join(os.path.dirname(path), "flame_dynamic_embedding.npy")
    if not os.path.isfile(dynamic_path):
        raise FlameFileError(f"{path}: holds only the 51 inner landmarks; the 17 jaw-contour points "
                             f"need {dynamic_path} (or use DECA's landmark_embedding.npy)")
    contour = _embedding_arrays(dynamic_path, load_npy(dynamic_path), "lmk_face_idx",
                                "lmk_b_coords", N_CONTOUR)
    faces = np.concatenate([contour[0][0], inner_faces[0]])  # row 0: the frontal (0 degree) contour
    bary = np.concatenate([contour[1][0], inner_bary[0]])
    return _make_embedding(path, faces, bary, contour)


def _make_embedding(path, faces, bary, contour):
    if contour is not None and contour[0].shape[0] != CONTOUR_LUT_ROWS:
        raise FlameFileError(f"{path}: dynamic contour table has {contour[0].shape[0]} rows, "
                             f"expected {CONTOUR_LUT_ROWS}")
    if contour is None:
        return LandmarkEmbedding(faces, bary)
    return LandmarkEmbedding(faces, bary, contour[0], contour[1])


# --------------------------------------------------------------------------- geometry

def axis_angle_to_matrix(aa):
    """Rodrigues: (..., 3) axis-angle in radians -> (..., 3, 3) rotation matrices."""
    angle = torch.sqrt((aa * aa).sum(-1, keepdim=True) + 1e-16)  # smooth at zero
    axis = aa / angle
    x, y, z = axis.unbind(-1)
    zero = torch.zeros_like(x)
    k = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(*aa.shape[:-1], 3, 3)
    sin, cos = torch.sin(angle)[..., None], torch.cos(angle)[..., None]
    eye = torch.eye(3, dtype=aa.dtype, device=aa.device)
    return eye + sin * k + (1 - cos) * (k @ k)


def matrix_to_axis_angle(rot):
    """(..., 3, 3) rotations -> (..., 3) axis-angle (numpy, for initialisation and evaluation)."""
    rot = np.asarray(rot, dtype=np.float64)
    cos = np.clip((np.trace(rot, axis1=-2, axis2=-1) - 1) / 2, -1, 1)
    angle = np.arccos(cos)
    vec = np.stack([rot[..., 2, 1] - rot[..., 1, 2], rot[..., 0, 2] - rot[..., 2, 0],
                    rot[..., 1, 0] - rot[..., 0, 1]], -1)
    sin = np.sin(angle)[..., None]
    small = sin < 1e-6
    axis = vec / np.where(small, 1.0, 2 * sin)
    # near pi the antisymmetric part vanishes: (R + I) / 2 ~ axis axis^T, so its largest column
    # is the axis (the sign is irrelevant at pi)
    near_pi = (angle > np.pi - 1e-3)[..., None]
    outer = (rot + np.eye(3)) / 2
    column = np.diagonal(outer, axis1=-2, axis2=-1).argmax(-1)[..., None, None]
    pi_axis = np.take_along_axis(outer, np.broadcast_to(column, outer.shape[:-1] + (1,)), -1)[..., 0]
    pi_axis /= np.linalg.norm(pi_axis, axis=-1, keepdims=True)
    axis = np.where(near_pi, pi_axis * np.where((pi_axis * vec).sum(-1, keepdims=True) < 0, -1, 1), axis)
    return np.where(small & ~near_pi, vec / 2, axis * angle[..., None])


def rotation_yaw_index(rot):
    """Row of the dynamic contour table for head rotations (B,3,3): yaw rounded to whole degrees."""
    yaw = torch.atan2(-rot[:, 2, 0], torch.sqrt(rot[:, 0, 0] ** 2 + rot[:, 1, 0] ** 2))
    degrees = torch.round(torch.clamp(-torch.rad2deg(yaw), max=39)).long()
    return torch.where(degrees >= 0, degrees, torch.clamp(39 - degrees, max=78))


# --------------------------------------------------------------------------- the model

class FLAME(nn.Module):
    """FLAME with `n_shape` identity and `n_exp` expression components.

    forward(shape (B,<=n_shape), expression (B,<=n_exp), global_rot, neck_rot, jaw_rot (B,3),
    eye_rots (B,6) = left|right, translation (B,3)) -> vertices (B,V,3), landmarks (B,68,3).
    Missing pose arguments are zero. Translation is added after skinning (camera space).
    """

    def __init__(self, model, embedding, n_shape=100, n_exp=50, dynamic_contour=False):
        super().__init__()
        n_total_exp = model["shapedirs"].shape[2] - SHAPE_SPACE_DIM
        if not (0 < n_shape <= SHAPE_SPACE_DIM and 0 < n_exp <= n_total_exp):
            raise ValueError(f"n_shape must be in 1..{SHAPE_SPACE_DIM}, n_exp in 1..{n_total_exp}")
        if dynamic_contour and embedding.contour_faces_idx is None:
            raise ValueError("dynamic_contour needs a landmark embedding with a contour table")
        self.n_shape, self.n_exp, self.dynamic_contour = n_shape, n_exp, dynamic_contour
        f32 = lambda a: torch.tensor(a, dtype=torch.float32)
        shapedirs = np.concatenate([model["shapedirs"][:, :, :n_shape],
                                    model["shapedirs"][:, :, SHAPE_SPACE_DIM:SHAPE_SPACE_DIM + n_exp]], 2)
        self.register_buffer("v_template", f32(model["v_template"]))
        # component-major layouts, so that blending coefficients is one plain matrix product
        self.register_buffer("shapedirs", f32(shapedirs.transpose(2, 0, 1)))       # (S+E,V,3)
        self.register_buffer("posedirs", f32(model["posedirs"].transpose(2, 0, 1)))  # (36,V,3)
        # joints are linear in the blend coefficients: regress template and directions once
        self.register_buffer("J_template", f32(model["J_regressor"] @ model["v_template"]))
        self.register_buffer("J_dirs", f32(np.einsum("jv,vkl->ljk", model["J_regressor"], shapedirs)))
        self.register_buffer("lbs_weights", f32(model["weights"]))                  # (V,5)
        self.register_buffer("faces", torch.tensor(model["f"], dtype=torch.long))
        parents = model["kintree_table"][0].copy()
        parents[0] = -1  # stored as an unsigned "no parent"
        self.parents = parents.tolist()
        # landmarks as corner vertex ids (68,3) and barycentric weights; contour table (79,17,3)
        self.register_buffer("lmk_corners", self.faces[torch.tensor(embedding.faces_idx, dtype=torch.long)])
        self.register_buffer("lmk_bary_coords", f32(embedding.bary_coords))
        if dynamic_contour:
            contour = self.faces[torch.tensor(embedding.contour_faces_idx, dtype=torch.long)]
            self.register_buffer("contour_corners", contour)
            self.register_buffer("contour_bary_coords", f32(embedding.contour_bary_coords))
        self._landmark_buffers()
        self._last_identity = None  # (shape, identity_template(shape)) of the last skinning without autograd
        render_faces, regions = face_regions(model["f"], model["weights"], model["v_template"],
                                             embedding)
        self.register_buffer("render_faces", torch.tensor(render_faces, dtype=torch.long))
        self.register_buffer("face_regions", torch.tensor(regions, dtype=torch.long))

    @classmethod
    def from_files(cls, model_path, embedding_path, **kwargs):
        return cls(load_flame_model(model_path), load_landmark_embedding(embedding_path), **kwargs)

    def pose_matrices(self, batch, global_rot=None, neck_rot=None, jaw_rot=None, eye_rots=None):
        """(B,5,3,3) joint rotations from axis-angle; missing ones are the identity."""
        zero = self.v_template.new_zeros(batch, 3)
        eyes = eye_rots if eye_rots is not None else self.v_template.new_zeros(batch, 6)
        pose = torch.stack([global_rot if global_rot is not None else zero,
                            neck_rot if neck_rot is not None else zero,
                            jaw_rot if jaw_rot is not None else zero,
                            eyes[:, :3], eyes[:, 3:]], 1)
        return axis_angle_to_matrix(pose)

    def forward(self, shape, expression, global_rot=None, neck_rot=None, jaw_rot=None,
                eye_rots=None, translation=None, landmarks_only=False):
        """-> (vertices (B,V,3), landmarks (B,68,3)); with landmarks_only, vertices is None and
        only what the landmarks need is computed (what fitting needs, much cheaper)."""
        given = (shape, expression, global_rot, neck_rot, jaw_rot, eye_rots, translation)
        batch = max(x.shape[0] for x in given if x is not None)
        rots = self.pose_matrices(batch, global_rot, neck_rot, jaw_rot, eye_rots)
        shape, expression = self.padded(shape, self.n_shape), self.padded(expression.expand(batch, -1), self.n_exp)
        if landmarks_only:
            vertices, landmarks = None, self.skinned_landmarks(shape, expression, rots)
        else:
            vertices = self.skin(shape, expression, rots)
            landmarks = self.landmarks(vertices, rots)
        if translation is not None:
            landmarks = landmarks + translation[:, None, :]
            if vertices is not None:
                vertices = vertices + translation[:, None, :]
        return vertices, landmarks

    @staticmethod
    def padded(coeffs, n):
        """Coefficients (B,<=n) padded with zeros to n components."""
        return torch.nn.functional.pad(coeffs, (0, n - coeffs.shape[1]))

    def joints(self, shape, expression):
        """Joint positions (B,5,3) regressed from the shaped (unposed) mesh."""
        n = self.n_shape
        return (self.J_template + torch.einsum("bl,ljk->bjk", shape, self.J_dirs[:n])
                + torch.einsum("bl,ljk->bjk", expression, self.J_dirs[n:]))

    @staticmethod
    def pose_feature(rots):
        """(B,36) input of the pose correctives: R - I of the 4 non-root joints."""
        return (rots[:, 1:] - torch.eye(3, dtype=rots.dtype, device=rots.device)).flatten(1)

    def skin(self, shape, expression, rots):
        """Linear blend skinning of all vertices -> (B,V,3).

        Blendshapes, pose correctives, then the kinematic chain. A shape batch of 1 is shared by
        all frames (computed once).
        """
        v_shaped = self.identity_template(shape) + torch.einsum("bl,lvk->bvk", expression, self.shapedirs[self.n_shape:])
        v_posed = v_shaped + torch.einsum("bp,pvk->bvk", self.pose_feature(rots), self.posedirs)
        world_rot, world_offset = self.joint_transforms(rots, self.joints(shape, expression))
        blended = torch.einsum("vj,bjkl->bvkl", self.lbs_weights,
                               torch.cat([world_rot, world_offset[..., None]], -1))
        # (B,V,3,4) affine per vertex; elementwise products beat a bmm over B*V tiny matrices
        return (blended[..., :3] * v_posed[:, :, None, :]).sum(-1) + blended[..., 3]

    def identity_template(self, shape):
        """The template with the identity blendshapes of `shape` (B,V,3). Without autograd the last
        identity's is kept: renders pose one identity frame after frame (a hint per live frame, a
        preview), and its blendshapes are most of the memory one skinning reads (n_shape of the
        n_shape + n_exp components)."""
        if shape.requires_grad and torch.is_grad_enabled():
            return self.v_template + torch.einsum("bl,lvk->bvk", shape, self.shapedirs[:self.n_shape])
        last = self._last_identity
        same = last is not None and last[0].shape == shape.shape and last[0].device == shape.device
        if not (same and torch.equal(last[0], shape)):
            shape = shape.detach()
            last = shape.clone(), self.v_template + torch.einsum("bl,lvk->bvk", shape, self.shapedirs[:self.n_shape])
            self._last_identity = last  # one assignment: a thread sees the old pair or the new one
        return last[1]

    def _landmark_buffers(self):
        """Precomputed terms of `skinned_landmarks`."""
        n = self.n_shape
        weights = [self.lmk_bary_coords[..., None] * self.lbs_weights[self.lmk_corners]]  # (68,3,5)
        if self.dynamic_contour:
            weights.append(self.contour_bary_coords[..., None] * self.lbs_weights[self.contour_corners])
        # only the joints that move some landmark (the head and the jaw for FLAME)
        self.lmk_joints = [j for j in range(N_JOINTS) if any((w[..., j] > 0).any() for w in weights)]
        weights = [w[..., self.lmk_joints] for w in weights]
        frame_dirs = torch.cat([self.shapedirs[n:], self.posedirs])

        def fold(dirs):  # (C,V,3) -> (C, joint * axis * 68): p_j of each component
            return torch.einsum("lcj,klcm->kjml", weights[0], dirs[:, self.lmk_corners]).flatten(1)

        self.register_buffer("lmk_points_template", fold(self.v_template[None])[0])
        self.register_buffer("lmk_points_shape_dirs", fold(self.shapedirs[:n]))
        self.register_buffer("lmk_points_frame_dirs", fold(frame_dirs))
        self.register_buffer("lmk_weight_sums", weights[0].sum(1).T.contiguous())          # (joint,68)
        if self.dynamic_contour:  # the table's vertices, and its corners as indices among them
            ids, corners = torch.unique(self.contour_corners, return_inverse=True)
            self.register_buffer("contour_v_template", self.v_template[ids].flatten())
            self.register_buffer("contour_shape_dirs", self.shapedirs[:n, ids].flatten(1))
            self.register_buffer("contour_frame_dirs", frame_dirs[:, ids].flatten(1))
            self.register_buffer("contour_corners_local", corners)
            self.register_buffer("contour_corner_weights", weights[1])                     # (79,17,3,joint)

    def skinned_landmarks(self, shape, expression, rots):
        """The 68 landmarks (B,68,3) of `skin`, without skinning the mesh.

        A landmark mixes three corners c with barycentric weights b_c, and skinning maps each
        corner's rest position x_c to sum_j w_cj (R_j x_c + t_j). So the landmark is
        sum_j R_j p_j + a_j t_j with p_j = sum_c b_c w_cj x_c and a_j = sum_c b_c w_cj. For a fixed
        embedding p_j is linear in the blend coefficients like x_c is: its blendshapes are folded
        at load time, and a landmark costs one small matrix product per frame over the joints
        that move landmarks. The landmark index is the last dimension throughout: on the CPU,
        elementwise work over tiny trailing dimensions (3 axes, a few joints) is many times
        slower than over long ones.
        """
        batch, joints = rots.shape[0], self.lmk_joints
        coeffs = torch.cat([expression, self.pose_feature(rots)], 1)
        points = _blend(self.lmk_points_template, self.lmk_points_shape_dirs, self.lmk_points_frame_dirs,
                        shape, coeffs).view(batch, -1, N_LANDMARKS)               # (B,joint*axis,68)
        weight_sums = self.lmk_weight_sums.expand(batch, -1, -1)
        if self.dynamic_contour:
            contour_points, contour_sums = self._contour_points(shape, coeffs, rots)
            points = torch.cat([contour_points, points[..., N_CONTOUR:]], 2)
            weight_sums = torch.cat([contour_sums, weight_sums[..., N_CONTOUR:]], 2)
        world_rot, world_offset = self.joint_transforms(rots, self.joints(shape, expression))
        transforms = torch.cat([world_rot[:, joints].permute(0, 2, 1, 3).flatten(2),
                                world_offset[:, joints].transpose(1, 2)], 2)    # (B,3,joint*axis+joint)
        return torch.bmm(transforms, torch.cat([points, weight_sums], 1)).transpose(1, 2)

    def _contour_points(self, shape, coeffs, rots):
        """p_j (B,joint*axis,17) and a_j (B,joint,17) of `skinned_landmarks` for the contour points
        the head yaw selects: blendshapes of the contour table's vertices, then per-frame corners."""
        batch = rots.shape[0]
        rest = _blend(self.contour_v_template, self.contour_shape_dirs, self.contour_frame_dirs, shape, coeffs)
        row = self.contour_row(rots)
        corners, weights = self.contour_corners_local[row], self.contour_corner_weights[row]
        columns = corners.transpose(1, 2)[:, :, None] * 3 + torch.arange(3)[:, None]   # (B,corner,axis,17)
        x = torch.gather(rest, 1, columns.flatten(1)).view(batch, 3, 3, N_CONTOUR)
        w = weights.permute(0, 2, 3, 1)                                                # (B,corner,joint,17)
        p = sum(w[:, c, :, None] * x[:, c, None] for c in range(3))                   # (B,joint,axis,17)
        return p.flatten(1, 2), w.sum(1)

    def joint_transforms(self, rots, joints):
        """World rotation R_j and offset t_j of each joint, so a rest-pose point x maps to R_j x + t_j."""
        world_rot, world_pos = [], []
        for j, parent in enumerate(self.parents):
            if parent < 0:
                world_rot.append(rots[:, j])
                world_pos.append(joints[:, j])
            else:
                local = joints[:, j] - joints[:, parent]
                world_rot.append(world_rot[parent] @ rots[:, j])
                world_pos.append(world_pos[parent] + (world_rot[parent] @ local[..., None])[..., 0])
        world_rot, world_pos = torch.stack(world_rot, 1), torch.stack(world_pos, 1)
        return world_rot, world_pos - (world_rot @ joints[..., None])[..., 0]

    @staticmethod
    def contour_row(rots):
        """Row of the contour table per frame: yaw of the head (global rotation, then neck)."""
        return rotation_yaw_index(rots[:, GLOBAL] @ rots[:, NECK])

    def landmarks(self, vertices, rots):
        """68 iBUG landmarks (B,68,3) by barycentric interpolation on the posed mesh (B,V,3)."""
        batch = vertices.shape[0]
        corners = self.lmk_corners.expand(batch, -1, -1)
        bary = self.lmk_bary_coords.expand(batch, -1, -1)
        if self.dynamic_contour:
            row = self.contour_row(rots)
            corners = torch.cat([self.contour_corners[row], corners[:, N_CONTOUR:]], 1)
            bary = torch.cat([self.contour_bary_coords[row], bary[:, N_CONTOUR:]], 1)
        corner_pos = torch.gather(vertices, 1, corners.flatten(1)[..., None].expand(-1, -1, 3))
        return (corner_pos.view(batch, -1, 3, 3) * bary[..., None]).sum(2)


def _blend(template, shape_dirs, frame_dirs, shape, frame_coeffs):
    """template + shape @ shape_dirs + frame_coeffs @ frame_dirs: flattened blendshapes (B,C)
    whose shape coefficients may be shared by all frames (a batch of 1)."""
    return torch.addmm(torch.addmm(template, shape, shape_dirs), frame_coeffs, frame_dirs)


# --------------------------------------------------------------------------- render regions

def face_regions(faces, weights, v_template, embedding):
    """Faces for rendering plus a region label per face (tracking.conditioning's REGION_*).

    Heuristics that hold for FLAME and the toy head alike:
    - eyeballs are the faces whose three vertices are skinned mostly (> 0.5) to an eye joint;
    - the mouth is a hole in the mesh: of the mesh's boundary loops, the one closest to the
      inner-lip landmarks (60..67). We close it with a triangle fan and label the fan
      REGION_MOUTH, so an open jaw shows a mouth-interior mask.
    """
    regions = np.full(len(faces), REGION_SKIN, dtype=np.int64)
    for joint, label in ((LEFT_EYE, REGION_LEFT_EYE), (RIGHT_EYE, REGION_RIGHT_EYE)):
        regions[(weights[faces, joint] > 0.5).all(1)] = label
    lips = _embedding_points(v_template, faces, embedding)[60:68].mean(0)
    loops = _boundary_loops(faces)
    if not loops:
        return faces, regions
    mouth = min(loops, key=lambda loop: np.linalg.norm(v_template[loop].mean(0) - lips))
    # Fan out from the loop vertex whose fan is smallest on the template (mouth closed): the fan then
    # stays between the lips, whichever vertex the loop happens to be read from.
    fans = [_fan(np.roll(mouth, -k)) for k in range(len(mouth))]
    fan = min(fans, key=lambda fan: _area(v_template[fan]))
    return (np.concatenate([faces, fan]),
            np.concatenate([regions, np.full(len(fan), REGION_MOUTH, dtype=np.int64)]))


def _fan(loop):
    """Triangles from loop[0] to every other edge of the loop, wound against the loop (as the mesh)."""
    return np.stack([np.full(len(loop) - 2, loop[0]), loop[2:], loop[1:-1]], 1)


def _area(triangles):
    return np.linalg.norm(np.cross(triangles[:, 1] - triangles[:, 0], triangles[:, 2] - triangles[:, 0]), axis=1).sum() / 2


def _embedding_points(vertices, faces, embedding):
    return (vertices[faces[embedding.faces_idx]] * embedding.bary_coords[..., None]).sum(1)


def _boundary_loops(faces):
    """Closed loops of edges used by one face only, each ordered along its faces' winding."""
    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    undirected, counts = np.unique(np.sort(edges, 1), axis=0, return_counts=True)
    single = {tuple(e) for e in undirected[counts == 1]}
    next_vertex = {a: b for a, b in edges.tolist() if (min(a, b), max(a, b)) in single}
    loops = []
    while next_vertex:
        start, loop = next(iter(next_vertex)), []
        vertex = start
        while vertex in next_vertex:
            loop.append(vertex)
            vertex = next_vertex.pop(vertex)
        if vertex == start and len(loop) >= 3:
            loops.append(np.array(loop))
    return loops
