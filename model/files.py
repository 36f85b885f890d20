"""Writing files so that an interrupted run never leaves a half-written one: write a temp file in the same
folder, then rename it over the target (a rename within a folder is atomic on POSIX and Windows).

Every file svp writes (checkpoints, avatars, caches, seq.npz, videos, images, JSON) goes through
`atomic_write`, so a reader either finds the previous complete file or the new complete file. Here too:
JSON, the JSON-lines training log, and training checkpoints (torch.save, with the global RNG states in a
form that torch.load(weights_only=True) reads back); and the lock that keeps one training per run folder.
"""
import fcntl
import json
import os
import random
from contextlib import contextmanager

import numpy as np
import torch


@contextmanager
def atomic_write(path: str):
    """Yield a temp path beside `path` to write to; on success it replaces `path`, on failure it is removed.

    The temp name keeps `path`'s extension (writers such as np.save and PIL pick the format from it) and
    holds the pid, so two processes writing the same target never share a temp file.
    """
    stem, ext = os.path.splitext(path)
    tmp = f"{stem}.tmp{os.getpid()}{ext}"
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # some writers (safetensors) create their files 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


class JSONFileError(ValueError):
    pass


def read_json(path: str):
    """The JSON in `path`; a file that is not JSON is one error naming it."""
    with open(path) as f:
        try:
            return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise JSONFileError(f"{path}: not a JSON file ({e})") from e


def write_json(path: str, obj):
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1)


def append_log(path: str, record: dict):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(path: str, step: int):
    """Keep the records up to `step` (none for a fresh run): those a killed run wrote after its last
    checkpoint are written again by the resumed run."""
    kept = []
    if step and os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if json.loads(line)["step"] <= step]
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        f.writelines(kept)


def save_checkpoint(path: str, checkpoint: dict):
    """A failed write leaves the previous checkpoint intact."""
    try:
        with atomic_write(path) as tmp:
            torch.save(checkpoint, tmp)
    except OSError as e:
        raise OSError(f"{path}: could not write the checkpoint ({e}); the previous one is unchanged") from e


def load_checkpoint(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(legacy=False), "torch": torch.get_rng_state()}
    state["numpy"]["state"]["key"] = torch.from_numpy(state["numpy"]["state"]["key"].astype(np.int64))
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    numpy_state["state"]["key"] = numpy_state["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RunInUseError(ValueError):
    pass


@contextmanager
def run_lock(out: str):
    """Hold <out>/.lock exclusively while training into `out`, so that a second run into the same folder
    is refused instead of interleaving with the first. The lock is an flock, which the kernel releases
    when its process ends however it ends: a lock file left by a killed run is simply taken over."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, ".lock"), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise RunInUseError(f"{out} is in use by pid {f.read().strip() or '?'} (another train.py); wait for "
                                "it to end or use another --out") from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
