"""Scoring an avatar's renders against real frames, as evaluate.py does it: sources of real frames, renders
scored chunk by chunk as they are made (memory flat in the take's length), a cache of renders on disk (a
setting scored once is not rendered again), and the report: table (text and Markdown), strip and plot.

A render cache entry is <run>/eval/renders/<key>.npy (uint8 frames) and <key>.json (what was rendered, and
how long it took); the key is a hash of the avatar's weights, the sampler settings and the source frames.
"""
import hashlib
import json
import os
import time
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from model.files import atomic_write, read_json, write_json
from model.metrics import FrameScores

STRIP_FRAMES = 4  # frames per source in the strip


@dataclass
class Source:
    """Real frames to score against: a FLAME sequence, its face crops (read chunk by chunk), which frames count."""
    name: str
    seq: object             # svp.FlameSequence
    seq_path: str
    crops_path: str         # (T, S, S, 3) uint8 .npy
    frames: list[int]
    about: dict             # what it is, for eval.json

    def real(self, frames: list[int]) -> np.ndarray:
        """The crops of `frames`, read from the file for this call only (a map kept open would keep every page
        read so far in the process's memory)."""
        return np.array(np.load(self.crops_path, mmap_mode="r")[frames])

    def check_size(self, size: int):
        crops = np.load(self.crops_path, mmap_mode="r")
        if crops.shape[1:3] != (size, size):
            raise ValueError(f"{self.crops_path}: {crops.shape[1]} px crops, but the avatar renders {size} px")


def runs(frames: list[int]) -> list[range]:
    """Sorted frames as contiguous ranges: each is rendered as one video (the sampler needs its predecessors)."""
    out = []
    for f in frames:
        if out and out[-1].stop == f:
            out[-1] = range(out[-1].start, f + 1)
        else:
            out.append(range(f, f + 1))
    return out


def file_hash(path: str) -> str:
    """sha256 of a whole file (an avatar's weights: two checkpoints of one run may share their first MiB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def render_key(what: dict) -> str:
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:20]


def strip_picks(n: int, count: int = STRIP_FRAMES) -> list[int]:
    """Positions of `count` evenly spaced frames among n."""
    return np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(int)).tolist()


@dataclass
class Scored:
    """One source scored under one setting."""
    metrics: dict
    seconds_per_frame: float   # rendering wall time per frame scored (the cached render's, when cached)
    cached: bool
    render_file: str
    picked: np.ndarray         # the strip's frames of the render


def score_source(render_chunks, source: Source, cache_dir: str, key_of: dict, scores: FrameScores,
                 label: str, chunk: int) -> Scored:
    """Render `source`'s frames (render_chunks(range) -> iterator of uint8 frame chunks), or read them from
    the cache, and score each chunk against the real frames as it comes, dropping it after."""
    key = render_key({**key_of, "seq": file_hash(source.seq_path), "frames": source.frames})
    path, meta_path = (os.path.join(cache_dir, key + ext) for ext in (".npy", ".json"))
    cached = os.path.exists(path) and os.path.exists(meta_path)
    picks, picked = strip_picks(len(source.frames)), []
    done = 0

    def take(fake: np.ndarray):
        nonlocal done
        scores.add(source.real(source.frames[done:done + len(fake)]), fake)
        picked.extend(fake[p - done] for p in picks if done <= p < done + len(fake))
        done += len(fake)
        bar.update(len(fake))

    with tqdm(total=len(source.frames), desc=f"{label}{source.name}", unit="frame") as bar:
        if cached:
            for start in range(0, len(source.frames), chunk):
                take(np.array(np.load(path, mmap_mode="r")[start:start + chunk]))
            seconds = read_json(meta_path)["seconds_per_frame"]
        else:
            os.makedirs(cache_dir, exist_ok=True)
            started = time.perf_counter()
            with atomic_write(path) as tmp, open(tmp, "wb") as file:
                size = None
                for r in runs(source.frames):
                    for fake in render_chunks(r):
                        if size is None:   # the header, for all the frames to come
                            size = fake.shape[1:]
                            np.lib.format.write_array_header_1_0(file, {
                                "descr": "|u1", "fortran_order": False, "shape": (len(source.frames), *size)})
                        file.write(np.ascontiguousarray(fake).tobytes())
                        take(fake)
            seconds = (time.perf_counter() - started) / len(source.frames)
            write_json(meta_path, {**key_of, "source": source.about, "frames": source.frames,
                                   "seconds_per_frame": seconds})
    return Scored(scores.result(), seconds, cached, path, np.stack(picked))


# ----------------------------------------------------------------------------- reporting

COLUMNS = {"psnr": "PSNR dB", "ssim": "SSIM", "lpips": "LPIPS", "fid": "FID", "kid": "KID",
           "flicker": "flicker render / real / excess"}
ABOUT = "PSNR, SSIM: higher is closer; LPIPS, FID, KID: lower is closer; flicker: excess about 0 is as steady " \
        "as the real video"


def shown(value) -> str:
    """One cell of the table (model.metrics.FrameScores' entries)."""
    if "missing" in value:
        return "missing"
    if "std" in value:
        return f"{value['mean']:.4g} +- {value['std']:.2g}"
    if "excess" in value:
        return " / ".join(f"{value[k]:.4f}" for k in ("render", "real", "excess"))
    return f"{value['value' if 'value' in value else 'mean']:.4g}"


def table_cells(rows: list[dict]) -> list[list[str]]:
    """Header and one line per row and source of eval.json's rows."""
    head = ["setting", "source", "frames", *COLUMNS.values(), "s / frame"]
    return [head] + [[row["label"], s["name"], str(s["metrics"]["frames"]),
                      *(shown(s["metrics"][k]) for k in COLUMNS),
                      f"{s['seconds_per_frame']:.3g}" + (" (cached)" if s["cached"] else "")]
                     for row in rows for s in row["sources"]]


def missing_notes(rows: list[dict]) -> list[str]:
    return sorted({f"missing: {s['metrics'][k]['missing']}" for row in rows for s in row["sources"] for k in COLUMNS
                   if "missing" in s["metrics"][k]})


def text_table(rows: list[dict]) -> str:
    cells = table_cells(rows)
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in cells]
    return "\n".join(lines + missing_notes(rows))


def markdown_table(rows: list[dict]) -> str:
    cells = table_cells(rows)
    lines = ["| " + " | ".join(line) + " |" for line in cells]
    lines.insert(1, "|" + "---|" * len(cells[0]))
    return "\n".join(lines + [""] + [ABOUT + "."] + [f"{note}  " for note in missing_notes(rows)]) + "\n"


def strip(real: dict[str, np.ndarray], renders: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Per source (one block of STRIP_FRAMES rows each), the columns real | render | |real - render| of each row."""
    blocks = []
    for name, truth in real.items():
        columns = [truth]
        for picked in renders:
            columns += [picked[name], np.abs(truth.astype(np.int16) - picked[name]).astype(np.uint8)]
        blocks.append(np.concatenate(columns, axis=2).reshape(-1, sum(c.shape[2] for c in columns), 3))
    return np.concatenate(blocks)


def plot(rows: list[dict], path: str):
    """Per-frame PSNR, LPIPS (when scored) and flicker over the frames: one column per source, one line per row."""
    import matplotlib
    matplotlib.use("Agg")   # files only, no display
    import matplotlib.pyplot as plt

    sources = [s["name"] for s in rows[0]["sources"]]
    panels = [("psnr", "PSNR dB")] + [("lpips", "LPIPS")] * any(
        "per_frame" in s["metrics"]["lpips"] for row in rows for s in row["sources"]) + [("flicker", "flicker")]
    fig, axes = plt.subplots(len(panels), len(sources), figsize=(5 * len(sources), 1.9 * len(panels)), dpi=80,
                             squeeze=False, sharex="col")
    for column, name in enumerate(sources):
        for row in rows:
            source = next(s for s in row["sources"] if s["name"] == name)
            frames, metrics = np.asarray(source["frames"]), source["metrics"]
            for (key, title), ax in zip(panels, axes[:, column]):
                if key == "flicker" and "flicker_per_frame" in metrics:
                    ax.plot(frames[1:-1], metrics["flicker_per_frame"]["render"], lw=1, label=row["label"])
                elif key != "flicker" and "per_frame" in metrics[key]:
                    ax.plot(frames, metrics[key]["per_frame"], lw=1, label=row["label"])
        first = next(s for s in rows[0]["sources"] if s["name"] == name)
        if "flicker_per_frame" in first["metrics"]:   # the real video's own, the floor
            axes[-1, column].plot(np.asarray(first["frames"])[1:-1], first["metrics"]["flicker_per_frame"]["real"],
                                  "k--", lw=1, label="real video")
        axes[0, column].set_title(name)
        axes[-1, column].set_xlabel("frame")
        for (key, title), ax in zip(panels, axes[:, column]):
            ax.set_ylabel(title)
            ax.grid(alpha=0.3)
    for ax in {axes[0, -1], axes[-1, -1]}:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
