"""The take: the FLAME parameters of every frame a live run showed, kept as a seq.npz beside its mp4.

Schema and camera of tracking/sequence.py, the source's frame rate, one row per frame shown (the frames the
loop dropped are absent, so the take plays faster where the live run fell behind); crop_boxes hold the face
crop of each frame in the source's pixels. Render it offline at full quality:
    python sample.py --avatar runs/me --params live.seq.npz --out take.mp4
"""
import os

import numpy as np

from tracking.sequence import FlameSequence, save_seq

PER_FRAME = ("expression", "global_rot", "neck_rot", "jaw_rot", "eye_rots", "translation")


def take_path(mp4: str) -> str:
    """Where the take of a live run writing `mp4` goes: live.mp4 -> live.seq.npz."""
    return os.path.splitext(mp4)[0] + ".seq.npz"


class Take:
    """One-frame FlameSequences collected as they are shown, saved (atomically) as one sequence."""

    def __init__(self, path: str, fps: float):
        self.path, self.fps, self.frames, self.boxes = path, float(fps), [], []

    def add(self, params: FlameSequence, box: np.ndarray | None = None):
        self.frames.append(params)
        self.boxes.append(box)

    def sequence(self) -> FlameSequence:
        first = self.frames[0]
        boxes = None if any(b is None for b in self.boxes) else np.stack(self.boxes).astype(np.float32)
        return FlameSequence(shape=first.shape, focal=first.focal, image_size=first.image_size, fps=self.fps,
                             crop_boxes=boxes,
                             **{name: np.concatenate([getattr(f, name) for f in self.frames]) for name in PER_FRAME})

    def save(self) -> str | None:
        """Write the take (nothing when no frame was shown); returns its path."""
        if not self.frames:
            return None
        save_seq(self.path, self.sequence())
        return self.path
