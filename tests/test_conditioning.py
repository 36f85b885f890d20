"""The conditioning image (tracking/conditioning.py): its channels, region masks, depth scale and normals."""
import torch

from bench.render import uv_ellipsoid
from tracking.conditioning import (
    CONDITIONING_CHANNELS,
    REGION_LEFT_EYE,
    REGION_MOUTH,
    REGION_RIGHT_EYE,
    conditioning_image,
)
from tracking.render import rasterize, vertex_normals


def test_conditioning_image_channels():
    verts, faces = uv_ellipsoid(16, 32)
    labels = torch.zeros(len(faces), dtype=torch.int64)
    centre = verts[faces].mean(1)
    labels[(centre[:, 2] < -0.7) & (centre[:, 0] < 0)] = REGION_LEFT_EYE  # near the camera, left
    labels[(centre[:, 2] < -0.7) & (centre[:, 0] > 0)] = REGION_RIGHT_EYE
    labels[centre[:, 1] > 0.7] = REGION_MOUTH  # bottom (y down)
    verts = (verts * 0.5 + torch.tensor([0.0, 0.0, 2.0]))[None]
    image = conditioning_image(verts, faces, focal=64.0, image_size=(40, 48), face_labels=labels)
    assert image.shape == (1, len(CONDITIONING_CHANNELS), 40, 48) and image.dtype == torch.float32
    assert image.min() >= 0 and image.max() <= 1
    channel = dict(zip(CONDITIONING_CHANNELS, image[0]))
    fg = channel["foreground"].bool()
    raster = rasterize(verts, faces, focal=64.0, image_size=(40, 48))
    assert torch.equal(fg, raster.mask[0])
    # The sphere's centre faces the camera: normal (0, 0, -1) -> (0.5, 0.5, 0); nearest -> depth 1.
    normal = torch.stack([channel["normal_x"], channel["normal_y"], channel["normal_z"]])
    torch.testing.assert_close(normal[:, 20, 24], torch.tensor([0.5, 0.5, 0.0]), atol=0.03, rtol=0)
    assert channel["depth"][20, 24] > 0.97 and channel["depth"].max() == 1 and channel["depth"][fg].min() == 0
    assert (channel["depth"][~fg] == 0).all() and (normal[:, ~fg] == 0.5).all()
    # Region masks are exactly the pixels whose visible face carries the label.
    for name, region in [("left_eye", REGION_LEFT_EYE), ("right_eye", REGION_RIGHT_EYE), ("mouth", REGION_MOUTH)]:
        expected = fg & (labels[raster.face[0].clamp(min=0)] == region)
        assert expected.any() and torch.equal(channel[name].bool(), expected)
    # Left of the image is the left eye (x right); the mouth is below the centre (y down).
    assert channel["left_eye"].nonzero()[:, 1].float().mean() < 24 < channel["right_eye"].nonzero()[:, 1].float().mean()
    assert channel["mouth"].nonzero()[:, 0].float().mean() > 20
    # Frames of a batch are rendered and normalised independently.
    moved = verts + torch.tensor([0.2, -0.1, 0.5])
    batch = conditioning_image(torch.cat([moved, verts]), faces, 64.0, (40, 48), face_labels=labels)
    assert torch.equal(batch[1], image[0])
    assert torch.equal(batch[0], conditioning_image(moved, faces, 64.0, (40, 48), face_labels=labels)[0])
    # A fixed depth span is in camera units behind the nearest point (radius 0.5 sphere: <= 0.5).
    span = conditioning_image(verts, faces, focal=64.0, image_size=(40, 48), depth_span=2.0)[0, 3]
    near = raster.depth[0][fg].min()
    torch.testing.assert_close(span[fg], 1 - (raster.depth[0][fg] - near) / 2.0)
    assert span[fg].min() > 0.75


def test_conditioning_normals_are_exact_smooth_normals():
    # Reference: cast the ray through each pixel centre onto the visible (unsnapped) face, take the
    # barycentrics of the hit point in 3D, mix the vertex normals, normalise; all in float64.
    verts, faces = uv_ellipsoid(12, 20)
    verts = verts * torch.tensor([0.5, 0.6, 0.4]) + torch.tensor([0.1, -0.05, 1.5])
    turn = torch.tensor([[0.8, 0.0, 0.6], [0.0, 1.0, 0.0], [-0.6, 0.0, 0.8]])
    batch = torch.stack([verts, (verts - verts.mean(0)) @ turn.T + verts.mean(0)])
    focal, principal = torch.tensor([40.0, 52.0]), torch.tensor([[23.0, 19.5], [25.5, 21.0]])
    image = conditioning_image(batch, faces, focal, (40, 48), principal=principal)
    raster = rasterize(batch, faces, focal, (40, 48), principal)
    frame, row, column = raster.mask.nonzero(as_tuple=True)
    corners = batch.double()[frame[:, None], faces[raster.face[raster.mask]]]  # (N, 3, 3)
    centre = torch.stack([column, row], -1).double() + 0.5
    ray = torch.cat([(centre - principal.double()[frame]) / focal.double()[frame, None], torch.ones(len(frame), 1)], 1)
    a, b, c = corners.unbind(1)
    normal = torch.linalg.cross(b - a, c - a)
    hit = ray * ((normal * a).sum(-1) / (normal * ray).sum(-1))[:, None]
    area = (normal * normal).sum(-1)
    bary = [(normal * torch.linalg.cross(q - p, hit - p)).sum(-1) / area for p, q in ((b, c), (c, a), (a, b))]
    vertex = vertex_normals(batch.double(), faces)[frame[:, None], faces[raster.face[raster.mask]]]
    want = torch.nn.functional.normalize(sum(w[:, None] * vertex[:, i] for i, w in enumerate(bary)), dim=-1)
    got = image[:, :3].permute(0, 2, 3, 1)[raster.mask] * 2 - 1
    assert len(want) > 1000
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=0)


def test_background_outside_the_window_and_an_empty_frame():
    # The image is filled with the background once and the maps drawn in the rasterizer's window:
    # every pixel outside the foreground, inside the window or not, holds the background values, and
    # a frame with nothing in front of the camera is background throughout.
    verts, faces = uv_ellipsoid(8, 12)
    small = verts * 0.2 + torch.tensor([0.3, -0.2, 2.0])
    image = conditioning_image(torch.stack([small, small * torch.tensor([1.0, 1.0, -1.0])]), faces, 40.0, (36, 44),
                               face_labels=torch.full((len(faces),), REGION_MOUTH))
    background = torch.tensor([0.5, 0.5, 0.5, 0, 0, 0, 0, 0])[:, None]
    fg = image[0, 7].bool()
    assert 0 < fg.float().mean() < 0.2
    assert torch.equal(image[0][:, ~fg], background.expand(-1, int((~fg).sum())))
    assert torch.equal(image[1], background[..., None].expand(-1, 36, 44))
    assert torch.equal(image[0, 6], image[0, 7]) and image[0, 3][fg].min() >= 0 and image[0, 3].max() == 1


def test_hints_of_one_identity_after_another_are_each_their_own():
    # FLAME keeps the last identity's blendshapes (renders pose one identity frame after frame):
    # renders of identities A, B, A equal those of a FLAME that never saw another.
    from bench.tracking import synthetic_sequence
    from tracking.conditioning import render_conditioning
    from tracking.pipeline import load_flame
    flame = load_flame()
    seq = synthetic_sequence(flame, 2)
    shapes = [seq.shape, seq.shape * -2, seq.shape]
    images = [render_conditioning(flame, seq, 48, shape=shape) for shape in shapes]
    for shape, image in zip(shapes, images):
        assert torch.equal(image, render_conditioning(load_flame(), seq, 48, shape=shape))
    assert not torch.equal(images[0], images[1])
