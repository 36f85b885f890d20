"""The command-line pieces the commands share (train.py, sample.py, evaluate.py, `python -m tracking`): the flag
types that check a value before any work starts, the checks of output paths, the one-line ending of a failed or
interrupted command, the tracking flags, and the sampler flags (sample.py's, which evaluate.py takes too: an
evaluation scores what sample.py makes with the same flags)."""
import argparse
import math
import os
import sys

from tracking.pipeline import DEFAULT_MAX_GAP


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (argparse's own prints the whole usage first)."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _checked(kind, text: str, ok, expected: str, out_of_range: str | None = None):
    """`text` read as `kind` (int, float) and kept if ok(value), else the flag's error: `expected` (what a
    value must be), or `out_of_range` for a number outside."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{expected}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{out_of_range or expected}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _checked(int, text, lambda v: v > 0, "must be a whole number > 0")


def non_negative_int(text: str) -> int:
    return _checked(int, text, lambda v: v >= 0, "must be a whole number >= 0")


def positive_float(text: str) -> float:
    return _checked(float, text, lambda v: 0 < v < float("inf"), "must be a number > 0")


def non_negative_float(text: str) -> float:
    return _checked(float, text, lambda v: 0 <= v < float("inf"), "must be a number >= 0")


def fraction(text: str) -> float:
    """A number in [0, 1]."""
    return _checked(float, text, lambda v: 0 <= v <= 1, "must be a number in [0, 1]", "must be in [0, 1]")


def multiple_of_8(text: str) -> int:
    """Pixels of an image the VAE encodes (it downsamples by 8)."""
    value = positive_int(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8, got {text}")
    return value


def port(text: str) -> int:
    """A TCP port to listen on; 0 lets the system pick a free one (the command prints which)."""
    return _checked(int, text, lambda v: 0 <= v <= 65535, "must be a port number 0-65535",
                    "must be a port number 0-65535 (0: any free port)")


def nonempty_text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def available_device(text: str) -> str:
    """cpu, cuda or cuda:N, available on this machine."""
    import torch
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text}: no CUDA GPU is available here (torch {torch.__version__}); "
                                             "use --device cpu")
        if (dev.index or 0) >= count:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {count} CUDA GPU(s)")
    elif dev.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text}: svp runs on cpu or cuda")
    return text


def existing_file(what: str):
    """A flag type: the path of an existing file, `what` naming it in the error."""
    def check(path: str) -> str:
        if not os.path.isfile(path):
            raise argparse.ArgumentTypeError(f"{what} {path} not found" if not os.path.exists(path)
                                             else f"{what} {path} is not a file")
        return path
    return check


def lora_file_and_scale(text: str) -> tuple[str, float]:
    """FILE[:SCALE] (sample.py's --lora) -> (an existing file, a finite scale; 1 without one). A name that
    is an existing file is the file, even with a ':' in it; otherwise the part after the last ':' is the scale."""
    if os.path.isfile(text):
        return text, 1.0
    path, colon, scale = text.rpartition(":")
    if not colon:
        return existing_file("LoRA file")(text), 1.0
    try:
        value = float(scale)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text}: the scale {scale!r} is not a finite number" if os.path.isfile(path)
                                         else f"{text}: no such LoRA file, and {scale!r} is not a scale (a number)")
    return existing_file("LoRA file")(path), value


def _writable_parent(path: str) -> str | None:
    """Why files cannot be created at `path` (its nearest existing ancestor is not a writable folder), or None."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"the folder {parent} is not writable"
    return None


def output_file_problem(path: str, what: str, extensions: tuple[str, ...]) -> str | None:
    """Why `path` cannot be written as the output file (`what`, ending in one of `extensions`), or None."""
    if os.path.isdir(path):
        return f"{path} is a folder; name the {what} file"
    if os.path.splitext(path)[1].lower() not in extensions:
        return f"{path}: the {what} file's name must end in {' or '.join(extensions)}"
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return f"{path} is not writable"
    why = _writable_parent(path)
    return f"cannot write {path}: {why}" if why else None


def output_dir_problem(path: str) -> str | None:
    """Why `path` cannot be (or become) a folder that outputs are written into, or None."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            return f"{path} is a file, not a folder"
        return None if os.access(path, os.W_OK | os.X_OK) else f"the folder {path} is not writable"
    why = _writable_parent(os.path.join(path, "x"))
    return f"cannot create {path}: {why}" if why else None


def run_command(main, interrupted: str = "interrupted"):
    """Run a command's main(): input and file-system errors end in one line `error: ...` (exit 1),
    Ctrl-C in one line (exit 130), never in a traceback."""
    try:
        main()
    except KeyboardInterrupt as e:
        print(str(e) or interrupted, file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError) as e:  # every svp input error derives from these (FileNotFoundError too)
        sys.exit(f"error: {e}")


def parse_bbox(text: str):
    try:
        x0, y0, x1, y1 = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"wants x0,y0,x1,y1 in pixels, got {text!r}") from None
    if x1 <= x0 or y1 <= y0:
        raise argparse.ArgumentTypeError(f"{text!r}: x1 must exceed x0 and y1 exceed y0")
    return (x0, y0, x1, y1)


def add_tracking_args(p: argparse.ArgumentParser, offline: bool = True):
    """The tracking flags (offline: --bbox and --person too; live tracking finds the face itself and follows
    the first person it sees)."""
    p.add_argument("--flame", type=existing_file("FLAME file"), default=None,
                   help="FLAME generic_model.pkl (its landmark embedding beside it); default: the built-in toy head")
    if offline:
        p.add_argument("--bbox", type=parse_bbox, default=None, help="x0,y0,x1,y1 face box in the first frame "
                       "(default: detected)")
    p.add_argument("--max-frames", type=positive_int, default=None, help="track only the first N frames")
    p.add_argument("--max-gap", type=non_negative_int, default=DEFAULT_MAX_GAP,
                   help="longest run of frames without a face that is bridged by interpolation")
    if offline:
        p.add_argument("--person", type=non_negative_int, default=None, metavar="FRAME",
                       help="a frame that shows the person to track (default: the person seen on the most frames); "
                            "frames of anyone else are left out of training (see report.png beside seq.npz)")


def add_sampler_args(p: argparse.ArgumentParser):
    """The flags that say how a sample is made (sample.py, evaluate.py; `video_settings` reads them). Returns
    the "avatar video" group."""
    # imported here, not above: `python -m tracking` shares this module and loads no sampler
    from model.sampling import SAMPLER_NAMES
    from model.temporal import VideoSampling  # its class attributes are the video defaults
    p.add_argument("--prompt", type=nonempty_text, default=None,
                   help="text prompt (avatar default: its training caption)")
    p.add_argument("--negative-prompt", default="", help="what to steer away from (classifier-free guidance)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--steps", type=positive_int, default=None,
                   help=f"sampler steps (avatar default {VideoSampling.steps}; text to image 30)")
    p.add_argument("--guidance", type=non_negative_float, default=None, help="classifier-free guidance scale, "
                   f"1 = off (avatar default {VideoSampling.guidance:g}; text to image 7.5)")
    p.add_argument("--sampler", default=None, choices=SAMPLER_NAMES,
                   help=f"avatar default {VideoSampling.sampler}; text to image dpmpp_2m; few-step: lcm (with an "
                   "LCM-LoRA), euler_trailing (SD-Turbo-style bases)")
    p.add_argument("--eta", type=fraction, default=0.0, help="DDIM stochasticity (0 = deterministic, 1 = DDPM)")
    p.add_argument("--lora", action="append", type=lora_file_and_scale, default=[], metavar="FILE[:SCALE]",
                   help="a LoRA .safetensors fused into the base (repeatable; scale default 1), e.g. LCM-LoRA")
    p.add_argument("--dtype", default=None, choices=("fp32", "fp16", "bf16"),
                   help="weights and activations (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", type=available_device, default=None,
                   help="cuda, cuda:1, cpu (default: cuda when available; under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--tokenizer", default=None, help="CLIP vocabulary: a tokenizer/ folder, tokenizer.json, "
                   "vocab.json or bpe_simple_vocab_16e6.txt.gz (default: beside the checkpoint, or $SVP_TOKENIZER)")
    video = p.add_argument_group("avatar video")
    video.add_argument("--base", default=None, help="the avatar's base checkpoint, if it moved since training")
    video.add_argument("--flame", type=existing_file("FLAME file"), default=None,
                       help="FLAME generic_model.pkl, if it moved since training")
    video.add_argument("--temporal-strength", type=fraction, default=VideoSampling.temporal_strength,
                       help="pull of each frame toward the previous one while denoising (0 = independent frames)")
    video.add_argument("--temporal-fade", type=fraction, default=VideoSampling.temporal_fade,
                       help="fraction of the steps over which that pull fades to 0")
    video.add_argument("--batch-frames", type=positive_int, default=VideoSampling.batch_frames,
                       help="frames denoised together in lock-step")
    video.add_argument("--conditioning-scale", type=non_negative_float, default=VideoSampling.conditioning_scale,
                       help="strength of the 3DMM conditioning (multiplies the ControlNet's residuals)")
    video.add_argument("--decoder", type=existing_file("tiny decoder"), default=None, metavar="FILE",
                       help="decode frames with a tiny autoencoder decoder (TAESD: taesd_decoder.safetensors or .pth, "
                       "or diffusers' AutoencoderTiny weights) instead of the VAE: faster, less detail")
    video.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                       help="run every model call eagerly (default on CUDA: the calls whose shapes repeat, the model's "
                       "steps and the decode, replay CUDA graphs); to compare or debug")
    return video


def video_settings(args):
    """The sampler flags as model/temporal.VideoSampling (its defaults where a flag was not given)."""
    from model.temporal import VideoSampling
    return VideoSampling(steps=args.steps or VideoSampling.steps,
                         guidance=VideoSampling.guidance if args.guidance is None else args.guidance,
                         sampler=args.sampler or VideoSampling.sampler, eta=args.eta, seed=args.seed,
                         temporal_strength=args.temporal_strength, temporal_fade=args.temporal_fade,
                         batch_frames=args.batch_frames, conditioning_scale=args.conditioning_scale,
                         cuda_graphs=args.cuda_graphs)


def default_dtype(args, device) -> str:
    """--dtype, else the sampler's default on `device` (a torch.device or its name)."""
    return args.dtype or ("fp16" if str(device).startswith("cuda") else "fp32")
