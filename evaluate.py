"""Score trained avatars on real frames they never trained on: the paper's self-reenactment protocol, and its
tables: settings and avatars side by side.

    python evaluate.py --avatar runs/me
    python evaluate.py --avatar runs/me --lpips lpips-weights/ --inception pt_inception-2015-12-05-6726825d.pth
    python evaluate.py --avatar runs/me --video another_take.mp4      # also a held-out video of the same person
    python evaluate.py --avatar runs/me --vary temporal-strength=0,0.9 --vary steps=25,50   # 4 rows
    python evaluate.py --avatar runs/a runs/b                         # two avatars (the same split), a row each

The held-out frames that train.py recorded (<run>/split.json) are rendered from their tracked FLAME
parameters, with sample.py's sampler flags, and compared with the real face crops (<run>/tracking/
crops.npy, made at the avatar's resolution, so no resizing): PSNR, SSIM, LPIPS, FID, KID and flicker
(model/metrics.py says what each means). --video tracks another video of the person through the avatar's
camera (its identity shape and focal length held fixed; into <run>/eval/<video name>/) and scores every
frame of it the same way. --vary NAME=V1,V2 scores every combination of the values of sampler flags (any
flag sample.py takes, without its --; "default" is the flag's default), one row each. Frames are rendered,
scored and dropped chunk by chunk (memory flat in the take's length), and kept in a cache (<run>/eval/
renders/): a setting already scored is not rendered again, so adding a row costs one row.

Writes --out (default <run>/eval.json: per row the settings and, per source, the frames, every metric and
the rendering time per frame) and beside it: the table as Markdown (.md), a PNG of a few frames per source
(real, then render | absolute difference of each row) and a plot of the per-frame PSNR, LPIPS and flicker
(-plot.png). The metric networks run in float32 whatever --dtype (the sampler's). LPIPS, FID and KID need
weights brought by the user (see README); without them they are reported missing, naming the file.
"""
import argparse
import copy
import dataclasses
import itertools
import os

import numpy as np
import torch
from PIL import Image

import svp
from cli import (ArgumentParser, add_sampler_args, default_dtype, existing_file, output_dir_problem,
                 output_file_problem, positive_int, run_command, video_settings)
from model.avatar import fingerprint
from model.evaluation import Source, file_hash, markdown_table, plot, score_source, strip, strip_picks, text_table
from model.files import atomic_write, write_json
from model.metrics import FrameScores, load_inception, load_lpips
from tracking.people import left_out_frames
from tracking.pipeline import track_video

# flags that change the loaded avatar (the others only how it samples)
LOADING = ("base", "flame", "device", "dtype", "tokenizer", "lora", "decoder")


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--avatar", required=True, nargs="+", action="extend", metavar="RUN", help="run folder(s) of "
                   "`python train.py` (avatar.safetensors, split.json); several: one row each (the same split)")
    p.add_argument("--vary", action="append", default=[], metavar="FLAG=V1,V2", help="a sampler flag's values "
                   "(any flag below without its --, e.g. temporal-strength=0,0.9; 'default': its default), one row "
                   "per combination of all --vary")
    p.add_argument("--out", default=None, help="the evaluation's JSON (default <first avatar>/eval.json); the table "
                   "(.md), the strip of frames (.png) and the plot (-plot.png) are written beside it")
    p.add_argument("--lpips", default=None, metavar="FILE/FOLDER", help="LPIPS weights: AlexNet's features "
                   "(alexnet-owt-7be5be79.pth) and the v0.1 heads (alex.pth), a folder holding both or one "
                   ".safetensors (without: LPIPS is reported missing)")
    p.add_argument("--inception", type=existing_file("Inception weights"), default=None, metavar="FILE",
                   help="FID's Inception v3, pt_inception-2015-12-05-6726825d.pth or .safetensors (without: FID "
                   "and KID are reported missing)")
    p.add_argument("--video", type=existing_file("video"), default=None, help="a held-out video of the same "
                   "person, scored too (tracked through the avatar's camera: its identity shape and focal)")
    p.add_argument("--max-frames", type=positive_int, default=None, help="the first N frames of each source only")
    p.add_argument("--metric-batch", type=positive_int, default=16, help="frames per batch of a metric network")
    add_sampler_args(p)
    args = p.parse_args(argv)
    for run in args.avatar:
        if not os.path.isfile(os.path.join(run, "avatar.safetensors")):
            p.error(f"argument --avatar: {run}: no avatar.safetensors here (the run folder of train.py)")
    if args.lpips is not None and not os.path.exists(args.lpips):
        p.error(f"argument --lpips: LPIPS weights {args.lpips} not found")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        p.error("evaluate.py runs as one process; under torchrun every process would evaluate it all")
    try:
        args.settings = settings_grid(args, args.vary)
    except ValueError as e:
        p.error(f"argument --vary: {e}")
    args.out = args.out or os.path.join(args.avatar[0], "eval.json")
    for what, path, extensions in outputs(args.out):
        problem = output_file_problem(path, what, extensions)
        if problem:
            p.error(f"argument --out: {problem}")
    for run in args.avatar:
        problem = output_dir_problem(os.path.join(run, "eval"))
        if problem:
            p.error(f"argument --avatar: its renders and tracking go into {run}/eval: {problem}")
    return args


def outputs(out: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """(what, path, extensions) of everything written: the JSON, and beside it the table, strip and plot."""
    stem = os.path.splitext(out)[0]
    return [("evaluation", out, (".json",)), ("table", stem + ".md", (".md",)), ("strip", stem + ".png", (".png",)),
            ("plot", stem + "-plot.png", (".png",))]


def sampler_flags() -> dict[str, argparse.Action]:
    """sample.py's sampler flags by name (without --): the ones --vary can vary."""
    parser = argparse.ArgumentParser(add_help=False)
    add_sampler_args(parser)
    return {flag[2:]: action for action in parser._actions for flag in action.option_strings if action.nargs != 0}


def settings_grid(args, varies: list[str]) -> list[tuple[dict, argparse.Namespace]]:
    """One (the varied flags' values as given, the flags with them set) per combination of the --vary values.
    A flag that is not a sampler flag or a value its flag refuses is a ValueError naming it."""
    flags, axes = sampler_flags(), []
    for text in varies:
        name, _, values = text.partition("=")
        if name not in flags:
            raise ValueError(f"{text}: {name!r} is not a sampler flag (one of: {', '.join(sorted(flags))})")
        if not values or name in (axis[0] for axis in axes):
            raise ValueError(f"{text}: wants {name}=V1,V2,... once")
        axes.append((name, [(v, flag_value(flags[name], name, v)) for v in values.split(",")]))
    grid = []
    for combination in itertools.product(*(values for _, values in axes)):
        setting = copy.copy(args)
        for (name, _), (_, value) in zip(axes, combination):
            setattr(setting, flags[name].dest, value)
        grid.append(({name: shown for (name, _), (shown, _) in zip(axes, combination)}, setting))
    return grid


def flag_value(action: argparse.Action, name: str, text: str):
    """`text` as the flag would parse it (argparse's type and choices checks); "default": its default."""
    if text == "default":
        return copy.copy(action.default)
    try:
        value = action.type(text) if action.type else text
    except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
        raise ValueError(f"{name}={text}: {e}") from None
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{name}={text}: not one of {', '.join(map(str, action.choices))}")
    return [value] if isinstance(action, argparse._AppendAction) else value


def same_splits(runs: list[str]) -> svp.Split:
    """The split every run holds out (avatars side by side score the same frames), else an error naming the two."""
    splits = [svp.load_split(run) for run in runs]
    for run, split in zip(runs[1:], splits[1:]):
        if (split.n_frames, split.held_out) != (splits[0].n_frames, splits[0].held_out):
            raise ValueError(f"{run} holds out {split.rule}, {runs[0]} {splits[0].rule}: avatars side by side must "
                             "hold out the same frames")
    return splits[0]


def held_out_source(avatar: svp.Avatar, split: svp.Split, max_frames: int | None) -> Source:
    """The run's held-out frames (the first max_frames) and its own tracking."""
    seq_path = avatar.run_file("seq")
    crops_path = os.path.join(os.path.dirname(seq_path), "crops.npy")
    seq, n_crops = svp.load_seq(seq_path), len(np.load(crops_path, mmap_mode="r"))
    for path, n in ((seq_path, seq.n_frames), (crops_path, n_crops)):
        if n != split.n_frames:
            raise ValueError(f"{path} has {n} frames, but {os.path.join(avatar.run_dir, svp.SPLIT_FILE)} splits "
                             f"{split.n_frames}: the tracking changed after training")
    # Frames that show another person (the track's people.json) are left out, as training leaves them out.
    left_out = left_out_frames(os.path.dirname(seq_path))
    frames = [f for f in sorted(split.held_out) if f not in left_out][:max_frames]
    return Source("held-out", seq, seq_path, crops_path, frames,
                  {"truth": crops_path, "split": split.rule, "other_person": len(left_out & set(split.held_out))})


def video_source(avatar: svp.Avatar, video: str, max_frames: int | None) -> Source:
    """Another video of the person, tracked (cached in <run>/eval/<name>/) through the avatar's camera: its
    identity shape and focal length (the training tracking's, in pixels of the avatar's resolution)."""
    name = os.path.splitext(os.path.basename(video))[0]
    folder = os.path.join(avatar.run_dir, "eval", name)
    own = svp.load_seq(avatar.run_file("seq"))
    focal = own.focal * avatar.resolution / own.image_size[1]
    tracked = track_video(video, folder, avatar.flame, size=avatar.resolution, max_frames=max_frames,
                          shape=avatar.shape, focal=focal)
    left_out = left_out_frames(folder)  # another person's frames: not the avatar's to match
    return Source(os.path.basename(video), tracked.seq, os.path.join(folder, "seq.npz"),
                  os.path.join(folder, "crops.npy"), [f for f in range(tracked.seq.n_frames) if f not in left_out],
                  {"truth": os.path.join(folder, "crops.npy"), "tracking": folder, "other_person": len(left_out)})


def settings_record(args, avatar: svp.Avatar, device: str, dtype: str) -> dict:
    """The sampler settings of a row, as eval.json records them."""
    return {**dataclasses.asdict(video_settings(args)), "prompt": args.prompt or avatar.meta["prompt"],
            "negative_prompt": args.negative_prompt, "lora": [list(lora) for lora in args.lora],
            "decoder": args.decoder, "dtype": dtype, "device": device}


def render_identity(weights: str, avatar: svp.Avatar, settings: dict) -> dict:
    """What a render depends on besides its source (the render cache's key): the weights (`weights`: the hash
    of avatar.safetensors) and the settings."""
    record = {k: v for k, v in settings.items() if k != "cuda_graphs"}   # graphs replay the same arithmetic
    return {"avatar": weights, "base": avatar.meta["base_fingerprint"],
            "loras": [[fingerprint(path), scale] for path, scale in settings["lora"]],
            "decoder": settings["decoder"] and fingerprint(settings["decoder"]),
            **record, "device": torch.device(settings["device"]).type}


def score_row(run: str, avatar: svp.Avatar, sources: list[Source], args, varied: dict, nets, device, dtype,
              weights: str) -> tuple[dict, dict]:
    """Every source rendered with one setting and scored: a row of eval.json, and its strip frames per source."""
    label = " ".join([run] * (len(args.avatar) > 1) + [f"{k}={v}" for k, v in varied.items()])
    settings = settings_record(args, avatar, device, dtype)
    identity = render_identity(weights, avatar, settings)
    row = {"label": label or "default", "avatar": os.path.abspath(run), "step": avatar.meta["step"],
           "varied": varied, "settings": settings, "sources": []}
    picked = {}
    for source in sources:
        def render_chunks(frames, source=source):
            return avatar.render_chunks(source.seq, args.prompt, negative_prompt=args.negative_prompt, frames=frames,
                                        settings=video_settings(args), progress=False)
        scored = score_source(render_chunks, source, os.path.join(run, "eval", "renders"), identity,
                              FrameScores(*nets, device, args.metric_batch), f"{label}: " if label else "",
                              video_settings(args).batch_frames)
        picked[source.name] = scored.picked
        row["sources"].append({"name": source.name, **source.about, "frames": source.frames,
                               "metrics": scored.metrics, "seconds_per_frame": scored.seconds_per_frame,
                               "cached": scored.cached, "render": scored.render_file})
    return row, picked


def main(argv=None):
    args = parse_args(argv)
    device = str(svp.init_processes(args.device).device)  # as train.py and sample.py: cuda is cuda:N, made current
    split = same_splits(args.avatar)  # runs without a split, or with different ones, fail before anything loads
    # The metric networks in float32 whatever --dtype: the reference packages' numbers (fp16 moves them).
    nets = (load_lpips(args.lpips, device) if args.lpips else None,
            load_inception(args.inception, device) if args.inception else None)
    scored, real = {}, {}   # (avatar, setting) index -> (row, its strip frames); source name -> real strip frames
    for a, run in enumerate(args.avatar):
        weights = file_hash(os.path.join(run, "avatar.safetensors"))
        for group in loading_groups(args.settings):
            flags = group[0][2]
            row_device = flags.device or device
            dtype = default_dtype(flags, row_device)
            avatar = svp.load_avatar(run, base=flags.base, flame=flags.flame, device=row_device,
                                     dtype=dtype, tokenizer=flags.tokenizer, loras=flags.lora, decoder=flags.decoder)
            sources = [held_out_source(avatar, split, args.max_frames)]
            if args.video:
                sources.append(video_source(avatar, args.video, args.max_frames))
            for source in sources:
                source.check_size(avatar.resolution)
                real.setdefault(source.name, source.real([source.frames[p] for p in strip_picks(len(source.frames))]))
            for i, varied, setting in group:
                scored[a, i] = score_row(run, avatar, sources, setting, varied, nets, row_device, dtype, weights)
            del avatar   # before the next group's loads
    rows, renders = zip(*(scored[key] for key in sorted(scored)))
    write_report(args, list(rows), list(renders), real)


def loading_groups(settings: list[tuple[dict, argparse.Namespace]]) -> list[list[tuple[int, dict, argparse.Namespace]]]:
    """The settings grouped by the avatar they load (LOADING flags): one load per group."""
    groups = {}
    for i, (varied, setting) in enumerate(settings):
        groups.setdefault(tuple(str(getattr(setting, k)) for k in LOADING), []).append((i, varied, setting))
    return list(groups.values())


def write_report(args, rows: list[dict], renders: list[dict], real: dict):
    """The table printed; eval.json, eval.md, the strip and the plot written."""
    print(text_table(rows))
    (_, out, _), (_, md, _), (_, png, _), (_, plot_png, _) = outputs(args.out)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with atomic_write(png) as tmp:
        Image.fromarray(strip(real, renders)).save(tmp)
    plot(rows, plot_png)
    with atomic_write(md) as tmp, open(tmp, "w") as f:
        f.write(markdown_table(rows))
    write_json(out, {"rows": rows, "weights": {"lpips": args.lpips, "inception": args.inception},
                     "table": os.path.basename(md), "strip": os.path.basename(png), "plot": os.path.basename(plot_png)})
    print(f"wrote {out}, {md}, {png} and {plot_png}")


if __name__ == "__main__":
    run_command(main)
