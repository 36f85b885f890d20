"""Rasterizer throughput: frames/s of `conditioning_image` at 512^2 for a FLAME-sized mesh.

FLAME has 5023 vertices and 9976 faces; a 50 x 100 UV ellipsoid (4902 vertices, 9800 faces) stands in
for it, filling about half of the image like a tracked face crop.
--hint: the live hint instead, `render_conditioning` of the toy head (FLAME's forward pass included,
the identity fixed, back faces culled) one frame at a time, framed like a tracked 512 px face crop (the
head about 45% of the image, as in bench/tracking.py's stage rows); its stages are timed apart too.
Times are CPU time of this thread (the machine may be shared: CPU time moves far less with the load).

    python bench/render.py [--size 512] [--frames 8] [--batch 1] [--cull-back-faces] [--threads N] [--hint]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tracking.conditioning import conditioning_image  # noqa: E402


def uv_ellipsoid(rings, segments, radii=(1.0, 1.0, 1.0)):
    """Closed UV ellipsoid: vertices (V, 3) float32 and outward counter-clockwise faces (F, 3)."""
    theta = torch.linspace(0, torch.pi, rings + 1)[1:-1]  # polar angles of the inner rings
    phi = torch.arange(segments) * (2 * torch.pi / segments)
    ring = torch.stack(
        [theta.sin()[:, None] * phi.cos(), theta.sin()[:, None] * phi.sin(), theta.cos()[:, None].expand(-1, segments)], -1
    ).reshape(-1, 3)
    verts = torch.cat([torch.tensor([[0.0, 0.0, 1.0]]), ring, torch.tensor([[0.0, 0.0, -1.0]])]) * torch.tensor(radii)
    north, south = 0, len(verts) - 1
    idx = torch.arange(segments)
    nxt = (idx + 1) % segments
    faces = [torch.stack([torch.full_like(idx, north), 1 + idx, 1 + nxt], 1)]
    for r in range(rings - 2):
        a, b = 1 + r * segments + idx, 1 + r * segments + nxt
        c, d = a + segments, b + segments
        faces += [torch.stack([a, c, d], 1), torch.stack([a, d, b], 1)]
    last = 1 + (rings - 2) * segments
    faces.append(torch.stack([last + idx, torch.full_like(idx, south), last + nxt], 1))
    return verts, torch.cat(faces)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--cull-back-faces", action="store_true")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--hint", action="store_true", help="the live hint of the toy head (module doc)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.hint:
        return hint_rows(args.size, max(args.frames, 30))

    verts, faces = uv_ellipsoid(50, 100, radii=(0.09, 0.12, 0.1))  # head-sized, metres
    labels = torch.randint(0, 4, (len(faces),))
    focal = args.size * 2.0
    frames = []
    for i in range(args.batch):  # slightly different poses per frame
        angle = torch.tensor(0.1 * i)
        rot = torch.tensor([[angle.cos(), 0, angle.sin()], [0, 1, 0], [-angle.sin(), 0, angle.cos()]])
        frames.append(verts @ rot.T + torch.tensor([0.0, 0.0, 0.5]))
    batch = torch.stack(frames)

    def render():
        return conditioning_image(batch, faces, focal, args.size, face_labels=labels, cull_back_faces=args.cull_back_faces)

    render()  # warm-up
    wall, cpu = [], []
    for _ in range(args.frames):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = render()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    coverage = out[:, -1].mean().item()
    # The machine may be shared: the best call is the closest to the renderer's own speed.
    print(
        f"{len(verts)} vertices, {len(faces)} faces, {args.size}x{args.size}, batch {args.batch}, "
        f"cull {args.cull_back_faces}, {torch.get_num_threads()} threads, coverage {coverage:.2f}: "
        f"{args.batch / min(wall):.1f} frames/s best, {args.batch / sorted(wall)[len(wall) // 2]:.1f} median "
        f"({1000 * min(cpu) / args.batch:.0f} ms CPU/frame best), load average {os.getloadavg()[0]:.2f}"
    )


def hint_rows(size, frames):
    """Median CPU ms of the toy head's live hint, one frame at a time, and of its stages."""
    from bench.tracking import synthetic_sequence
    from tracking.conditioning import DEPTH_SPAN, posed_vertices, render_conditioning
    from tracking.pipeline import load_flame
    from tracking.render import rasterize, window_normal_maps
    flame = load_flame()
    seq = synthetic_sequence(flame, frames)
    seq.focal = seq.focal * 1.6  # closer: the head fills about as much of the crop as a tracked face
    focal, faces = seq.focal * size / seq.image_size[1], flame.render_faces
    stages = {
        "hint (render_conditioning)": lambda t: render_conditioning(flame, seq, size, slice(t, t + 1), seq.shape),
        "FLAME vertices": lambda t: posed_vertices(flame, seq, slice(t, t + 1), seq.shape),
        "conditioning_image": lambda t: conditioning_image(verts[t:t + 1], faces, focal, size, flame.face_regions,
                                                           depth_span=DEPTH_SPAN, cull_back_faces=True),
        "rasterize": lambda t: rasterize(verts[t:t + 1], faces, focal, size, cull_back_faces=True),
        "normal maps": lambda t: window_normal_maps(rasters[t]),
    }
    verts = posed_vertices(flame, seq, slice(None), seq.shape)
    rasters = [rasterize(verts[t:t + 1], faces, focal, size, cull_back_faces=True) for t in range(frames)]
    coverage = torch.stack([raster.mask.float().mean() for raster in rasters]).mean()
    load = os.getloadavg()[0]
    print(f"toy head hint, {size} px, 1 frame a call, {torch.get_num_threads()} threads, {frames} frames, "
          f"coverage {coverage:.2f}, load average {load:.2f}")
    for name, stage in stages.items():
        stage(0)  # warm-up
        cpu = []
        for t in range(frames):
            start = time.thread_time()
            stage(t)
            cpu.append(time.thread_time() - start)
        print(f"  {name}: {1000 * sorted(cpu)[len(cpu) // 2]:.2f} ms CPU median")


if __name__ == "__main__":
    main()
