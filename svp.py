"""svp's public API: the functions that train.py, sample.py and `python -m tracking` are shells around.

Example (runs offline in a few minutes on a CPU):

    import svp
    tracked = svp.track("demo", "runs/demo/tracking", size=128)   # offline demo video, toy head
    print(tracked.seq.n_frames, tracked.crops.shape)

    # after `python train.py --video demo --preset tiny --out runs/demo` (a few minutes on a CPU):
    avatar = svp.load_avatar("runs/demo")
    seq = svp.load_seq("runs/demo/tracking/seq.npz")             # or another person's, to re-enact
    frames, hints = avatar.render(seq, frames=range(8))          # uint8 (8, 64, 64, 3), temporally smooth
    morphed, _ = avatar.render(seq, frames=range(8), morph="Tom Cruise", morph_weight=0.5)
    print(svp.temporal_flicker(frames))

    sd = svp.load_stable_diffusion("v1-5-pruned-emaonly.safetensors")   # your own SD weights
    images = svp.text_to_image(sd, "a photo of an astronaut", steps=25)   # uint8 (1, 512, 512, 3)
"""
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from model.avatar import Denoiser, fingerprint, from_run, load_avatar_weights, read_avatar_meta
from model.controlnet import ControlNet
from model.files import read_json, write_json
from model.loading import CheckpointError, StableDiffusion, load_stable_diffusion
from model.lora import fuse_lora, load_lora
from model.metrics import temporal_flicker
from model.pipeline import encode_prompts, text_to_image
from model.sampling import SAMPLER_NAMES, NoiseSchedule
from model.taesd import TinyDecoder, load_tiny_decoder
from model.temporal import FrameSettings, VideoSampling, iter_sample_video, stream_video, warm_up_start
from model.vae import AutoencoderKL
from tracking.conditioning import render_conditioning
from tracking.pipeline import TrackedVideo, load_flame, track_video
from tracking.sequence import FlameSequence, load_seq

__all__ = ["load_stable_diffusion", "fuse_loras", "text_to_image", "SAMPLER_NAMES", "track", "load_avatar", "Avatar",
           "VideoSampling", "load_seq", "temporal_flicker", "init_processes", "end_processes", "Processes", "Split",
           "last_frames_split", "save_split", "load_split"]


def track(video: str, out_dir: str, flame: str | None = None, size: int = 512, max_frames: int | None = None,
          **options) -> TrackedVideo:
    """Track `video` (a path, or "demo" for the offline demo video of `max_frames` or 48 frames) into `out_dir`.

    flame: path of FLAME's generic_model.pkl (None: the built-in toy head); options: bbox, max_gap,
    preview, shape and focal (a fixed identity shape and camera; see tracking.pipeline.track_video). Returns the FLAME
    sequence and the face crops.
    """
    return track_video(video, out_dir, load_flame(flame), size=size, max_frames=max_frames, **options)


# ----------------------------------------------------------------------------- the held-out split

SPLIT_FILE = "split.json"


@dataclass(frozen=True)
class Split:
    """Which of a run's tracked frames train and which are held out for evaluation (<run>/split.json)."""
    n_frames: int
    held_out: tuple[int, ...]
    rule: str                 # how the held-out frames were chosen, in words

    @property
    def train(self) -> list[int]:
        held_out = set(self.held_out)
        return [i for i in range(self.n_frames) if i not in held_out]


def last_frames_split(n_frames: int, fraction: float) -> Split:
    """The last `fraction` of the frames held out (at least one). One stretch at the end: evaluation
    renders it as video (the temporal sampler needs each frame's predecessors), and no held-out frame
    has a near-copy a frame away in training, as every k-th frame would."""
    n_held_out = min(n_frames, max(1, round(n_frames * fraction)))
    return Split(n_frames, tuple(range(n_frames - n_held_out, n_frames)),
                 f"the last {n_held_out} of {n_frames} frames (train.py --val-fraction {fraction:g})")


def save_split(run_dir: str, split: Split):
    """Write <run_dir>/split.json, or check that the split there is this one (a resumed run keeps its split)."""
    path = os.path.join(run_dir, SPLIT_FILE)
    if os.path.exists(path):
        stored = load_split(run_dir)
        if (stored.n_frames, stored.held_out) != (split.n_frames, split.held_out):
            raise ValueError(f"{path} holds out {stored.rule}, this run would hold out {split.rule}; "
                             "use another --out")
        return
    write_json(path, {"n_frames": split.n_frames, "held_out": list(split.held_out), "rule": split.rule})


def load_split(run_dir: str) -> Split:
    """The held-out split train.py recorded in `run_dir`."""
    path = os.path.join(run_dir, SPLIT_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run_dir}: no {SPLIT_FILE} (trained before held-out splits were recorded); "
                                "rerun its train.py command with --resume to write it (it trains no further)")
    data = read_json(path)
    try:
        n, held_out, rule = int(data["n_frames"]), tuple(int(i) for i in data["held_out"]), str(data["rule"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a split file (wants n_frames, held_out, rule; {e!r})") from None
    if not held_out or not all(0 <= i < n for i in held_out) or len(set(held_out)) != len(held_out):
        raise ValueError(f"{path}: held_out must name distinct frames among its {n}")
    return Split(n, held_out, rule)


# ----------------------------------------------------------------------------- the avatar

@dataclass
class Avatar:
    """A trained avatar on its base model: render FLAME sequences as video of the person."""
    sd: StableDiffusion
    controlnet: ControlNet
    meta: dict              # the avatar's config (train.py's avatar_meta)
    flame: object           # tracking.flame.FLAME the avatar was trained with
    shape: np.ndarray       # the person's identity shape (tracked from the training video, stored in the avatar)
    run_dir: str = "."      # the run folder: the config's relative paths resolve against it
    tiny_decoder: TinyDecoder | None = None  # decodes frames in place of the base's VAE (sample.py --decoder)

    def run_file(self, key: str) -> str:
        """The path of a file the avatar's config names (`seq`, `base`, `flame`), wherever the run folder is now."""
        return from_run(self.meta[key], self.run_dir)

    @property
    def resolution(self) -> int:
        return int(self.meta["resolution"])

    def hints(self, seq: FlameSequence, frames: range) -> torch.Tensor:
        """Hint images (3DMM renderings) of `seq`: its expression and pose, the avatar's identity shape."""
        if seq.shape.shape != self.shape.shape:
            raise ValueError(f"the sequence has {len(seq.shape)} shape components, the avatar {len(self.shape)}")
        return render_conditioning(self.flame, seq, self.resolution, frames=slice(frames.start, frames.stop),
                                   shape=self.shape)

    def text_context(self, prompt: str | None, morph: str | None = None, morph_weight: float = 0.0):
        """The prompt's text embedding, blended toward "a photo of <morph>" by `morph_weight` (0..1).

        Why a blend of embeddings: the fine-tuned UNet still understands the text, so moving the
        conditioning part of the way to a celebrity's prompt moves the identity part of the way, every
        frame alike, with the geometry still set by the 3DMM rendering. No test-time fine-tuning.
        """
        context = encode_prompts(self.sd, [prompt or self.meta["prompt"]])
        if morph and morph_weight:
            if not 0.0 <= morph_weight <= 1.0:
                raise ValueError(f"--morph-weight must be in [0, 1], got {morph_weight}")
            target = encode_prompts(self.sd, [f"a photo of {morph}"])
            context = (1 - morph_weight) * context + morph_weight * target
        return context

    @property
    def decoder(self) -> AutoencoderKL | TinyDecoder:
        """What turns the UNet's latents into frames (`decode_latents`, `downscale`): the tiny decoder when
        one was loaded, else the base's VAE."""
        return self.sd.vae if self.tiny_decoder is None else self.tiny_decoder

    @property
    def denoiser(self) -> Denoiser:
        return Denoiser(self.sd.unet, self.controlnet)

    @torch.no_grad()
    def render(self, seq: FlameSequence, prompt: str | None = None, morph: str | None = None,
               morph_weight: float = 0.0, negative_prompt: str = "", frames: range | None = None,
               settings: VideoSampling | None = None, progress: bool = True) -> tuple[np.ndarray, torch.Tensor]:
        """Frames (T, H, W, 3) uint8 for `frames` of `seq` (default all), and their hint images (T, C, H, W):
        `render_chunks`' frames put together, the hint images kept as the sampler renders them."""
        rendered = []   # every chunk's hint images, as the sampler asks for them: warm-up frames first

        def hints_of(chunk: range) -> torch.Tensor:
            rendered.append(self.hints(seq, chunk))
            return rendered[-1]
        images = np.concatenate(list(self._sample(seq, hints_of, prompt, morph, morph_weight, negative_prompt,
                                                  frames, settings, progress)))
        return images, torch.cat(rendered)[-len(images):]

    @torch.no_grad()
    def render_chunks(self, seq: FlameSequence, prompt: str | None = None, morph: str | None = None,
                      morph_weight: float = 0.0, negative_prompt: str = "", frames: range | None = None,
                      settings: VideoSampling | None = None, progress: bool = True) -> Iterator[np.ndarray]:
        """`render`'s frames, `settings.batch_frames` at a time as they are done, each chunk's hint images
        rendered when it is denoised and dropped after: memory that does not grow with the frames (evaluate.py)."""
        return self._sample(seq, lambda chunk: self.hints(seq, chunk), prompt, morph, morph_weight, negative_prompt,
                            frames, settings, progress)

    def _sample(self, seq: FlameSequence, hints_of: Callable[[range], torch.Tensor], prompt, morph, morph_weight,
                negative_prompt, frames: range | None, settings: VideoSampling | None,
                progress: bool) -> Iterator[np.ndarray]:
        """The video sampler over `frames` of `seq` (model/temporal.iter_sample_video), from the first warm-up
        frame on; hints_of(range) -> those frames' hint images, asked once per chunk."""
        settings = settings or VideoSampling()
        frames = frames if frames is not None else range(seq.n_frames)
        if not (0 <= frames.start < frames.stop <= seq.n_frames):
            raise ValueError(f"frames {frames.start}:{frames.stop} are outside the sequence's 0:{seq.n_frames}")
        uncond_context = encode_prompts(self.sd, [negative_prompt]) if settings.guidance != 1.0 else None
        return iter_sample_video(self.denoiser, self.decoder, NoiseSchedule.from_config(self.sd.config), hints_of,
                                 (self.resolution, self.resolution), warm_up_start(frames.start, settings.weights),
                                 frames, self.text_context(prompt, morph, morph_weight), uncond_context, settings,
                                 progress)

    @torch.no_grad()
    def stream(self, inputs: Iterable, settings: VideoSampling | None = None, prompt: str | None = None,
               morph: str | None = None, morph_weight: float = 0.0, negative_prompt: str = "",
               frame_settings: Callable[[], FrameSettings] | None = None) -> Iterator[np.ndarray]:
        """Frames (H, W, 3) uint8 of a sequence that arrives piece by piece, as soon as each is done.

        inputs: FlameSequences (any number of frames each: live tracking yields one per video frame) or
        hint images (C, H, W), or None: no frame yet, the frames in flight advance a step anyway. Frame f
        leaves `settings.steps` ticks after it arrives (one tick per item, model/temporal.stream_latents):
        the frames are `render`'s for the whole sequence (up to rounding: each frame is decoded alone).
        frame_settings: asked as each frame arrives, its text embedding (`text_context`), temporal strength
        and conditioning scale (a live run's page controls; model/temporal.FrameSettings); None: the prompt's
        and `settings`' for every frame.
        """
        settings = settings or VideoSampling()
        context = self.text_context(prompt, morph, morph_weight) if frame_settings is None else None
        uncond_context = encode_prompts(self.sd, [negative_prompt]) if settings.guidance != 1.0 else None
        latent = self.resolution // self.decoder.downscale
        yield from stream_video(self.denoiser, self.decoder, NoiseSchedule.from_config(self.sd.config),
                                self._hint_frames(inputs), (latent, latent), context, uncond_context, settings,
                                frame_settings)

    def _hint_frames(self, inputs: Iterable) -> Iterator[torch.Tensor]:
        """One hint image per frame of `inputs` (see `stream`), rendered as each piece arrives."""
        for item in inputs:
            if isinstance(item, FlameSequence):
                yield from self.hints(item, range(item.n_frames))
            else:
                yield item


def load_avatar(run_dir: str, base: str | None = None, flame: str | None = None, device=None,
                dtype: str = "fp32", tokenizer: str | None = None, loras: Iterable[tuple[str, float]] = (),
                decoder: str | None = None) -> Avatar:
    """The avatar that `python train.py --out run_dir` wrote, on its base model.

    base: the base checkpoint (default: the one recorded at training time, found relative to the run
    folder when it lies inside it); it must be the same file (checked by fingerprint). flame: FLAME
    generic_model.pkl (default: the one recorded, else the toy head). The person's identity shape is
    stored in the avatar itself, so the run folder works from anywhere, moved or copied.
    loras: (file, scale) LoRAs fused into the base once the avatar is on it (e.g. LCM-LoRA for 4 steps).
    decoder: a tiny autoencoder decoder file (TAESD, model/taesd.py) that decodes the frames instead of
    the base's VAE; read first, so a bad file is reported before the base loads.
    """
    path = os.path.join(run_dir, "avatar.safetensors")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run_dir}: no avatar.safetensors here; train one with python train.py --out {run_dir}")
    meta = read_avatar_meta(path)
    if "identity_shape" not in meta:
        raise CheckpointError(f"{path}: written by an older train.py (no identity shape inside); train it again")
    base = base or from_run(meta["base"], run_dir)
    if not os.path.exists(base):
        raise FileNotFoundError(f"{path}: its base checkpoint {base} is missing; pass --base")
    if fingerprint(base) != meta["base_fingerprint"]:
        raise ValueError(f"{path} was trained on another base model than {base}")
    flame = flame or (meta["flame"] and from_run(meta["flame"], run_dir))
    if flame and not os.path.exists(flame):
        raise FileNotFoundError(f"{path}: its FLAME file {flame} is missing; pass --flame")
    tiny_decoder = load_tiny_decoder(decoder, device, dtype) if decoder else None
    sd = load_stable_diffusion(base, dtype=dtype, tokenizer=tokenizer).to(device)
    if tiny_decoder is not None:
        check_decoder_fits(decoder, tiny_decoder, sd)
    controlnet, meta = load_avatar_weights(path, sd)
    shape = np.asarray(meta["identity_shape"], np.float32)
    fuse_loras(sd, loras)
    return Avatar(sd, controlnet.eval(), meta, load_flame(flame), shape, run_dir, tiny_decoder)


def check_decoder_fits(path: str, tiny_decoder: TinyDecoder, sd: StableDiffusion):
    """A tiny decoder for another latent space (SD3/FLUX: 16 channels) or scale would fail mid-sampling."""
    theirs = (tiny_decoder.latent_channels, tiny_decoder.downscale)
    ours = (sd.config.unet.in_channels, sd.vae.downscale)
    if theirs != ours:
        raise CheckpointError(f"{path}: the tiny decoder takes {theirs[0]}-channel latents and upscales {theirs[1]}x; "
                              f"the avatar's base makes {ours[0]}-channel latents of {ours[1]}x (SD1/SD2: TAESD)")


def fuse_loras(sd: StableDiffusion, loras: Iterable[tuple[str, float]]) -> None:
    """Fuse LoRA files (file, scale), e.g. sample.py's --lora FILE[:SCALE], into sd's weights (model/lora.py)."""
    for path, scale in loras:
        fuse_lora(sd, load_lora(path), scale)


# ----------------------------------------------------------------------------- processes (torchrun)

@dataclass
class Processes:
    """This process's rank among `world` (torchrun), and its device."""
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def share(self, frames: range) -> range:
        """This process's contiguous share of `frames`; each share is exact on its own (the sampler's
        warm-up frames, model/temporal.py), so the shares put together are the whole."""
        bounds = [frames.start + len(frames) * r // self.world for r in range(self.world + 1)]
        return range(bounds[self.rank], bounds[self.rank + 1])

    def gather(self, images: np.ndarray) -> np.ndarray | None:
        """Every process's `images` (its `share`), concatenated in rank order on the main process; None on
        the others."""
        if self.world == 1:
            return images
        shares = [None] * self.world if self.main else None
        dist.gather_object(images, shares, dst=0)  # on NCCL, through this rank's current GPU
        return np.concatenate(shares) if self.main else None


def init_processes(device: str | None) -> Processes:
    """One process, or one of torchrun's (RANK/WORLD_SIZE set): nccl on CUDA, gloo on the CPU. What
    train.py, sample.py and evaluate.py start with.

    device: cuda, cuda:1, cpu (None: cuda when available). Under torchrun `cuda` is cuda:LOCAL_RANK, and
    it is made this process's current GPU: NCCL's collectives and Triton's launches go to the current
    GPU, and every rank left on GPU 0 would put all their work there ("Duplicate GPU detected")."""
    world, local_rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
        elif world > 1:
            raise ValueError(f"--device {device} under torchrun would put every process on one GPU; pass --device cuda "
                             "or none (each process takes cuda:LOCAL_RANK)")
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(int(os.environ.get("RANK", 0)), world, device)


def end_processes():
    """Leave torchrun's process group, if this process joined one (init_processes)."""
    if dist.is_initialized():
        dist.destroy_process_group()
