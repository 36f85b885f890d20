"""A short demo video that needs no download: a real face in smooth synthetic head motion.

The face is scikit-image's astronaut photograph (Eileen Collins, public domain, shipped inside the
scikit-image wheel). Each frame is the photo under a slowly varying similarity transform (rotation,
zoom, translation), so the offline landmark tracker, the FLAME fit and training all see a real face
that moves. It is a demo, not a benchmark: there is no expression change and no parallax.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from tracking.video import write_video


def demo_frames(n_frames: int = 48, size: int = 384, seed: int = 0) -> np.ndarray:
    """(n_frames, size, size, 3) uint8 frames of the astronaut's head moving smoothly."""
    from skimage import data
    image = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float()
    image = F.interpolate(image, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 2 * math.pi, 4)
    t = np.linspace(0, 2 * math.pi, n_frames, endpoint=False)
    angle = np.deg2rad(6) * np.sin(t + phase[0])
    zoom = 1 + 0.06 * np.sin(t + phase[1])
    shift = 0.05 * np.stack([np.sin(t + phase[2]), np.sin(2 * t + phase[3])], 1)
    # affine_grid maps output coords to input coords in [-1, 1]; rotate/zoom about the face (upper left)
    centre = np.array([-0.1, -0.35])
    cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
    theta = np.zeros((n_frames, 2, 3))
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    theta[:, :, 2] = centre - np.einsum("tij,j->ti", theta[:, :, :2], centre) + shift
    grid = F.affine_grid(torch.tensor(theta, dtype=torch.float32), (n_frames, 3, size, size), align_corners=False)
    frames = F.grid_sample(image.expand(n_frames, -1, -1, -1), grid, padding_mode="border", align_corners=False)
    return frames.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def write_demo_video(path: str, n_frames: int = 48, size: int = 384, fps: float = 24.0, seed: int = 0) -> str:
    write_video(path, demo_frames(n_frames, size, seed), fps)
    return path
