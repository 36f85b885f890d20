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

DRIFT_PERIOD = 480  # frames


def iter_demo_frames(n_frames: int = 48, size: int = 384, seed: int = 0, frame_size=None, photo=None,
                     centre=(-0.1, -0.35)):
    """The demo's frames one at a time, (size, size, 3) uint8: the astronaut's head moving smoothly.

    photo: another (H, W, 3) uint8 photo to move instead, turned and zoomed about `centre` (in [-1, 1]
    image coordinates: the astronaut's face is up and left of the middle).

    frame_size (H, W): each frame is instead placed in a larger (H, W, 3) frame on a plain gradient,
    drifting across it (a face in a phone video's wide frame; benchmarks use 1080p). Frames are made
    as they are asked for, so a long clip never sits in memory.
    """
    from skimage import data
    image = torch.from_numpy(data.astronaut() if photo is None else photo).permute(2, 0, 1)[None].float()
    image = F.interpolate(image, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 2 * math.pi, 4)
    t = np.linspace(0, 2 * math.pi, n_frames, endpoint=False)
    angle = np.deg2rad(6) * np.sin(t + phase[0])
    zoom = 1 + 0.06 * np.sin(t + phase[1])
    shift = 0.05 * np.stack([np.sin(t + phase[2]), np.sin(2 * t + phase[3])], 1)
    # affine_grid maps output coords to input coords in [-1, 1]; rotate/zoom about the face (upper left)
    centre = np.array(centre)
    cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
    theta = np.zeros((n_frames, 2, 3))
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    theta[:, :, 2] = centre - np.einsum("tij,j->ti", theta[:, :, :2], centre) + shift
    theta = torch.tensor(theta, dtype=torch.float32)
    if frame_size is not None:
        height, width = frame_size
        background = np.empty((height, width, 3), np.uint8)
        background[:] = np.linspace(60, 160, width, dtype=np.uint8)[None, :, None]
        # the square drifts over the wide frame, across and back every DRIFT_PERIOD frames (whatever
        # the clip's length: a person moving about, at most a few pixels a frame), up and down twice
        drift = 2 * math.pi * np.arange(n_frames) / DRIFT_PERIOD
        left = ((width - size) * (0.5 - 0.45 * np.cos(drift))).astype(int)
        top = ((height - size) * (0.5 - 0.45 * np.cos(2 * drift))).astype(int)
    for i in range(n_frames):
        grid = F.affine_grid(theta[i:i + 1], (1, 3, size, size), align_corners=False)
        frame = F.grid_sample(image, grid, padding_mode="border", align_corners=False)
        frame = frame.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
        if frame_size is not None:
            placed = background.copy()
            placed[top[i]:top[i] + size, left[i]:left[i] + size] = frame
            frame = placed
        yield frame


def demo_frames(n_frames: int = 48, size: int = 384, seed: int = 0) -> np.ndarray:
    """(n_frames, size, size, 3) uint8 frames of the astronaut's head moving smoothly."""
    return np.stack(list(iter_demo_frames(n_frames, size, seed)))


def write_demo_video(path: str, n_frames: int = 48, size: int = 384, fps: float = 24.0, seed: int = 0,
                     frame_size=None) -> str:
    """The demo video (see iter_demo_frames), streamed to the encoder frame by frame."""
    write_video(path, iter_demo_frames(n_frames, size, seed, frame_size), fps)
    return path
