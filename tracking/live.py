"""Live tracking, one frame at a time: the face in a video frame -> its crop and its FLAME parameters.

    68 landmarks (FaceTracker, the box from the previous frame's landmarks) -> square face crop (its box
    smoothed over frames) -> FLAME fit of that one frame, warm-started from the previous one, with a given
    identity shape and camera (tracking.fit.FrameFit); only the first person seen is followed (tracking/people.py)

The live loop around it (sources, stages, outputs, the take) is live/ (live/loop.py).
"""
import numpy as np

from tracking.fit import FrameFit
from tracking.landmarks import FaceTracker
from tracking.people import PersonLock, maybe_someone_new
from tracking.pipeline import DEFAULT_MAX_GAP, TrackingError, to_crop_pixels
from tracking.sequence import FlameSequence
from tracking.video import crop_frames, smooth_crop_boxes

CROP_SMOOTHING = 0.5  # weight of the new crop box against the previous one: less jitter, little lag


class LiveTracker:
    """One video frame -> (its face crop, its FLAME parameters as a one-frame FlameSequence).

    The FLAME fit (tracking.fit.FrameFit, built once) keeps the avatar's identity shape and camera
    (`reference`: the seq.npz it was trained on, whose crops were `size` pixels) and starts from the
    previous frame's parameters. A frame without a face, or with only someone else's (the tracker follows
    the first person it sees), keeps the previous parameters (before the first face: it is skipped, None);
    more than `max_gap` frames in a row without any face is an error. The person check runs beside the tracking
    (PersonLock); wait_for_person: each check's verdict applies to its own frame (tests).
    """

    def __init__(self, flame, reference: FlameSequence, shape: np.ndarray, size: int, source: str,
                 max_gap: int = DEFAULT_MAX_GAP, wait_for_person: bool = False):
        self.size, self.source, self.max_gap = size, source, max_gap
        self.fit = FrameFit(flame, shape, reference.focal * size / reference.image_size[1], (size, size))
        self.faces = FaceTracker(full_searches=0, one_view=True)  # a frame without a face costs one view
        self.state = None     # FaceTracker's TrackState of the previous frame while the track holds
        self.box = None       # the previous crop box (float, smoothed)
        self.params = None    # the previous frame's fit
        self.faceless = []  # source indices of the frames without a face since the last face
        self.someone_else = False  # whether the last frame's face was someone else's
        self.person = PersonLock(wait_for_person)  # whom the tracker follows: the first face it sees

    def landmarks(self, frame: np.ndarray):
        """(68, 2) landmarks of the face in `frame`, followed from the previous frame, or None (no face, or
        not the person the tracker started with: tracking/people.py's PersonLock). When the verdict on a
        face already fitted arrives (late) and says someone else, the fit goes back to where it stood before
        that check and the face is searched for afresh; someone else's face found then is followed by the
        landmark tracker (no search per frame), its frames held."""
        if self.person.new_shot(frame):
            self.state = None  # a cut: the face is searched for afresh, and checked
        previous = self.state
        result, lost, self.state = self.faces.step(frame, previous)
        self.someone_else = False
        if result is None:
            return None
        accepted = self.person.accepts(frame, result[0],
                                       maybe_someone_new(previous, self.state, lost, self.faces.min_similarity),
                                       before=(self.params, self.box))  # this frame is not fitted yet
        if self.person.turned is not None:  # a verdict of someone else on a face followed until now: the fit as
            # it stood before that check, and the face searched for afresh on the next frame, whose landmarks are
            # checked next (landmarks followed across a fast move give a chip that can misjudge the person)
            (self.params, self.box), self.state = self.person.turned, None
        self.someone_else = not accepted
        return result[0] if accepted else None

    def crop(self, frame: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the face crop (size, size, 3), the landmarks in its pixels): the crop box around the landmarks,
        smoothed with the previous frames' boxes."""
        face_box = np.concatenate([landmarks.min(0), landmarks.max(0)])[None]
        box = smooth_crop_boxes(face_box, frame.shape[:2], sigma=0)[0].astype(np.float64)
        self.box = box if self.box is None else CROP_SMOOTHING * box + (1 - CROP_SMOOTHING) * self.box
        box = self.box.round().astype(np.int64)
        return crop_frames(frame[None], box[None], self.size)[0], to_crop_pixels(landmarks[None], box[None], self.size)[0]

    def __call__(self, index: int, frame: np.ndarray) -> tuple[np.ndarray, FlameSequence] | None:
        landmarks = self.landmarks(frame)
        if landmarks is None:
            # someone else's face is no gap: the fit is held while they are there, however long
            self.faceless = [] if self.someone_else else self.faceless + [index]
            if len(self.faceless) > self.max_gap:
                raise TrackingError(f"{self.source}: no face on frames {self.faceless[0]}-{index} (more than "
                                    f"{self.max_gap} frames in a row)")
            if self.params is None:
                return None
            return crop_frames(frame[None], self.box.round().astype(np.int64)[None], self.size)[0], self.params
        self.faceless = []
        crop, points = self.crop(frame, landmarks)
        self.params = self.fit(points, self.params)
        return crop, self.params
