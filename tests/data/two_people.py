"""A generated clip whose truth is known: shots of two different real faces with hard cuts between them.

Person A is scikit-image's astronaut (tracking/demo.py), person B the Mona Lisa (mona_lisa_face.png; its
source and licence: make_identity_reference.py), each moving smoothly within its shot as the demo's head
does. `shots` lists (person, frames); the clip is written frame by frame.
"""
import itertools
import os

import numpy as np

from tracking.demo import iter_demo_frames
from tracking.video import write_video

HERE = os.path.dirname(os.path.abspath(__file__))
SHOTS = (("A", 24), ("B", 24), ("A", 24))
MOTION_PERIOD = 48  # frames of a full cycle of the head's motion (2 s at 24 fps)


def mona_lisa_photo(side=512):
    """The Mona Lisa's face on a canvas of its mean grey, (side, side, 3) uint8, the face in the middle."""
    from PIL import Image
    grey = Image.open(os.path.join(HERE, "mona_lisa_face.png")).convert("L")
    face = grey.resize((side * 2 // 5, side * 2 * grey.height // (5 * grey.width)), Image.BILINEAR)
    canvas = Image.new("L", (side, side), int(np.asarray(grey).mean()))
    canvas.paste(face, ((side - face.width) // 2, (side - face.height) // 2))
    return np.repeat(np.asarray(canvas)[..., None], 3, axis=2)


def iter_two_person_frames(shots=SHOTS, size=384):
    photos = {"A": None, "B": mona_lisa_photo()}
    centres = {"A": (-0.1, -0.35), "B": (0.0, 0.0)}
    for seed, (person, n_frames) in enumerate(shots):
        # Each shot is the start of a demo clip of at least MOTION_PERIOD frames: the demo's head turns a
        # full cycle per clip, far faster than footage moves when the clip is a few frames long.
        frames = iter_demo_frames(max(n_frames, MOTION_PERIOD), size, seed, photo=photos[person],
                                  centre=centres[person])
        yield from itertools.islice(frames, n_frames)


def write_two_person_video(path, shots=SHOTS, size=384, fps=24.0):
    """The clip (see the module doc); returns the per-frame truth: the person on each frame."""
    write_video(path, iter_two_person_frames(shots, size), fps)
    return np.concatenate([[person] * n for person, n in shots])
