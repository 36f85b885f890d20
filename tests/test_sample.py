"""Driving a trained avatar: temporal denoising's proof, determinism, sample.py's CLI and its bad input.

One module-scoped run trains the tiny preset on the offline demo video as a user would (48 frames, the
last 5 held out, 300 steps, the tiny VAE fitted to the training frames first), then the tests sample it.
"""
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import svp
import train
from model.loading import write_tiny_base
from model.pipeline import encode_prompts
from model.sampling import NoiseSchedule
from model.temporal import sample_video, warm_up_start

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELD_OUT = range(43, 48)  # train.py holds out the last 10% of the demo's 48 frames


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("avatar")
    train.main(["--video", "demo", "--preset", "tiny", "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def avatar(run):
    return svp.load_avatar(str(run))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255 ** 2 / mse)


def test_temporal_denoising_is_smoother_and_as_faithful(run, avatar):
    """The method's claim on the tiny demo avatar: pulling each frame toward the previous one lowers the
    flicker clearly, while the held-out frames stay as close to the real video (PSNR, within 1 dB)."""
    seq = svp.load_seq(str(run / "tracking" / "seq.npz"))
    truth = np.load(run / "tracking" / "crops.npy")[HELD_OUT.start:HELD_OUT.stop]
    frames = range(HELD_OUT.start - 7, HELD_OUT.stop)
    scores = {}
    for strength in (0.0, svp.VideoSampling.temporal_strength):  # off, and the default
        video, _ = avatar.render(seq, frames=frames, settings=svp.VideoSampling(temporal_strength=strength),
                                 progress=False)
        held_out = video[HELD_OUT.start - frames.start:]
        scores[strength] = svp.temporal_flicker(video), psnr(held_out, truth)
    (flicker_0, psnr_0), (flicker_t, psnr_t) = scores.values()
    print(f"flicker {flicker_0:.4f} -> {flicker_t:.4f}; held-out PSNR {psnr_0:.2f} -> {psnr_t:.2f} dB")
    assert psnr_0 > 15, "the avatar does not reproduce the held-out frames at all"
    assert flicker_t < 0.7 * flicker_0
    assert psnr_t > psnr_0 - 1.0


def test_evaluate_py_scores_the_demo_avatar_on_its_held_out_frames(run, metric_weights, tmp_path):
    """`train.py --video demo --preset tiny` then `evaluate.py --avatar`: the split train.py recorded is scored
    (the last 5 frames), every metric a finite number, and the held-out PSNR that of the test above."""
    import json
    import math
    out = tmp_path / "eval.json"
    result = subprocess.run([sys.executable, "evaluate.py", "--avatar", str(run), "--out", str(out), "--lpips",
                             str(metric_weights), "--inception",
                             str(metric_weights / "pt_inception-2015-12-05-6726825d.pth")],
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)
    (source,) = json.loads(out.read_text())["rows"][0]["sources"]
    assert source["frames"] == list(HELD_OUT)
    metrics = source["metrics"]
    values = [metrics["psnr"]["mean"], metrics["ssim"]["mean"], metrics["lpips"]["mean"], metrics["fid"]["value"],
              metrics["kid"]["mean"], metrics["kid"]["std"], *metrics["flicker"].values()]
    assert all(math.isfinite(v) for v in values), metrics
    assert metrics["psnr"]["mean"] > 15
    assert (tmp_path / "eval.png").is_file()


def test_same_seed_same_frames(run, avatar):
    seq = svp.load_seq(str(run / "tracking" / "seq.npz"))
    settings = svp.VideoSampling(steps=6, seed=3)
    first, _ = avatar.render(seq, frames=range(4, 8), settings=settings, progress=False)
    again, _ = avatar.render(seq, frames=range(4, 8), settings=settings, progress=False)
    other, _ = avatar.render(seq, frames=range(4, 8), settings=svp.VideoSampling(steps=6, seed=4), progress=False)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_render_is_the_video_sampler_fed_the_sequences_hint_images(run, avatar):
    """Avatar.render against the sampler given every hint image up front (model/temporal.sample_video), each
    sampler chunk's rendered in one batch as render renders them: the same frames, and the hint images it
    returns are those of the frames asked for; render_chunks makes the same frames, batch_frames at a time.
    Frames from mid-sequence (warm-up frames before them), chunks that do not divide them, guidance (a
    negative prompt) and a morph; the hint images steer this avatar, so hints a frame off would show. All
    frames' hint images rendered in one batch differ in float rounding only: frames within 1 of those."""
    seq = svp.load_seq(str(run / "tracking" / "seq.npz"))
    settings, frames = svp.VideoSampling(steps=4, batch_frames=3, guidance=2.0), range(9, 16)
    first = warm_up_start(frames.start, settings.weights)
    assert first < frames.start
    words = ("a photo of sks person", "Tom Cruise", 0.5, "blurry")
    images, hints = avatar.render(seq, *words, frames=frames, settings=settings, progress=False)

    def sampled(hint_images: torch.Tensor) -> np.ndarray:
        return sample_video(avatar.denoiser, avatar.decoder, NoiseSchedule.from_config(avatar.sd.config),
                            hint_images, frames, avatar.text_context(*words[:3]), encode_prompts(avatar.sd, [words[3]]),
                            settings, progress=False)
    by_chunk = torch.cat([avatar.hints(seq, range(start, min(start + 3, frames.stop)))
                          for start in range(first, frames.stop, 3)])
    assert np.array_equal(images, sampled(by_chunk))
    assert torch.equal(hints, by_chunk[frames.start - first:])
    torch.testing.assert_close(hints, avatar.hints(seq, frames))
    assert np.abs(images.astype(np.int16) - sampled(avatar.hints(seq, range(first, frames.stop)))).max() <= 1
    assert np.abs(images.astype(np.int16) - sampled(avatar.hints(seq, range(first + 1, frames.stop + 1)))).max() > 10
    chunks = list(avatar.render_chunks(seq, *words, frames=frames, settings=settings, progress=False))
    assert [len(chunk) for chunk in chunks] == [3, 3, 1]
    assert np.array_equal(np.concatenate(chunks), images)


def test_conditioning_scale_zero_ignores_the_3dmm(run, avatar):
    """With the ControlNet's residuals scaled to 0 every frame is the same text-to-image sample (same
    noise, same prompt): the sequence no longer steers; at scale 1 it does."""
    seq = svp.load_seq(str(run / "tracking" / "seq.npz"))
    for scale in (0.0, 1.0):
        settings = svp.VideoSampling(steps=6, conditioning_scale=scale)
        frames, _ = avatar.render(seq, frames=range(0, 12), settings=settings, progress=False)
        spread = np.abs(frames.astype(np.int16) - frames[:1]).max()
        assert (spread <= 1) if scale == 0 else (spread > 10), (scale, spread)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample(run, out, *extra, params=None, launcher=(sys.executable,), env=None):
    cmd = [*launcher, "sample.py", "--avatar", str(run), "--params", str(params or run / "tracking" / "seq.npz"),
           "--frames", "2:8", "--steps", "4", "--out", str(out) + ".mp4", "--png-dir", str(out), *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **(env or {})})


def read_pngs(folder, frames=range(2, 8)) -> np.ndarray:
    return np.stack([np.asarray(Image.open(os.path.join(folder, f"{i:05d}.png")), dtype=np.int16) for i in frames])


def test_sample_py_writes_the_same_frames_however_they_are_split(run, tmp_path):
    """One process, smaller lock-step chunks, and two torchrun processes give the same frames."""
    from tracking.video import read_video
    whole = sample(run, tmp_path / "whole", "--batch-frames", "8")
    assert whole.returncode == 0, whole.stderr[-2000:]
    frames, _ = read_video(str(tmp_path / "whole.mp4"))
    assert frames.shape == (6, 64, 64, 3)
    chunked = sample(run, tmp_path / "chunked", "--batch-frames", "4")
    assert chunked.returncode == 0, chunked.stderr[-2000:]
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()))
    split = sample(run, tmp_path / "split", launcher=torchrun)
    assert split.returncode == 0, split.stderr[-2000:]
    reference = read_pngs(tmp_path / "whole")
    for name in ("chunked", "split"):
        assert np.abs(read_pngs(tmp_path / name) - reference).max() <= 1, name  # up to rounding of batched convs


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_torchrun_on_two_gpus_gives_the_frames_of_one(untrained_avatar_run, tmp_path):
    """`torchrun --nproc_per_node 2 sample.py`: each process on its own GPU (cuda:LOCAL_RANK, made current,
    so NCCL's gather runs on both), and the frames of one process on one GPU."""
    run = untrained_avatar_run
    one = sample(run, tmp_path / "one", "--dtype", "fp32")
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()))
    two = sample(run, tmp_path / "two", "--dtype", "fp32", launcher=torchrun)
    assert two.returncode == 0, two.stderr[-2000:]
    assert np.abs(read_pngs(tmp_path / "two") - read_pngs(tmp_path / "one")).max() <= 1


def test_side_by_side_and_the_default_avatar(run, tmp_path):
    """Without --avatar, the run that tracked --params drives it (the mission's `sample.py --params seq.npz`)."""
    out = tmp_path / "sbs"
    cmd = [sys.executable, "sample.py", "--params", str(run / "tracking" / "seq.npz"), "--prompt", "a photo of sks person",
           "--frames", "0:3", "--steps", "4", "--side-by-side", "--out", str(out) + ".mp4", "--png-dir", str(out)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    frames = read_pngs(out, range(0, 3))
    assert frames.shape == (3, 64, 128, 3)
    assert np.abs(frames[:, :, :64] - 128).max() > 50, "the left half should show the conditioning's normals"

    elsewhere = tmp_path / "seq.npz"
    elsewhere.write_bytes((run / "tracking" / "seq.npz").read_bytes())
    cmd[cmd.index("--params") + 1] = str(elsewhere)
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0 and "--avatar" in result.stderr and "Traceback" not in result.stderr


def broken_seq(run, tmp_path, name, edit) -> str:
    seq = dict(np.load(run / "tracking" / "seq.npz"))
    edit(seq)
    path = tmp_path / f"{name}.npz"
    np.savez(path, **seq)
    return str(path)


def assert_clean_failure(result, out, *words):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
    for word in words:
        assert word in result.stderr, result.stderr
    assert not os.path.exists(str(out) + ".mp4") and not os.path.exists(out)
    assert not [f for f in os.listdir(os.path.dirname(out)) if ".tmp" in f], "a temporary file was left behind"


@pytest.mark.parametrize("name, edit, words", [
    ("nan", lambda s: s["expression"].__setitem__((1, 0), np.nan), ("nan.npz", "NaN")),
    ("missing", lambda s: s.pop("jaw_rot"), ("missing.npz", "jaw_rot", "missing")),
    ("mismatch", lambda s: s.__setitem__("neck_rot", s["neck_rot"][:-3]), ("mismatch.npz", "neck_rot", "shape")),
])
def test_broken_sequence_files(run, tmp_path, name, edit, words):
    params = broken_seq(run, tmp_path, name, edit)
    assert_clean_failure(sample(run, tmp_path / name, params=params), tmp_path / name, *words)


def test_frames_beyond_the_sequence_or_too_few_for_the_processes(run, tmp_path):
    result = sample(run, tmp_path / "beyond", "--frames", "40:60")
    assert_clean_failure(result, tmp_path / "beyond", "seq.npz", "48 frames")
    result = sample(run, tmp_path / "few", "--frames", "0:2", env={"RANK": "0", "WORLD_SIZE": "4"})
    assert_clean_failure(result, tmp_path / "few", "2 frames", "4 processes")


def test_avatar_on_another_base_model(run, tmp_path):
    other_base = tmp_path / "other.safetensors"
    write_tiny_base(str(other_base), seed=1, crops=np.load(run / "tracking" / "crops.npy")[:4], vae_steps=0)
    result = sample(run, tmp_path / "other", "--base", str(other_base))
    assert_clean_failure(result, tmp_path / "other", "another base model")


def test_a_moved_run_folder_samples_from_any_working_directory(run, tmp_path):
    """The avatar finds its base inside its run folder and carries the identity shape: a copy of the run
    folder, with the original's files out of the way, samples from another working directory."""
    moved = tmp_path / "moved"
    (moved / "tracking").mkdir(parents=True)
    for name in ("avatar.safetensors", "base.safetensors", os.path.join("tracking", "seq.npz")):
        shutil.copy2(run / name, moved / name)
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    for name in ("base.safetensors", "tracking"):
        os.rename(run / name, hidden / name)
    try:
        cmd = [sys.executable, os.path.join(REPO, "sample.py"), "--avatar", "moved", "--params",
               os.path.join("moved", "tracking", "seq.npz"), "--frames", "0:2", "--steps", "2", "--out", "o.mp4"]
        result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    finally:
        for name in ("base.safetensors", "tracking"):
            os.rename(hidden / name, run / name)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "o.mp4").is_file()


def test_the_avatar_example_in_svps_docstring_runs(run, capsys):
    """svp's module docstring shows the API on the demo run: it runs as written (on this run's folder)."""
    import textwrap
    example = svp.__doc__[svp.__doc__.index("    # after"):svp.__doc__.index("    sd = svp.load_stable_diffusion(")]
    exec(textwrap.dedent(example).replace("runs/demo", str(run)), {"svp": svp})
    assert float(capsys.readouterr().out) > 0
