"""One person per track: shot cuts, who each stretch of a track shows, and the report that says so.

Real footage cuts between shots and between people (an interview's two speakers, a stage and its
audience); the landmark tracker follows whatever face it finds. Pass 1 of the track command feeds every
frame to a PeopleLog:
  * Shots: a frame whose tiny grey thumbnail (about 12 px) differs from the previous frame's by more than
    CUT_DIFFERENCE (mean absolute difference, grey levels 0-1) starts a shot, and the pipeline drops the
    running track there: the detector searches the new shot afresh, so no face is carried across a cut
    unchecked. A cut found where there is none costs one search and one descriptor, so the test may err
    that way.
  * Runs: the stretches the tracker followed one face through. A run starts at a cut and wherever the
    detector found a face (the track's start, or after the track was lost), and is described by dlib's
    face recognition network (tracking/identity.py) on up to SAMPLES_PER_RUN of its frames, SAMPLE_SPACING
    apart; the run's descriptor is their mean.
After pass 1, `identify` groups the runs into people (a run joins the first group, largest first, whose
frame-weighted mean descriptor is within SAME_PERSON). The main person is the group with the most frames,
or the one seen on the frame `person` names. Runs further than SAME_PERSON from the main person show
someone else: their frames count as faceless for the fit (bridged by its smoothness terms) and are left out
of training. people.json lists them, report.png shows every shot.
"""
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from model.files import atomic_write
from tracking.identity import SAME_PERSON, FaceNet, face_chip

# Mean |grey difference| (0-1) of consecutive thumbnails that marks a cut. With the demo's head turning a
# full cycle in 12 frames (faster than footage moves) frames within a shot differed by at most 0.08, the cuts
# between the astronaut and the Mona Lisa (tests/data/two_people.py) by 0.19.
CUT_DIFFERENCE = 0.12
THUMB_SIDE = 48         # the cut test's thumbnails: about this many pixels on the long side
SAMPLES_PER_RUN = 3     # descriptors per run ...
SAMPLE_SPACING = 10     # ... this many frames apart (its first frame, then every SAMPLE_SPACING)
REPORT_THUMB = 72       # height of a shot's picture in report.png
RECHECK_EVERY = 30      # live: frames a followed face goes without its descriptor being checked ...
RECHECK_OTHER = 4       # ... and someone else's: a wrong verdict (a chip off a fast-moving face) soon mended


class ShotCuts:
    """The cut test: call it on every frame in order; True where a frame starts a new shot (not the first)."""

    def __init__(self):
        self.thumb = None  # the previous frame's thumbnail

    def __call__(self, frame) -> bool:
        thumb = _thumbnail(np.asarray(frame))
        cut = self.thumb is not None and thumb.shape == self.thumb.shape \
            and float(np.abs(thumb - self.thumb).mean()) > CUT_DIFFERENCE
        self.thumb = thumb
        return cut


class Describer:
    """Face descriptors of (frame, 68 landmarks), the network loaded when first needed."""

    def __init__(self):
        self.net = None

    def __call__(self, frame, landmarks) -> np.ndarray:
        self.net = self.net or FaceNet.load()
        return self.net(face_chip(frame, landmarks)[None]).numpy()[0]


class PeopleLog:
    """What pass 1 records besides the landmarks: cuts, runs, descriptors, a picture of each shot.
    `state()` and `from_state` carry it through pass 1's checkpoints."""

    def __init__(self):
        self.cuts, self.run_starts, self.sample_frames, self.descriptors = [], [], [], []
        self.shot_pictures, self.frames = [], 0
        self.cut_test, self.describe = ShotCuts(), Describer()

    def is_cut(self, frame) -> bool:
        """Whether `frame` starts a new shot (the first frame does not); call it once per frame, in order."""
        cut = self.cut_test(frame)
        if cut:
            self.cuts.append(self.frames)
        if cut or self.frames == 0:
            self.shot_pictures.append(_picture(frame))
        return cut

    def add(self, frame, landmarks, found: bool):
        """Record frame self.frames: its landmarks (None without a face); found: the detector found the face
        there (after a cut, a loss, or at the start): a run starts."""
        t = self.frames
        if landmarks is not None:
            if found or not self.run_starts:
                self.run_starts.append(t)
            offset = t - self.run_starts[-1]
            if offset % SAMPLE_SPACING == 0 and offset // SAMPLE_SPACING < SAMPLES_PER_RUN:
                self.sample_frames.append(t)
                self.descriptors.append(self.describe(frame, landmarks))
        self.frames += 1

    def state(self) -> dict:
        pictures = np.stack(self.shot_pictures) if self.shot_pictures else np.zeros((0, REPORT_THUMB, 1, 3), np.uint8)
        return {"people_cuts": np.array(self.cuts, np.int64), "people_runs": np.array(self.run_starts, np.int64),
                "people_samples": np.array(self.sample_frames, np.int64),
                "people_descriptors": np.array(self.descriptors, np.float32).reshape(-1, 128),
                "people_thumb": np.zeros((0, 0), np.float32) if self.cut_test.thumb is None else self.cut_test.thumb,
                "people_pictures": pictures, "people_frames": np.int64(self.frames)}

    @classmethod
    def from_state(cls, saved) -> "PeopleLog":
        people_log = cls()
        people_log.cuts, people_log.run_starts = saved["people_cuts"].tolist(), saved["people_runs"].tolist()
        people_log.sample_frames = saved["people_samples"].tolist()
        people_log.descriptors = list(saved["people_descriptors"])
        people_log.cut_test.thumb = saved["people_thumb"] if saved["people_thumb"].size else None
        people_log.shot_pictures, people_log.frames = list(saved["people_pictures"]), int(saved["people_frames"])
        return people_log


def maybe_someone_new(previous, state, lost: bool, min_similarity: float) -> bool:
    """Whether the face FaceTracker.step returned (its TrackState `state`) may be someone new: the detector
    found it (no `previous` TrackState, or the track was `lost`), or it looks unlike the previous frame's
    face (face_patch correlation below `min_similarity`: the tracker kept it only because a face was there,
    which is also what another person taking the same place looks like). Live checks each such face; the
    track command does not start runs at the look test: in fast motion it fires every few frames, and a
    one-frame run judged by one descriptor of a poorly fitted face could drop frames of the main person."""
    return previous is None or lost or float(previous.patch @ state.patch) < min_similarity


class PersonLock:
    """The live tracker's person: the first face it describes. A face the detector finds (at the start, after
    the track was lost, or in a new shot: a new track), and a followed face every RECHECK_EVERY frames (one
    taken for someone else every RECHECK_OTHER), is checked: within SAME_PERSON of the first descriptor it is
    the person, else someone else.

    The descriptor (tracking/identity.py, 40 ms on a quiet core, 170 ms on a loaded one) runs on a worker
    thread: inline, every check would stall the live loop for several frames. So a check's verdict arrives
    a few frames after the face it describes, and until then the track keeps the standing it had: the person
    (the first face, or the last verdict said so: the face is followed meanwhile) or someone else (held until
    a verdict says otherwise). A verdict about an earlier track than the current one only sets the first
    descriptor. One check runs at a time; the newest one asked for meanwhile waits for it, older ones are
    dropped. wait=True: each check is waited for, the verdict applies to the frame itself (what the loop did
    inline, the behaviour tests compare against).
    """

    def __init__(self, wait: bool = False):
        self.wait = wait
        self.descriptor, self.unchecked = None, 0
        self.new_shot, self.describe = ShotCuts(), Describer()
        self.track = 0              # tracks started (a face the detector found starts one)
        self.followed = True        # whether the current track is taken for the person
        self.asked = False          # whether the last call asked for a check
        self.turned = None          # the last call's verdict turned the track to someone else: that check's `before`
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="person")
        self.checking = None        # (future descriptor, its track, before) of the check in flight
        self.waiting = None         # (frame, landmarks, track, before) of the newest check asked for meanwhile

    def accepts(self, frame, landmarks, found: bool, before=None) -> bool:
        """Whether to follow the face with these landmarks as the person; found: the detector found it.
        before: where the caller stood before this frame, handed back as `turned` if a check asked now says
        someone else of a track taken for the person until then (what to go back to)."""
        if found:
            self.track += 1
        self.asked = found or self.unchecked >= (RECHECK_EVERY if self.followed else RECHECK_OTHER)
        if self.asked:
            self.unchecked, self.waiting = 0, (frame, landmarks, self.track, before)
        else:
            self.unchecked += 1
        self.turned = None
        self._advance()
        if self.wait:
            self.settle()
        return self.followed

    def settle(self):
        """Wait for the checks asked for so far and apply their verdicts."""
        while self.checking is not None:
            self.checking[0].result()
            self._advance()

    def _advance(self):
        """Apply a finished check's verdict; start the waiting check when the worker is free."""
        if self.checking is not None and self.checking[0].done():
            (future, track, before), self.checking = self.checking, None
            descriptor = future.result()  # the describer's error, if any, is the tracking stage's
            if self.descriptor is None:
                self.descriptor = descriptor
            if track == self.track:
                followed = bool(np.linalg.norm(descriptor - self.descriptor) < SAME_PERSON)
                if self.followed and not followed:
                    self.turned = before
                self.followed = followed
        if self.checking is None and self.waiting is not None:
            (frame, landmarks, track, before), self.waiting = self.waiting, None
            self.checking = self.worker.submit(self.describe, frame, landmarks), track, before


def _thumbnail(frame):
    """The cut test's view of a frame: grey, a strided sample about THUMB_SIDE px on the long side (no
    full-frame work), then 4x4 block means: a face moving a few pixels barely changes it, a cut does."""
    step = max(1, max(frame.shape[:2]) // THUMB_SIDE)
    sample = frame[::step, ::step].mean(-1, dtype=np.float32) / 255
    rows, cols = (side // 4 * 4 for side in sample.shape)
    return sample[:rows, :cols].reshape(rows // 4, 4, cols // 4, 4).mean((1, 3))


def _picture(frame):
    """A small copy of a frame (REPORT_THUMB px high) for the report."""
    step = max(1, frame.shape[0] // REPORT_THUMB)
    small = frame[::step, ::step][:REPORT_THUMB]
    return np.pad(small, ((0, REPORT_THUMB - len(small)), (0, 0), (0, 0)))[:, :REPORT_THUMB * 2]


@dataclass
class Run:
    start: int            # first frame
    end: int              # last frame
    distance: float       # of its descriptor from the main person's
    main: bool            # the main person (distance below SAME_PERSON)


@dataclass
class People:
    runs: list            # Run per run of the track, in order
    other: np.ndarray     # (T,) bool: the frame shows someone else (left out of training)
    cuts: list            # first frames of the shots after the first

    def other_ranges(self):
        return [(r.start, r.end, r.distance) for r in self.runs if not r.main]


class PersonError(ValueError):
    """--person names a frame on which no face was tracked."""


def identify(people_log: PeopleLog, valid: np.ndarray, person: int | None = None) -> People:
    """Who each run shows (module doc). valid (T,): pass 1's frames with a face; person: a frame showing
    the main person (None: the person seen on the most frames)."""
    starts = np.array(people_log.run_starts, np.int64)
    ends = [_run_end(valid, s, stop) for s, stop in zip(starts, np.append(starts[1:], len(valid)))]
    sample_run = np.searchsorted(starts, people_log.sample_frames, side="right") - 1
    descriptors = np.array(people_log.descriptors, np.float64).reshape(-1, 128)
    run_descriptors = np.array([descriptors[sample_run == i].mean(0) for i in range(len(starts))]).reshape(-1, 128)
    lengths = np.array([e - s + 1 for s, e in zip(starts, ends)])
    groups = _group(run_descriptors, lengths)
    if person is None:
        main = max(set(groups), key=lambda g: lengths[groups == g].sum(), default=0)
    else:
        covering = [i for i, (s, e) in enumerate(zip(starts, ends)) if s <= person <= e]
        if not covering:
            raise PersonError(f"--person {person}: no face was tracked on frame {person} "
                              f"(faces on frames {_ranges(valid)})")
        main = groups[covering[0]]
    members = groups == main
    centre = (run_descriptors[members] * lengths[members, None]).sum(0) / max(1, lengths[members].sum())
    distances = np.linalg.norm(run_descriptors - centre, axis=1)
    runs = [Run(int(s), int(e), float(d), bool(d < SAME_PERSON)) for s, e, d in zip(starts, ends, distances)]
    other = np.zeros(len(valid), bool)
    for run in runs:
        if not run.main:
            other[run.start:run.end + 1] = True
    return People(runs, other, list(people_log.cuts))


def _run_end(valid, start, stop):
    """Last frame of the run from `start`: before the next run's start `stop` or the first faceless frame."""
    after = np.flatnonzero(~valid[start:stop])
    return int(start + after[0] - 1) if len(after) else int(stop - 1)


def _group(descriptors, lengths):
    """Group index per run: largest runs first, each joins the first group whose frame-weighted mean
    descriptor lies within SAME_PERSON, else starts one."""
    groups, sums, weights = np.zeros(len(descriptors), np.int64), [], []
    for i in np.argsort(-lengths, kind="stable"):
        near = [g for g in range(len(sums)) if np.linalg.norm(sums[g] / weights[g] - descriptors[i]) < SAME_PERSON]
        if not near:
            sums.append(np.zeros(descriptors.shape[1]))
            weights.append(0)
            near = [len(sums) - 1]
        groups[i] = near[0]
        sums[near[0]] = sums[near[0]] + descriptors[i] * lengths[i]
        weights[near[0]] += lengths[i]
    return groups


def _ranges(mask):
    """'a-b, c-d' of the True runs of a bool array."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return ", ".join(f"{a}-{b - 1}" for a, b in zip(edges[::2], edges[1::2])) or "none"


# ---- the report ----------------------------------------------------------------------------------

def shot_rows(people: People, valid: np.ndarray):
    """One dict per shot: its frames, verdict (main person / another person / mixed / no face), the
    distance of its runs from the main person (the largest), frames kept, left out and bridged."""
    bounds = [0] + people.cuts + [len(valid)]
    rows = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        runs = [r for r in people.runs if start <= r.start < stop]
        kinds = {r.main for r in runs}
        verdict = "no face" if not runs else "main person" if kinds == {True} else \
            "another person" if kinds == {False} else "mixed"
        shot = slice(start, stop)
        rows.append({"frames": [start, stop - 1], "verdict": verdict,
                     "distance": max((r.distance for r in runs), default=None),
                     "kept": int((valid[shot] & ~people.other[shot]).sum()),
                     "left_out": int(people.other[shot].sum()), "bridged": int((~valid[shot]).sum())})
    return rows


def summary_lines(rows):
    """The report in words: a line per shot."""
    lines = []
    for i, row in enumerate(rows):
        distance = "" if row["distance"] is None else f" (distance {row['distance']:.2f})"
        lines.append(f"shot {i + 1}: frames {row['frames'][0]}-{row['frames'][1]}: {row['verdict']}{distance}; "
                     f"{row['kept']} kept, {row['left_out']} left out, {row['bridged']} without a face")
    return lines


def write_people(path, people: People, valid: np.ndarray):
    """people.json: the shots, the runs and the frames left out of training (train.py reads `left_out`)."""
    record = {"same_person_below": SAME_PERSON, "shots": shot_rows(people, valid),
              "runs": [vars(r) for r in people.runs],
              "left_out": np.flatnonzero(people.other).tolist(),
              "left_out_why": [f"frames {a}-{b} show another person (descriptor distance {d:.2f} >= {SAME_PERSON})"
                               for a, b, d in people.other_ranges()]}
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        json.dump(record, f, indent=1)


def write_report(path, people: People, valid: np.ndarray, pictures):
    """report.png: a row per shot, its first frame beside its frames, verdict and counts."""
    from PIL import Image, ImageDraw
    rows = shot_rows(people, valid)
    width, height = REPORT_THUMB * 2 + 560, REPORT_THUMB + 8
    sheet = Image.new("RGB", (width, height * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    colours = {"main person": (0, 120, 0), "another person": (190, 0, 0), "mixed": (200, 110, 0),
               "no face": (90, 90, 90)}
    for i, (row, line) in enumerate(zip(rows, summary_lines(rows))):
        top = i * height + 4
        sheet.paste(Image.fromarray(np.asarray(pictures[i])), (4, top))
        head, _, counts = line.partition("; ")
        draw.text((REPORT_THUMB * 2 + 12, top + 8), head, fill=colours[row["verdict"]])
        draw.text((REPORT_THUMB * 2 + 12, top + 30), counts, fill=(0, 0, 0))
    with atomic_write(path) as tmp:
        sheet.save(tmp, format="PNG")


def report_lines(track_dir) -> list:
    """The command's closing lines for a track folder: a line per shot, the frames left out and why, and
    where report.png is (nothing for a track made before people.json existed)."""
    path = os.path.join(track_dir, "people.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        record = json.load(f)
    return summary_lines(record["shots"]) + [f"left out of training: {why}" for why in record["left_out_why"]] \
        + [f"report: {os.path.join(track_dir, 'report.png')}"]


def left_out_frames(track_dir) -> set:
    """The frames of a track folder that show another person (people.json), which training skips."""
    path = os.path.join(track_dir, "people.json")
    if not os.path.exists(path):
        return set()
    with open(path) as f:
        return set(json.load(f)["left_out"])
