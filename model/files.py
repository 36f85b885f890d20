"""Writing files so that an interrupted run never leaves a half-written one: write a temp file in the same
folder, then rename it over the target (a rename within a folder is atomic on POSIX and Windows).

Every file svp writes (checkpoints, avatars, caches, seq.npz, videos, images, JSON) goes through
`atomic_write`, so a reader either finds the previous complete file or the new complete file.
"""
import json
import os
from contextlib import contextmanager


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
