"""Shared test setup: the repo root on sys.path, and the real CLIP vocabulary as a fixture.

The vocabulary is OpenAI's bpe_simple_vocab_16e6.txt.gz, taken from the open_clip_torch wheel on
PyPI (one pinned release, downloaded once, never installed) and cached in ~/.cache/svp-test-data/.
"""
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

# Without a GPU, Triton kernels are tested in its interpreter, which must be chosen before triton is
# first imported (kernels/ imports it at module level). The dispatcher still sends CPU tensors to the
# PyTorch references; tests/test_kernels.py launches the kernels on CPU tensors explicitly.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests import the project as top-level packages (model, kernels, tracking), like train.py does, and the
# helpers of tests/data (the metrics' reference weights).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(1, os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))

from model.tokenizer import OPENAI_BPE_FILE, read_openai_bpe  # noqa: E402

CACHE = Path.home() / ".cache" / "svp-test-data"
# Pinned like requirements-lock.txt: a new upstream release must not change what the tests read.
OPEN_CLIP_WHEEL = "open_clip_torch==3.3.0"


@pytest.fixture
def one_torch_thread():
    """One torch thread for a test: the test machine's 2 cores are shared, and a second thread makes every
    small op wait for a busy core (oversubscription stalls)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def openai_bpe_file() -> Path:
    """OpenAI CLIP's merges file from the open_clip_torch wheel; a failed download fails the test."""
    target = CACHE / OPENAI_BPE_FILE
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
             OPEN_CLIP_WHEEL, "-d", tmp], capture_output=True, text=True, timeout=600)
        wheels = sorted(Path(tmp).glob("open_clip_torch-*.whl"))
        if result.returncode != 0 or not wheels:
            pytest.fail("could not download the open_clip_torch wheel from PyPI, which carries the CLIP "
                        f"vocabulary ({OPENAI_BPE_FILE}) these tests need:\n{result.stderr[-2000:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            data = wheel.read(f"open_clip/{OPENAI_BPE_FILE}")
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + f".{os.getpid()}.partial")
    partial.write_bytes(data)
    os.replace(partial, target)  # atomic: a concurrent or interrupted run never sees half a file
    return target


@pytest.fixture(scope="session")
def tokenizer_folder(openai_bpe_file, tmp_path_factory) -> Path:
    """A diffusers-style tokenizer/ folder (vocab.json + merges.txt) derived from the OpenAI file."""
    vocab, merges = read_openai_bpe(openai_bpe_file)
    folder = tmp_path_factory.mktemp("sd") / "tokenizer"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def untrained_avatar_run(tmp_path_factory) -> Path:
    """A run folder as train.py writes it, without training: a random tiny base (random VAE), a fresh
    ControlNet, and a short synthetic FLAME sequence (a head turning and opening its mouth) as the
    'tracked' seq.npz. Seconds to build; its frames show noise-like texture, but the sampler's
    arithmetic (streaming, live driving) is the real one."""
    import numpy as np
    from model.avatar import build_denoiser, fingerprint, save_avatar
    from model.config import config_to_dict
    from model.loading import load_stable_diffusion, write_tiny_base
    from tracking.pipeline import load_flame
    from tracking.sequence import FlameSequence, save_seq

    run = tmp_path_factory.mktemp("untrained-avatar")
    base = str(run / "base.safetensors")
    write_tiny_base(base, seed=0, crops=np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), np.uint8),
                    vae_steps=0)
    flame, n = load_flame(None), 12
    turn = np.sin(np.linspace(0, np.pi, n, dtype=np.float32))
    zeros = lambda width: np.zeros((n, width), np.float32)
    seq = FlameSequence(shape=np.zeros(flame.n_shape, np.float32), expression=zeros(flame.n_exp),
                        global_rot=np.stack([0 * turn, 0.3 * turn, 0 * turn], 1), neck_rot=zeros(3),
                        jaw_rot=np.stack([0.2 * turn, 0 * turn, 0 * turn], 1), eye_rots=zeros(6),
                        translation=np.tile(np.float32([0, 0, -0.5]), (n, 1)), focal=76.8, image_size=(64, 64),
                        fps=24.0)
    (run / "tracking").mkdir()
    save_seq(str(run / "tracking" / "seq.npz"), seq)
    sd = load_stable_diffusion(base)
    denoiser = build_denoiser(sd, "controlnet", hint_channels=8, checkpointing=False, seed=0)
    meta = {"base": "base.safetensors", "base_fingerprint": fingerprint(base), "family": config_to_dict(sd.config),
            "prompt": "a photo of sks person", "hint_channels": 8, "resolution": 64, "train": "controlnet",
            "seq": "tracking/seq.npz", "identity_shape": seq.shape.tolist(), "flame": None, "step": 0}
    save_avatar(str(run / "avatar.safetensors"), denoiser, meta)
    return run


@pytest.fixture(scope="session")
def metric_weights(tmp_path_factory) -> Path:
    """LPIPS and FID-Inception weights under the published file names, in their layouts: torchvision's AlexNet
    with a classifier (cut short here), lpips' heads in torch's legacy (non-zip) format, the FID Inception with
    its fc and the num_batches_tracked a torchvision-made state dict carries. The values are random, seeded per
    tensor name as tests/data/make_metrics_reference.py seeded the reference implementations' networks, so
    tests/test_metrics.py compares what loads from these files with the references' stored outputs."""
    from make_metrics_reference import random_weights
    from model.inception import FIDInception
    from model.lpips import LPIPS

    def random_state_dict(build) -> dict:
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in build().state_dict().items()}
        return {k: torch.from_numpy(v) for k, v in random_weights(shapes).items()}

    folder = tmp_path_factory.mktemp("metric-weights")
    lpips = random_state_dict(LPIPS)
    features = {k: v for k, v in lpips.items() if k.startswith("features.")}
    heads = {k: v for k, v in lpips.items() if k.startswith("lin")}
    torch.save({**features, "classifier.6.bias": torch.zeros(1000)}, folder / "alexnet-owt-7be5be79.pth")
    torch.save(heads, folder / "alex.pth", _use_new_zipfile_serialization=False)
    inception = random_state_dict(FIDInception)
    bn_counters = {k.replace("running_mean", "num_batches_tracked"): torch.tensor(0) for k in inception
                   if k.endswith("running_mean")}
    torch.save({**inception, **bn_counters, "fc.bias": torch.zeros(1008)},
               folder / "pt_inception-2015-12-05-6726825d.pth")
    return folder


@pytest.fixture(scope="session")
def evaluable_avatar_run(untrained_avatar_run, tmp_path_factory) -> Path:
    """`untrained_avatar_run` with what evaluate.py reads besides: the tracking's face crops (random) and
    split.json holding out the last 6 of its 12 frames."""
    import shutil

    import numpy as np
    import svp
    run = tmp_path_factory.mktemp("evaluable") / "run"
    shutil.copytree(untrained_avatar_run, run)
    n = svp.load_seq(str(run / "tracking" / "seq.npz")).n_frames
    np.save(run / "tracking" / "crops.npy", np.random.default_rng(0).integers(0, 256, (n, 64, 64, 3), np.uint8))
    svp.save_split(str(run), svp.last_frames_split(n, 0.5))
    return run
