"""Person-specific fine-tuning: Stable Diffusion + a ControlNet on one person's tracked video.

    python train.py --video me.mp4 --base SD.safetensors --flame generic_model.pkl --out runs/me
    python train.py --video demo --preset tiny --out runs/demo        # offline, CPU, a few minutes

1. The video is tracked into <out>/tracking/ (FLAME sequence and face crops, re-used on rerun).
2. Each frame's hint (its FLAME conditioning image) is rendered once (<out>/cache/hints.npy, fp16, memory-mapped)
   and each crop encoded once by the VAE to the mean of its posterior (<out>/cache/latents.npy, fp16;
   the mean makes the cache independent of any seed). <out>/cache/meta.json says what the caches were
   built from; they are rebuilt when that differs from the current run.
3. The ControlNet (and, with --train, the UNet or its attention layers) learns the diffusion loss of
   the checkpoint's prediction type, captioned "a photo of <token> person". The LAST frames are held
   out (<out>/split.json, written before training: evaluate.py scores the avatar on them); their denoising
   loss at fixed timesteps and fixed noise is logged at step 0, every --val-every steps and at the end.
4. Outputs: <out>/avatar.safetensors (the trained weights only: `control_model.*` plus the trained
   `model.diffusion_model.*` UNet tensors; the metadata key `svp_avatar` holds a JSON config),
   <out>/previews/step_XXXXX.png (held-out hint | ground truth | sample), <out>/log.jsonl.

Randomness is a pure function of (seed, step): the data order is a seeded permutation per epoch and each
micro-batch's timesteps and noise come from a generator seeded with (seed, step, micro-batch, rank). So a
resumed run replays exactly what an uninterrupted one would have done. <out>/checkpoint.pt (torch.save,
read back with weights_only=True) holds the trainable weights, the
optimizer, the step and the global RNG states. Under torchrun every rank trains on its own shard of each
batch (DDP); rank 0 alone tracks, builds the caches and writes files.
"""
import argparse
import hashlib
import logging
import os
import re
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm.auto import tqdm

import svp
from cli import (ArgumentParser, add_tracking_args, available_device, fraction, multiple_of_8, non_negative_int,
                 nonempty_text, output_dir_problem, positive_float, positive_int, run_command)
from model.avatar import (Denoiser, build_denoiser, diffusion_loss, fingerprint, held_out_loss, run_relative,
                          save_avatar)
from model.config import config_to_dict
from model.files import (append_log, atomic_write, load_checkpoint, read_json, rng_state, run_lock,
                         save_checkpoint, set_rng_state, truncate_log, write_json)
from model.loading import DTYPES, StableDiffusion, write_tiny_base
from model.pipeline import encode_prompts
from model.sampling import NoiseSchedule
from model.temporal import sample_video
from tracking.conditioning import CONDITIONING_CHANNELS, render_conditioning
from tracking.people import left_out_frames
from tracking.pipeline import load_flame

log = logging.getLogger("train")

TRAIN_MODES = ("controlnet", "controlnet+unet", "controlnet+attn")
PRESETS = {  # defaults that --flags override
    "tiny": dict(resolution=64, max_steps=300, lr=1e-3, batch_size=4, val_every=50, preview_every=100,
                 save_every=100, preview_steps=10),
    "sd": dict(resolution=512, max_steps=3000, lr=1e-5, batch_size=4, val_every=250, preview_every=250,
               save_every=500, preview_steps=25),
}
TOKEN_WORD = r"\bsks\b"  # the identity token of the default caption, as a whole word ("tasks" stays)
# What a run is: --resume and a rerun into the same --out must agree on all of these.
IDENTITY_FIELDS = ("preset", "video", "controlnet", "train", "prompt", "resolution", "lr", "batch_size", "grad_accum", "seed",
                   "val_fraction", "max_frames", "conditioning_dropout")


def parse_args(argv=None) -> argparse.Namespace:
    """The run's settings: the flags, with --preset's defaults where a flag is not given. Every value is
    checked here, before any work starts."""
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--video", required=True, help="the person's video (mp4, ...) or `demo` for the offline demo")
    p.add_argument("--out", required=True, help="run folder: tracking, caches, checkpoint, avatar, previews, log")
    p.add_argument("--base", default=None, help="Stable Diffusion .safetensors or diffusers folder "
                   "(--preset tiny: default <out>/base.safetensors, a seeded random tiny model written once)")
    p.add_argument("--vae-steps", type=non_negative_int, default=300, help="--preset tiny without --base: steps "
                   "fitting the tiny model's VAE to the training frames (0 = a random VAE, whose samples show nothing)")
    p.add_argument("--preset", default="sd", choices=PRESETS, help="default settings: sd (512 px, real SD "
                   "weights) or tiny (64 px random model, runs on a CPU); --flags override them")
    p.add_argument("--controlnet", default=None, help="start the conditioning encoder from this ControlNet "
                   "(.safetensors, original or diffusers layout) instead of a copy of the UNet; its hint channels "
                   "must match ours")
    add_tracking_args(p)
    p.add_argument("--train", default="controlnet+unet", choices=TRAIN_MODES, help="what learns besides the "
                   "ControlNet: nothing, the whole UNet, or the UNet's attention layers (attn1/attn2)")
    p.add_argument("--prompt", type=nonempty_text, default="a photo of sks person", help="training caption")
    p.add_argument("--token", type=nonempty_text, default=None, help="identity token replacing the word `sks` "
                   "in --prompt")
    p.add_argument("--resolution", type=multiple_of_8, help="side of the square face crops in pixels")
    p.add_argument("--max-steps", type=positive_int, help="optimizer steps in total (a resumed run counts from 0 too)")
    p.add_argument("--lr", type=positive_float, help="AdamW learning rate (constant)")
    p.add_argument("--batch-size", type=positive_int, help="frames per micro-batch on each process")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--val-fraction", type=fraction, default=0.1, help="share of frames held out (the last ones; "
                   "at least one)")
    p.add_argument("--val-every", type=positive_int, help="steps between held-out losses")
    p.add_argument("--preview-every", type=positive_int, help="steps between preview images")
    p.add_argument("--preview-steps", type=positive_int, help="DDIM steps of a preview sample")
    p.add_argument("--save-every", type=positive_int, help="steps between checkpoints")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--conditioning-dropout", type=fraction, default=0.0,
                   help="probability of a zeroed conditioning image (for guidance on the conditioning)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="autocast dtype (weights stay fp32); default bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--device", type=available_device, default=None, help="cuda, cuda:1, cpu (default: cuda when "
                   "available; under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the "
                   "backward pass (less memory, about 30%% slower)")
    p.add_argument("--tokenizer", default=None, help="CLIP vocabulary (see sample.py --tokenizer)")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None,
                   help="override the checkpoint's detected prediction type")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: SIGKILL itself
    args = vars(p.parse_args(argv))
    for key, value in PRESETS[args["preset"]].items():
        args[key] = value if args.get(key) is None else args[key]
    if args["val_fraction"] >= 1:
        p.error("argument --val-fraction: must be below 1 (the frames that are not held out train)")
    if args["preset"] == "sd" and args["base"] is None:
        p.error("--base is required (a Stable Diffusion checkpoint), unless --preset tiny")
    for flag in ("base", "controlnet", "tokenizer"):
        if args[flag] is not None and not os.path.exists(args[flag]):
            p.error(f"argument --{flag}: {args[flag]} not found")
    token = args.pop("token")
    if token:
        if not re.search(TOKEN_WORD, args["prompt"]):
            p.error(f"argument --token: it replaces the word 'sks' in --prompt, and {args['prompt']!r} has none")
        args["prompt"] = re.sub(TOKEN_WORD, lambda _: token, args["prompt"])
    if args["video"] != "demo" and not os.path.isfile(args["video"]):
        p.error(f"argument --video: {args['video']}: no such video file")
    problem = output_dir_problem(args["out"])
    if problem:
        p.error(f"argument --out: {problem}")
    return argparse.Namespace(**args)


# ----------------------------------------------------------------------------- base model and run identity

def load_base(cfg: argparse.Namespace, ranks: svp.Processes) -> tuple[StableDiffusion, str]:
    """The base checkpoint; for --preset tiny without --base, a tiny model written once into <out>,
    its VAE fitted to the training frames (so the video is tracked first)."""
    base = cfg.base or os.path.join(cfg.out, "base.safetensors")
    if cfg.base is None and ranks.main and not os.path.exists(base):
        crops = track(cfg).crops
        write_tiny_base(base, cfg.seed, crops[split_of(cfg, len(crops)).train], cfg.vae_steps)
    ranks.barrier()
    sd = svp.load_stable_diffusion(base, prediction_type=cfg.prediction_type, tokenizer=cfg.tokenizer)
    return sd.to(ranks.device), base


def run_identity(cfg: argparse.Namespace, sd: StableDiffusion, base: str, ranks: svp.Processes) -> dict:
    return {**{k: getattr(cfg, k) for k in IDENTITY_FIELDS}, "base_fingerprint": fingerprint(base),
            "family": sd.config.name, "prediction_type": sd.config.prediction_type, "world_size": ranks.world}


def check_same_run(stored: dict, current: dict, where: str):
    diffs = [f"{k}: {stored.get(k)!r} there, {current[k]!r} now" for k in current if stored.get(k) != current[k]]
    if diffs:
        what = "another base model" if "base_fingerprint" in " ".join(diffs) else "other settings"
        raise ValueError(f"{where} holds a run with {what} ({'; '.join(diffs)}); use another --out")


def check_out_dir(cfg: argparse.Namespace, identity: dict):
    """Refuse an --out that holds another run (<out>/run.json is written beside every checkpoint)."""
    run_file = os.path.join(cfg.out, "run.json")
    if os.path.exists(run_file):
        check_same_run(read_json(run_file), identity, cfg.out)
        if not cfg.resume and os.path.exists(os.path.join(cfg.out, "checkpoint.pt")):
            raise ValueError(f"{cfg.out} already holds this run's checkpoint; pass --resume to continue it, "
                             "or use another --out")


# ----------------------------------------------------------------------------- data

@dataclass
class FrameData:
    latents: torch.Tensor    # (T, 4, h, w) float32, the VAE posterior means, scaled
    hints: np.ndarray        # (T, C, S, S) float16 hint images (memory-mapped)
    crops: np.ndarray        # (T, S, S, 3) uint8
    split: svp.Split         # which frames train, which are held out
    seq_path: str

    def hint_batch(self, idx, device) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.hints[idx])).to(device, torch.float32)


def track(cfg: argparse.Namespace) -> svp.TrackedVideo:
    """<out>/tracking at --resolution (a cache made with other inputs is tracked again: tracking/pipeline.py)."""
    return svp.track(cfg.video, os.path.join(cfg.out, "tracking"), cfg.flame, size=cfg.resolution,
                     max_frames=cfg.max_frames, bbox=cfg.bbox, max_gap=cfg.max_gap, person=cfg.person)


def build_caches(cfg: argparse.Namespace, sd: StableDiffusion, flame, tracked, base: str, device):
    """Render the hints and encode the latents, unless <out>/cache already holds them."""
    folder = os.path.join(cfg.out, "cache")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(cfg.out, "tracking", "seq.npz"), "rb") as f:
        key = {"base": fingerprint(base), "resolution": cfg.resolution,
               "seq_sha256": hashlib.sha256(f.read()).hexdigest()}
    paths = {name: os.path.join(folder, name) for name in ("hints.npy", "latents.npy", "meta.json")}
    if all(os.path.exists(path) for path in paths.values()) and read_json(paths["meta.json"]) == key:
        return
    n = tracked.seq.n_frames
    shape = (n, len(CONDITIONING_CHANNELS), cfg.resolution, cfg.resolution)
    latents = []
    with atomic_write(paths["hints.npy"]) as tmp:
        hints = np.lib.format.open_memmap(tmp, "w+", np.float16, shape)
        for start in tqdm(range(0, n, 8), desc="caching", leave=False):
            frames = slice(start, min(n, start + 8))
            hints[frames] = render_conditioning(flame, tracked.seq, cfg.resolution, frames=frames).numpy()
            crops = torch.from_numpy(np.array(tracked.crops[frames])).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
            with torch.no_grad():
                latents.append((sd.vae.encode(crops).mean * sd.config.vae.scale_factor).half().cpu().numpy())
        hints.flush()
        del hints
    with atomic_write(paths["latents.npy"]) as tmp:
        np.save(tmp, np.concatenate(latents))
    write_json(paths["meta.json"], key)  # last: it vouches for the two arrays


def split_of(cfg: argparse.Namespace, n: int) -> svp.Split:
    """The last --val-fraction of the n tracked frames (at least one) are held out, the rest train."""
    split = svp.last_frames_split(n, cfg.val_fraction)
    if not split.train:
        raise ValueError(f"{cfg.video}: {n} tracked frames leave none for training after holding out {n}")
    return split


def training_frames(cfg: argparse.Namespace, split: svp.Split, say: bool = True) -> list[int]:
    """The split's training frames less those of another person (the track's people.json); `say`: log how
    many train and where the track's report is."""
    track_dir = os.path.join(cfg.out, "tracking")
    left_out = left_out_frames(track_dir)
    frames = [f for f in split.train if f not in left_out]
    if not frames:
        raise ValueError(f"{cfg.video}: no frame of the main person is left to train on; see {track_dir}/report.png")
    if say:
        log.info("training on %d of %d tracked frames (%d held out, %d of another person left out); "
                 "the track's report: %s", len(frames), split.n_frames, len(split.held_out),
                 len(split.train) - len(frames), os.path.join(track_dir, "report.png"))
    return frames


def prepare_data(cfg: argparse.Namespace, sd: StableDiffusion, base: str, ranks: svp.Processes, flame) -> FrameData:
    """Track, cache and record the split (<out>/split.json) on rank 0; the other ranks wait, then read the
    same files."""
    if ranks.main:
        tracked = track(cfg)
        build_caches(cfg, sd, flame, tracked, base, ranks.device)
        svp.save_split(cfg.out, split_of(cfg, tracked.seq.n_frames))
    ranks.barrier()
    folder = os.path.join(cfg.out, "cache")
    latents = torch.from_numpy(np.load(os.path.join(folder, "latents.npy"))).float()
    return FrameData(latents, np.load(os.path.join(folder, "hints.npy"), mmap_mode="r"), track(cfg).crops,
                     svp.load_split(cfg.out), os.path.join(cfg.out, "tracking", "seq.npz"))


def epoch_order(n: int, epoch: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def batch_indices(step: int, micro: int, cfg: argparse.Namespace, ranks: svp.Processes,
                  train_frames: list[int]) -> list[int]:
    """This rank's frames of a micro-batch: a stateless walk through seeded per-epoch permutations of the
    training frames (the held-out ones are never drawn).

    The global batch (world x batch_size frames) is cut into one contiguous share per rank, like
    DistributedSampler, and the position in the stream depends only on (step, micro-batch).
    """
    start = ((step * cfg.grad_accum + micro) * ranks.world + ranks.rank) * cfg.batch_size
    positions, n = range(start, start + cfg.batch_size), len(train_frames)
    return [train_frames[int(epoch_order(n, p // n, cfg.seed)[p % n])] for p in positions]


def step_generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(keys)).generate_state(1)[0]))


# ----------------------------------------------------------------------------- outputs

def avatar_meta(cfg: argparse.Namespace, sd: StableDiffusion, identity: dict, base: str, data: FrameData, step: int) -> dict:
    """The avatar's config; its paths are relative to the run folder when inside it, so the folder can move."""
    def stored(path):
        return path and run_relative(path, cfg.out)
    return {"base": stored(base), "base_fingerprint": identity["base_fingerprint"],
            "family": config_to_dict(sd.config), "prompt": cfg.prompt, "hint_channels": data.hints.shape[1],
            "resolution": cfg.resolution, "train": cfg.train, "seq": stored(data.seq_path),
            "identity_shape": svp.load_seq(data.seq_path).shape.tolist(), "flame": stored(cfg.flame), "step": step}


def save_preview(path: str, sd: StableDiffusion, denoiser: Denoiser, data: FrameData, context, steps: int, seed: int):
    """Held-out hint (its normals as colours) | ground truth | a DDIM sample (no guidance): the video sampler
    on that one frame."""
    frame = data.split.held_out[0]
    settings = svp.VideoSampling(steps=steps, guidance=1.0, sampler="ddim", seed=seed, temporal_strength=0.0)
    denoiser.eval()
    image = sample_video(denoiser, sd.vae, NoiseSchedule.from_config(sd.config), data.hint_batch([frame], context.device),
                         range(frame, frame + 1), context, settings=settings, progress=False)[0]
    denoiser.train()
    normals = (data.hints[frame][:3].transpose(1, 2, 0).astype(np.float32) * 255).round().astype(np.uint8)
    from PIL import Image
    with atomic_write(path) as tmp:
        Image.fromarray(np.concatenate([normals, data.crops[frame], image], axis=1)).save(tmp)


# ----------------------------------------------------------------------------- training

def autocast_for(cfg: argparse.Namespace, device: torch.device):
    dtype = DTYPES[cfg.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if dtype == torch.float32:
        return nullcontext, None
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


class TrainingInterrupted(KeyboardInterrupt):
    pass


def train(cfg: argparse.Namespace) -> Denoiser:
    ranks = svp.init_processes(cfg.device)
    with run_lock(cfg.out) if ranks.main else nullcontext():  # rank 0 writes for all ranks
        return train_locked(cfg, ranks)


def train_locked(cfg: argparse.Namespace, ranks: svp.Processes) -> Denoiser:
    os.makedirs(os.path.join(cfg.out, "previews"), exist_ok=True)
    flame = load_flame(cfg.flame) if ranks.main else None  # rank 0 first: the toy head is written on first use
    sd, base = load_base(cfg, ranks)
    identity = run_identity(cfg, sd, base, ranks)
    check_out_dir(cfg, identity)
    data = prepare_data(cfg, sd, base, ranks, flame)
    device, schedule = ranks.device, NoiseSchedule.from_config(sd.config)
    context = encode_prompts(sd, [cfg.prompt])
    denoiser = build_denoiser(sd, cfg.train, data.hints.shape[1], cfg.gradient_checkpointing, cfg.seed, cfg.controlnet)
    params = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, fused=device.type == "cuda")
    autocast, scaler = autocast_for(cfg, device)
    model = nn.parallel.DistributedDataParallel(denoiser) if ranks.world > 1 else denoiser
    paths = {k: os.path.join(cfg.out, k) for k in ("checkpoint.pt", "log.jsonl", "avatar.safetensors")}

    step = 0
    if cfg.resume and os.path.exists(paths["checkpoint.pt"]):
        checkpoint = load_checkpoint(paths["checkpoint.pt"])
        check_same_run(checkpoint["identity"], identity, paths["checkpoint.pt"])
        denoiser.load_trainable_state(checkpoint["trainable"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scaler is not None:
            scaler.load_state_dict(checkpoint["scaler"])
        set_rng_state(checkpoint["rng"])
        step = checkpoint["step"]
        log.info("resuming at step %d", step)
    if ranks.main:
        truncate_log(paths["log.jsonl"], step)

    def validate(record):
        if ranks.main:
            record["val_loss"] = held_out_loss(denoiser, schedule, data, context, cfg.seed + 1, cfg.batch_size, autocast)
    if step == 0:
        record = {"step": 0}
        validate(record)
        if ranks.main:
            append_log(paths["log.jsonl"], record)

    train_frames = training_frames(cfg, data.split, say=ranks.main)
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not ranks.main, desc="training")
    try:
        while step < cfg.max_steps:
            started = time.perf_counter()
            loss = 0.0
            for micro in range(cfg.grad_accum):
                idx = batch_indices(step, micro, cfg, ranks, train_frames)
                generator = step_generator(cfg.seed, step, micro, ranks.rank)
                last = micro == cfg.grad_accum - 1
                with (model.no_sync() if ranks.world > 1 and not last else nullcontext()), autocast():
                    micro_loss = diffusion_loss(model, schedule, data.latents[idx].to(device),
                                                data.hint_batch(idx, device), context, generator,
                                                cfg.conditioning_dropout) / cfg.grad_accum
                (scaler.scale(micro_loss) if scaler else micro_loss).backward()
                loss += micro_loss.detach()
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ranks.world > 1:
                dist.all_reduce(loss, op=dist.ReduceOp.AVG)
            step += 1

            record = {"step": step, "loss": loss.item(), "lr": cfg.lr, "it_s": 1 / (time.perf_counter() - started)}
            if step % cfg.val_every == 0 or step == cfg.max_steps:
                validate(record)
            if ranks.main:
                append_log(paths["log.jsonl"], record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", **({"val": f"{record['val_loss']:.4f}"}
                                                                if "val_loss" in record else {}))
                if step % cfg.preview_every == 0 or step == cfg.max_steps:
                    save_preview(os.path.join(cfg.out, "previews", f"step_{step:05d}.png"), sd, denoiser, data,
                                 context, cfg.preview_steps, cfg.seed)
                if step % cfg.save_every == 0 or step == cfg.max_steps:
                    write_json(os.path.join(cfg.out, "run.json"), identity)
                    save_checkpoint(paths["checkpoint.pt"], {
                        "step": step, "identity": identity, "trainable": denoiser.trainable_state(),
                        "optimizer": optimizer.state_dict(), "rng": rng_state(),
                        **({"scaler": scaler.state_dict()} if scaler else {})})
            if step == cfg.stop_after:
                os.kill(os.getpid(), signal.SIGKILL)  # tests: an interruption without any clean-up
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback
        raise TrainingInterrupted(f"interrupted at step {step}; rerun with --resume to continue from the last "
                                  "checkpoint") from None
    finally:
        bar.close()
    if ranks.main:
        save_avatar(paths["avatar.safetensors"], denoiser, avatar_meta(cfg, sd, identity, base, data, step))
        log.info("wrote %s", paths["avatar.safetensors"])
    ranks.barrier()
    return denoiser


def main(argv=None) -> Denoiser:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = parse_args(argv)
    try:
        return train(cfg)
    finally:
        svp.end_processes()


if __name__ == "__main__":
    run_command(main, interrupted="interrupted; rerun with --resume to continue")
