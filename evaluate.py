"""Score a trained avatar on real frames it never trained on: the paper's self-reenactment protocol.

    python evaluate.py --avatar runs/me
    python evaluate.py --avatar runs/me --lpips lpips-weights/ --inception pt_inception-2015-12-05-6726825d.pth
    python evaluate.py --avatar runs/me --video another_take.mp4      # also a held-out video of the same person

The held-out frames that train.py recorded (<run>/split.json) are rendered from their tracked FLAME
parameters, with sample.py's sampler flags, and compared with the real face crops (<run>/tracking/
crops.npy, made at the avatar's resolution, so no resizing): PSNR, SSIM, LPIPS, FID, KID and flicker
(model/metrics.py says what each means). --video tracks another video of the person with the avatar's
identity shape (into <run>/eval/<video name>/) and scores every frame of it the same way.

Writes --out (default <run>/eval.json: the settings, each source's frames and metrics) and, beside it, a
PNG of a few frames per source, one row each: real | render | absolute difference. LPIPS, FID and KID
need weights brought by the user (see README); without them they are reported missing, naming the file.
"""
import argparse
import dataclasses
import os

import numpy as np
from PIL import Image

import svp
from model.files import atomic_write, write_json
from model.loading import DTYPES
from model.metrics import frame_metrics, load_inception, load_lpips
from sample import add_sampler_args, video_settings
from tracking.cli import (ArgumentParser, existing_file, output_dir_problem, output_file_problem, positive_int,
                          run_command)
from tracking.pipeline import track_video

STRIP_FRAMES = 4  # frames per source in the PNG


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--avatar", required=True, help="run folder of `python train.py` (avatar.safetensors, split.json)")
    p.add_argument("--out", default=None, help="the evaluation's JSON (default <avatar>/eval.json); the strip of "
                   "frames is written beside it with the extension .png")
    p.add_argument("--lpips", default=None, metavar="FILE/FOLDER", help="LPIPS weights: AlexNet's features "
                   "(alexnet-owt-7be5be79.pth) and the v0.1 heads (alex.pth), a folder holding both or one "
                   ".safetensors (without: LPIPS is reported missing)")
    p.add_argument("--inception", type=existing_file("Inception weights"), default=None, metavar="FILE",
                   help="FID's Inception v3, pt_inception-2015-12-05-6726825d.pth or .safetensors (without: FID "
                   "and KID are reported missing)")
    p.add_argument("--video", type=existing_file("video"), default=None, help="a held-out video of the same "
                   "person, scored too (tracked with the avatar's identity shape)")
    p.add_argument("--max-frames", type=positive_int, default=None, help="with --video: its first N frames only")
    p.add_argument("--metric-batch", type=positive_int, default=16, help="frames per batch of a metric network")
    add_sampler_args(p)
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.avatar, "avatar.safetensors")):
        p.error(f"argument --avatar: {args.avatar}: no avatar.safetensors here (the run folder of train.py)")
    if args.lpips is not None and not os.path.exists(args.lpips):
        p.error(f"argument --lpips: LPIPS weights {args.lpips} not found")
    if args.max_frames is not None and args.video is None:
        p.error("--max-frames counts frames of --video; there is none")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        p.error("evaluate.py runs as one process; under torchrun every process would evaluate it all")
    args.out = args.out or os.path.join(args.avatar, "eval.json")
    problem = output_file_problem(args.out, "evaluation", (".json",)) or \
        output_file_problem(strip_path(args.out), "strip", (".png",))
    if problem:
        p.error(f"argument --out: {problem}")
    problem = args.video and output_dir_problem(os.path.join(args.avatar, "eval"))
    if problem:
        p.error(f"argument --video: its tracking goes into {args.avatar}/eval: {problem}")
    return args


def strip_path(out: str) -> str:
    return os.path.splitext(out)[0] + ".png"


@dataclasses.dataclass
class Source:
    """Real frames to score against: a FLAME sequence, its face crops, and which of its frames count."""
    name: str
    seq: svp.FlameSequence
    crops: np.ndarray       # (T, S, S, 3) uint8
    frames: list[int]
    about: dict             # what it is, for eval.json


def held_out_source(avatar: svp.Avatar, split: svp.Split) -> Source:
    """The run's held-out frames and its own tracking."""
    seq_path = avatar.run_file("seq")
    crops_path = os.path.join(os.path.dirname(seq_path), "crops.npy")
    seq, crops = svp.load_seq(seq_path), np.load(crops_path, mmap_mode="r")
    for path, n in ((seq_path, seq.n_frames), (crops_path, len(crops))):
        if n != split.n_frames:
            raise ValueError(f"{path} has {n} frames, but {os.path.join(avatar.run_dir, svp.SPLIT_FILE)} splits "
                             f"{split.n_frames}: the tracking changed after training")
    return Source("held-out", seq, crops, sorted(split.held_out), {"truth": crops_path, "split": split.rule})


def video_source(avatar: svp.Avatar, video: str, max_frames: int | None) -> Source:
    """Another video of the person, tracked (cached in <run>/eval/<name>/) with the avatar's identity shape,
    at the avatar's resolution."""
    name = os.path.splitext(os.path.basename(video))[0]
    folder = os.path.join(avatar.run_dir, "eval", name)
    tracked = track_video(video, folder, avatar.flame, size=avatar.resolution, max_frames=max_frames,
                          shape=avatar.shape)
    return Source(os.path.basename(video), tracked.seq, tracked.crops, list(range(tracked.seq.n_frames)),
                  {"truth": os.path.join(folder, "crops.npy"), "tracking": folder})


def runs(frames: list[int]) -> list[range]:
    """Sorted frames as contiguous ranges: each is rendered as one video (the sampler needs its predecessors)."""
    out = []
    for f in frames:
        if out and out[-1].stop == f:
            out[-1] = range(out[-1].start, f + 1)
        else:
            out.append(range(f, f + 1))
    return out


def render(avatar: svp.Avatar, source: Source, args) -> np.ndarray:
    """The avatar's frames for the source's frames, (T, S, S, 3) uint8."""
    return np.concatenate([avatar.render(source.seq, args.prompt, negative_prompt=args.negative_prompt, frames=r,
                                         settings=video_settings(args))[0] for r in runs(source.frames)])


def real_frames(source: Source, size: int) -> np.ndarray:
    real = np.asarray(source.crops[source.frames])
    if real.shape[1:3] != (size, size):
        raise ValueError(f"{source.about['truth']}: {real.shape[1]} px crops, but the avatar renders {size} px")
    return real


# ----------------------------------------------------------------------------- reporting

ROWS = {"frames": "frames", "psnr": "PSNR dB (higher: closer)", "ssim": "SSIM (higher: closer, 1 = same)",
        "lpips": "LPIPS (lower: closer)", "fid": "FID (lower: closer)", "kid": "KID (lower: closer)",
        "flicker": "flicker render | real | excess"}


def shown(value) -> str:
    """One cell of the table (model.metrics.frame_metrics' entries)."""
    if not isinstance(value, dict):
        return f"{value:.4g}" if isinstance(value, float) else str(value)
    if "missing" in value:
        return "missing"
    if "std" in value:
        return f"{value['mean']:.4g} +- {value['std']:.2g}"
    if "excess" in value:
        return " | ".join(f"{value[k]:.4f}" for k in ("render", "real", "excess"))
    return f"{value['value' if 'value' in value else 'mean']:.4g}"


def table(results: dict[str, dict]) -> str:
    """Metrics as rows, sources as columns; below, why a metric is missing."""
    rows = [["", *results]] + [[label, *(shown(r[key]) for r in results.values())] for key, label in ROWS.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    missing = {r[key]['missing'] for r in results.values() for key in ROWS
               if isinstance(r[key], dict) and "missing" in r[key]}
    return "\n".join(lines + sorted(f"missing: {why}" for why in missing))


def strip_rows(real: np.ndarray, fake: np.ndarray, count: int = STRIP_FRAMES) -> np.ndarray:
    """`count` evenly spaced frames, one row each: real | render | |real - render|."""
    pick = np.unique(np.linspace(0, len(real) - 1, min(count, len(real))).round().astype(int))
    diff = np.abs(real[pick].astype(np.int16) - fake[pick]).astype(np.uint8)
    return np.concatenate([real[pick], fake[pick], diff], axis=2).reshape(-1, 3 * real.shape[2], 3)


def main(argv=None):
    args = parse_args(argv)
    device = str(svp.init_processes(args.device).device)  # as train.py and sample.py: cuda is cuda:N, made current
    dtype = args.dtype or ("fp16" if device.startswith("cuda") else "fp32")
    split = svp.load_split(args.avatar)  # a run without one fails before anything loads
    lpips = load_lpips(args.lpips, device, DTYPES[dtype]) if args.lpips else None
    inception = load_inception(args.inception, device, DTYPES[dtype]) if args.inception else None
    avatar = svp.load_avatar(args.avatar, base=args.base, flame=args.flame, device=device, dtype=dtype,
                             tokenizer=args.tokenizer, loras=args.lora, decoder=args.decoder)
    sources = [held_out_source(avatar, split)]
    if args.video:
        sources.append(video_source(avatar, args.video, args.max_frames))
    results, strips = {}, []
    for source in sources:
        print(f"{source.name}: rendering {len(source.frames)} frames")
        real, fake = real_frames(source, avatar.resolution), render(avatar, source, args)
        results[source.name] = frame_metrics(real, fake, lpips, inception, device, args.metric_batch)
        strips.append(strip_rows(real, fake))
    print(table(results))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with atomic_write(strip_path(args.out)) as tmp:
        Image.fromarray(np.concatenate(strips)).save(tmp)
    settings = {**dataclasses.asdict(video_settings(args)), "prompt": args.prompt or avatar.meta["prompt"],
                "negative_prompt": args.negative_prompt, "lora": [list(lora) for lora in args.lora],
                "decoder": args.decoder, "dtype": dtype, "device": device}
    write_json(args.out, {
        "avatar": os.path.abspath(args.avatar), "step": avatar.meta["step"], "settings": settings,
        "weights": {"lpips": args.lpips, "inception": args.inception}, "strip": os.path.basename(strip_path(args.out)),
        "sources": [{"name": s.name, **s.about, "frames": s.frames, "metrics": results[s.name]} for s in sources]})
    print(f"wrote {args.out} and {strip_path(args.out)}")


if __name__ == "__main__":
    run_command(main)
