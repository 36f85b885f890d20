"""evaluate.py: an avatar scored on its held-out frames (and on another video) with every metric, its outputs,
and its bad input.

The run is conftest's evaluable_avatar_run (a run folder as train.py writes it, untrained: seconds to build;
tests/test_sample.py scores the trained demo avatar), the metric networks random weights in the published
layouts (conftest's metric_weights), sampling 2 steps.
"""
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import evaluate
import svp
from model.metrics import MetricWeightsError, frame_metrics, load_lpips, psnr
from tracking.demo import write_demo_video
from tracking.sequence import save_seq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ["--steps", "2"]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # the commands run here, like one_torch_thread
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def numbers(tree) -> list[float]:
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in numbers(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in numbers(v)]
    return [tree] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def missing(metrics: dict) -> dict:
    return {k: v["missing"] for k, v in metrics.items() if isinstance(v, dict) and "missing" in v}


def copy_run(run, dst):
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("eval*"))
    return dst


def test_evaluate_py_scores_the_held_out_frames_and_another_video(evaluable_avatar_run, metric_weights, tmp_path):
    """Every metric of both sources is a finite number; the JSON holds the settings and the frames; the strip
    shows real | render | difference, the render being sample.py's for those frames and settings."""
    run = copy_run(evaluable_avatar_run, tmp_path / "run")
    own = svp.load_seq(str(run / "tracking" / "seq.npz"))   # a camera the fit would not find on its own
    save_seq(str(run / "tracking" / "seq.npz"), dataclasses.replace(own, focal=100.0))
    video = write_demo_video(str(tmp_path / "take2.mp4"), n_frames=10, seed=1)
    result = subprocess.run([sys.executable, "evaluate.py", "--avatar", str(run), "--lpips", str(metric_weights),
                             "--inception", str(metric_weights / "pt_inception-2015-12-05-6726825d.pth"),
                             "--video", video, "--max-frames", "8", *STEPS], cwd=REPO, capture_output=True,
                            text=True, timeout=900, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "held-out" in result.stdout and "take2.mp4" in result.stdout and "FID" in result.stdout

    report = json.loads((run / "eval.json").read_text())
    [row] = report["rows"]
    assert row["settings"]["steps"] == 2 and row["settings"]["prompt"] == "a photo of sks person"
    assert report["weights"]["inception"].endswith("pt_inception-2015-12-05-6726825d.pth")
    held_out, other = row["sources"]
    assert held_out["frames"] == [6, 7, 8, 9, 10, 11] and other["frames"] == list(range(8))
    assert held_out["split"] == "the last 6 of 12 frames (train.py --val-fraction 0.5)"
    for source in (held_out, other):
        metrics = source["metrics"]
        assert not missing(metrics), missing(metrics)
        assert {"psnr", "ssim", "lpips", "fid", "kid", "flicker"} <= metrics.keys()
        assert len(metrics["psnr"]["per_frame"]) == len(source["frames"]) == metrics["frames"]
        assert all(math.isfinite(x) for x in numbers(metrics)), metrics

    # The video was tracked through the avatar's camera (its identity shape and focal), at its resolution.
    tracked = svp.load_seq(str(run / "eval" / "take2" / "seq.npz"))
    avatar = svp.load_avatar(str(run))
    assert np.array_equal(tracked.shape, avatar.shape) and tracked.image_size == (64, 64)
    assert tracked.focal == pytest.approx(100.0, rel=1e-6)   # the run's tracking: 100 px at 64 px
    assert json.loads((run / "eval" / "take2" / "source.json").read_text())["focal"] == 100.0

    strip = np.asarray(Image.open(run / "eval.png")).astype(np.int16)
    assert strip.shape == (2 * 4 * 64, 3 * 64, 3)  # 4 frames of each source
    rows = strip[:4 * 64].reshape(4, 64, 3, 64, 3).transpose(2, 0, 1, 3, 4)  # column, frame, H, W, RGB
    picked = [6, 8, 9, 11]  # 4 of the 6 held-out frames, evenly spaced
    real = np.load(run / "tracking" / "crops.npy")[picked]
    seq = svp.load_seq(str(run / "tracking" / "seq.npz"))
    render, _ = avatar.render(seq, frames=range(6, 12), settings=svp.VideoSampling(steps=2), progress=False)
    render = render[[f - 6 for f in picked]]
    assert np.array_equal(rows[0], real) and np.array_equal(rows[1], render)
    assert np.array_equal(rows[2], np.abs(rows[0] - rows[1]))
    np.testing.assert_allclose(psnr(real, render), np.array(held_out["metrics"]["psnr"]["per_frame"])[[0, 2, 3, 5]])


def test_without_weights_lpips_fid_and_kid_are_missing_naming_their_files(evaluable_avatar_run, tmp_path, capsys):
    out = tmp_path / "scores" / "e.json"
    evaluate.main(["--avatar", str(evaluable_avatar_run), "--out", str(out), *STEPS])
    metrics = json.loads(out.read_text())["rows"][0]["sources"][0]["metrics"]
    gaps = missing(metrics)
    assert gaps.keys() == {"lpips", "fid", "kid"}
    assert "alexnet-owt-7be5be79.pth" in gaps["lpips"] and "alex.pth" in gaps["lpips"]
    assert "pt_inception-2015-12-05-6726825d.pth" in gaps["fid"]
    assert all(math.isfinite(x) for k in ("psnr", "ssim", "flicker") for x in numbers(metrics[k]))
    printed = capsys.readouterr().out
    assert "missing: LPIPS needs alexnet-owt-7be5be79.pth" in printed and (tmp_path / "scores" / "e.png").is_file()


def test_too_few_held_out_frames_for_fid_kid_and_flicker_are_said(evaluable_avatar_run, metric_weights, tmp_path):
    run = copy_run(evaluable_avatar_run, tmp_path / "run")
    os.remove(run / "split.json")
    svp.save_split(str(run), svp.last_frames_split(12, 0.01))  # one frame
    evaluate.main(["--avatar", str(run), "--lpips", str(metric_weights), "--inception",
                   str(metric_weights / "pt_inception-2015-12-05-6726825d.pth"), *STEPS])
    metrics = json.loads((run / "eval.json").read_text())["rows"][0]["sources"][0]["metrics"]
    gaps = missing(metrics)
    assert gaps.keys() == {"fid", "kid", "flicker"} and "got 1" in gaps["fid"] and "got 1" in gaps["flicker"]
    assert math.isfinite(metrics["lpips"]["mean"])


def test_a_sweep_is_one_row_per_setting_and_renders_only_new_settings(evaluable_avatar_run, metric_weights, tmp_path,
                                                                       monkeypatch, capsys):
    """--vary temporal-strength=0,0.9: two rows, each the metrics of sample.py's render with that setting (the
    all-at-once path on the same frames, identical numbers); table, eval.md, strip and plot written. A third
    value later renders that setting only: the others come from the render cache."""
    run = copy_run(evaluable_avatar_run, tmp_path / "run")
    rendered = []
    render_chunks = svp.Avatar.render_chunks
    monkeypatch.setattr(svp.Avatar, "render_chunks", lambda self, seq, *a, **k: rendered.append(
        k["settings"].temporal_strength) or render_chunks(self, seq, *a, **k))
    argv = ["--avatar", str(run), "--lpips", str(metric_weights), *STEPS]
    evaluate.main([*argv, "--vary", "temporal-strength=0,0.9"])
    assert rendered == [0.0, 0.9]
    printed = capsys.readouterr().out
    report = json.loads((run / "eval.json").read_text())
    assert [row["label"] for row in report["rows"]] == ["temporal-strength=0", "temporal-strength=0.9"]
    avatar, seq = svp.load_avatar(str(run)), svp.load_seq(str(run / "tracking" / "seq.npz"))
    real = np.load(run / "tracking" / "crops.npy")[6:12]
    lpips = load_lpips(str(metric_weights))
    for row, strength, text in zip(report["rows"], (0.0, 0.9), ("0", "0.9")):
        assert row["settings"]["temporal_strength"] == strength and row["varied"] == {"temporal-strength": text}
        [held_out] = row["sources"]
        render, _ = avatar.render(seq, frames=range(6, 12), progress=False,
                                  settings=svp.VideoSampling(steps=2, temporal_strength=strength))
        assert held_out["metrics"] == json.loads(json.dumps(frame_metrics(real, render, lpips, progress=False)))
        assert held_out["seconds_per_frame"] > 0 and not held_out["cached"]
        assert re.search(rf"^temporal-strength={text} +held-out +6 +\d", printed, re.MULTILINE), printed
    assert report["rows"][0]["sources"][0]["metrics"] != report["rows"][1]["sources"][0]["metrics"]
    markdown = (run / "eval.md").read_text().splitlines()
    assert markdown[0].startswith("| setting | source | frames | PSNR dB |") and markdown[1].startswith("|---|")
    assert markdown[2].startswith("| temporal-strength=0 | held-out | 6 |") and "missing: FID and KID" in markdown[-1]
    strip = np.asarray(Image.open(run / "eval.png"))
    assert strip.shape == (4 * 64, 5 * 64, 3)   # real | render, difference of each row
    with Image.open(run / "eval-plot.png") as plot:
        assert plot.format == "PNG" and 300 <= plot.width <= 2000 and 200 <= plot.height <= 2000
        assert np.asarray(plot.convert("L")).std() > 10   # lines and labels, not a blank image

    rendered.clear()
    evaluate.main([*argv, "--vary", "temporal-strength=0,0.5,0.9"])
    assert rendered == [0.5]
    again = json.loads((run / "eval.json").read_text())["rows"]
    assert [r["sources"][0]["cached"] for r in again] == [True, False, True]
    for before, after in zip(report["rows"], again[::2]):
        assert after["sources"][0]["metrics"] == before["sources"][0]["metrics"]
        assert after["sources"][0]["seconds_per_frame"] == before["sources"][0]["seconds_per_frame"]


def test_avatars_side_by_side_need_the_same_split(evaluable_avatar_run, tmp_path):
    """Two runs: one row each (the same weights here: the same numbers). A run holding out other frames is
    refused in one line naming both, before anything renders."""
    a, b = copy_run(evaluable_avatar_run, tmp_path / "a"), copy_run(evaluable_avatar_run, tmp_path / "b")
    out = tmp_path / "both.json"
    evaluate.main(["--avatar", str(a), str(b), "--out", str(out), *STEPS])
    rows = json.loads(out.read_text())["rows"]
    assert [row["label"] for row in rows] == [str(a), str(b)]
    assert rows[0]["sources"][0]["metrics"] == rows[1]["sources"][0]["metrics"]

    os.remove(b / "split.json")
    svp.save_split(str(b), svp.last_frames_split(12, 0.25))
    shutil.rmtree(a / "eval")
    result = subprocess.run([sys.executable, "evaluate.py", "--avatar", str(a), "--avatar", str(b), *STEPS], cwd=REPO,
                            capture_output=True, text=True, timeout=600, env=ONE_THREAD)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.strip() == (f"error: {b} holds out the last 3 of 12 frames (train.py --val-fraction 0.25), "
                                     f"{a} the last 6 of 12 frames (train.py --val-fraction 0.5): avatars side by side "
                                     "must hold out the same frames")
    assert not [f for f in os.listdir(a) if f.startswith("eval")]


def test_metrics_run_in_float32_whatever_the_renders_dtype(evaluable_avatar_run, metric_weights, tmp_path):
    """A bf16 render (--dtype bf16; --max-frames 4 of the held-out frames) is scored as its frames are in
    float32 on their own: the metric networks do not follow --dtype."""
    run = copy_run(evaluable_avatar_run, tmp_path / "run")
    evaluate.main(["--avatar", str(run), "--lpips", str(metric_weights), "--dtype", "bf16", "--max-frames", "4",
                   *STEPS])
    [source] = json.loads((run / "eval.json").read_text())["rows"][0]["sources"]
    assert source["frames"] == [6, 7, 8, 9]
    render = np.load(source["render"])   # the render cache: the bf16 render's frames
    real = np.load(run / "tracking" / "crops.npy")[6:10]
    on_their_own = frame_metrics(real, render, load_lpips(str(metric_weights), dtype="fp32"), progress=False)
    assert source["metrics"] == json.loads(json.dumps(on_their_own))
    in_bf16 = frame_metrics(real, render, load_lpips(str(metric_weights), dtype="bf16"), progress=False)
    assert in_bf16["lpips"]["per_frame"] != on_their_own["lpips"]["per_frame"]   # what fp32 is guarding against


# ----------------------------------------------------------------------------- bad input

def test_a_run_without_a_split_says_how_to_make_one(evaluable_avatar_run, tmp_path):
    run = copy_run(evaluable_avatar_run, tmp_path / "run")
    os.remove(run / "split.json")
    result = subprocess.run([sys.executable, "evaluate.py", "--avatar", str(run)], cwd=REPO, capture_output=True,
                            text=True, timeout=600, env=ONE_THREAD)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {run}: no split.json (trained before held-out splits were recorded); " \
                                    "rerun its train.py command with --resume to write it (it trains no further)"
    assert not [f for f in os.listdir(run) if f.startswith("eval")]


def test_wrong_or_corrupt_weight_files_are_named(evaluable_avatar_run, metric_weights, tmp_path):
    weights = tmp_path / "lpips"
    shutil.copytree(metric_weights, weights)
    (weights / "alex.pth").write_bytes(b"not a weights file")
    out = tmp_path / "e.json"
    argv = ["--avatar", str(evaluable_avatar_run), "--out", str(out), *STEPS]
    with pytest.raises(MetricWeightsError, match="alex.pth"):
        evaluate.main([*argv, "--lpips", str(weights)])
    lpips_as_inception = str(metric_weights / "alexnet-owt-7be5be79.pth")
    with pytest.raises(MetricWeightsError, match="alexnet-owt-7be5be79.pth"):
        evaluate.main([*argv, "--inception", lpips_as_inception])
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "--steps: must be a whole number > 0, got 0"),
    (["--temporal-strength", "2"], "--temporal-strength: must be in [0, 1], got 2"),
    (["--lpips", "nowhere/"], "--lpips: LPIPS weights nowhere/ not found"),
    (["--inception", "nowhere.pth"], "--inception: Inception weights nowhere.pth not found"),
    (["--video", "nowhere.mp4"], "--video: video nowhere.mp4 not found"),
    (["--vary", "strength=0,1"], "--vary: strength=0,1: 'strength' is not a sampler flag (one of: base, batch-frames"),
    (["--vary", "temporal-strength=0,2"], "--vary: temporal-strength=2: must be in [0, 1], got 2"),
    (["--vary", "sampler=ddim,nope"], "--vary: sampler=nope: not one of ddim,"),
    (["--vary", "steps=2", "--vary", "steps=3"], "--vary: steps=3: wants steps=V1,V2,... once"),
    (["--vary", "decoder=nowhere.pth"], "--vary: decoder=nowhere.pth: tiny decoder nowhere.pth not found"),
    (["--out", "scores.txt"], "--out: scores.txt: the evaluation file's name must end in .json"),
])
def test_bad_flags_are_refused_before_any_work(evaluable_avatar_run, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.parse_args(["--avatar", str(evaluable_avatar_run), *flags])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_an_avatar_folder_without_an_avatar(tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--avatar", str(tmp_path)])
    assert f"--avatar: {tmp_path}: no avatar.safetensors here" in capsys.readouterr().err


def test_held_out_frames_of_another_person_are_not_scored(evaluable_avatar_run, tmp_path):
    """Frames the track gave to another person (people.json) are left out of the held-out set, as training
    leaves them out of its frames: the avatar is not asked to look like someone else."""
    run = copy_run(evaluable_avatar_run, tmp_path / "run")
    split = svp.load_split(str(run))
    avatar = svp.load_avatar(str(run))
    everyone = evaluate.held_out_source(avatar, split, None)
    assert everyone.frames == sorted(split.held_out) and everyone.about["other_person"] == 0
    other = sorted(split.held_out)[1]
    with open(os.path.join(os.path.dirname(avatar.run_file("seq")), "people.json"), "w") as f:
        json.dump({"left_out": [other, split.train[0]]}, f)
    source = evaluate.held_out_source(avatar, split, None)
    assert source.frames == [f for f in sorted(split.held_out) if f != other]
    assert source.about["other_person"] == 1
