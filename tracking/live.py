"""Live tracking, one frame at a time: the face in a video frame -> its crop and its FLAME parameters.

    68 landmarks (FaceTracker, the box from the previous frame's landmarks) -> square face crop (its box
    smoothed over frames) -> FLAME fit of that one frame, warm-started from the previous one, with a given
    identity shape and camera

The live loop around it (sources, stages, outputs, the take) is live/ (live/loop.py).
"""
import numpy as np

from tracking.fit import fit_frame
from tracking.landmarks import FaceTracker
from tracking.pipeline import DEFAULT_MAX_GAP, TrackingError, to_crop_pixels
from tracking.sequence import FlameSequence
from tracking.video import crop_frames, smooth_crop_boxes

CROP_SMOOTHING = 0.5  # weight of the new crop box against the previous one: less jitter, little lag


class LiveTracker:
    """One video frame -> (its face crop, its FLAME parameters as a one-frame FlameSequence).

    The FLAME fit keeps the avatar's identity shape and camera (`reference`: the seq.npz it was trained
    on, whose crops were `size` pixels) and starts from the previous frame's parameters. A frame without a
    face keeps the previous parameters (before the first face: it is skipped, None); more than `max_gap`
    frames in a row without one is an error.
    """

    def __init__(self, flame, reference: FlameSequence, shape: np.ndarray, size: int, source: str,
                 max_gap: int = DEFAULT_MAX_GAP):
        self.flame, self.shape, self.size, self.source, self.max_gap = flame, shape, size, source, max_gap
        self.focal = reference.focal * size / reference.image_size[1]
        self.faces = FaceTracker()
        self.state = None     # FaceTracker's TrackState of the previous frame while the track holds
        self.box = None       # the previous crop box (float, smoothed)
        self.params = None    # the previous frame's fit
        self.faceless = []  # source indices of the frames without a face since the last face

    def landmarks(self, frame: np.ndarray):
        """(68, 2) landmarks of the face in `frame`, followed from the previous frame, or None."""
        result, _, self.state = self.faces.step(frame, self.state)
        return None if result is None else result[0]

    def __call__(self, index: int, frame: np.ndarray) -> tuple[np.ndarray, FlameSequence] | None:
        landmarks = self.landmarks(frame)
        if landmarks is None:
            self.faceless.append(index)
            if len(self.faceless) > self.max_gap:
                raise TrackingError(f"{self.source}: no face on frames {self.faceless[0]}-{index} (more than "
                                    f"{self.max_gap} frames in a row)")
            if self.params is None:
                return None
            return crop_frames(frame[None], self.box.round().astype(np.int64)[None], self.size)[0], self.params
        self.faceless = []
        face_box = np.concatenate([landmarks.min(0), landmarks.max(0)])[None]
        box = smooth_crop_boxes(face_box, frame.shape[:2], sigma=0)[0].astype(np.float64)
        self.box = box if self.box is None else CROP_SMOOTHING * box + (1 - CROP_SMOOTHING) * self.box
        box = self.box.round().astype(np.int64)
        crop = crop_frames(frame[None], box[None], self.size)[0]
        points = to_crop_pixels(landmarks[None], box[None], self.size)[0]
        self.params = fit_frame(self.flame, points, (self.size, self.size), self.shape, self.focal, self.params)
        return crop, self.params
