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
    """The per-frame parameters of the frames shown, saved (atomically) as one sequence. Only each frame's
    rows are kept (the identity and camera once): a camera left running for hours holds a few hundred
    bytes a frame, not a FlameSequence each."""

    def __init__(self, path: str, fps: float):
        self.path, self.fps, self.first, self.rows, self.boxes = path, float(fps), None, [], []

    def add(self, params: FlameSequence, box: np.ndarray | None = None):
        if self.first is None:
            self.first = params
        self.rows.append(np.concatenate([getattr(params, name)[-1] for name in PER_FRAME]).astype(np.float32))
        self.boxes.append(box)

    def sequence(self) -> FlameSequence:
        first, rows = self.first, np.stack(self.rows)
        widths = [getattr(first, name).shape[1] for name in PER_FRAME]
        columns = np.split(rows, np.cumsum(widths)[:-1], axis=1)
        boxes = None if any(b is None for b in self.boxes) else np.stack(self.boxes).astype(np.float32)
        return FlameSequence(shape=first.shape, focal=first.focal, image_size=first.image_size, fps=self.fps,
                             crop_boxes=boxes, **dict(zip(PER_FRAME, columns)))

    def save(self) -> str | None:
        """Write the take (nothing when no frame was shown); returns its path."""
        if not self.rows:
            return None
        save_seq(self.path, self.sequence())
        return self.path
