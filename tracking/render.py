"""A z-buffered triangle rasterizer in plain PyTorch: the one pinhole projection of svp, face ids,
depths, perspective-correct interpolation, smooth normal maps, and preview drawing. What the maps
mean for the avatar (channels, regions, depth scale) is tracking/conditioning.py's business.

Conventions (OpenCV pinhole camera):
- Vertices are given in camera space, shape (B, V, 3): x right, y down, z forward (the camera looks
  down +z; visible geometry has z > 0). FLAME fits and seq.npz use OpenGL axes (y up, looking down
  -z); `opengl_to_opencv` is the one place that turns them into these.
- Projection (`project`): u = focal * x / z + cx, v = focal * y / z + cy, in pixels. The principal
  point (cx, cy) defaults to the image centre (W / 2, H / 2). Pixel (i, j) (column i, row j) covers
  [i, i+1) x [j, j+1) and is sampled at its centre (i + 0.5, j + 0.5). The FLAME fit projects its
  landmarks with the same function, so fitted landmarks and rendered pixels agree by construction.
- Projected vertices are snapped to a fixed-point grid of 1/256 pixel, like GPU rasterizers, so that
  coverage is decided by exact integer edge functions. A pixel centre on a shared edge belongs to
  exactly one of the two triangles (top-left fill rule, y down), so meshes have no cracks and no
  double-covered pixels. Both windings are drawn unless back faces are culled on request
  (counter-clockwise around the outward normal = front, as for FLAME).
- Depth test: the smaller camera z (rounded to float32) wins; equal depths go to the smaller face
  index. This is one int64 key per pixel (float32 depth bits above the index of the triangle in the
  list of those drawn, which is in face order per frame), reduced with scatter_reduce(amin), so the
  result does not depend on processing order.
- Triangles with a vertex at z <= near, or projecting more than 2^20 pixels off-screen, are dropped
  (there is no clipping; only geometry touching the camera plane is affected).
- Attributes are interpolated perspective-correctly with the winning face's barycentrics.

Algorithm: per-triangle setup (fixed-point corners, bounding box, edge functions and 1/z as affine
functions of the pixel), then each row of each bounding box gets its run of covered pixels from
the edge functions by exact integer division; the depth keys of those pixels are scatter-min'ed into
the z-buffer, a chunk of triangles at a time. The z-buffer, and every per-pixel map made from it,
covers only the window the triangles' bounding boxes span (a face crop's head is half the image or
less); the rest of the image is background by construction. Barycentrics of the winning face are computed on
demand (`Raster.pixel_bary`). The normal maps skip them: a perspective-correct attribute is a
ratio of two affine functions of the pixel per face, and normals, normalised anyway, need only the
numerator, one plane per face and channel. tests/test_render.py checks face ids and depths
pixel-exactly against a brute-force loop over pixels and triangles, and the normals against rays
cast in float64.
"""
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F

SUBPIXEL = 256  # fixed-point steps per pixel (8 subpixel bits)
_GUARD = 2**28  # max |fixed-point coordinate|; keeps every edge-function product far below 2^63
_MAX_INT64 = torch.iinfo(torch.int64).max
_BACKGROUND_KEY = _MAX_INT64

@dataclass
class Raster:
    """Result of `rasterize` for B frames of H x W pixels.

    The maps are computed in a window, the rows and columns that the triangles' bounding boxes
    span in any frame of the batch: every pixel outside it is background, and a face that fills a
    fifth of the image spares the per-pixel work of the rest (`window_triangle`, `window_depth`,
    `window`). A pixel holds the index of its visible triangle in the list of the triangles drawn
    (`triangle_frame`, `triangle_face`: the faces in view, ascending per frame), so that per-face
    tables need rows for these only (culled faces are often more than half). `face` and `depth` are
    the full images. The lists of covered pixels and their barycentrics are computed on first use:
    the normal maps need neither.
    """

    window_triangle: torch.Tensor  # (B, h, w) int64 index into the triangle lists, -1 on the background
    window_depth: torch.Tensor  # (B, h, w) float32 camera-space z of the visible surface, 0 on the background
    window: tuple  # (top, left): the window's first row and column in the image
    image_size: tuple  # (H, W)
    triangle_frame: torch.Tensor  # (T,) int64 frame of each triangle drawn
    triangle_face: torch.Tensor  # (T,) int64 its face
    camera: tuple  # (verts, faces, focal, principal, near) as given to `rasterize`

    @cached_property
    def window_face(self):
        """(B, h, w) int64 index of the visible face, -1 on the background."""
        return self.per_triangle(self.triangle_face, -1)

    def per_triangle(self, table, background):
        """The value of a per-triangle table (T,) at each pixel of the window (B, h, w)."""
        table = torch.cat([table.new_full((1,), background), table])
        return table.index_select(0, (self.window_triangle + 1).view(-1)).view(self.window_triangle.shape)

    @cached_property
    def face(self):
        """(B, H, W) int64 index of the visible face, -1 on the background."""
        return self.full_image(self.window_face, -1)

    @cached_property
    def depth(self):
        """(B, H, W) float32 camera-space z of the visible surface, 0 on the background."""
        return self.full_image(self.window_depth, 0)

    def full_image(self, window_map, background):
        """A map of the window (B, h, w) as a full image (B, H, W), `background` outside the window."""
        out = window_map.new_full((len(window_map), *self.image_size), background)
        self.in_window(out).copy_(window_map)
        return out

    def in_window(self, image):
        """The window's part of an image (..., H, W): a view, to read or write."""
        (top, left), (height, width) = self.window, self.window_triangle.shape[1:]
        return image[..., top:top + height, left:left + width]

    def outside_window(self, image):
        """The parts of an image (..., H, W) outside the window: up to four views (the bands above and
        below it, and left and right of it), to fill with the background."""
        (top, left), (height, width) = self.window, self.window_triangle.shape[1:]
        bottom, right = top + height, left + width
        middle = image[..., top:bottom, :]
        return [image[..., :top, :], image[..., bottom:, :], middle[..., :left], middle[..., right:]]

    @property
    def mask(self):
        return self.face >= 0

    @cached_property
    def pixel(self):
        """(N,) int64 flat indices into (B, H, W) of the covered pixels, ascending."""
        return self.mask.view(-1).nonzero().view(-1)

    @cached_property
    def pixel_frame(self):
        """(N,) int64 frame of each covered pixel."""
        return torch.div(self.pixel, self.face[0].numel(), rounding_mode="floor")

    @cached_property
    def pixel_face(self):
        """(N,) int64 visible face at each covered pixel."""
        return self.face.view(-1).index_select(0, self.pixel)

    @cached_property
    def pixel_bary(self):
        """(3, N) float32 perspective-correct barycentrics at the covered pixels."""
        height, width = self.face.shape[1:]
        row, column = torch.div(self.pixel, width, rounding_mode="floor") % height, self.pixel % width
        verts, faces, focal, principal, near = self.camera
        return _barycentrics(verts, faces, focal, principal, near, (height, width), self.pixel_frame, row, column,
                             self.pixel_face)

    @property
    def bary(self):
        """(B, H, W, 3) float32 barycentrics, 0 on the background."""
        return _scatter_pixels(self.pixel, self.pixel_bary.T, self.face.shape)


def _scatter_pixels(pixel, values, shape):
    """Dense (*shape, C) tensor holding values (N, C) at flat pixel indices, zero elsewhere."""
    out = values.new_zeros(shape.numel(), values.shape[-1])
    return out.index_copy_(0, pixel, values).view(*shape, -1)


def _image_hw(image_size):
    if isinstance(image_size, int):
        return image_size, image_size
    return tuple(image_size)


def _per_frame(value, batch, dtype, width):
    """Broadcast a scalar / (width,) / (B,) / (B, width) camera parameter to (B, width) of `dtype`."""
    t = torch.as_tensor(value, dtype=dtype)
    if t.dim() == 0 or (t.dim() == 1 and t.numel() == width):
        return t.reshape(1, -1).expand(batch, width)
    return t.reshape(batch, -1).expand(batch, width)


def project(points, focal, image_size=512, principal=None, near=1e-4):
    """Pinhole projection of camera-space points (B, N, 3), OpenCV axes, to pixels (B, N, 2) as (column,
    row), in the points' dtype and differentiable (the FLAME fit's loss goes through it).

    focal: pixels, a scalar or one per frame (B,); principal: (2,) or (B, 2) as (cx, cy), default the
    image centre. Depth is clamped to `near`: a point at or behind the camera lands far off-screen
    instead of mirrored onto it (the rasterizer drops such triangles anyway).
    """
    height, width = _image_hw(image_size)
    batch = points.shape[0]
    f = _per_frame(focal, batch, points.dtype, 1)
    c = _per_frame((width / 2, height / 2) if principal is None else principal, batch, points.dtype, 2)
    z = points[..., 2].clamp(min=near)
    column = points[..., 0] / z * f + c[:, :1]
    row = points[..., 1] / z * f + c[:, 1:]
    return torch.stack([column, row], dim=-1)


def opengl_to_opencv(points):
    """Camera-space points (..., 3) from OpenGL axes (x right, y up, looking down -z: FLAME fits and
    seq.npz) to the rasterizer's OpenCV axes (x right, y down, looking down +z): a half-turn about x."""
    return points * points.new_tensor([1.0, -1.0, -1.0])


def _edge(ax, ay, bx, by, px, py):
    """Edge function of the directed edge a->b at p: > 0 on the inner side of a positive triangle."""
    return (bx - ax) * (py - ay) - (by - ay) * (px - ax)


def _is_top_left(ax, ay, bx, by):
    """Top-left rule for a positively oriented triangle in a y-down image: a top edge is horizontal
    with the interior below it (it runs towards +x), a left edge runs upwards (towards -y)."""
    return ((ay == by) & (bx > ax)) | (by < ay)


@dataclass
class _Triangles:
    """Screen-space setup of the triangles that survive culling, one entry per (frame, face).

    Corners are reordered (1 <-> 2) where needed so that every triangle has a positive area. Edge
    functions and 1/z are affine in the pixel position, so each triangle keeps their values at the
    centre of the first pixel of its bounding box and their steps per pixel. Every field is a 1-D
    tensor over the triangles, or (3, T) with one row per edge.
    """

    face: torch.Tensor  # int64 face index
    frame: torch.Tensor  # int64
    first_x: torch.Tensor  # int64 column of the bounding box's first pixel
    first_y: torch.Tensor  # int64 row of the bounding box's first pixel
    box_x: torch.Tensor  # int64 bounding box width - 1
    box_y: torch.Tensor  # int64 bounding box height - 1
    edge_origin: torch.Tensor  # (3, T) int64 edge functions (i opposite corner i) minus the fill bias
    step_x: torch.Tensor  # (3, T) int64 change of each edge function per pixel in x
    step_y: torch.Tensor  # (3, T) int64 ... in y
    offset_x: torch.Tensor  # int64 first pixel centre minus corner 0, x, fixed point
    offset_y: torch.Tensor  # int64 ... y
    inv_z: torch.Tensor  # float64 1/z at corner 0
    grad_x: torch.Tensor  # float64 change of 1/z per fixed-point unit in x
    grad_y: torch.Tensor  # float64 ... in y


def _snap(verts, focal, height, width, principal, near):
    """Fixed-point screen positions (float64 holding integers) of camera-space vertices."""
    pixels = project(verts.detach().to(torch.float64), focal, (height, width), principal, near)
    return torch.floor(pixels * SUBPIXEL + 0.5)


def _setup_triangles(verts, faces, focal, height, width, principal, near, cull_back_faces):
    # Per vertex: fixed-point position and depth, and whether it may be drawn at all; then per
    # face (frame-major, B * F), its corners' columns by 1-D gathers (far cheaper than indexing
    # (B, F, 3, 2) tensors on the CPU), and everything past culling for the faces kept only.
    num_faces = len(faces)
    fixed = _snap(verts, focal, height, width, principal, near)
    z = verts.detach().to(torch.float64)[..., 2]
    usable = (z > near) & (fixed.abs() < _GUARD).all(-1)
    fixed = torch.where(usable[..., None], fixed, 0).to(torch.int64)
    columns = [fixed[..., 0].reshape(-1), fixed[..., 1].reshape(-1), z.reshape(-1), usable.reshape(-1)]
    frame_start = torch.arange(len(verts))[:, None] * verts.shape[1]
    rows = [(corner + frame_start).view(-1) for corner in faces.T]
    (x0, y0, z0, u0), (x1, y1, z1, u1), (x2, y2, z2, u2) = ([c.index_select(0, r) for c in columns] for r in rows)
    area = _edge(x0, y0, x1, y1, x2, y2)
    # Seen from the camera, an outward counter-clockwise face runs clockwise on the y-down screen,
    # i.e. has a negative area here; a positive area means the camera sees its back.
    keep = u0 & u1 & u2 & ((area < 0) if cull_back_faces else (area != 0))

    # Inclusive range of pixels whose centres (i + 1/2) * SUBPIXEL lie in the bounding box.
    half = SUBPIXEL // 2
    first_x = -torch.div(half - torch.minimum(torch.minimum(x0, x1), x2), SUBPIXEL, rounding_mode="floor").clamp_(max=0)
    first_y = -torch.div(half - torch.minimum(torch.minimum(y0, y1), y2), SUBPIXEL, rounding_mode="floor").clamp_(max=0)
    last_x = torch.div(torch.maximum(torch.maximum(x0, x1), x2) - half, SUBPIXEL, rounding_mode="floor").clamp_(max=width - 1)
    # A horizontal edge bounds rows, not columns: at the top (interior below) it is a top edge and
    # takes the pixel centres on it, so the box is right; at the bottom it does not, so the box ends a
    # row earlier when that row's centres lie on it. Within the box, such an edge then never excludes
    # a pixel, and `_spans` need not look at it.
    bottom = torch.maximum(torch.maximum(y0, y1), y2)
    flat_bottom = ((y0 == bottom).long() + (y1 == bottom) + (y2 == bottom)) // 2  # 1 when two corners share it
    last_y = torch.div(bottom - half - flat_bottom, SUBPIXEL, rounding_mode="floor").clamp_(max=height - 1)
    keep &= (first_x <= last_x) & (first_y <= last_y)

    kept = keep.nonzero().view(-1)
    frame, face = torch.div(kept, num_faces, rounding_mode="floor"), kept % num_faces
    x0, y0, z0, x1, y1, z1, x2, y2, z2, first_x, first_y, last_x, last_y, area = (
        v.index_select(0, kept) for v in (x0, y0, z0, x1, y1, z1, x2, y2, z2, first_x, first_y, last_x, last_y, area))
    # A negative area is the other winding on screen: swapping corners 1 and 2 makes it positive.
    swap = area < 0
    x1, x2 = torch.where(swap, x2, x1), torch.where(swap, x1, x2)
    y1, y2 = torch.where(swap, y2, y1), torch.where(swap, y1, y2)
    z1, z2 = torch.where(swap, z2, z1), torch.where(swap, z1, z2)
    edges = ((x1, y1, x2, y2), (x2, y2, x0, y0), (x0, y0, x1, y1))  # edge i is opposite corner i
    step_x = [ay - by for ax, ay, bx, by in edges]  # per fixed-point unit
    step_y = [bx - ax for ax, ay, bx, by in edges]
    cx, cy = first_x * SUBPIXEL + half, first_y * SUBPIXEL + half
    inv_z = (1.0 / z0, 1.0 / z1, 1.0 / z2)
    area = area.abs()
    return _Triangles(
        face=face,
        frame=frame,
        first_x=first_x,
        first_y=first_y,
        box_x=last_x - first_x,
        box_y=last_y - first_y,
        edge_origin=torch.stack([_edge(*e, cx, cy) - (~_is_top_left(*e)).long() for e in edges]),
        step_x=torch.stack(step_x) * SUBPIXEL,
        step_y=torch.stack(step_y) * SUBPIXEL,
        offset_x=cx - x0,
        offset_y=cy - y0,
        inv_z=inv_z[0],
        grad_x=_inv_z_gradient(step_x, inv_z, area),
        grad_y=_inv_z_gradient(step_y, inv_z, area),
    )


def _inv_z_gradient(edge_step, inv_z, area):
    """d(1/z)/d(position) of 1/z = sum_i w_i / z_i / area, from the three edge functions' steps."""
    step = [s.to(torch.float64) for s in edge_step]
    return (step[0] * inv_z[0] + step[1] * inv_z[1] + step[2] * inv_z[2]) / area.to(torch.float64)


def _chunks(counts, max_count):
    """Consecutive index ranges whose counts sum to at most max_count (or a single index)."""
    ends = torch.cumsum(counts, 0)
    start = 0
    while start < len(counts):
        budget = (ends[start - 1] if start > 0 else 0) + max_count
        stop = max(int(torch.searchsorted(ends, budget, right=True)), start + 1)
        yield start, stop
        start = stop


def _repeat_ranges(counts):
    """For ranges of the given lengths (R,): the range of each element (P,) and its index in it."""
    owner = torch.repeat_interleave(torch.arange(len(counts)), counts)
    return owner, torch.arange(len(owner)) - (torch.cumsum(counts, 0) - counts).index_select(0, owner)


def _spans(tri, start, stop):
    """The covered pixels of triangles start:stop as runs along their bounding boxes' rows:
    triangle (R,), row y and first column x (R,) in pixels from the box corner, length (R,) >= 0.

    Along a row an edge function is e + step * x; pixel x is on the inner side where that is >= 0
    (the fill bias is already subtracted), i.e. x >= ceil(-e / step) = -floor(e / step) for a
    positive step and x <= floor(e / -step) for a negative one: exact integer divisions, no pixel is
    tested. A zero step (a horizontal edge) bounds no column: `_setup_triangles` folded it into the
    box. Per edge and triangle, `floor(e / |step|)` times -1 or 0 bounds the first column, plus 0 or
    2^62 (no bound) the last.
    """
    t, y = _repeat_ranges(tri.box_y[start:stop] + 1)
    t += start
    first, last = torch.zeros_like(t), tri.box_x.index_select(0, t)
    for origin, step_x, step_y in zip(tri.edge_origin, tri.step_x, tri.step_y):  # the three edges
        lower, upper = -(step_x > 0).long(), torch.where(step_x < 0, 0, 1 << 62)
        edge = origin.index_select(0, t).addcmul_(step_y.index_select(0, t), y)  # at each row's first pixel
        bound = torch.div(edge, step_x.abs().clamp_(min=1).index_select(0, t), rounding_mode="floor")
        first = torch.maximum(first, lower.index_select(0, t).mul_(bound))
        last = torch.minimum(last, bound.add_(upper.index_select(0, t)))
    return t, y, first, (last - first + 1).clamp_(min=0)


def _window(tri):
    """(top, left), (height, width) of the pixels the triangles' bounding boxes span; with no triangle,
    one pixel of background (the maps of an empty window would need a case of their own downstream)."""
    if len(tri.face) == 0:
        return (0, 0), (1, 1)
    top, left = int(tri.first_y.min()), int(tri.first_x.min())
    bottom, right = int((tri.first_y + tri.box_y).max()), int((tri.first_x + tri.box_x).max())
    return (top, left), (bottom - top + 1, right - left + 1)


def _depth_test(tri, zbuffer, top, left, height, width, max_pixels):
    """Scatter the depth key of every covered (triangle, pixel) pair into zbuffer (B * height * width,),
    a window whose first pixel is (top, left) in the image, with amin."""
    pixels = (tri.box_x + 1) * (tri.box_y + 1)
    for start, stop in _chunks(pixels, max_pixels):
        t, y, first, length = _spans(tri, start, stop)
        # 1/z = 1/z0 + grad . (p - p0), p - p0 in fixed point, exact in float64: per run, all but
        # the x term (the row's y term is the same for the whole run), then per pixel.
        inv_z, grad_x, grad_y = (v.index_select(0, t) for v in (tri.inv_z, tri.grad_x, tri.grad_y))
        run_px = tri.offset_x.index_select(0, t) + first * SUBPIXEL  # first pixel centre - corner 0
        y_term = grad_y * (tri.offset_y.index_select(0, t) + y * SUBPIXEL).to(torch.float64)
        row = (tri.frame.index_select(0, t) * height + (tri.first_y.index_select(0, t) - top) + y) * width
        run_pixel = row + (tri.first_x.index_select(0, t) - left) + first
        # Per covered pixel i, of run r: its place in the run is i - (first i of r), so a run's
        # values less that much are gathered and i added (no per-pixel offsets).
        run = torch.repeat_interleave(length)
        i = torch.arange(len(run))
        run_start = torch.cumsum(length, 0) - length
        px = (i * SUBPIXEL).add_((run_px - run_start * SUBPIXEL).index_select(0, run)).to(torch.float64)
        inv_z = inv_z.index_select(0, run) + grad_x.index_select(0, run) * px + y_term.index_select(0, run)
        depth = (1.0 / inv_z).to(torch.float32)
        # Positive float32 bit patterns order like their values: depth above, triangle below (the
        # triangles are in face order within a frame: equal depths go to the smaller face index).
        key = torch.add(t.index_select(0, run), depth.view(torch.int32).to(torch.int64), alpha=1 << 32)
        zbuffer.scatter_reduce_(0, i.add_((run_pixel - run_start).index_select(0, run)), key, "amin")


def rasterize(
    verts, faces, focal, image_size=512, principal=None, near=1e-3, cull_back_faces=False, max_pixels=1 << 19
):
    """Z-buffered rasterization of camera-space triangles (see the module docstring).

    verts: (B, V, 3) camera space (x right, y down, z forward); faces: (F, 3) int vertex indices;
    focal: pixels, scalar or (B,); image_size: int or (H, W); principal: (cx, cy) or (B, 2), default
    the image centre; near: faces with a vertex at z <= near are dropped; cull_back_faces: skip faces
    whose back the camera sees (counter-clockwise = front), about twice as fast on closed meshes but
    holes then show the background instead of the mesh's inside; max_pixels bounds the
    bounding-box pixels processed at once (memory). Returns a Raster.
    """
    height, width = _image_hw(image_size)
    batch = verts.shape[0]
    faces = torch.as_tensor(faces, dtype=torch.int64)
    tri = _setup_triangles(verts, faces, focal, height, width, principal, near, cull_back_faces)
    window, window_size = _window(tri)
    zbuffer = torch.full((batch, *window_size), _BACKGROUND_KEY, dtype=torch.int64)
    _depth_test(tri, zbuffer.view(-1), *window, *window_size, max_pixels)
    # The key's low 32 bits are the triangle (the background key's all ones, -1 as int32), the high
    # ones the depth (as int32 words of a little-endian int64: every CPU torch runs on).
    words = zbuffer.view(torch.int32).view(*zbuffer.shape, 2)
    triangle = words[..., 0].to(torch.int64)
    depth = torch.where(triangle >= 0, words[..., 1].view(torch.float32), 0.0)
    return Raster(window_triangle=triangle, window_depth=depth, window=window, image_size=(height, width),
                  triangle_frame=tri.frame, triangle_face=tri.face, camera=(verts, faces, focal, principal, near))


def _corner_rows(faces, frame, face, num_verts):
    """For each corner of the given faces in the given frames (N,), its row (N,) in per-vertex
    tables flattened to (B * V,)."""
    frame_start = frame * num_verts
    return [corner.index_select(0, face) + frame_start for corner in faces.T]


def _gather_columns(table, rows):
    """table (R, C) gathered at rows (N,) as C columns (N,): 1-D gathers beat row gathers of
    narrow rows by far on the CPU."""
    return [column.index_select(0, rows) for column in table.T.contiguous()]


def _barycentrics(verts, faces, focal, principal, near, image_size, frame, row, column, face):
    """Perspective-correct barycentrics (3, N) of the given faces at the given pixels (N,)."""
    fixed = _snap(verts, focal, *image_size, principal, near)
    inv_z = 1.0 / verts.detach().to(torch.float64)[..., 2:]
    table = torch.cat([fixed, inv_z], -1).flatten(0, 1)  # (B * V, 3): x, y, 1/z
    rows = _corner_rows(faces, frame, face, verts.shape[1])
    (x0, y0, iz0), (x1, y1, iz1), (x2, y2, iz2) = (_gather_columns(table, r) for r in rows)
    # Pixel centres in fixed point; float64 is exact enough here (only the depth test must be exact).
    px = column.to(torch.float64) * SUBPIXEL + SUBPIXEL // 2
    py = row.to(torch.float64) * SUBPIXEL + SUBPIXEL // 2
    # Screen-space weights divided by z; the sign of the winding cancels in the ratio.
    weight = [_edge(x1, y1, x2, y2, px, py) * iz0, _edge(x2, y2, x0, y0, px, py) * iz1, _edge(x0, y0, x1, y1, px, py) * iz2]
    total = weight[0] + weight[1] + weight[2]
    return torch.stack([(w / total).to(torch.float32) for w in weight])


def vertex_normals(verts, faces):
    """Area-weighted unit vertex normals (B, V, 3); outward for counter-clockwise faces (right hand)."""
    faces = torch.as_tensor(faces, dtype=torch.int64)
    batch, num_verts = verts.shape[:2]
    v0, v1, v2 = (verts[:, faces[:, i]] for i in range(3))
    face_normals = torch.cross(v1 - v0, v2 - v0, dim=-1)  # length = 2 x area: larger faces weigh more
    # each face's normal added to its corners' rows, one coordinate at a time (1-D index_add is fast)
    rows = [(corner + torch.arange(batch)[:, None] * num_verts).view(-1) for corner in faces.T]
    normals = []
    for column in face_normals.flatten(0, 1).T:
        normal = column.new_zeros(batch * num_verts)
        for r in rows:
            normal.index_add_(0, r, column)
        normals.append(normal)
    return F.normalize(torch.stack(normals, 1).view(batch, num_verts, 3), dim=-1)


def _interpolate_columns(raster, faces, attributes):
    """Per-vertex attributes (B, V, C) interpolated at the N covered pixels, as C columns (N,)."""
    faces = torch.as_tensor(faces, dtype=torch.int64)
    rows = _corner_rows(faces, raster.pixel_frame, raster.pixel_face, attributes.shape[1])
    table = attributes.flatten(0, 1)
    corners = [_gather_columns(table, r) for r in rows]  # corners[i][channel]
    b0, b1, b2 = raster.pixel_bary.to(attributes.dtype)
    return [b0 * c0 + b1 * c1 + b2 * c2 for c0, c1, c2 in zip(*corners)]


def interpolate_pixels(raster, faces, attributes):
    """Interpolate per-vertex attributes (B, V, C) at the N covered pixels: (N, C)."""
    return torch.stack(_interpolate_columns(raster, faces, attributes), 1)


def interpolate(raster, faces, attributes):
    """Interpolate per-vertex attributes (B, V, C) at the visible surface: (B, H, W, C), 0 off it."""
    return _scatter_pixels(raster.pixel, interpolate_pixels(raster, faces, attributes), raster.face.shape)


def _attribute_planes(verts, faces, attributes, focal, frame, face):
    """Perspective-correct interpolation of per-vertex attributes (B, V, C) over the given faces of
    the given frames (T,), as planes.

    With e_i(p) the edge function opposite corner i (an affine function of the pixel p), the
    interpolated attribute is sum_i e_i(p) a_i / z_i divided by sum_i e_i(p) / z_i. The numerator
    is affine in p too: A p_x + B p_y + C per channel, p relative to the principal point. Returns
    (A, B, C), each (C, 1 + T) float32 (column 0 all zeros, for the background, then one per
    triangle), signed so that the (dropped) denominator is positive: enough for directions, which are
    normalised afterwards anyway.
    """
    v = verts.detach().to(torch.float64)
    inv_z = 1.0 / v[..., 2]
    q = v[..., :2] * (inv_z[..., None] * _per_frame(focal, len(v), torch.float64, 1)[:, None])  # pixels
    table = torch.cat([q, inv_z[..., None], attributes.to(torch.float64)], -1).flatten(0, 1)  # (B * V, 3 + C)
    corners = [_gather_columns(table, rows) for rows in _corner_rows(faces, frame, face, v.shape[1])]
    (x0, y0, iz0, *a0), (x1, y1, iz1, *a1), (x2, y2, iz2, *a2) = corners
    edges = ((x1, y1, x2, y2), (x2, y2, x0, y0), (x0, y0, x1, y1))  # edge i is opposite corner i
    # e(p) = (bx - ax)(py - ay) - (by - ay)(px - ax) = step_x px + step_y py + at_origin
    steps_x = [ay - by for ax, ay, bx, by in edges]
    steps_y = [bx - ax for ax, ay, bx, by in edges]
    at_origin = [ax * by - ay * bx for ax, ay, bx, by in edges]
    sign = torch.sign(at_origin[0] + at_origin[1] + at_origin[2])  # edge functions sum to 2 x area
    weights = [torch.stack(a) * (iz * sign) for iz, a in ((iz0, a0), (iz1, a1), (iz2, a2))]  # (C, T) each

    def plane(coefficients):
        total = sum(c * w for c, w in zip(coefficients, weights))  # (C, T)
        return F.pad(total.to(torch.float32), (1, 0))

    return plane(steps_x), plane(steps_y), plane(at_origin)


def normal_maps(raster):
    """Unit camera-space normals (3 maps (B, H, W)) of the surface `raster` sees, smooth shading; 0 on
    the background."""
    return [raster.full_image(normal, 0) for normal in window_normal_maps(raster)]


def window_normal_maps(raster, scale=1.0, out=None):
    """`normal_maps` in raster's window only (3 maps (B, h, w)), times `scale`, written into `out` (3
    maps) if given; 0 on the background (its pixels read the planes' zero column, and 0 stays 0
    through the normalisation), so a caller needs no mask. A power-of-two scale is exact: the maps
    are the unit normals' bits, scaled.
    (In-place arithmetic on the image-sized maps: on the CPU, writing into fresh large tensors costs
    more than the arithmetic, a page fault per 4 KiB.)"""
    verts, faces, focal, principal, _ = raster.camera
    batch, height, width = raster.window_triangle.shape
    (top, left), (image_height, image_width) = raster.window, raster.image_size
    planes = _attribute_planes(verts, faces, vertex_normals(verts.detach().float(), faces), focal,
                               raster.triangle_frame, raster.triangle_face)
    centre = _per_frame((image_width / 2, image_height / 2) if principal is None else principal, batch, torch.float32, 2)
    px = (torch.arange(left, left + width) + 0.5) - centre[:, :1, None]  # (B, 1, w) pixel centres from the principal point
    py = (torch.arange(top, top + height)[:, None] + 0.5) - centre[:, 1:, None]  # (B, h, 1)
    rows = (raster.window_triangle + 1).view(-1)  # the planes' column of each pixel: 0 on the background

    def at_pixels(column):
        return column.index_select(0, rows).view(batch, height, width)

    normal = [at_pixels(a).mul_(px).add_(at_pixels(b).mul_(py)).add_(at_pixels(c)) for a, b, c in zip(*planes)]
    squared = (normal[0] * normal[0]).addcmul_(normal[1], normal[1]).addcmul_(normal[2], normal[2])
    inv_length = squared.clamp_(min=1e-30).rsqrt_().mul_(scale)
    if out is None:
        return [n.mul_(inv_length) for n in normal]
    return [torch.mul(n, inv_length, out=o) for n, o in zip(normal, out)]


def overlay(frames, verts, faces, focal, principal=None, color=(170, 200, 255), alpha=0.6, cull_back_faces=False):
    """Blend a shaded render of camera-space meshes over RGB uint8 frames: one frame (H, W, 3) with
    its mesh (V, 3), or a batch (B, H, W, 3) with (B, V, 3), rasterized together.

    Headlight shading (brightness follows |n_z|), for tracking previews; culling the back faces of a
    closed mesh changes nothing visible and halves the work. Returns new uint8 frame(s).
    """
    frames = np.asarray(frames)
    single = frames.ndim == 3
    frames = frames[None] if single else frames
    verts = torch.as_tensor(verts, dtype=torch.float32).reshape(len(frames), -1, 3)
    faces = torch.as_tensor(faces, dtype=torch.int64)
    raster = rasterize(verts, faces, focal, frames.shape[1:3], principal, cull_back_faces=cull_back_faces)
    out = frames.copy()
    # Blended in the rasterizer's window only: the pixels outside it keep the frame's.
    window = raster.in_window(torch.from_numpy(out).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, h, w, 3) view
    shade = window_normal_maps(raster)[2].abs_().mul_(0.75).add_(0.25)
    mesh = shade[..., None] * torch.tensor(color, dtype=torch.float32)
    blended = (window.float().mul_(1 - alpha)).add_(mesh.mul_(alpha)).round_().clamp_(0, 255).to(torch.uint8)
    window.copy_(torch.where((raster.window_triangle >= 0)[..., None], blended, window))
    return out[0] if single else out


def draw_landmarks(frame, points, radius=2.0, color=(0, 255, 0)):
    """Draw filled dots at pixel positions (N, 2) as (x, y) on a copy of an RGB uint8 frame.

    Same pixel convention as `project`: pixel (i, j) spans [i, i+1) x [j, j+1); a pixel is painted
    when its centre lies within radius of a point. Points off the frame are skipped.
    """
    out = frame.copy()
    height, width = frame.shape[:2]
    reach = int(np.ceil(radius))
    offsets = np.arange(-reach - 1, reach + 2)
    x, y = np.asarray(points, dtype=np.float64).reshape(-1, 2).T[..., None]  # (N, 1) each
    cols, rows = np.floor(x) + offsets, np.floor(y) + offsets                 # (N, K): the pixels around each point
    near = (cols[:, None, :] + 0.5 - x[..., None]) ** 2 + (rows[:, :, None] + 0.5 - y[..., None]) ** 2 <= radius**2
    near &= ((cols >= 0) & (cols < width))[:, None, :] & ((rows >= 0) & (rows < height))[:, :, None]
    n, r, c = near.nonzero()
    out[rows[n, r].astype(int), cols[n, c].astype(int)] = color
    return out
