"""From an mp4 of a face (or the offline demo video) to per-frame FLAME parameters and face crops.

    frames -> 68 landmarks per frame (tracking/landmarks.py) -> short gaps interpolated
           -> smoothed square crop boxes, frames cropped to `size` (tracking/video.py)
           -> FLAME fitted to the landmarks in crop pixels (tracking/fit.py) -> seq.npz (tracking/sequence.py)
           -> preview mp4 (mesh + landmarks over the crops)

Everything a run writes goes into one folder: seq.npz, crops.npy (uint8 T x size x size x 3),
landmarks.npy and preview.mp4 (and demo.mp4 for the demo), each written atomically, so a rerun can
trust whatever it finds there.
"""
import logging
import os
from dataclasses import dataclass

import numpy as np

from model.files import atomic_write
from tracking.conditioning import posed_vertices
from tracking.demo import write_demo_video
from tracking.fit import fit_sequence
from tracking.flame import FLAME, load_flame_model, load_landmark_embedding
from tracking.landmarks import NoFaceError, track_landmarks
from tracking.render import draw_landmarks, overlay
from tracking.sequence import FlameSequence, load_seq, save_seq
from tracking.toyhead import write_toy_flame
from tracking.video import crop_frames, read_video, smooth_crop_boxes, write_video

log = logging.getLogger(__name__)

DEFAULT_MAX_GAP = 10  # frames: longer stretches without a face are an error, shorter ones are interpolated
DEMO_FRAMES = 48      # length of the demo video when max_frames does not say
EMBEDDING_NAMES = ("landmark_embedding.npy", "flame_static_embedding.pkl")
TOY_FLAME_DIR = os.path.join(os.path.expanduser("~"), ".cache", "svp", "toyhead")


class TrackingError(ValueError):
    """The video cannot be tracked: the message names the file and the frames concerned."""


def load_flame(flame_path: str | None = None, n_shape: int = 100, n_exp: int = 50) -> FLAME:
    """FLAME from `generic_model.pkl` (its landmark embedding beside it), or the toy head when None."""
    if flame_path is None:
        flame_path = write_toy_flame(TOY_FLAME_DIR)["generic_model.pkl"]
    folder = os.path.dirname(os.path.abspath(flame_path))
    embeddings = [os.path.join(folder, n) for n in EMBEDDING_NAMES if os.path.exists(os.path.join(folder, n))]
    if not embeddings:
        raise FileNotFoundError(f"{folder}: no FLAME landmark embedding beside {os.path.basename(flame_path)}; "
                                f"put {' or '.join(EMBEDDING_NAMES)} there (DECA / the FLAME website provide them)")
    model = load_flame_model(flame_path)
    embedding = load_landmark_embedding(embeddings[0])
    n_exp = min(n_exp, model["shapedirs"].shape[2] - 300)
    # The jaw-line landmarks slide with head yaw where the embedding says how (DECA's contour table).
    return FLAME(model, embedding, n_shape=n_shape, n_exp=n_exp,
                 dynamic_contour=embedding.contour_faces_idx is not None)


def check_gaps(valid: np.ndarray, max_gap: int, video: str):
    """Fail on runs of more than `max_gap` frames without a face. Shorter gaps are bridged downstream:
    crop boxes are interpolated over them and the fit's smoothness terms carry the parameters across."""
    runs, start = [], None
    for t, ok in enumerate(np.append(valid, True)):
        if not ok and start is None:
            start = t
        elif ok and start is not None:
            runs.append((start, t - 1))
            start = None
    long_runs = [(a, b) for a, b in runs if b - a + 1 > max_gap]
    if long_runs:
        spans = ", ".join(f"{a}-{b}" for a, b in long_runs[:5])
        raise TrackingError(f"{video}: no face on frames {spans} (more than {max_gap} frames in a row); "
                            "trim the video or raise --max-gap")
    if runs:
        log.warning("%s: face lost on frames %s; bridged by interpolation", video,
                    ", ".join(f"{a}-{b}" for a, b in runs))


def to_crop_pixels(landmarks: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Landmarks (T,68,2) in video pixels -> pixels of the `size`-square crops of `boxes` (T,4)."""
    scale = size / (boxes[:, 2] - boxes[:, 0]).astype(np.float64)
    return (landmarks - boxes[:, None, :2]) * scale[:, None, None]


@dataclass
class TrackedVideo:
    seq: FlameSequence
    crops: np.ndarray        # (T, size, size, 3) uint8
    landmarks: np.ndarray    # (T, 68, 2) in crop pixels


def track_video(video: str, out_dir: str, flame: FLAME, size: int = 512, bbox=None,
                max_frames: int | None = None, max_gap: int = DEFAULT_MAX_GAP, preview: bool = True) -> TrackedVideo:
    """Track `video` into `out_dir` (seq.npz, crops.npy, landmarks.npy, preview.mp4); reuse them if present.

    video "demo": the offline demo video (tracking/demo.py), written to out_dir/demo.mp4 with max_frames
    (default DEMO_FRAMES) frames unless it is there already.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = {n: os.path.join(out_dir, n) for n in ("seq.npz", "crops.npy", "landmarks.npy", "preview.mp4")}
    if video == "demo":
        video = os.path.join(out_dir, "demo.mp4")
        if not os.path.exists(video):
            write_demo_video(video, n_frames=max_frames or DEMO_FRAMES)
    if all(os.path.exists(paths[n]) for n in ("seq.npz", "crops.npy", "landmarks.npy")):
        log.info("re-using the tracking cached in %s", out_dir)
        return TrackedVideo(load_seq(paths["seq.npz"]), np.load(paths["crops.npy"]), np.load(paths["landmarks.npy"]))
    frames, fps = read_video(video, max_frames)
    try:
        result = track_landmarks(frames, bbox)
    except NoFaceError as e:
        raise TrackingError(f"{video}: {e}") from e
    check_gaps(result.valid, max_gap, video)
    landmarks = result.landmarks  # NaN on frames without a face
    face_boxes = np.concatenate([landmarks.min(1), landmarks.max(1)], 1)
    boxes = smooth_crop_boxes(face_boxes, frames.shape[1:3])
    crops = crop_frames(frames, boxes, size)
    crop_landmarks = to_crop_pixels(landmarks, boxes, size)
    seq = fit_sequence(flame, crop_landmarks, (size, size), fps=float(fps), confidence=result.valid.astype(np.float64))
    seq.crop_boxes = boxes.astype(np.float32)
    for name, array in (("crops.npy", crops), ("landmarks.npy", crop_landmarks.astype(np.float32))):
        with atomic_write(paths[name]) as tmp:
            np.save(tmp, array)
    if preview:
        write_video(paths["preview.mp4"], preview_frames(flame, seq, crops, crop_landmarks), fps)
    save_seq(paths["seq.npz"], seq)  # last: its presence marks a complete cache
    return TrackedVideo(seq, crops, crop_landmarks)


def preview_frames(flame: FLAME, seq: FlameSequence, crops: np.ndarray, landmarks: np.ndarray):
    """The fitted mesh and the tracked landmarks over each crop (a generator of uint8 frames)."""
    verts = posed_vertices(flame, seq)
    focal = seq.focal * crops.shape[2] / seq.image_size[1]
    for crop, v, points in zip(crops, verts, landmarks):
        yield draw_landmarks(overlay(crop, v, flame.render_faces, focal), points[np.isfinite(points).all(1)])
