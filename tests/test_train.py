"""train.py on the tiny preset, on the CPU: tracking -> rendering -> training -> avatar, and its guarantees.

One module-scoped run tracks 12 frames of the offline demo video at 64 px and trains on them; the other
tests copy its tracking and caches (re-used, never recomputed) into fresh run folders.
"""
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import svp
import train
from model.avatar import build_denoiser, held_out_loss, load_avatar_weights
from model.controlnet import CONTROLNET_PREFIX
from model.files import load_checkpoint, save_checkpoint
from model.loading import UNET_PREFIX, CheckpointError, load_stable_diffusion, write_tiny_base
from model.pipeline import encode_prompts
from model.sampling import NoiseSchedule
from tracking.conditioning import render_conditioning
from tracking.pipeline import load_flame
from tracking.sequence import load_seq, save_seq
from tracking.video import write_video

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAMES = 12
DEMO_STEPS = 60
TINY_ARGS = ["--preset", "tiny", "--max-frames", str(FRAMES), "--val-every", "20", "--preview-every", "30",
             "--vae-steps", "50"]  # tests/test_sample.py trains the recognisable avatar


def run_train(out, *extra, video="demo"):
    return train.main(["--video", video, "--out", str(out), *TINY_ARGS, *extra])


def clone_run(src, dst, parts=("base.safetensors", "tracking", "cache")):
    """A fresh run folder holding `src`'s base model, tracking and caches."""
    os.makedirs(dst, exist_ok=True)
    for part in parts:
        copy = shutil.copytree if os.path.isdir(os.path.join(src, part)) else shutil.copy2
        copy(os.path.join(src, part), os.path.join(dst, part))
    return dst


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def state_of(denoiser):
    return {k: v.clone() for k, v in denoiser.trainable_state().items()}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    denoiser = run_train(out, "--max-steps", str(DEMO_STEPS), "--save-every", "30")
    return out, state_of(denoiser)


def test_end_to_end_writes_an_avatar_that_reloads_as_the_trained_weights(demo_run):
    out, trained = demo_run
    assert np.load(out / "cache" / "latents.npy").shape == (FRAMES, 4, 8, 8)
    hints = np.load(out / "cache" / "hints.npy", mmap_mode="r")
    assert hints.shape == (FRAMES, 8, 64, 64) and hints.dtype == np.float16
    assert sorted(os.listdir(out / "previews")) == ["step_00030.png", "step_00060.png"]
    assert np.asarray(Image.open(out / "previews" / "step_00060.png")).shape == (64, 3 * 64, 3)
    assert [r["step"] for r in read_log(out)] == list(range(DEMO_STEPS + 1))
    assert not [f for f in os.listdir(out) if ".tmp" in f], "a temporary file was left behind"

    avatar = load_file(out / "avatar.safetensors")
    assert avatar.keys() == trained.keys()
    assert all(torch.equal(avatar[k], trained[k]) for k in trained)
    sd = load_stable_diffusion(str(out / "base.safetensors"))
    base_unet = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    controlnet, meta = load_avatar_weights(str(out / "avatar.safetensors"), sd)
    assert meta["train"] == "controlnet+unet" and meta["resolution"] == 64 and meta["hint_channels"] == 8
    assert meta["prompt"] == "a photo of sks person"
    # Relocatable: paths inside the run folder are stored relative to it, the identity shape in the avatar.
    assert meta["base"] == "base.safetensors" and meta["seq"] == os.path.join("tracking", "seq.npz")
    assert meta["identity_shape"] == load_seq(str(out / "tracking" / "seq.npz")).shape.tolist()
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out / "avatar.safetensors").st_mode & 0o777 == 0o666 & ~umask
    for key, value in controlnet.state_dict().items():
        assert torch.equal(value, trained[CONTROLNET_PREFIX + key]), key
    for key, value in sd.unet.state_dict().items():
        assert torch.equal(value, trained[UNET_PREFIX + key]), key
        assert not torch.equal(value, base_unet[key]) or "bias" in key, f"{key} did not train"


def test_held_out_loss_falls(demo_run):
    log = [r for r in read_log(demo_run[0]) if "val_loss" in r]
    assert [r["step"] for r in log] == [0, 20, 40, 60]
    first, last = log[0]["val_loss"], log[-1]["val_loss"]
    drop = 1 - last / first
    print(f"held-out loss {first:.4f} -> {last:.4f} in {DEMO_STEPS} steps ({drop:.0%} lower)")
    assert drop >= 0.5


def test_the_held_out_frames_are_recorded_and_never_drawn_for_training(demo_run):
    """split.json names the held-out frames (the last 10%: 1 of 12) before training starts, and the data
    order of every step, micro-batch and rank draws only the other frames, each of them."""
    out = demo_run[0]
    split = svp.load_split(str(out))
    assert split == svp.last_frames_split(FRAMES, 0.1) and split.held_out == (11,)
    assert split.train == list(range(11))
    cfg = train.parse_args(["--video", "demo", "--out", str(out), *TINY_ARGS, "--grad-accum", "2"])
    for world in (1, 2):
        drawn = [i for rank in range(world) for step in range(DEMO_STEPS) for micro in range(cfg.grad_accum)
                 for i in train.batch_indices(step, micro, cfg, svp.Processes(rank, world, None), split.train)]
        assert set(drawn) == set(split.train), world


def test_a_run_keeps_its_split(demo_run, tmp_path):
    """A rerun into a run folder whose split.json holds out other frames (its tracking changed) is refused
    before training, naming the file."""
    out = clone_run(demo_run[0], tmp_path / "run")
    svp.save_split(str(out), svp.last_frames_split(FRAMES, 0.5))
    with pytest.raises(ValueError, match="split.json holds out the last 6 of 12 frames"):
        run_train(out, "--max-steps", "1")
    assert not (out / "log.jsonl").exists()


def test_resume_writes_the_split_of_a_run_trained_before_splits_were_recorded(demo_run, tmp_path):
    """What evaluate.py tells the owner of such a run to do: the same command with --resume writes split.json
    (the same last frames that run held out) and trains no further."""
    out = clone_run(demo_run[0], tmp_path / "old", parts=("base.safetensors", "tracking", "cache", "checkpoint.pt",
                                                           "run.json", "log.jsonl"))
    assert not (out / "split.json").exists()
    resumed = state_of(run_train(out, "--max-steps", str(DEMO_STEPS), "--save-every", "30", "--resume"))
    assert svp.load_split(str(out)) == svp.load_split(str(demo_run[0]))
    assert read_log(out) == read_log(demo_run[0])
    assert all(torch.equal(resumed[k], demo_run[1][k]) for k in demo_run[1])


def pose_sweep(src, dst, frames=24, period=8):
    """A tracking folder whose "video" is its own conditioning: the demo's head turning +-35 degrees.

    Each frame is the rendered normal map of its pose, so a frame is fully determined by its
    conditioning image, and a model that reads the hint can denoise it far better than one that cannot.
    The motion repeats every `period` frames, so the held-out last frames show poses seen in training.
    """
    seq = load_seq(os.path.join(src, "tracking", "seq.npz"))
    pick = np.arange(frames) % period
    per_frame = {f.name: getattr(seq, f.name)[pick] for f in dataclasses.fields(seq)
                 if f.name not in ("shape", "focal", "image_size", "fps") and getattr(seq, f.name) is not None}
    yaw = np.deg2rad(35) * np.sin(2 * np.pi * pick / period)
    per_frame["global_rot"] = np.stack([np.zeros(frames), yaw, np.zeros(frames)], 1).astype(np.float32)
    seq = dataclasses.replace(seq, **per_frame)
    normals = render_conditioning(load_flame(None), seq, 64)[:, :3]
    os.makedirs(os.path.join(dst, "tracking"))
    save_seq(os.path.join(dst, "tracking", "seq.npz"), seq)
    np.save(os.path.join(dst, "tracking", "crops.npy"), (normals * 255).round().byte().permute(0, 2, 3, 1).numpy())
    np.save(os.path.join(dst, "tracking", "landmarks.npy"), np.zeros((frames, 68, 2), np.float32))


def test_it_learns_to_use_the_conditioning(demo_run, tmp_path):
    out = clone_run(demo_run[0], tmp_path / "sweep", parts=("base.safetensors",))
    pose_sweep(demo_run[0], out)
    # The UNet stays frozen, so whatever the model learns about a frame comes through the ControlNet.
    denoiser = run_train(out, "--max-steps", "300", "--max-frames", "24", "--val-fraction", "0.15",
                         "--train", "controlnet", "--lr", "3e-3")
    sd = load_stable_diffusion(str(out / "base.safetensors"))
    latents = torch.from_numpy(np.load(out / "cache" / "latents.npy")).float()
    data = train.FrameData(latents, np.load(out / "cache" / "hints.npy"), None, svp.load_split(str(out)), "")
    assert data.split.held_out == (20, 21, 22, 23)
    context = encode_prompts(sd, ["a photo of sks person"])
    schedule = NoiseSchedule.from_config(sd.config)
    with_hint = held_out_loss(denoiser, schedule, data, context, seed=1, batch_size=8)
    zeroed = held_out_loss(denoiser, schedule, data, context, seed=1, batch_size=8, zero_hint=True)
    print(f"held-out loss {with_hint:.4f} with the conditioning, {zeroed:.4f} with it zeroed")
    assert zeroed >= 1.03 * with_hint


def test_rerun_resumes_exactly_after_a_kill(demo_run, tmp_path):
    """An uninterrupted run vs one SIGKILLed at step 5 (checkpoint at 4) and resumed: same final weights."""
    args = ["--max-steps", "8", "--save-every", "4", "--train", "controlnet+attn", "--batch-size", "2"]
    straight = state_of(run_train(clone_run(demo_run[0], tmp_path / "straight"), *args))

    out = clone_run(demo_run[0], tmp_path / "killed")
    cache_time = os.path.getmtime(out / "cache" / "hints.npy")
    killed = subprocess.run([sys.executable, "train.py", "--video", "demo", "--out", str(out), *TINY_ARGS, *args,
                             "--stop-after", "5"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert load_checkpoint(str(out / "checkpoint.pt"))["step"] == 4
    assert not os.path.exists(out / "avatar.safetensors")
    assert read_log(out)[-1]["step"] == 5

    with pytest.raises(ValueError, match="pass --resume"):
        run_train(out, *args)
    resumed = state_of(run_train(out, *args, "--resume"))
    assert os.path.getmtime(out / "cache" / "hints.npy") == cache_time, "the caches were rebuilt"
    assert svp.load_split(str(out)) == svp.load_split(str(demo_run[0]))
    assert [r["step"] for r in read_log(out)] == list(range(9))
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert any("attn" in k for k in straight if k.startswith(UNET_PREFIX))
    assert not any("attn" not in k for k in straight if k.startswith(UNET_PREFIX))

    with pytest.raises(ValueError, match="lr"):
        run_train(out, *args, "--resume", "--lr", "0.5")


def test_ctrl_c_ends_in_one_line_naming_the_step(demo_run, tmp_path):
    out = clone_run(demo_run[0], tmp_path / "interrupted")
    run = subprocess.Popen([sys.executable, "train.py", "--video", "demo", "--out", str(out), *TINY_ARGS,
                            "--max-steps", "1000", "--val-every", "1000", "--preview-every", "1000"],
                           cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "log.jsonl").exists() or (out / "log.jsonl").read_text().count("\n") < 3:  # steps 0-2
        assert run.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.2)
    run.send_signal(signal.SIGINT)
    stderr = run.communicate(timeout=120)[1]
    assert run.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    assert re.fullmatch(r"interrupted at step \d+; rerun with --resume to continue from the last checkpoint",
                        stderr.splitlines()[-1]), stderr[-2000:]


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    save_checkpoint(path, {"step": 4, "weights": torch.ones(3)})

    def disk_full(obj, f):
        with open(f, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="checkpoint.pt.*No space left.*previous one is unchanged"):
        save_checkpoint(path, {"step": 8, "weights": torch.zeros(3)})
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    checkpoint = load_checkpoint(path)
    assert checkpoint["step"] == 4 and torch.equal(checkpoint["weights"], torch.ones(3))


def ddp_worker(rank, world, port, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    denoiser = run_train(out, "--max-steps", "3", "--batch-size", "2", "--train", "controlnet", "--device", "cpu")
    torch.save(denoiser.trainable_state(), os.path.join(out, f"rank{rank}.pt"))


def test_ddp_two_processes_keep_identical_weights(demo_run, tmp_path):
    out = clone_run(demo_run[0], tmp_path / "ddp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(ddp_worker, args=(2, port, str(out)), nprocs=2, join=True)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    assert not any(k.startswith(UNET_PREFIX) for k in ranks[0])
    assert ranks[0]["control_model.zero_convs.0.0.weight"].abs().max() > 0, "nothing was trained"
    assert load_file(out / "avatar.safetensors").keys() == ranks[0].keys()
    assert [r["step"] for r in read_log(out)] == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- bad input

def test_cli_reports_a_missing_video_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--video", str(tmp_path / "me.mp4"), "--out",
                             str(tmp_path / "run"), "--preset", "tiny"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: argument --video: {tmp_path / 'me.mp4'}: no such video file " \
                                    "(see train.py --help)"
    assert not (tmp_path / "run").exists()


def test_wrong_base_checkpoint(tmp_path):
    (tmp_path / "me.mp4").write_bytes(b"not checked yet")
    (tmp_path / "lora.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="lora.safetensors"):
        run_train(tmp_path / "run", "--base", str(tmp_path / "lora.safetensors"), video=str(tmp_path / "me.mp4"))


def test_unreadable_flame_file(demo_run, tmp_path):
    out = clone_run(demo_run[0], tmp_path / "run", parts=("base.safetensors",))
    flame = tmp_path / "flame" / "generic_model.pkl"
    flame.parent.mkdir()
    flame.write_bytes(b"not a pickle")
    np.save(flame.parent / "landmark_embedding.npy", np.zeros(3))
    with pytest.raises(ValueError, match="generic_model.pkl"):
        run_train(out, "--flame", str(flame))


def test_video_without_a_face(tmp_path):
    video = str(tmp_path / "wall.mp4")
    write_video(video, np.full((4, 96, 96, 3), 128, np.uint8), 24)
    with pytest.raises(ValueError, match="wall.mp4.*face"):
        run_train(tmp_path / "run", video=video)


def test_out_dir_of_another_base_model_is_refused(demo_run, tmp_path):
    other = tmp_path / "other.safetensors"
    write_tiny_base(str(other), seed=1, crops=np.load(demo_run[0] / "tracking" / "crops.npy"), vae_steps=0)
    for resume in ([], ["--resume"]):
        with pytest.raises(ValueError, match="another base model"):
            run_train(demo_run[0], "--base", str(other), *resume)


def test_training_can_start_from_an_existing_controlnet(demo_run, tmp_path):
    """--controlnet: the encoder starts from a ControlNet checkpoint (here: the demo run's, re-saved in the
    original single-file layout) instead of a copy of the UNet; a hint width other than ours or a public
    ControlNet's 3 is refused."""
    from safetensors.torch import save_file
    out, trained = demo_run
    start = tmp_path / "controlnet.safetensors"
    controlnet_state = {k: v for k, v in trained.items() if k.startswith(CONTROLNET_PREFIX)}
    save_file(controlnet_state, str(start))
    sd = load_stable_diffusion(str(out / "base.safetensors"))
    denoiser = build_denoiser(sd, "controlnet+unet", 8, checkpointing=False, seed=0, start_from=str(start))
    for key, value in denoiser.controlnet.state_dict().items():
        assert torch.equal(value, trained[CONTROLNET_PREFIX + key]), key
    wrong = {k: (v[:, :5].contiguous() if k.endswith("input_hint_block.0.weight") else v) for k, v in controlnet_state.items()}
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(CheckpointError, match="5-channel hints, but ours have 8"):  # before the first step
        run_train(clone_run(out, tmp_path / "run"), "--max-steps", "1", "--controlnet",
                  str(tmp_path / "wrong.safetensors"))
