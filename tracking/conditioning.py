"""The conditioning image: what the ControlNet sees of a FLAME sequence (its `hint` input).

A posed FLAME mesh, seen by the tracked camera, rendered into CONDITIONING_CHANNELS maps: smooth
camera-space normals, a depth map on one fixed scale (DEPTH_SPAN) and masks of the regions a
normal map cannot show (eyes, the mouth interior), plus the foreground. Region labels are per
face; tracking/flame.py assigns them to FLAME's faces.
"""
import numpy as np
import torch

from tracking.render import opengl_to_opencv, rasterize, window_normal_maps

# Per-face region labels (tracking.flame.face_regions assigns them, `conditioning_image` reads them).
REGION_SKIN, REGION_LEFT_EYE, REGION_RIGHT_EYE, REGION_MOUTH = range(4)

# Channel order of the conditioning image; every channel lies in [0, 1].
CONDITIONING_CHANNELS = (
    "normal_x",  # camera-space unit normal mapped by (n + 1) / 2; background 0.5, 0.5, 0.5
    "normal_y",
    "normal_z",
    "depth",  # 1 at the nearest foreground point, falling towards 0 with distance; background 0
    "left_eye",  # region masks from the per-face labels above
    "right_eye",
    "mouth",
    "foreground",
)

DEPTH_SPAN = 0.3  # metres from the nearest point to depth 0: one fixed scale keeps the depth map steady over a video


def posed_vertices(flame, seq, frames=slice(None), shape=None) -> torch.Tensor:
    """Camera-space vertices (T,V,3) of a FlameSequence's frames, in the rasterizer's OpenCV axes.

    flame: tracking.flame.FLAME; `shape` replaces the sequence's identity (re-enactment: another
    person's motion, our shape).
    """
    params = seq.torch_params(frames)
    if shape is not None:
        params["shape"] = torch.as_tensor(np.asarray(shape, np.float32))[None]
    with torch.no_grad():
        verts, _ = flame(**params)
    return opengl_to_opencv(verts)


def render_conditioning(flame, seq, size: int, frames=slice(None), shape=None, batch: int = 16) -> torch.Tensor:
    """Conditioning images (T, C, size, size) of a FlameSequence's frames, seen by its camera scaled to `size`.

    Back faces are culled: FLAME (and the toy head) are wound counter-clockwise around outward normals
    and the mouth is closed by a fan, so a back face is hidden behind a front one anyway (except
    looking into the open neck), and skipping them makes the rasterizer about 1.5x faster."""
    verts = posed_vertices(flame, seq, frames, shape)
    focal = seq.focal * size / seq.image_size[1]
    images = [conditioning_image(verts[i:i + batch], flame.render_faces, focal, size, flame.face_regions,
                                 depth_span=DEPTH_SPAN, cull_back_faces=True) for i in range(0, len(verts), batch)]
    return images[0] if len(images) == 1 else torch.cat(images)  # one batch (a live frame): no copy


def conditioning_image(verts, faces, focal, image_size=512, face_labels=None, principal=None, depth_span=None,
                       near=1e-3, cull_back_faces=False):
    """The conditioning maps of a posed mesh: (B, len(CONDITIONING_CHANNELS), H, W) float32 in [0, 1].

    verts: (B, V, 3) camera space (OpenCV axes); faces: (F, 3); face_labels: (F,) REGION_* ints (None:
    no regions); depth_span: None normalises depth per frame between its nearest and farthest visible
    points, a number fixes the scale (camera units from the nearest point to 0), which keeps it steady
    over a video. Channels, in CONDITIONING_CHANNELS order: camera-space normals mapped by (n + 1) / 2
    (OpenCV axes: a surface facing the camera has n_z < 0), depth, left eye, right eye, mouth, and
    the foreground mask. focal, image_size, principal, near, cull_back_faces: as in `rasterize`.
    """
    faces = torch.as_tensor(faces, dtype=torch.int64)
    raster = rasterize(verts, faces, focal, image_size, principal, near, cull_back_faces)
    batch, height, width = len(verts), *raster.image_size
    # Outside the rasterizer's window every pixel is background, filled once; every channel of the
    # window is written below.
    image = torch.empty(batch, len(CONDITIONING_CHANNELS), height, width)
    for background in raster.outside_window(image):
        background[:, :3], background[:, 3:] = 0.5, 0.0
    window = raster.in_window(image)
    # (n + 1) / 2 as n / 2 + 1/2: halving is exact, so these are the same bits; 0 on the background: 0.5 there
    for normal in window_normal_maps(raster, scale=0.5, out=window[:, :3].unbind(1)):
        normal.add_(0.5)
    _depth_map(raster, depth_span, out=window[:, 3])
    # region label of every pixel, -1 on the background (int8: a quarter of the memory traffic of int64)
    if face_labels is None:
        face_labels = torch.zeros(len(faces), dtype=torch.int8)
    labels = torch.as_tensor(face_labels).to(torch.int8).index_select(0, raster.triangle_face)
    label = raster.per_triangle(labels, -1)
    for k, region in enumerate((REGION_LEFT_EYE, REGION_RIGHT_EYE, REGION_MOUTH), 4):
        torch.eq(label, region, out=window[:, k])
    window[:, 7] = raster.window_triangle >= 0
    return image


def _depth_map(raster, depth_span, out):
    """Depth channel of raster's window (B, h, w), written into `out`: 1 at the nearest visible point of each frame,
    decreasing linearly to 0 at the farthest one (depth_span None) or depth_span camera units behind
    the nearest; 0 on the background."""
    mask, depth = raster.window_triangle >= 0, raster.window_depth
    near = torch.where(mask, depth, torch.inf).amin((1, 2), keepdim=True)
    if depth_span is None:
        span = (depth.amax((1, 2), keepdim=True) - near).clamp(min=torch.finfo(torch.float32).tiny)
    else:
        span = torch.as_tensor(depth_span, dtype=torch.float32)
    return torch.sub(near, depth, out=out).div_(span).add_(1).clamp_(0, 1).mul_(mask)
