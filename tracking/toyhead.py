"""A procedural toy head in exactly the FLAME file layout, for tests and demos without the real model.

`write_toy_flame(dir)` writes `generic_model.pkl` (plain numpy arrays and a scipy.sparse
`J_regressor`, loadable by tracking/flame.py's safe loader and by plain pickle), DECA-style
`landmark_embedding.npy` and FLAME-style `flame_static_embedding.pkl` +
`flame_dynamic_embedding.npy`. Same seed -> same bytes.

Differences from the real FLAME: about 2k vertices instead of 5023 (every array keeps FLAME's
layout, with V = the toy's vertex count); the identity/expression bases are smooth procedural
fields rather than PCA of scans (with, as in a PCA of rigidly aligned scans, no rigid motion or
scale of the face, so they cannot imitate head pose); the dynamic contour table repeats the
frontal contour in every row (the toy has no per-yaw silhouette table).

Geometry (metres, y up, face towards +z, like FLAME): a surface of revolution (skull + neck,
open at the neck) with a nose bump, eye sockets and a one-row mouth slit (a hole whose lips
nearly touch), plus two eyeball spheres skinned to the eye joints. The lower face is skinned
to the jaw joint, so a positive jaw rotation about x opens the mouth.
"""
import os
import pickle

import numpy as np
import scipy.sparse

from model.files import atomic_write

from .flame import CONTOUR_LUT_ROWS, N_CONTOUR, N_JOINTS

HEAD_RADIUS = 0.09
NECK_RADIUS = 0.048
N_COLUMNS = 48           # vertices around each ring
N_HEAD_RINGS = 34        # rings from the crown down to the neck
NECK_Y = (-0.09, -0.115, -0.14)
EYE_CENTRE = np.array([0.032, 0.02])   # +x: the subject's left eye (camera's right)
EYE_RADIUS = 0.012
MOUTH_Y = -0.045         # the slit is the ring band straddling this height
MOUTH_HALF_WIDTH = 0.026
N_SHAPE, N_EXP = 300, 100


def _smoothstep(lo, hi, x):
    t = np.clip((x - lo) / (hi - lo), 0, 1)
    return t * t * (3 - 2 * t)


def _gauss(points, centre, sigma):
    d = (points - centre) / sigma
    return np.exp(-0.5 * (d * d).sum(-1))


# --------------------------------------------------------------------------- mesh

def _skin_grid():
    """Vertices of the head-and-neck surface of revolution: crown pole + rings of N_COLUMNS."""
    theta = np.linspace(0, np.arccos(-np.sqrt(1 - (NECK_RADIUS / HEAD_RADIUS) ** 2)), N_HEAD_RINGS + 1)[1:]
    ring_rho = np.concatenate([HEAD_RADIUS * np.sin(theta), np.full(len(NECK_Y), NECK_RADIUS)])
    ring_y = np.concatenate([HEAD_RADIUS * np.cos(theta), NECK_Y])
    phi = 2 * np.pi * np.arange(N_COLUMNS) / N_COLUMNS        # phi = 0 faces +z
    rings = np.stack([np.outer(ring_rho, np.sin(phi)), np.repeat(ring_y[:, None], N_COLUMNS, 1),
                      np.outer(ring_rho, np.cos(phi))], -1)
    return np.concatenate([[[0, HEAD_RADIUS, 0]], rings.reshape(-1, 3)])


def _grid_faces(n_rings, columns, first=1):
    """Triangles of a pole-capped ring grid (vertex 0 = pole, ring r column c = first + r*C + c),
    counter-clockwise seen from outside (FLAME's winding: outward normals, the renderer's front)."""
    c = np.arange(columns)
    c1 = (c + 1) % columns
    faces = [np.stack([np.zeros(columns, int), first + c, first + c1], 1)] if first else []
    for r in range(n_rings - 1):
        a, b = first + r * columns + c, first + (r + 1) * columns + c
        a1, b1 = first + r * columns + c1, first + (r + 1) * columns + c1
        faces += [np.stack([a, b, a1], 1), np.stack([a1, b, b1], 1)]
    return np.concatenate(faces)


def _sculpt(verts):
    """Face features by moving skin vertices along their radial direction; returns mouth ring."""
    radial = verts / np.linalg.norm(verts[:, [0, 2]], axis=1, keepdims=True).clip(1e-6)
    radial[:, 1] = 0
    front = verts[:, 2] > 0
    nose = 0.022 * _gauss(verts[:, :2], [0, -0.002], [0.011, 0.02]) * front
    sockets = sum(-0.009 * _gauss(verts[:, :2], [sx * EYE_CENTRE[0], EYE_CENTRE[1]], [0.014, 0.01])
                  for sx in (-1, 1)) * front
    chin = 0.006 * _gauss(verts[:, :2], [0, -0.07], [0.02, 0.01]) * front
    verts = verts + radial * (nose + sockets + chin)[:, None]
    # the mouth slit runs between the ring just above MOUTH_Y and the ring just below it
    ring_y = verts[1::N_COLUMNS, 1]
    upper_ring = int(np.nonzero(ring_y > MOUTH_Y)[0].max())
    return verts, upper_ring


def _mouth_faces(faces, verts, upper_ring):
    """Triangles of the slit: the quads between the lip rings within the mouth width, in front."""
    first, last = 1 + upper_ring * N_COLUMNS, 1 + (upper_ring + 2) * N_COLUMNS
    centre = verts[faces].mean(1)
    in_band = ((faces >= first) & (faces < last)).all(1)
    return in_band & (np.abs(centre[:, 0]) < MOUTH_HALF_WIDTH) & (centre[:, 2] > 0)


def _eyeball(centre, n_rings=8, columns=12):
    theta = np.linspace(0, np.pi, n_rings + 2)[1:-1]
    phi = 2 * np.pi * np.arange(columns) / columns
    ring = np.stack([np.outer(np.sin(theta), np.sin(phi)), np.repeat(np.cos(theta)[:, None], columns, 1),
                     np.outer(np.sin(theta), np.cos(phi))], -1).reshape(-1, 3)
    verts = centre + EYE_RADIUS * np.concatenate([[[0, 1, 0]], ring, [[0, -1, 0]]])
    faces = _grid_faces(n_rings, columns)
    bottom, last_ring = len(verts) - 1, 1 + (n_rings - 1) * columns
    c = np.arange(columns)
    cap = np.stack([np.full(columns, bottom), last_ring + (c + 1) % columns, last_ring + c], 1)
    return verts, np.concatenate([faces, cap])


def build_mesh():
    """Template vertices, faces, per-vertex part ids (0 skin, 1 left eye, 2 right eye), mouth ring."""
    skin = _skin_grid()
    skin, upper_ring = _sculpt(skin)
    # close the lips to a thin slit: lip rings move towards each other
    upper = slice(1 + upper_ring * N_COLUMNS, 1 + (upper_ring + 1) * N_COLUMNS)
    lower = slice(upper.stop, upper.stop + N_COLUMNS)
    gap = skin[upper, 1] - skin[lower, 1]
    lip_mask = (np.abs(skin[upper, 0]) < MOUTH_HALF_WIDTH + 0.01) & (skin[upper, 2] > 0)
    skin[upper, 1] -= 0.4 * gap * lip_mask
    skin[lower, 1] += 0.4 * gap * lip_mask
    skin_faces = _grid_faces(N_HEAD_RINGS + len(NECK_Y), N_COLUMNS)
    skin_faces = skin_faces[~_mouth_faces(skin_faces, skin, upper_ring)]
    verts, faces, parts = [skin], [skin_faces], [np.zeros(len(skin), int)]
    for part, sx in ((1, 1), (2, -1)):
        x, y = sx * EYE_CENTRE[0], EYE_CENTRE[1]
        surface_z = np.sqrt(HEAD_RADIUS ** 2 - x * x - y * y) - 0.009
        eye_v, eye_f = _eyeball(np.array([x, y, surface_z - EYE_RADIUS + 0.004]))
        faces.append(eye_f + sum(len(v) for v in verts))
        verts.append(eye_v)
        parts.append(np.full(len(eye_v), part))
    return np.concatenate(verts), np.concatenate(faces), np.concatenate(parts), upper_ring


# --------------------------------------------------------------------------- rig

def skinning_weights(verts, parts, upper_ring):
    """(V,5): neck base to global, head to neck, lower face to jaw, eyeballs to their eye joints."""
    n = len(verts)
    weights = np.zeros((n, N_JOINTS))
    skin = parts == 0
    to_global = 1 - _smoothstep(-0.13, -0.085, verts[:, 1])
    ring = np.full(n, -1)
    ring[1:len(ring)] = (np.arange(1, n) - 1) // N_COLUMNS
    front = _smoothstep(np.cos(np.radians(80)), np.cos(np.radians(45)),
                        verts[:, 2] / np.linalg.norm(verts[:, [0, 2]], axis=1).clip(1e-6))
    below_mouth = (ring > upper_ring) & (verts[:, 1] > -0.095)
    to_jaw = front * below_mouth * (1 - to_global)
    weights[:, 0] = to_global
    weights[:, 2] = to_jaw
    weights[:, 1] = 1 - to_global - to_jaw
    weights[~skin] = 0
    weights[parts == 1, 3] = 1
    weights[parts == 2, 4] = 1
    return weights


def joint_regressor(verts, parts):
    """Sparse (5,V): each joint is the mean of a vertex set (so it moves with identity shape)."""
    ring_of = lambda y: np.nonzero((parts == 0) & np.isclose(verts[:, 1], y))[0]
    side = np.nonzero(parts == 0)[0]
    side = side[np.argsort(np.abs(verts[side, 1] + 0.01) + 10 * np.abs(verts[side, 2]))[:2]]
    sets = [ring_of(NECK_Y[-1]), ring_of(NECK_Y[0]), side,
            np.nonzero(parts == 1)[0], np.nonzero(parts == 2)[0]]
    rows = np.concatenate([np.full(len(s), j) for j, s in enumerate(sets)])
    cols = np.concatenate(sets)
    vals = np.concatenate([np.full(len(s), 1 / len(s)) for s in sets])
    return scipy.sparse.csc_matrix((vals, (rows, cols)), shape=(N_JOINTS, len(verts)))


def _rigid_eyes(field, parts):
    """Eyeballs follow the field at their centre rigidly, so they never deform."""
    for part in (1, 2):
        field[parts == part] = field[parts == part].mean(0)
    return field


def _similarity_fields(verts):
    """(V*3, 7) displacement fields of an infinitesimal rotation (3), translation (3) and scale."""
    fields = [np.cross(np.eye(3)[axis], verts) for axis in range(3)]
    fields += [np.broadcast_to(np.eye(3)[axis], verts.shape) for axis in range(3)] + [verts]
    return np.stack([f.reshape(-1) for f in fields], 1)


def _without_face_rigid_motion(fields, verts, parts):
    """Remove from (V,3,K) fields the similarity motion (rotation, translation, scale) that best
    fits them over the face, so no combination of them can imitate a head pose in the landmarks
    (as in a PCA of rigidly aligned scans). The correction fades out behind the face."""
    face = (parts == 0) & (verts[:, 2] > 0.02)
    mask = _smoothstep(-0.02, 0.03, verts[:, 2]) * (parts == 0)
    similarity = _similarity_fields(verts)                                      # (V*3,7)
    flat = fields.reshape(-1, fields.shape[-1])
    coeffs = np.linalg.lstsq(similarity[np.repeat(face, 3)], flat[np.repeat(face, 3)], rcond=None)[0]
    return fields - mask[:, None, None] * (similarity @ coeffs).reshape(fields.shape)


def shape_basis(verts, parts, rng):
    """(V,3,300) smooth global fields (sums of wide Gaussians), amplitude decaying with index."""
    centres = verts[rng.choice(np.nonzero(parts == 0)[0], 48, replace=False)]
    kernels = np.stack([_gauss(verts, c, 0.06) for c in centres], 1)              # (V,48)
    basis = np.einsum("vc,kcd->vdk", kernels, rng.normal(size=(N_SHAPE, len(centres), 3)))
    basis = _without_face_rigid_motion(basis, verts, parts)
    basis /= np.linalg.norm(basis.reshape(-1, N_SHAPE), axis=0) / np.sqrt(len(verts))
    basis *= 0.004 / (1 + np.arange(N_SHAPE) / 4)                                # metres per unit
    return np.stack([_rigid_eyes(basis[..., k], parts) for k in range(N_SHAPE)], -1)


_NAMED_EXPRESSIONS = [  # (centre x, y, sigma, displacement per unit coefficient in metres), mirrored
    ((0.024, MOUTH_Y), 0.012, (0.004, 0.004, 0.0)),     # smile: mouth corners up and out
    ((0.025, 0.04), 0.015, (0.0, 0.005, 0.0)),          # brow raise
    ((0.012, 0.035), 0.01, (-0.003, -0.003, 0.0)),      # brow furrow
    ((0.0, MOUTH_Y), 0.014, (0.0, 0.0, 0.005)),         # lip pucker
    ((0.04, -0.03), 0.02, (0.003, 0.0, 0.003)),         # cheek puff
    ((0.032, 0.013), 0.008, (0.0, 0.002, 0.0)),         # lower lids up (squint)
    ((0.012, MOUTH_Y), 0.01, (0.0, -0.002, 0.0)),       # lip stretch down
]


def expression_basis(verts, parts, rng):
    """(V,3,100): named mirrored bumps first, then random local bumps on the face, decaying."""
    fields = []
    for (x, y), sigma, disp in _NAMED_EXPRESSIONS:
        field = np.zeros_like(verts)
        for sx in (-1, 1):
            w = _gauss(verts[:, :2], [sx * x, y], sigma) * (verts[:, 2] > 0)
            field += w[:, None] * np.array([sx * disp[0], disp[1], disp[2]])
        fields.append(field)
    while len(fields) < N_EXP:
        centre = np.array([rng.uniform(-0.05, 0.05), rng.uniform(-0.07, 0.05)])
        w = _gauss(verts[:, :2], centre, rng.uniform(0.01, 0.025)) * (verts[:, 2] > 0)
        amp = 0.003 / (1 + (len(fields) - len(_NAMED_EXPRESSIONS)) / 10)
        fields.append(w[:, None] * rng.normal(size=3) * amp)
    basis = _without_face_rigid_motion(np.stack(fields, -1), verts, parts)
    basis[parts != 0] = 0
    return basis


def pose_correctives(verts, weights, rng):
    """(V,3,36): small smooth corrections for the (R - I) entries of neck and jaw; eyes none."""
    posedirs = np.zeros((len(verts), 3, 36))
    for joint in (1, 2):  # features of joint j occupy columns 9*(j-1) .. 9*j
        posedirs[:, :, 9 * (joint - 1):9 * joint] = (
            weights[:, joint, None, None] * rng.normal(scale=0.002, size=(1, 3, 9))
            * _gauss(verts, verts[weights[:, joint] > 0.5].mean(0), 0.05)[:, None, None])
    return posedirs


# --------------------------------------------------------------------------- landmarks

def _ibug_targets(upper_lip_y, lower_lip_y):
    """(68,2) front-view (x, y) of the iBUG points on the toy face; image-left = subject's right = -x."""
    a = np.linspace(0, np.pi, N_CONTOUR)
    jaw = np.stack([-0.062 * np.cos(a), 0.012 - 0.082 * np.sin(a) ** 1.2], 1)
    brow_x = np.linspace(0.055, 0.012, 5)
    brow_y = 0.036 + 0.006 * np.sin(np.linspace(0.3, np.pi - 0.3, 5))
    brows = np.concatenate([np.stack([-brow_x, brow_y], 1), np.stack([brow_x[::-1], brow_y[::-1]], 1)])
    bridge = np.stack([np.zeros(4), np.linspace(0.016, -0.012, 4)], 1)
    nostrils = np.stack([np.linspace(-0.012, 0.012, 5), -0.021 + 0.003 * np.cos(np.linspace(-1.2, 1.2, 5))], 1)
    ex, ey = EYE_CENTRE
    eye = lambda sx, ang: np.stack([sx * ex + 0.012 * np.cos(ang), ey + 0.0045 * np.sin(ang)], 1)
    ang = np.radians([180, 120, 60, 0, -60, -120])       # outer corner, upper lid, inner, lower lid
    right_eye, left_eye = eye(-1, ang), eye(1, np.pi - ang[[3, 2, 1, 0, 5, 4]])
    mid = (upper_lip_y + lower_lip_y) / 2
    t = np.linspace(-1, 1, 7)
    outer_upper = np.stack([0.024 * t, mid + 0.009 * (1 - t ** 2) + 0.001], 1)
    outer_lower = np.stack([0.02 * t[1:-1][::-1], mid - 0.011 * (1 - t[1:-1] ** 2)], 1)
    ti = np.array([-0.5, 0, 0.5])
    inner_upper = np.stack([0.018 * ti, np.full(3, upper_lip_y + 0.0008)], 1)
    inner_lower = np.stack([0.018 * ti[::-1], np.full(3, lower_lip_y - 0.0008)], 1)
    corners = np.array([[-0.021, upper_lip_y + 0.0008], [0.021, upper_lip_y + 0.0008]])
    return np.concatenate([jaw, brows, bridge, nostrils, right_eye, left_eye, outer_upper,
                           outer_lower, corners[:1], inner_upper, corners[1:], inner_lower])


def _cast_front(points_xy, verts, faces):
    """For each (x, y), the frontmost triangle hit by a ray along -z: face index, barycentrics."""
    tri = verts[faces][:, :, :2]                                          # (F,3,2)
    v0, v1, v2 = tri[:, 0], tri[:, 1], tri[:, 2]
    det = (v1[:, 0] - v0[:, 0]) * (v2[:, 1] - v0[:, 1]) - (v2[:, 0] - v0[:, 0]) * (v1[:, 1] - v0[:, 1])
    face_idx, bary = [], []
    for p in points_xy:
        d = p - v0
        b1 = (d[:, 0] * (v2[:, 1] - v0[:, 1]) - (v2[:, 0] - v0[:, 0]) * d[:, 1]) / det
        b2 = ((v1[:, 0] - v0[:, 0]) * d[:, 1] - d[:, 0] * (v1[:, 1] - v0[:, 1])) / det
        coords = np.stack([1 - b1 - b2, b1, b2], 1)
        hit = (coords >= -1e-9).all(1) & (np.abs(det) > 1e-12)
        depth = np.where(hit, (coords * verts[faces][:, :, 2]).sum(1), -np.inf)
        best = int(np.argmax(depth))
        if not hit[best]:
            raise RuntimeError(f"toy head: no surface under landmark at {p}")
        face_idx.append(best)
        bary.append(coords[best])
    return np.array(face_idx), np.array(bary)


def landmark_embedding(verts, faces, parts, upper_ring):
    """Face indices (68,) and barycentric coordinates (68,3) of the iBUG points on the skin."""
    upper_lip_y = verts[1 + upper_ring * N_COLUMNS, 1]            # column 0 is the face centre
    lower_lip_y = verts[1 + (upper_ring + 1) * N_COLUMNS, 1]
    skin_faces = np.nonzero((parts[faces] == 0).all(1))[0]
    idx, bary = _cast_front(_ibug_targets(upper_lip_y, lower_lip_y), verts, faces[skin_faces])
    return skin_faces[idx], bary


# --------------------------------------------------------------------------- files

def build_toy_flame(seed=0):
    """The toy model as a dict in FLAME's generic_model.pkl layout, plus its landmark embedding."""
    rng = np.random.default_rng(seed)
    verts, faces, parts, upper_ring = build_mesh()
    weights = skinning_weights(verts, parts, upper_ring)
    model = {
        "v_template": verts,
        "f": faces.astype(np.uint32),
        "shapedirs": np.concatenate([shape_basis(verts, parts, rng), expression_basis(verts, parts, rng)], 2),
        "posedirs": pose_correctives(verts, weights, rng),
        "J_regressor": joint_regressor(verts, parts),
        "kintree_table": np.array([[2 ** 32 - 1, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64),
        "weights": weights,
    }
    return model, landmark_embedding(verts, faces, parts, upper_ring)


def write_toy_flame(directory, seed=0):
    """Write the toy head's FLAME files into `directory`; returns {name: path}."""
    os.makedirs(directory, exist_ok=True)
    model, (lmk_faces, lmk_bary) = build_toy_flame(seed)
    contour_faces = np.repeat(lmk_faces[None, :N_CONTOUR], CONTOUR_LUT_ROWS, 0)
    contour_bary = np.repeat(lmk_bary[None, :N_CONTOUR], CONTOUR_LUT_ROWS, 0)
    deca = {"static_lmk_faces_idx": lmk_faces[N_CONTOUR:], "static_lmk_bary_coords": lmk_bary[N_CONTOUR:],
            "dynamic_lmk_faces_idx": contour_faces, "dynamic_lmk_bary_coords": contour_bary,
            "full_lmk_faces_idx": lmk_faces[None], "full_lmk_bary_coords": lmk_bary[None]}
    static = {"lmk_face_idx": lmk_faces[N_CONTOUR:].astype(np.uint32), "lmk_b_coords": lmk_bary[N_CONTOUR:]}
    dynamic = {"lmk_face_idx": contour_faces, "lmk_b_coords": contour_bary}
    paths = {name: os.path.join(directory, name) for name in (
        "generic_model.pkl", "landmark_embedding.npy", "flame_static_embedding.pkl",
        "flame_dynamic_embedding.npy")}
    # atomic_write's temp names hold the pid: two processes may write the same toy head at once
    for name, tables in (("generic_model.pkl", model), ("flame_static_embedding.pkl", static)):
        with atomic_write(paths[name]) as tmp, open(tmp, "wb") as f:
            pickle.dump(tables, f, protocol=2)
    for name, tables in (("landmark_embedding.npy", deca), ("flame_dynamic_embedding.npy", dynamic)):
        with atomic_write(paths[name]) as tmp:
            np.save(tmp, np.array(tables, dtype=object))
    return paths
