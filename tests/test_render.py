import math

import numpy as np
import pytest
import torch

from bench.render import uv_ellipsoid
from tracking.render import (
    SUBPIXEL,
    draw_landmarks,
    interpolate,
    normal_maps,
    overlay,
    project,
    rasterize,
    vertex_normals,
)


def reference_rasterize(verts, faces, focal, height, width, principal=None, near=1e-3):
    """Brute force: every pixel tests every triangle, in plain Python integers and numpy scalars.

    Same conventions as tracking.render: pixel centres at +1/2, vertices rounded half up to 1/SUBPIXEL
    pixel, corners 1 and 2 swapped for a negative screen area, top-left fill rule (y down), depth
    1 / (1/z0 + g . (p - p0)) rounded to float32, the nearest depth then the smaller face index wins.
    """
    verts = np.asarray(verts, dtype=np.float64)
    cx, cy = (width / 2, height / 2) if principal is None else principal
    z = verts[:, 2]
    sx = np.floor((verts[:, 0] / z * focal + cx) * SUBPIXEL + 0.5)
    sy = np.floor((verts[:, 1] / z * focal + cy) * SUBPIXEL + 0.5)

    def edge(a, b, p):
        return (b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0])

    def top_left(a, b):
        return (a[1] == b[1] and b[0] > a[0]) or b[1] < a[1]

    triangles = []
    for index, corners in enumerate(np.asarray(faces).tolist()):
        if any(z[c] <= near or abs(sx[c]) >= 2**28 or abs(sy[c]) >= 2**28 for c in corners):
            continue
        p = [(int(sx[c]), int(sy[c])) for c in corners]
        area = edge(p[0], p[1], p[2])
        if area == 0:
            continue
        if area < 0:
            corners, p, area = [corners[0], corners[2], corners[1]], [p[0], p[2], p[1]], -area
        edges = [(p[1], p[2]), (p[2], p[0]), (p[0], p[1])]
        inv_z = [1.0 / np.float64(z[c]) for c in corners]
        grad = []
        for axis in (0, 1):  # d(edge)/dx = a.y - b.y, d(edge)/dy = b.x - a.x
            steps = [float(a[1] - b[1]) if axis == 0 else float(b[0] - a[0]) for a, b in edges]
            grad.append((steps[0] * inv_z[0] + steps[1] * inv_z[1] + steps[2] * inv_z[2]) / float(area))
        triangles.append((index, p, edges, inv_z[0], grad))

    face = np.full((height, width), -1)
    depth = np.zeros((height, width), np.float32)
    ties = {"on_edge": 0, "same_depth": 0}  # how often the fill rule and the index tie-break decided
    half = SUBPIXEL // 2
    for row in range(height):
        for col in range(width):
            centre = (col * SUBPIXEL + half, row * SUBPIXEL + half)
            best = None
            for index, p, edges, inv_z0, grad in triangles:
                w = [edge(a, b, centre) for a, b in edges]
                ties["on_edge"] += min(w) == 0
                if not all(wi >= (0 if top_left(a, b) else 1) for wi, (a, b) in zip(w, edges)):
                    continue
                x, y = float(centre[0] - p[0][0]), float(centre[1] - p[0][1])
                z_here = np.float32(1.0 / (inv_z0 + grad[0] * x + grad[1] * y))
                ties["same_depth"] += best is not None and z_here == best[0]
                if best is None or (z_here, index) < best:
                    best = (z_here, index)
            if best is not None:
                depth[row, col], face[row, col] = best
    return face, depth, ties


def random_triangles(n, seed, size=32, on_grid=False):
    """n random overlapping triangles in front of a camera with focal = size; on_grid puts every
    vertex on the centre of every 4th pixel: many edges are horizontal or vertical or otherwise run
    through pixel centres, where only the fill rule decides."""
    g = torch.Generator().manual_seed(seed)
    uv = torch.rand(n * 3, 2, generator=g) * (size + 8) - 4
    if on_grid:
        uv = torch.floor(uv / 4) * 4 + 0.5
    z = 1 + 3 * torch.rand(n * 3, 1, generator=g)
    if on_grid:  # whole triangles at one of few depths, so that equal depths tie as well
        z = (1 + torch.randint(0, 3, (n, 1), generator=g).float()).repeat_interleave(3, 0)
    xy = (uv - size / 2) * z / size
    verts = torch.cat([xy, z], 1)
    return verts, torch.arange(n * 3).view(n, 3)


@pytest.mark.parametrize("on_grid", [False, True])
def test_matches_brute_force_on_random_triangles(on_grid):
    verts, faces = random_triangles(40, seed=int(on_grid), on_grid=on_grid)
    raster = rasterize(verts[None], faces, focal=32.0, image_size=32)
    face, depth, ties = reference_rasterize(verts.numpy(), faces.numpy(), 32.0, 32, 32)
    assert (face >= 0).mean() > 0.5
    if on_grid:
        assert ties["on_edge"] > 100 and ties["same_depth"] > 100
    np.testing.assert_array_equal(raster.face[0].numpy(), face)
    np.testing.assert_array_equal(raster.depth[0].numpy(), depth)


def test_matches_brute_force_on_sphere_with_offset_camera():
    verts, faces = uv_ellipsoid(8, 12)
    verts = verts * 0.8 + torch.tensor([0.1, -0.2, 3.0])
    raster = rasterize(verts[None], faces, focal=40.0, image_size=(24, 32), principal=(15.0, 13.5))
    face, depth, _ = reference_rasterize(verts.numpy(), faces.numpy(), 40.0, 24, 32, principal=(15.0, 13.5))
    assert 0.2 < (face >= 0).mean() < 0.9
    np.testing.assert_array_equal(raster.face[0].numpy(), face)
    np.testing.assert_array_equal(raster.depth[0].numpy(), depth)


def test_shared_edges_cover_each_pixel_exactly_once():
    # A 6 x 6 grid of quads whose vertices sit on pixel centres: every interior edge passes through
    # pixel centres. Render each triangle alone; the union must tile the square without overlap.
    n, size = 6, 32
    u = torch.arange(n + 1) * 4.0 + 4.5
    grid = torch.stack(torch.meshgrid(u, u, indexing="xy"), -1).reshape(-1, 2)
    verts = torch.cat([(grid - size / 2) / size * 2.0, torch.full((len(grid), 1), 2.0)], 1)
    i = torch.arange(n)
    corner = (i[None, :] + i[:, None] * (n + 1)).flatten()
    faces = torch.cat([torch.stack([corner, corner + 1, corner + n + 2], 1), torch.stack([corner, corner + n + 2, corner + n + 1], 1)])
    coverage = torch.zeros(size, size, dtype=torch.int64)
    for f in range(len(faces)):
        coverage += rasterize(verts[None], faces[f : f + 1], focal=32.0, image_size=size).mask[0].long()
    assert coverage.max() == 1
    assert coverage.sum() == 24 * 24  # centres 4.5 .. 28.5: pixels 4..27 inclusive, right/bottom out
    together = rasterize(verts[None], faces, focal=32.0, image_size=size).mask[0]
    assert torch.equal(together, coverage.bool())


def test_barycentrics_are_perspective_correct():
    # Interpolating camera-space positions must give the point seen through each pixel centre.
    verts, faces = uv_ellipsoid(10, 16)
    verts = (verts * torch.tensor([0.5, 0.6, 0.4]) + torch.tensor([0.05, 0.0, 1.5]))[None]
    raster = rasterize(verts, faces, focal=48.0, image_size=48)
    point = interpolate(raster, faces, verts)[raster.mask]
    seen = project(point[None], 48.0, 48)[0]
    rows, cols = raster.mask[0].nonzero(as_tuple=True)
    centre = torch.stack([cols, rows], -1).double() + 0.5
    # Vertices are snapped to 1/SUBPIXEL px; the flat facets differ from the snapped ones by that much.
    assert (seen - centre).abs().max() < 2.0 / SUBPIXEL
    torch.testing.assert_close(point[:, 2], raster.depth[raster.mask], rtol=1e-5, atol=0)
    assert torch.allclose(raster.bary.sum(-1)[raster.mask], torch.ones(()))


def test_batch_frames_are_independent_and_near_plane_culls():
    verts, faces = random_triangles(30, seed=3)
    moved = verts + torch.tensor([0.1, 0.0, 0.5])
    batch = rasterize(torch.stack([verts, moved]), faces, focal=torch.tensor([32.0, 40.0]), image_size=32)
    for b, (v, f) in enumerate([(verts, 32.0), (moved, 40.0)]):
        single = rasterize(v[None], faces, focal=f, image_size=32)
        assert torch.equal(batch.face[b], single.face[0])
        assert torch.equal(batch.depth[b], single.depth[0])
    # A face crossing the near plane disappears, the others are untouched.
    crossing = verts.clone()
    crossing[0, 2] = -1.0
    raster = rasterize(crossing[None], faces, focal=32.0, image_size=32)
    face, _, _ = reference_rasterize(crossing.numpy(), faces.numpy(), 32.0, 32, 32)
    assert not (raster.face == 0).any()
    np.testing.assert_array_equal(raster.face[0].numpy(), face)


def test_small_chunks_give_the_same_image():
    verts, faces = uv_ellipsoid(10, 16)
    verts = (verts + torch.tensor([0.0, 0.0, 3.0]))[None]
    full = rasterize(verts, faces, focal=40.0, image_size=40)
    chunked = rasterize(verts, faces, focal=40.0, image_size=40, max_pixels=50)
    assert torch.equal(full.face, chunked.face) and torch.equal(full.bary, chunked.bary)


def test_back_face_culling():
    # On a closed mesh only front faces are visible, so culling changes nothing.
    verts, faces = uv_ellipsoid(10, 16)
    verts = (verts + torch.tensor([0.2, 0.0, 3.0]))[None]
    full = rasterize(verts, faces, focal=40.0, image_size=40)
    culled = rasterize(verts, faces, focal=40.0, image_size=40, cull_back_faces=True)
    assert torch.equal(full.face, culled.face) and torch.equal(full.depth, culled.depth)
    # A lone triangle: counter-clockwise seen from the camera (normal towards -z) is its front.
    front = torch.tensor([[[0.0, 0.0, 2.0], [0.0, 1.0, 2.0], [1.0, 0.0, 2.0]]])
    assert torch.linalg.cross(front[0, 1] - front[0, 0], front[0, 2] - front[0, 0])[2] < 0
    triangle = torch.tensor([[0, 1, 2]])
    assert rasterize(front, triangle, 16.0, 16, cull_back_faces=True).mask.any()
    assert not rasterize(front, triangle[:, [0, 2, 1]], 16.0, 16, cull_back_faces=True).mask.any()
    assert rasterize(front, triangle[:, [0, 2, 1]], 16.0, 16).mask.any()


def test_vertex_normals_of_a_sphere_point_outwards():
    verts, faces = uv_ellipsoid(12, 24)
    normals = vertex_normals(verts[None], faces)[0]
    assert torch.nn.functional.cosine_similarity(normals, verts).min() > 0.99


def test_overlay_and_landmarks_draw_on_uint8_frames():
    verts, faces = uv_ellipsoid(8, 12)
    verts = (verts * 0.5 + torch.tensor([0.0, 0.0, 2.0]))[None]
    frame = np.full((32, 40, 3), 10, np.uint8)
    shaded = overlay(frame, verts[0], faces, focal=40.0)
    assert shaded.dtype == np.uint8 and shaded.shape == frame.shape
    mask = rasterize(verts, faces, focal=40.0, image_size=(32, 40)).mask[0].numpy()
    assert (shaded[mask] > 10).all() and (shaded[~mask] == 10).all()
    # A batch is drawn as its frames one by one; culling back faces changes nothing on a closed mesh.
    moved = verts + torch.tensor([0.3, 0.1, 0.5])
    batch = overlay(np.stack([frame, frame + 5]), torch.cat([verts, moved]), faces, focal=40.0, cull_back_faces=True)
    assert np.array_equal(batch[0], shaded)
    assert np.array_equal(batch[1], overlay(frame + 5, moved[0], faces, focal=40.0))
    dots = draw_landmarks(frame, np.array([[5.5, 6.5], [30.0, 20.0], [-10.0, 3.0]]), radius=1.5, color=(0, 255, 0))
    assert dots.dtype == np.uint8 and (frame == 10).all()  # input untouched
    assert tuple(dots[6, 5]) == (0, 255, 0) and tuple(dots[20, 30]) == (0, 255, 0) and tuple(dots[0, 0]) == (10, 10, 10)
    assert ((dots != 10).any(-1)).sum() < 2 * math.pi * 1.5**2 + 4


def test_landmark_dots_are_exactly_the_pixel_centres_within_the_radius():
    # Reference: every pixel of the frame tested against every point.
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 200, (30, 41, 3), np.uint8)
    points = np.concatenate([rng.uniform(-4, 45, (40, 2)), [[0.5, 0.5], [40.9, 29.9], [-2.6, 10.0]]])
    for radius in (0.5, 1.5, 2.0, 3.2):
        dots = draw_landmarks(frame, points, radius=radius, color=(255, 0, 255))
        rows, cols = np.mgrid[:30, :41] + 0.5
        near = ((cols[..., None] - points[:, 0]) ** 2 + (rows[..., None] - points[:, 1]) ** 2 <= radius**2).any(-1)
        assert near.any() and (dots[near] == (255, 0, 255)).all() and np.array_equal(dots[~near], frame[~near])


def test_window_holds_every_covered_pixel_of_the_batch():
    # The maps are computed in the window the triangles' bounding boxes span; a batch whose frames
    # sit in opposite corners, one of them clipped by the image's edges, and a frame behind the
    # camera: each frame's full maps equal the brute force's.
    verts, faces = uv_ellipsoid(8, 12)
    frames = [verts * 0.5 + torch.tensor(offset) for offset in ([-1.4, -1.0, 3.0], [0.6, 0.5, 2.5], [0.0, 0.0, -3.0])]
    raster = rasterize(torch.stack(frames), faces, focal=32.0, image_size=(28, 36))
    (top, left), (height, width) = raster.window, raster.window_face.shape[1:]
    assert (top, left) == (0, 0) and 0 < height <= 28 and 0 < width <= 36
    for b, v in enumerate(frames):
        face, depth, _ = reference_rasterize(v.numpy(), faces.numpy(), 32.0, 28, 36)
        assert (b == 2) == (face < 0).all()
        np.testing.assert_array_equal(raster.face[b].numpy(), face)
        np.testing.assert_array_equal(raster.depth[b].numpy(), depth)
    # Nothing in front of the camera: a one-pixel window of background.
    empty = rasterize(frames[2][None], faces, focal=32.0, image_size=(28, 36))
    assert empty.window_face.shape == (1, 1, 1) and (empty.face == -1).all() and (empty.depth == 0).all()


def test_overlay_is_the_blend_of_the_full_normal_maps():
    # Reference: the blend written out in numpy over the full-size maps (overlay's former path); overlay
    # blends in the rasterizer's window only, with torch.
    verts, faces = uv_ellipsoid(10, 16)
    batch = torch.stack([verts * 0.4 + torch.tensor([-0.5, 0.3, 2.0]), verts * 0.3 + torch.tensor([0.6, -0.2, 2.5])])
    frames = np.random.default_rng(1).integers(0, 256, (2, 36, 44, 3), dtype=np.uint8)
    color, alpha = (200, 120, 40), 0.35
    raster = rasterize(batch, faces, focal=40.0, image_size=(36, 44))
    mask = raster.mask.numpy()
    mesh = (0.25 + 0.75 * normal_maps(raster)[2].abs()).numpy()[mask][:, None] * np.asarray(color, np.float32)
    expected = frames.copy()
    expected[mask] = np.clip(np.rint((1 - alpha) * frames[mask].astype(np.float32) + alpha * mesh), 0, 255).astype(np.uint8)
    assert 0.05 < mask.mean() < 0.5
    assert np.array_equal(overlay(frames, batch, faces, focal=40.0, color=color, alpha=alpha), expected)
