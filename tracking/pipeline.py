"""From an mp4 of a face (or the offline demo video) to per-frame FLAME parameters and face crops,
in memory that does not grow with the video's length.

    pass 1: decode frame by frame -> 68 landmarks per frame (tracking/landmarks.py), shot cuts and a face
            descriptor per stretch of the track (tracking/people.py): frames of anyone but the main person
            become faceless frames
    then:   short gaps interpolated -> smoothed square crop boxes (zero-phase: they need every frame's
            face box)
    pass 2: decode again -> each frame cropped to `size` into crops.npy (a preallocated memmap), while
            a thread fits FLAME to the landmarks in crop pixels (tracking/fit.py) on the other core
    then:   preview.mp4 from crops.npy (mesh + landmarks over the crops, at most PREVIEW_SIZE px)

Everything a run writes goes into one folder: seq.npz, crops.npy (uint8 T x size x size x 3),
landmarks.npy, preview.mp4 (and demo.mp4 for the demo), people.json and report.png (the shots and who
they show: tracking/people.py), and source.json: what the track was made
from (the video's identity, the flags, the FLAME model's fingerprint). Each output is written under
a temp name and renamed when complete, seq.npz last, so a rerun can trust what it finds: a complete
track made from the same source is returned as it is, one made from another is rebuilt.

An interrupted track resumes where it stopped: pass 1 saves its landmarks and the tracker's state
every CHECKPOINT_EVERY frames (pass1.partial.npz), the fit its result (fit.partial.npz), pass 2
its frame count (crops.progress.json) after flushing the crops written so far (crops.partial.npy).
They are resumed only under the same source.json.
"""
import ctypes
import glob
import hashlib
import logging
import os
import shutil
import signal
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from kernels.dispatch import cache_dir
from model.files import atomic_write, read_json, write_json
from tracking.conditioning import posed_vertices
from tracking.demo import write_demo_video
from tracking.fit import FitConfig, fit_sequence, intra_op_threads
from tracking.flame import FLAME, load_flame_model, load_landmark_embedding
from tracking.landmarks import FaceTracker, TrackState, stack_results
from tracking.people import PeopleLog, PersonError, identify, write_people, write_report
from tracking.render import draw_landmarks, overlay
from tracking.sequence import FlameSequence, load_seq, save_seq
from tracking import toyhead
from tracking.video import VideoWriter, crop_frames, iter_frames, probe_video, smooth_crop_boxes

log = logging.getLogger(__name__)

DEFAULT_MAX_GAP = 10  # frames: longer stretches without a face are an error, shorter ones are interpolated
DEMO_FRAMES = 48      # length of the demo video when max_frames does not say
EMBEDDING_NAMES = ("landmark_embedding.npy", "flame_static_embedding.pkl")
CHECKPOINT_EVERY = 100  # frames between the progress saves of an interruptible track
PREVIEW_SIZE = 256      # the preview is drawn at most this large: it is a preview
PREVIEW_BATCH = 8       # preview frames rasterized together
PREVIEW_THREADS = 2     # batches of the preview drawn at once
# x264's veryfast preset for the preview: 1.7 against 3.7 ms of CPU a 256 px frame for x264's default
# (medium), at crf 18 a file no larger; the preview is drawn after the fit, on the command's critical path.
PREVIEW_PRESET = "veryfast"
OUTPUTS = ("seq.npz", "crops.npy", "landmarks.npy", "preview.mp4", "people.json", "report.png")
PARTIALS = ("pass1.partial.npz", "fit.partial.npz", "crops.partial.npy", "crops.progress.json")
# Tests: "PASS:N" SIGKILLs the process after N frames of pass 1 or 2 (an interruption without clean-up).
KILL_ENV = "SVP_TRACK_KILL_AFTER"


class TrackingError(ValueError):
    """The video cannot be tracked: the message names the file and the frames concerned."""


def load_flame(flame_path: str | None = None, n_shape: int = 100, n_exp: int = 50) -> FLAME:
    """FLAME from `generic_model.pkl` (its landmark embedding beside it), or the toy head when None."""
    if flame_path is None:
        flame_path = toy_flame_path()
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


def toy_flame_path() -> str:
    """The toy head's generic_model.pkl, built once per version of tracking/toyhead.py (it takes about a
    second, every command used to pay it) into a folder of svp's cache named by that version."""
    with open(toyhead.__file__, "rb") as f:
        version = hashlib.sha256(f.read()).hexdigest()[:16]
    folder = str(cache_dir() / "toyhead" / version)
    if not os.path.isdir(folder):  # written whole under a temp name, then renamed: never seen half-written
        temp = f"{folder}.tmp{os.getpid()}"
        toyhead.write_toy_flame(temp)
        try:
            os.rename(temp, folder)
        except OSError:  # another process renamed its copy first
            shutil.rmtree(temp)
    return os.path.join(folder, "generic_model.pkl")


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


# ---- what a track is made from -----------------------------------------------------------------

def file_identity(path: str) -> dict | None:
    """Absolute path, size, mtime and sha256 of the first MiB of a file; None when it is missing."""
    if not os.path.isfile(path):
        return None
    stat = os.stat(path)
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()
    return {"path": os.path.abspath(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "sha256_first_mib": head}


def flame_fingerprint(flame: FLAME) -> str:
    """sha256 over the FLAME model's buffers and sizes: the same model files give the same print."""
    digest = hashlib.sha256(f"{flame.n_shape} {flame.n_exp}".encode())
    for name, tensor in sorted(flame.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def track_source(video: str, flame: FLAME, size: int, bbox, max_frames, max_gap, shape=None, focal=None,
                 person=None) -> dict:
    """What a track is made from, as source.json records it (`shape`, `focal` and `person` only when given:
    older records lack them)."""
    source = {"video": file_identity(video), "size": size, "max_frames": max_frames,
              "bbox": None if bbox is None else [float(v) for v in bbox], "max_gap": max_gap,
              "flame": flame_fingerprint(flame)}
    given = {"shape": None if shape is None else np.asarray(shape, np.float32).tolist(),
             "focal": None if focal is None else float(focal), "person": person}
    return {**source, **{key: value for key, value in given.items() if value is not None}}


def source_mismatch(recorded: dict | None, source: dict) -> str | None:
    """Why a folder's recorded source differs from `source` (None: it matches). A video that is
    missing now is not compared: a finished track stays usable after its video is deleted."""
    if recorded is None:
        return "it has no record of what it was made from (source.json)"
    keys = [k for k in source if not (k == "video" and source[k] is None)]
    changed = [k for k in keys if recorded.get(k) != source[k]]
    if not changed:
        return None
    return "; ".join("the video changed" if k == "video" else "the FLAME model changed" if k == "flame"
                     else f"{k} was {recorded.get(k)}, now {source[k]}" for k in changed)


# ---- the track ---------------------------------------------------------------------------------

@dataclass
class TrackedVideo:
    seq: FlameSequence
    crops: np.memmap         # (T, size, size, 3) uint8, read from crops.npy on demand (mmap_mode="r")
    landmarks: np.ndarray    # (T, 68, 2) in crop pixels


def track_video(video: str, out_dir: str, flame: FLAME, size: int = 512, bbox=None, max_frames: int | None = None,
                max_gap: int = DEFAULT_MAX_GAP, preview: bool = True, shape=None, focal=None,
                person: int | None = None) -> TrackedVideo:
    """Track `video` into `out_dir` (seq.npz, crops.npy, landmarks.npy, preview.mp4, people.json,
    report.png, source.json); return the track found there when it was made from the same source, resume
    an interrupted one.

    video "demo": the offline demo video (tracking/demo.py), written to out_dir/demo.mp4 with max_frames
    (default DEMO_FRAMES) frames unless it is there with at least that many already. shape: a fixed
    identity shape (an avatar's: another video of its person), else fitted; focal: a fixed focal length in
    pixels of the `size` crops (the avatar's camera), else fitted. person: a frame that shows the person to
    track (default: the one seen on the most frames); frames of anyone else are left out
    (tracking/people.py).
    """
    os.makedirs(out_dir, exist_ok=True)
    path = lambda name: os.path.join(out_dir, name)  # noqa: E731
    if video == "demo":
        video = path("demo.mp4")
        if (probe_video(video).frames if os.path.exists(video) else 0) < (max_frames or DEMO_FRAMES):
            write_demo_video(video, n_frames=max_frames or DEMO_FRAMES)
    source = track_source(video, flame, size, bbox, max_frames, max_gap, shape, focal, person)
    recorded = read_json(path("source.json")) if os.path.exists(path("source.json")) else None
    mismatch = source_mismatch(recorded, source)
    if mismatch is None and all(os.path.exists(path(n)) for n in OUTPUTS[:3]):
        if source["video"] is None:
            log.info("%s is missing; re-using the tracking made from it in %s", video, out_dir)
        else:
            log.info("re-using the tracking cached in %s", out_dir)
        return _load_tracked(out_dir)
    info = probe_video(video)  # a missing or unreadable video fails here, before anything is removed
    _remove_temp_files(out_dir)
    if mismatch is not None:
        if any(os.path.exists(path(n)) for n in OUTPUTS + PARTIALS):
            log.info("%s: tracking again, since %s", out_dir, mismatch)
        for name in OUTPUTS + PARTIALS:
            if os.path.exists(path(name)):
                os.remove(path(name))
        write_json(path("source.json"), source)

    # One PyTorch thread: the decoder runs in a thread of its own, and on small tensors (one crop, a
    # batch of previews) a second intra-op thread mostly waits for a busy core (several times slower).
    with intra_op_threads(1):
        return _track(video, info, out_dir, flame, size, bbox, max_frames, max_gap, preview, shape, focal, person)


def _track(video, info, out_dir, flame, size, bbox, max_frames, max_gap, preview, shape, focal, person):
    """track_video's work, on a folder that holds only its own source.json and partial progress; `info`:
    the video's VideoInfo (the container is not opened again to ask)."""
    path = lambda name: os.path.join(out_dir, name)  # noqa: E731
    fps = info.fps
    frames = min(filter(None, (info.frames, max_frames)), default=None)
    result, frame_shape, people_log = _track_landmarks(video, max_frames, frames, bbox, path("pass1.partial.npz"))
    check_gaps(result.valid, max_gap, video)
    try:
        people = identify(people_log, result.valid, person)
    except PersonError as error:
        raise TrackingError(f"{video}: {error}") from None
    write_people(path("people.json"), people, result.valid)
    write_report(path("report.png"), people, result.valid, people_log.shot_pictures)
    # Another person's frames are faceless to the fit and the crop boxes (bridged), and left out of training.
    landmarks = np.where(people.other[:, None, None], np.nan, result.landmarks)  # NaN on frames without a face
    face_boxes = np.concatenate([landmarks.min(1), landmarks.max(1)], 1)
    boxes = smooth_crop_boxes(face_boxes, frame_shape)
    crop_landmarks = to_crop_pixels(landmarks, boxes, size)
    with atomic_write(path("landmarks.npy")) as tmp:
        np.save(tmp, crop_landmarks.astype(np.float32))
    # The fit needs only the landmarks and pass 2 only the boxes: the fit runs in a thread beside pass 2
    # (decoding, resizing and writing release the GIL: each keeps a core busy), the preview after both.
    fit = _Background(lambda: _fit(flame, crop_landmarks, size, fps, result.valid & ~people.other, shape, focal,
                                   boxes, path("fit.partial.npz")))
    _write_crops(video, boxes, size, out_dir)
    seq = fit.result()
    if preview:
        _write_preview(flame, seq, crop_landmarks, out_dir, fps)
    save_seq(path("seq.npz"), seq)  # last: its presence marks a complete track
    for name in PARTIALS:
        if os.path.exists(path(name)):
            os.remove(path(name))
    return _load_tracked(out_dir)


def _fit(flame, crop_landmarks, size, fps, valid, shape, focal, boxes, partial):
    """The FLAME sequence fitted to the landmarks (in crop pixels), resumed from / saved to `partial`."""
    if os.path.exists(partial):
        return load_seq(partial)
    log.info("fitting FLAME to the landmarks of %d frames", len(crop_landmarks))
    seq = fit_sequence(flame, crop_landmarks, (size, size), fps=float(fps), confidence=valid.astype(np.float64),
                       shape=shape, config=None if focal is None else FitConfig(focal=float(focal), fit_focal=False))
    seq.crop_boxes = boxes.astype(np.float32)
    save_seq(partial, seq)
    _return_free_memory()
    return seq


class _Background:
    """fn() in a daemon thread (a Ctrl-C of the main thread does not wait for it); result() waits for its
    value or raises its exception."""

    def __init__(self, fn):
        self.value, self.error = None, None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn):
        try:
            self.value = fn()
        except BaseException as error:  # noqa: BLE001 -- raised in the waiting thread
            self.error = error

    def result(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.value


def _return_free_memory():
    """Hand the heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing). The fit's
    working memory grows with the video and, freed, would stay in the process under pass 2."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _load_tracked(out_dir: str) -> TrackedVideo:
    return TrackedVideo(load_seq(os.path.join(out_dir, "seq.npz")),
                        np.load(os.path.join(out_dir, "crops.npy"), mmap_mode="r"),
                        np.load(os.path.join(out_dir, "landmarks.npy")))


def _remove_temp_files(out_dir: str):
    """Temp files an interrupted run left behind (atomic_write names them STEM.tmpPID.EXT)."""
    for name in OUTPUTS + PARTIALS + ("source.json", "demo.mp4"):
        stem, ext = os.path.splitext(name)
        for temp in glob.glob(os.path.join(glob.escape(out_dir), f"{stem}.tmp*{ext}")):
            os.remove(temp)


def _kill_for_tests(pass_number: int, frames_done: int):
    """SIGKILL this process where KILL_ENV says (tests of resuming; see KILL_ENV)."""
    if os.environ.get(KILL_ENV) == f"{pass_number}:{frames_done}":
        os.kill(os.getpid(), signal.SIGKILL)


def _track_landmarks(video, max_frames, total, bbox, checkpoint):
    """Pass 1: (TrackResult, frame (H, W)), resumed from `checkpoint` and saved to it as it goes; `total`:
    the frames expected (for the progress bar; None: unknown)."""
    tracker = FaceTracker()
    results, lost, state, frame_shape, complete, people_log = _load_pass1(checkpoint, tracker)
    if not complete:
        with tqdm(total=total, initial=len(results), desc="pass 1: landmarks", unit="frame") as bar:
            for t, frame in enumerate(iter_frames(video, max_frames, start=len(results)), len(results)):
                if people_log.is_cut(frame):
                    state = None  # a new shot: the detector searches it afresh, no face is carried across
                found = state is None  # the detector (or the user's box) finds the face: a new run
                result, was_lost, state = tracker.step(frame, state, bbox if t == 0 else None)
                people_log.add(frame, None if result is None else result[0], found or was_lost)
                results.append(result)
                if was_lost:
                    lost.append(t)
                frame_shape = frame.shape[:2]
                if len(results) % CHECKPOINT_EVERY == 0:
                    _save_pass1(checkpoint, results, lost, state, frame_shape, people_log, tracker, complete=False)
                bar.update()
                _kill_for_tests(1, len(results))
        _save_pass1(checkpoint, results, lost, state, frame_shape, people_log, tracker, complete=True)
    if all(r is None for r in results):
        raise TrackingError(f"{video}: no face found in any of the {len(results)} frames")
    if lost:
        log.info("landmark track lost on frames %s; the detector searched them again", lost)
    return stack_results(results, tracker.predictor.num_parts), frame_shape, people_log


def _save_pass1(path, results, lost, state, frame_shape, people_log, tracker, complete):
    """Pass 1 so far, with what the FaceTracker counts (its search budget), so that a resumed run searches
    each frame as an uninterrupted one would."""
    track = stack_results(results)
    patch = np.full(0, np.nan) if state is None else state.patch
    box = np.full(4, np.nan) if state is None else state.box
    with atomic_write(path) as tmp:
        np.savez(tmp, landmarks=track.landmarks, boxes=track.boxes, rolls=track.rolls, lost=np.array(lost, np.int64),
                 state_box=box, state_roll=np.nan if state is None else state.roll, state_patch=patch,
                 frame_shape=np.array(frame_shape), complete=complete, searched=tracker.searched,
                 misses=tracker.misses, **people_log.state())


def _load_pass1(path, tracker):
    """(results, lost, state, frame_shape, complete, people_log) from a pass-1 checkpoint, or a fresh start;
    `tracker` takes back its counts."""
    if not os.path.exists(path):
        return [], [], None, None, False, PeopleLog()
    with np.load(path) as saved:
        if "searched" not in saved.files:  # saved before pass 1 kept the tracker's counts: start over
            return [], [], None, None, False, PeopleLog()
        tracker.searched, tracker.misses = int(saved["searched"]), int(saved["misses"])
        results = [None if np.isnan(roll) else (points, box, float(roll))
                   for points, box, roll in zip(saved["landmarks"], saved["boxes"], saved["rolls"])]
        state = None if np.isnan(saved["state_roll"]) else \
            TrackState(saved["state_box"], float(saved["state_roll"]), saved["state_patch"])
        log.info("resuming the landmarks after frame %d", len(results))
        return (results, saved["lost"].tolist(), state, tuple(saved["frame_shape"]), bool(saved["complete"]),
                PeopleLog.from_state(saved))


def _write_crops(video, boxes, size, out_dir):
    """Pass 2: every frame's crop into crops.npy (through crops.partial.npy, resumed after the frames
    crops.progress.json counts).

    The .npy is preallocated by open_memmap (header and size), then written frame by frame with
    pwrite rather than through the map: written pages of a map stay in the process's resident set
    until unmapped, which would make its peak memory grow with the video after all."""
    partial, progress = os.path.join(out_dir, "crops.partial.npy"), os.path.join(out_dir, "crops.progress.json")
    shape = (len(boxes), size, size, 3)
    done = read_json(progress)["frames"] if os.path.exists(progress) and os.path.exists(partial) else 0
    if not done:
        np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=shape)  # header; a sparse file of that size
    layout = np.load(partial, mmap_mode="r")
    offset, frame_bytes = layout.offset, layout[0].nbytes
    if layout.shape != shape or layout.dtype != np.uint8:
        raise TrackingError(f"{partial}: holds {layout.dtype} {layout.shape} crops, expected uint8 {shape}; delete it")
    del layout
    if done:
        log.info("resuming the crops after frame %d", done)
    with open(partial, "r+b") as file, tqdm(total=len(boxes), initial=done, desc="pass 2: crops", unit="frame") as bar:
        fd = file.fileno()
        for t, frame in enumerate(iter_frames(video, len(boxes), start=done), done):
            crop = crop_frames(frame[None], boxes[t:t + 1], size)[0]
            os.pwrite(fd, crop.tobytes(), offset + t * frame_bytes)
            if (t + 1) % CHECKPOINT_EVERY == 0:
                os.fsync(fd)  # the crops on disk before the count that says they are there
                write_json(progress, {"frames": t + 1})
            bar.update()
            _kill_for_tests(2, t + 1)
        os.fsync(fd)
    os.replace(partial, os.path.join(out_dir, "crops.npy"))


def _write_preview(flame, seq, landmarks, out_dir, fps):
    """preview.mp4 from the crops in crops.npy, read a frame at a time with pread (pages read through a
    memory map would stay in the process's resident set: its memory would grow with the video)."""
    crops = np.load(os.path.join(out_dir, "crops.npy"), mmap_mode="r")
    shape, offset, frame_bytes = crops.shape, crops.offset, crops[0].nbytes
    del crops
    draw = _PreviewDrawer(flame, seq, landmarks, os.path.join(out_dir, "preview.mp4"), fps)
    with open(os.path.join(out_dir, "crops.npy"), "rb") as file, \
            tqdm(total=shape[0], desc="preview", unit="frame") as bar:
        try:
            for t in range(shape[0]):
                draw(np.frombuffer(os.pread(file.fileno(), frame_bytes, offset + t * frame_bytes), np.uint8)
                     .reshape(shape[1:]))
                bar.update()
            draw.close()
        except BaseException:
            draw.abort()
            raise


class _PreviewDrawer:
    """preview.mp4 written as the crops come: the fitted mesh (back faces culled) and the landmarks
    over each crop, drawn at most PREVIEW_SIZE px, PREVIEW_BATCH frames rasterized together. The preview
    is all that is left to do once the fit is done: batches are drawn by PREVIEW_THREADS threads (torch
    and numpy release the GIL), at most one more batch waiting than there are threads (memory stays
    flat), and written in order."""

    def __init__(self, flame, seq, landmarks, path, fps):
        self.flame, self.seq, self.landmarks = flame, seq, landmarks
        self.writer = VideoWriter(path, fps, preset=PREVIEW_PRESET)
        self.pool = ThreadPoolExecutor(PREVIEW_THREADS)
        self.pending, self.queued, self.drawing = [], 0, deque()

    def __call__(self, crop):
        self.pending.append(np.asarray(crop))
        if len(self.pending) == PREVIEW_BATCH:
            self.submit()

    def submit(self):
        if self.pending:
            self.drawing.append(self.pool.submit(self.draw, self.queued, np.stack(self.pending)))
            self.queued += len(self.pending)
            self.pending = []
        while len(self.drawing) > PREVIEW_THREADS:
            self.write(self.drawing.popleft())

    def write(self, batch):
        for frame in batch.result():
            self.writer.write(frame)

    def draw(self, start, crops):
        """The preview frames of crops start, start + 1, ... (a batch (B, size, size, 3))."""
        side = min(crops.shape[1], PREVIEW_SIZE)
        if side != crops.shape[1]:  # the whole crop, resized
            crops = crop_frames(crops, np.tile([0, 0, crops.shape[2], crops.shape[1]], (len(crops), 1)), side)
        frames = slice(start, start + len(crops))
        verts = posed_vertices(self.flame, self.seq, frames)
        focal = self.seq.focal * side / self.seq.image_size[1]
        shaded = overlay(crops, verts, self.flame.render_faces, focal, cull_back_faces=True)
        return [draw_landmarks(frame, points[np.isfinite(points).all(1)])
                for frame, points in zip(shaded, self.landmarks[frames] * side / self.seq.image_size[1])]

    def close(self):
        self.submit()
        while self.drawing:
            self.write(self.drawing.popleft())
        self.pool.shutdown()
        self.writer.close()

    def abort(self):
        self.pool.shutdown(cancel_futures=True)
        self.writer.abort()
