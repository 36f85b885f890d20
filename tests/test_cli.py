"""The commands' flags and run folders, in-process and fast: every bad flag is refused by the parser in one
line before any work starts, output paths are checked first, one training per run folder, Ctrl-C and
file-system errors end in one line, outputs respect the umask, long prompts are reported."""
import logging
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import sample
import train
from cli import lora_file_and_scale, run_command
from model.files import RunInUseError, atomic_write, run_lock
from model.tokenizer import CLIPTokenizer
from tracking import __main__ as tracking_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def refused(parse, argv, capsys) -> str:
    """The one line the parser prints for bad flags (it exits with status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    return str(path)


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
TRAIN_CASES = [
    (["--max-steps", "0"], "--max-steps: must be a whole number > 0, got 0"),
    (["--save-every", "0"], "--save-every: must be a whole number > 0"),
    (["--resolution", "0"], "--resolution: must be a whole number > 0"),
    (["--resolution", "60"], "--resolution: must be a multiple of 8, got 60"),
    (["--batch-size", "0"], "--batch-size: must be a whole number > 0"),
    (["--grad-accum", "0"], "--grad-accum: must be a whole number > 0"),
    (["--lr=-1e-4"], "--lr: must be a number > 0"),
    (["--val-fraction", "1"], "--val-fraction: must be below 1"),
    (["--conditioning-dropout", "2"], "--conditioning-dropout: must be in [0, 1], got 2"),
    (["--max-frames", "0"], "--max-frames: must be a whole number > 0"),
    (["--seed", "-1"], "--seed: must be a whole number >= 0"),
    (["--vae-steps", "x"], "--vae-steps: must be a whole number >= 0, got 'x'"),
    (["--prompt", ""], "--prompt: must not be empty"),
    (["--prompt", "many tasks", "--token", "zz"], "--token: it replaces the word 'sks' in --prompt, and "
                                                  "'many tasks' has none"),
    (["--flame", "nowhere/generic_model.pkl"], "--flame: FLAME file nowhere/generic_model.pkl not found"),
    (["--base", "nowhere.safetensors"], "--base: nowhere.safetensors not found"),
    pytest.param(["--device", "cuda"], "--device: cuda: no CUDA GPU is available here", marks=NO_GPU),
    (["--device", "tpu"], "--device: 'tpu' is not a device"),
]


@pytest.mark.parametrize("flags, message", TRAIN_CASES)
def test_train_refuses_bad_flags_before_any_work(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    err = refused(train.parse_args, ["--video", "demo", "--preset", "tiny", "--out", str(out), *flags], capsys)
    assert message in err
    assert not out.exists(), "work started before the flags were checked"


def test_train_output_and_input_paths(tmp_path, capsys, a_file):
    err = refused(train.parse_args, ["--video", "demo", "--preset", "tiny", "--out", a_file], capsys)
    assert f"--out: {a_file} is a file, not a folder" in err
    err = refused(train.parse_args, ["--video", "demo", "--preset", "tiny", "--out", a_file + "/run"], capsys)
    assert f"--out: cannot create {a_file}/run: {a_file} is a file, not a folder" in err
    err = refused(train.parse_args, ["--video", "me.mp4", "--preset", "tiny", "--out", str(tmp_path)], capsys)
    assert "--video: me.mp4: no such video file" in err
    err = refused(train.parse_args, ["--video", "demo", "--out", str(tmp_path)], capsys)
    assert "--base is required" in err


def test_token_replaces_the_whole_word_only(tmp_path):
    args = train.parse_args(["--video", "demo", "--preset", "tiny", "--out", str(tmp_path), "--token", r"ohwx\1",
                             "--prompt", "sks does tasks, sks."])
    assert args.prompt == r"ohwx\1 does tasks, ohwx\1."


AVATAR = ["--avatar", "runs/me", "--params", "seq.npz"]
LIVE = ["--avatar", "runs/me", "--drive", "talk.mp4"]
SAMPLE_CASES = [
    (AVATAR + ["--steps", "0"], "--steps: must be a whole number > 0, got 0"),
    (AVATAR + ["--guidance", "-2"], "--guidance: must be a number >= 0, got -2"),
    (AVATAR + ["--temporal-strength", "2"], "--temporal-strength: must be in [0, 1], got 2"),
    (AVATAR + ["--temporal-fade", "-0.1"], "--temporal-fade: must be in [0, 1]"),
    (AVATAR + ["--eta", "-1"], "--eta: must be in [0, 1], got -1"),
    (AVATAR + ["--batch-frames", "0"], "--batch-frames: must be a whole number > 0"),
    (AVATAR + ["--conditioning-scale", "-1"], "--conditioning-scale: must be a number >= 0"),
    (AVATAR + ["--morph-weight", "0.3"], "--morph-weight needs --morph"),
    (AVATAR + ["--morph", "Tom Cruise", "--morph-weight", "1.5"], "--morph-weight: must be in [0, 1]"),
    (AVATAR + ["--prompt", ""], "--prompt: must not be empty"),
    (AVATAR + ["--frames", "5:2"], "--frames: '5:2': need 0 <= a < b"),
    (AVATAR + ["--frames", "2-5"], "--frames: wants a:b, got '2-5'"),
    (AVATAR + ["--flame", "nowhere.pkl"], "--flame: FLAME file nowhere.pkl not found"),
    (AVATAR + ["--decoder", "taesd_decoder.pth"], "--decoder: tiny decoder taesd_decoder.pth not found"),
    (["--ckpt", "sd.safetensors", "--prompt", "a cat", "--decoder", __file__], "--decoder drives an avatar"),
    (AVATAR + ["--out", "x.png"], "--out: x.png: the video file's name must end in .mp4"),
    (["--ckpt", "sd.safetensors"], "--prompt is required with --ckpt"),
    (["--ckpt", "sd.safetensors", "--prompt", "a cat", "--num-images", "0"],
     "--num-images: must be a whole number > 0"),
    (["--ckpt", "sd.safetensors", "--prompt", "a cat", "--height", "500"], "--height: must be a multiple of 8"),
    (["--ckpt", "sd.safetensors", "--prompt", "a cat", "--out", "cat.mp4"], "the image file's name must end in .png"),
    (["--ckpt", "sd.safetensors", "--prompt", "a cat", "--params", "seq.npz"], "--params drives an avatar"),
    pytest.param(AVATAR + ["--device", "cuda"], "--device: cuda: no CUDA GPU is available here", marks=NO_GPU),
    (LIVE + ["--serve", "99999"], "--serve: must be a port number 0-65535 (0: any free port), got 99999"),
    (LIVE + ["--serve", "-1"], "--serve: must be a port number 0-65535 (0: any free port), got -1"),
    (LIVE + ["--serve", "http"], "--serve: must be a port number 0-65535, got 'http'"),
    (AVATAR + ["--serve", "8000"], "--serve shows a live run: it needs --drive SOURCE"),
    (AVATAR + ["--lora", "nowhere.safetensors"], "--lora: LoRA file nowhere.safetensors not found"),
    (AVATAR + ["--lora", "nowhere.safetensors:0.5"], "--lora: LoRA file nowhere.safetensors not found"),
    (AVATAR + ["--lora", "nowhere.safetensors:abc"],
     "--lora: nowhere.safetensors:abc: no such LoRA file, and 'abc' is not a scale (a number)"),
]


@pytest.mark.parametrize("argv, message", SAMPLE_CASES)
def test_sample_refuses_bad_flags(capsys, argv, message):
    assert message in refused(sample.parse_args, argv, capsys)


def test_sample_output_paths_are_checked_first(tmp_path, capsys, a_file):
    err = refused(sample.parse_args, AVATAR + ["--out", str(tmp_path)], capsys)
    assert f"--out: {tmp_path} is a folder; name the video file" in err
    err = refused(sample.parse_args, AVATAR + ["--out", a_file + "/out.mp4"], capsys)
    assert f"--out: cannot write {a_file}/out.mp4: {a_file} is a file, not a folder" in err
    err = refused(sample.parse_args, AVATAR + ["--png-dir", a_file], capsys)
    assert f"--png-dir: {a_file} is a file, not a folder" in err
    args = sample.parse_args(AVATAR + ["--out", str(tmp_path / "new" / "out.mp4")])
    assert args.out.endswith("out.mp4") and args.morph_weight == 0.5


def test_a_port_in_use_is_refused_before_the_avatar_loads(capsys):
    """--serve binds its socket while the flags are checked: a taken port ends there, in one line."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        err = refused(sample.parse_args, LIVE + ["--serve", str(port)], capsys)
    assert f"--serve: cannot listen on 127.0.0.1:{port} (Address already in use)" in err


def test_serve_0_listens_on_a_free_port():
    page = sample.parse_args(LIVE + ["--serve", "0"]).page
    try:
        port = int(page.url.removeprefix("http://127.0.0.1:").removesuffix("/"))
        assert port > 0
        with pytest.raises(OSError), socket.socket() as other:  # bound by the parser, not later
            other.bind(("127.0.0.1", port))
    finally:
        page.close()


def test_lora_file_and_scale(tmp_path, capsys):
    """FILE[:SCALE]: an existing file is the file (':' in its name or not); else the part after the last ':'
    is the scale, and a scale that is not a number is named in the one-line error."""
    lcm, odd = tmp_path / "lcm.safetensors", tmp_path / "odd:name.safetensors"
    lcm.write_bytes(b"")
    odd.write_bytes(b"")
    assert lora_file_and_scale(str(lcm)) == (str(lcm), 1.0)
    assert lora_file_and_scale(f"{lcm}:0.8") == (str(lcm), 0.8)
    assert lora_file_and_scale(f"{lcm}:-1") == (str(lcm), -1.0)
    assert lora_file_and_scale(str(odd)) == (str(odd), 1.0)
    assert lora_file_and_scale(f"{odd}:2") == (str(odd), 2.0)
    for scale in ("abc", "inf", ""):
        err = refused(sample.parse_args, AVATAR + ["--lora", f"{lcm}:{scale}"], capsys)
        assert f"--lora: {lcm}:{scale}: the scale '{scale}' is not a finite number" in err


@pytest.mark.parametrize("flags, message", [
    (["--size", "0"], "--size: must be a whole number > 0, got 0"),
    (["--max-gap", "-1"], "--max-gap: must be a whole number >= 0"),
    (["--bbox", "10,10,5,50"], "--bbox: '10,10,5,50': x1 must exceed x0"),
    (["--flame", "nowhere/generic_model.pkl"], "--flame: FLAME file nowhere/generic_model.pkl not found"),
])
def test_tracking_refuses_bad_flags(tmp_path, capsys, flags, message):
    assert message in refused(tracking_main.parse_args, ["demo", "--out", str(tmp_path / "t"), *flags], capsys)
    assert not (tmp_path / "t").exists()


def test_tracking_out_that_is_a_file(capsys, a_file):
    assert f"--out: {a_file} is a file, not a folder" in refused(tracking_main.parse_args, ["demo", "--out", a_file],
                                                                 capsys)


# ----------------------------------------------------------------------------- run folder lock

LOCKER = """
import os, signal, sys, time
sys.path.insert(0, {repo!r})
from model.files import run_lock
with run_lock({out!r}):
    print("locked", flush=True)
    if {kill}:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)
"""


def locker(out, kill=False) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", LOCKER.format(repo=REPO, out=str(out), kill=kill)],
                             stdout=subprocess.PIPE, text=True)
    if not kill:
        assert child.stdout.readline().strip() == "locked"
    return child


def test_one_training_per_run_folder(tmp_path):
    child = locker(tmp_path)
    try:
        with pytest.raises(RunInUseError, match=f"{tmp_path} is in use by pid {child.pid}"):
            with run_lock(str(tmp_path)):
                pass
    finally:
        child.kill()
        child.wait()
    with run_lock(str(tmp_path)):  # the kernel released the killed run's lock
        assert (tmp_path / ".lock").read_text() == str(os.getpid())


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path):
    child = locker(tmp_path, kill=True)
    assert child.wait() == -9
    assert (tmp_path / ".lock").read_text() == str(child.pid)
    with run_lock(str(tmp_path)):
        assert (tmp_path / ".lock").read_text() == str(os.getpid())


# ----------------------------------------------------------------------------- endings, files, prompts

@pytest.mark.parametrize("error, code, stderr", [
    (KeyboardInterrupt(), 130, "interrupted\n"),
    (train.TrainingInterrupted("interrupted at step 7; rerun with --resume to continue"), 130,
     "interrupted at step 7; rerun with --resume to continue\n"),
    # sys.exit(text): the interpreter prints the text and exits with status 1
    (PermissionError(13, "Permission denied", "out.mp4"), "error: [Errno 13] Permission denied: 'out.mp4'", ""),
])
def test_commands_end_in_one_line(capsys, error, code, stderr):
    def main():
        raise error
    with pytest.raises(SystemExit) as exit_info:
        run_command(main)
    assert exit_info.value.code == code and capsys.readouterr().err == stderr


def test_outputs_respect_the_umask(tmp_path):
    """safetensors creates its files 0600; atomic_write gives every output the usual umask mode."""
    from safetensors.torch import save_file
    old = os.umask(0o022)
    try:
        with atomic_write(str(tmp_path / "w.safetensors")) as tmp:
            save_file({"w": torch.zeros(2)}, tmp)
        with atomic_write(str(tmp_path / "a.npy")) as tmp:
            np.save(tmp, np.zeros(2))
    finally:
        os.umask(old)
    for name in ("w.safetensors", "a.npy"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o644, name


def test_a_prompt_over_77_tokens_is_reported_once(caplog):
    tokenizer = CLIPTokenizer.byte_level()  # one token per character
    with caplog.at_level(logging.WARNING):
        tokenizer(["a" * 75])
        assert not caplog.records
        tokenizer(["a" * 80, "a" * 80])
        tokenizer(["a" * 80])
    assert len(caplog.records) == 1
    assert "its last 5 tokens were dropped" in caplog.records[0].getMessage()


# ----------------------------------------------------------------------------- processes (torchrun)

class FakeGPUs:
    """torch.cuda and torch.distributed as init_processes sees them on a machine with GPUs: which GPU each
    call made current, which backend the process group got."""

    def __init__(self, monkeypatch, current=0):
        import torch.distributed as dist
        self.current, self.set, self.backends = current, [], []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "set_device", self.set_device)
        monkeypatch.setattr(dist, "is_initialized", lambda: bool(self.backends))
        monkeypatch.setattr(dist, "init_process_group", self.backends.append)

    def set_device(self, device):
        self.current = torch.device(device).index
        self.set.append(torch.device(device))


def torchrun_env(monkeypatch, rank, world):
    for name, value in (("RANK", rank), ("LOCAL_RANK", rank), ("WORLD_SIZE", world)):
        monkeypatch.setenv(name, str(value))


@pytest.mark.parametrize("flag", [None, "cuda"])
def test_each_torchrun_process_makes_its_own_gpu_current(monkeypatch, flag):
    """Rank 1 of 2 takes cuda:1 and makes it current before NCCL starts: its collectives (sample.py's
    gather, train.py's all-reduce) and kernel timings then run on GPU 1, not all on GPU 0."""
    import svp
    gpus = FakeGPUs(monkeypatch)
    torchrun_env(monkeypatch, 1, 2)
    ranks = svp.init_processes(flag)
    assert (ranks.rank, ranks.world, ranks.device) == (1, 2, torch.device("cuda", 1))
    assert gpus.set == [torch.device("cuda", 1)] and gpus.backends == ["nccl"]


def test_one_process_on_a_gpu_takes_the_current_one_or_the_one_named(monkeypatch):
    import svp
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    gpus = FakeGPUs(monkeypatch, current=0)
    assert svp.init_processes(None).device == torch.device("cuda", 0)  # "cuda": an index set_device accepts
    assert svp.init_processes("cuda:1").device == torch.device("cuda", 1)
    assert gpus.set == [torch.device("cuda", 0), torch.device("cuda", 1)] and gpus.backends == []
    assert svp.init_processes("cpu").device == torch.device("cpu") and len(gpus.set) == 2


def test_one_gpu_named_for_every_torchrun_process_is_refused(monkeypatch):
    import svp
    gpus = FakeGPUs(monkeypatch)
    torchrun_env(monkeypatch, 0, 2)
    with pytest.raises(ValueError, match="--device cuda:1 under torchrun would put every process on one GPU"):
        svp.init_processes("cuda:1")
    assert gpus.set == [] and gpus.backends == []


class Started(Exception):
    pass


def test_sample_and_evaluate_start_through_init_processes(monkeypatch, tmp_path):
    """The one function that train.py starts with sets the device of sample.py (every mode) and evaluate.py."""
    import evaluate
    import svp
    asked = []

    def init_processes(device):
        asked.append(device)
        raise Started
    monkeypatch.setattr(svp, "init_processes", init_processes)
    with pytest.raises(Started):
        sample.main(["--ckpt", "sd.safetensors", "--prompt", "a cat", "--device", "cpu",
                     "--out", str(tmp_path / "cat.png")])
    (tmp_path / "avatar.safetensors").write_bytes(b"")
    (tmp_path / "split.json").write_text('{"n_frames": 4, "held_out": [3], "rule": "the last"}')
    with pytest.raises(Started):
        evaluate.main(["--avatar", str(tmp_path), "--device", "cpu"])
    assert asked == ["cpu", "cpu"]


def test_under_torchrun_only_sampling_frames_is_split(monkeypatch, capsys, tmp_path):
    import evaluate
    torchrun_env(monkeypatch, 0, 2)
    assert "run text to image and --drive as one process" in refused(
        sample.parse_args, ["--ckpt", "sd.safetensors", "--prompt", "a cat"], capsys)
    (tmp_path / "avatar.safetensors").write_bytes(b"")
    assert "evaluate.py runs as one process" in refused(evaluate.parse_args, ["--avatar", str(tmp_path)], capsys)


def share_and_gather(rank, world, port, out):
    """One torchrun-like process of two (gloo): its share of frames 2..8, gathered on rank 0."""
    import svp
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    ranks = svp.init_processes("cpu")
    try:
        share = ranks.share(range(2, 9))
        gathered = ranks.gather(np.arange(share.start, share.stop)[:, None].repeat(2, 1))
        np.save(os.path.join(out, f"rank{rank}.npy"), np.array([share.start, share.stop]))
        if ranks.main:
            np.save(os.path.join(out, "gathered.npy"), gathered)
        else:
            assert gathered is None
    finally:
        svp.end_processes()


def test_two_processes_share_the_frames_and_gather_them_in_order(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(share_and_gather, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    shares = [range(*np.load(tmp_path / f"rank{r}.npy")) for r in range(2)]
    assert shares == [range(2, 5), range(5, 9)]
    np.testing.assert_array_equal(np.load(tmp_path / "gathered.npy"), np.arange(2, 9)[:, None].repeat(2, 1))
