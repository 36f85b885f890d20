"""Shots and people in a track (tracking/people.py) on generated clips whose truth is known: shots of two
real faces (tests/data/two_people.py) with hard cuts, and the one-person demo clip, whose track must not
change."""
import json
import os
import time

import numpy as np
import pytest

from tracking import people as people_module
from tracking import pipeline
from tracking.demo import write_demo_video
from tracking.identity import SAME_PERSON
from tracking.people import PeopleLog, PersonError, identify
from tracking.pipeline import load_flame, track_video
from two_people import write_two_person_video

SHOTS = (("A", 12), ("B", 12), ("A", 12))


@pytest.fixture(scope="module")
def flame():
    return load_flame()


@pytest.fixture(scope="module")
def two_person_track(tmp_path_factory, flame):
    folder = tmp_path_factory.mktemp("two")
    truth = write_two_person_video(str(folder / "clip.mp4"), SHOTS)
    track_video(str(folder / "clip.mp4"), str(folder / "track"), flame, size=64, preview=False)
    with open(folder / "track" / "people.json") as f:
        return truth, json.load(f), folder / "track"


def test_every_frame_of_the_other_person_is_left_out_and_every_frame_of_the_main_one_kept(two_person_track):
    truth, record, _ = two_person_track
    assert record["left_out"] == np.flatnonzero(truth == "B").tolist()
    kept = sum(shot["kept"] for shot in record["shots"])
    assert kept == (truth == "A").sum()


def test_the_cuts_are_found_and_each_shot_is_judged(two_person_track):
    truth, record, folder = two_person_track
    cuts = np.flatnonzero(truth[1:] != truth[:-1]) + 1
    assert [shot["frames"][0] for shot in record["shots"][1:]] == cuts.tolist()
    assert [shot["verdict"] for shot in record["shots"]] == ["main person", "another person", "main person"]
    distances = [shot["distance"] for shot in record["shots"]]
    assert distances[0] < SAME_PERSON < distances[1] and distances[2] < SAME_PERSON
    # No run of the track crosses a cut: each starts after a detection in its own shot.
    assert all(truth[run["start"]] == truth[run["end"]] for run in record["runs"])
    assert os.path.getsize(folder / "report.png") > 0


def test_the_command_ends_with_the_report_in_words(two_person_track):
    _, _, folder = two_person_track
    lines = people_module.report_lines(str(folder))
    assert lines[1].startswith("shot 2: frames 12-23: another person") and "12 left out" in lines[1]
    assert lines[-1].endswith("report.png")


def _log(runs, descriptors, n_frames):
    """A PeopleLog of runs starting at `runs`, one descriptor each (at the run's start)."""
    log = PeopleLog()
    log.run_starts, log.sample_frames, log.descriptors = list(runs), list(runs), list(descriptors)
    log.frames = n_frames
    return log


def test_the_main_person_is_the_most_seen_unless_a_frame_names_them():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=128), rng.normal(size=128)
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)  # ~1.4 apart: two people
    valid = np.ones(30, bool)
    log = _log([0, 10, 25], [a, b, a + 0.01], 30)  # A on 0-9 and 25-29 (15 frames), B on 10-24 (15)
    # B's one run is the longest: groups form largest first, and the most frames decide (a tie: the first).
    assert identify(log, valid).other.tolist() == identify(log, valid, person=12).other.tolist()
    named_a = identify(log, valid, person=3)
    assert np.flatnonzero(named_a.other).tolist() == list(range(10, 25))
    named_b = identify(log, valid, person=12)
    assert np.flatnonzero(named_b.other).tolist() == list(range(10)) + list(range(25, 30))
    valid[5] = False
    with pytest.raises(PersonError, match="--person 5: no face was tracked on frame 5"):
        identify(log, valid, person=5)


def test_a_one_person_clip_tracks_exactly_as_without_the_person_filter(tmp_path, flame, monkeypatch):
    video = write_demo_video(str(tmp_path / "demo.mp4"), n_frames=12)
    with_filter = track_video(video, str(tmp_path / "with"), flame, size=64, preview=False)
    # The old path: no cuts, and nobody else on any frame.
    monkeypatch.setattr(PeopleLog, "is_cut", lambda self, frame: False)
    monkeypatch.setattr(pipeline, "identify", lambda log_, valid, person=None: people_module.People(
        [], np.zeros(len(valid), bool), []))
    monkeypatch.setattr(pipeline, "write_people", lambda *args: None)
    monkeypatch.setattr(pipeline, "write_report", lambda *args: None)
    without = track_video(video, str(tmp_path / "without"), flame, size=64, preview=False)
    with open(tmp_path / "with" / "seq.npz", "rb") as a, open(tmp_path / "without" / "seq.npz", "rb") as b:
        assert a.read() == b.read()
    np.testing.assert_array_equal(with_filter.crops, without.crops)
    with open(tmp_path / "with" / "people.json") as f:
        record = json.load(f)
    assert record["left_out"] == [] and [s["verdict"] for s in record["shots"]] == ["main person"]


@pytest.fixture(scope="module")
def live_tracker_factory(flame):
    from tracking.live import LiveTracker
    from tracking.sequence import FlameSequence
    zeros = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
    reference = FlameSequence(zeros(flame.n_shape), zeros(1, flame.n_exp), zeros(1, 3), zeros(1, 3), zeros(1, 3),
                              zeros(1, 6), np.array([[0, 0, -0.5]], np.float32), focal=1000.0,
                              image_size=(512, 512), fps=24.0)
    return lambda wait=True, max_gap=10: LiveTracker(flame, reference, zeros(flame.n_shape), 64, "two.mp4", max_gap,
                                                     wait_for_person=wait)


@pytest.mark.parametrize("cuts_seen", [True, False])
def test_live_keeps_the_person_it_started_with(live_tracker_factory, cuts_seen, monkeypatch):
    """Another face taking over is not followed: its frames hold the last fit, and they are no gap in the
    track (more of them than max_gap do not end the run). Without the cut test, the switch is still caught:
    the face stops looking like the previous frame's."""
    from two_people import iter_two_person_frames
    if not cuts_seen:
        monkeypatch.setattr(people_module.ShotCuts, "__call__", lambda self, frame: False)
    tracker = live_tracker_factory(max_gap=3)
    shots = (("A", 8), ("B", 6), ("A", 6))
    outputs = [tracker(i, frame) for i, frame in enumerate(iter_two_person_frames(shots))]
    last_a = outputs[7][1]
    assert all(params is last_a for _, params in outputs[8:14])  # B: held, not fitted
    assert all(params is not last_a for _, params in outputs[14:])  # A again: followed
    assert tracker.faceless == []


def test_the_lock_rechecks_a_face_it_took_for_someone_else_soon():
    """A wrong verdict on the person (a descriptor of a chip off a fast-moving face) holds their frames only
    until the next check, RECHECK_OTHER frames on, not RECHECK_EVERY; the person's face is checked every
    RECHECK_EVERY frames."""
    from tracking.people import RECHECK_EVERY, RECHECK_OTHER, PersonLock
    lock, checked = PersonLock(wait=True), []
    near, far = np.zeros(128), np.full(128, 1.0)  # far: sqrt(128) from the first descriptor

    wrong, mended = 1 + RECHECK_EVERY, 1 + RECHECK_EVERY + 1 + RECHECK_OTHER  # frames checked (after 0)

    def describe(frame, k):
        checked.append(k)
        return far if k == wrong else near
    lock.describe = describe
    followed = [lock.accepts(None, k, found=k == 0) for k in range(3 * RECHECK_EVERY)]
    assert checked == [0, wrong, mended, mended + 1 + RECHECK_EVERY]
    assert followed == [k < wrong or k >= mended for k in range(3 * RECHECK_EVERY)]


def test_a_late_verdict_hands_back_where_the_tracker_stood_before_its_own_check():
    """On the worker thread, a check's verdict may come on a frame that asks for the next check: `turned` is
    the first check's `before` (the fit to go back to), not the newer one's."""
    import threading

    from tracking.people import RECHECK_EVERY, PersonLock
    lock, ready = PersonLock(), {}
    near, far = np.zeros(128), np.full(128, 1.0)

    def describe(frame, k):
        ready.setdefault(k, threading.Event()).wait(30)
        return far if k > 0 else near
    lock.describe = describe
    ready[0] = threading.Event()
    ready[0].set()
    assert lock.accepts(None, 0, found=True, before="before 0")
    lock.settle()
    first, second = 1 + RECHECK_EVERY, 2 * (1 + RECHECK_EVERY)
    for k in range(1, second):
        assert lock.accepts(None, k, found=False, before=f"before {k}") and lock.turned is None
    assert lock.asked is False and lock.checking is not None  # frame `first`'s check still running
    ready.setdefault(first, threading.Event()).set()
    lock.checking[0].result()
    assert not lock.accepts(None, second, found=False, before=f"before {second}")
    assert lock.asked and lock.turned == f"before {first}"
    ready.setdefault(second, threading.Event()).set()
    lock.settle()


def test_live_checks_the_person_beside_the_tracking_and_acts_on_the_late_verdict(live_tracker_factory, monkeypatch):
    """The descriptor runs on the lock's worker thread: a face the detector finds is followed until its
    verdict arrives (here held back for LATE frames); someone else's verdict then holds the fit from before
    that face, and the person found again is held until their own verdict. Without the delay (the verdicts
    in time) the frames are the inline lock's (wait_for_person=True) after each verdict."""
    import threading

    from two_people import iter_two_person_frames
    late, released, threads = 2, [], set()
    describe = people_module.Describer.__call__

    def held_back(self, frame, landmarks):  # the verdict is ready once the test releases it
        gate = threading.Event()
        released.append(gate)
        threads.add(threading.current_thread())
        gate.wait(30)
        return describe(self, frame, landmarks)
    monkeypatch.setattr(people_module.Describer, "__call__", held_back)
    shots = (("A", 8), ("B", 8), ("A", 8))
    frames = list(iter_two_person_frames(shots))
    inline = live_tracker_factory(wait=True)
    monkeypatch.setattr(people_module.Describer, "__call__", describe)
    reference = [inline(i, frame) for i, frame in enumerate(frames)]
    monkeypatch.setattr(people_module.Describer, "__call__", held_back)
    tracker = live_tracker_factory(wait=False)
    outputs, asked = [], {}
    for i, frame in enumerate(frames):
        outputs.append(tracker(i, frame))
        if tracker.person.asked:
            asked[i] = len(released)
        for k, n in asked.items():  # each check's verdict is ready `late` frames after it was asked
            if i == k + late - 1:
                while len(released) < n:
                    time.sleep(0.01)
                released[n - 1].set()
                tracker.person.checking[0].result()
    for gate in released:  # none is left waiting, whatever failed
        gate.set()
    # the first face and each cut (a found face), and B found again on the frame after their verdict came
    assert sorted(asked) == [0, 8, 8 + late + 1, 16]
    assert threading.main_thread() not in threads
    params = [p for _, p in outputs]
    assert all(p is not params[7] for p in params[8:8 + late])  # B followed until its verdict ...
    assert all(p is params[7] for p in params[8 + late:16 + late])  # ... then held at A's last fit
    assert all(p is not params[7] for p in params[16 + late:])  # A again, after their verdict
    # the first shot is fitted exactly as with the inline lock; that lock held B's frames from the first
    assert all(np.array_equal(outputs[i][1].expression, reference[i][1].expression) for i in range(8))
    assert all(reference[i][1] is reference[7][1] for i in range(8, 16))


def test_training_leaves_the_other_persons_frames_out(two_person_track, tmp_path, caplog):
    import logging
    import shutil

    import svp
    import train
    truth, _, folder = two_person_track
    shutil.copytree(folder, tmp_path / "run" / "tracking")
    cfg = train.parse_args(["--video", str(folder.parent / "clip.mp4"), "--out", str(tmp_path / "run"),
                            "--preset", "tiny"])
    split = svp.last_frames_split(len(truth), cfg.val_fraction)
    with caplog.at_level(logging.INFO, logger="train"):
        frames = train.training_frames(cfg, split)
    assert frames == [f for f in split.train if truth[f] == "A"] and len(frames) > len(truth) // 2
    assert f"training on {len(frames)} of {len(truth)} tracked frames" in caplog.text and "report.png" in caplog.text
