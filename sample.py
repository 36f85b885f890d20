"""Sample a trained avatar as video, or plain Stable Diffusion as images.

Drive an avatar with a FLAME sequence (any seq.npz: the person's own, or another person's for re-enactment;
expression and pose come from the sequence, the identity shape from the avatar):
    python sample.py --avatar runs/me --params seq.npz --prompt "a photo of sks person" --out out.mp4
    python sample.py --params runs/me/tracking/seq.npz --prompt "..."     # the avatar of the run that tracked it
    python sample.py --avatar runs/me --params seq.npz --morph "Tom Cruise" --morph-weight 0.5 --out morph.mp4
    torchrun --nproc_per_node 4 sample.py --avatar runs/me --params seq.npz --out out.mp4   # frames split over GPUs
    (each process on its own GPU, cuda:LOCAL_RANK, as train.py; text to image and --drive run in one process)

Live: drive the avatar from a video (played at its own speed), a camera or a seq.npz, tracked frame by frame;
the mp4 is written as it goes (Ctrl-C stops it, playable), with the tracked FLAME sequence beside it
(live.mp4 -> live.seq.npz, for --params), --serve shows it at http://127.0.0.1:PORT/:
    python sample.py --avatar runs/me --drive talk.mp4 --sampler lcm --steps 4 --guidance 1 \
        --lora lcm-lora-sdv1-5.safetensors --out live.mp4 --serve 8000
    python sample.py --avatar runs/me --drive /dev/video0 --serve 8000

Text to image:
    python sample.py --ckpt SD.safetensors --prompt "a photo of an astronaut" --out img.png
"""
import argparse
import os

import numpy as np
from PIL import Image

import svp
from cli import (ArgumentParser, add_sampler_args, default_dtype, fraction, multiple_of_8, output_dir_problem,
                 output_file_problem, port, positive_int, run_command, video_settings)
from live.loop import drive, live_controls
from live.page import LivePage
from live.take import take_path
from model.files import atomic_write


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--avatar", help="run folder of `python train.py` (holds avatar.safetensors): video mode; "
                      "default: the run whose tracking/ holds --params")
    mode.add_argument("--ckpt", help="single-file .safetensors checkpoint or diffusers folder: text-to-image mode")
    p.add_argument("--out", default=None, help="output video (.mp4; default out.mp4) or image (.png/.jpg; default "
                   "sample.png); with --num-images N, files are named <stem>-<i><ext>")
    p.add_argument("--num-images", type=positive_int, default=1, help="text-to-image: images per prompt")
    video = add_sampler_args(p)
    video.add_argument("--params", help="FLAME sequence (seq.npz, see tracking/sequence.py) that drives the avatar")
    video.add_argument("--frames", type=parse_frames, default=None, help="a:b, only frames a..b-1")
    video.add_argument("--morph", default=None, help='morph toward "a photo of <MORPH>" (e.g. "Tom Cruise")')
    video.add_argument("--morph-weight", type=fraction, default=None, help="0 = the avatar, 1 = the --morph prompt "
                       "(default 0.5)")
    video.add_argument("--side-by-side", action="store_true", help="hint (3DMM rendering) | output in each frame")
    video.add_argument("--png-dir", default=None, help="also write every frame as a PNG here")
    live = p.add_argument_group("live avatar")
    live.add_argument("--drive", metavar="SOURCE", help="drive the avatar live: a video file (played at its fps; "
                      "frames it cannot keep up with are dropped), a camera (/dev/video0) or a seq.npz")
    live.add_argument("--serve", type=port, metavar="PORT", help="with --drive: show driving | avatar frames at "
                      "http://127.0.0.1:PORT/ while it runs (0: a free port, printed)")
    p.add_argument("--height", type=multiple_of_8, default=None, help="pixels; default: the family's native size")
    p.add_argument("--width", type=multiple_of_8, default=None)
    pred = p.add_mutually_exclusive_group()
    pred.add_argument("--v-prediction", dest="prediction_type", action="store_const", const="v_prediction",
                      help="the checkpoint predicts v (SD2-768); overrides detection")
    pred.add_argument("--epsilon", dest="prediction_type", action="store_const", const="epsilon",
                      help="the checkpoint predicts noise (SD1, SD2-512 base); overrides detection")
    args = p.parse_args(argv)
    for problem in input_problems(args):
        p.error(problem)
    # what a live run's page may change while it plays, starting from the flags
    args.controls = live_controls(video_settings(args), args.prompt, args.morph, args.morph_weight)
    args.page = None
    if args.serve is not None:  # bound now, so that a port in use is refused before the avatar loads
        try:
            args.page = LivePage(args.serve, args.controls)
        except OSError as error:
            p.error(f"argument --serve: cannot listen on 127.0.0.1:{args.serve} ({error.strerror})")
    return args


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


def input_problems(args) -> list[str]:
    """What is wrong with a combination of flags or an output path (checked before any work)."""
    problems = []
    if args.ckpt:
        if not args.prompt:
            problems.append("--prompt is required with --ckpt")
        problems += [f"{flag} drives an avatar; it does nothing with --ckpt" for flag, value in
                     (("--params", args.params), ("--morph", args.morph), ("--png-dir", args.png_dir),
                      ("--decoder", args.decoder)) if value]
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and (args.ckpt or args.drive):
        problems.append("under torchrun only --params' frames are split over processes; run text to image and "
                        "--drive as one process")
    if args.serve is not None and not args.drive:
        problems.append("--serve shows a live run: it needs --drive SOURCE")
    if args.drive and (args.params or args.frames):
        problems.append("--drive takes the place of --params and --frames")
    if args.morph_weight is not None and not args.morph:
        problems.append("--morph-weight needs --morph (the prompt to morph toward)")
    args.morph_weight = 0.5 if args.morph_weight is None else args.morph_weight
    args.out = args.out or ("sample.png" if args.ckpt else "out.mp4")
    what, extensions = ("image", IMAGE_EXTENSIONS) if args.ckpt else ("video", (".mp4",))
    outputs = (("--out", output_file_problem(args.out, what, extensions)),
               ("--out", args.drive and output_file_problem(take_path(args.out), "take", (".npz",))),
               ("--png-dir", args.png_dir and output_dir_problem(args.png_dir)))
    return problems + [f"argument {flag}: {problem}" for flag, problem in outputs if problem]


def parse_frames(text: str) -> range:
    try:
        a, b = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"wants a:b, got {text!r}") from None
    if not 0 <= a < b:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= a < b")
    return range(a, b)


def save_image(image: np.ndarray, path: str):
    with atomic_write(path) as tmp:
        Image.fromarray(image).save(tmp)


def text_to_image_main(args, device):
    sd = svp.load_stable_diffusion(args.ckpt, dtype=default_dtype(args, device), prediction_type=args.prediction_type,
                               tokenizer=args.tokenizer).to(device)
    svp.fuse_loras(sd, args.lora)
    images = svp.text_to_image(sd, args.prompt, args.negative_prompt, steps=args.steps or 30,
                           guidance=7.5 if args.guidance is None else args.guidance,
                           sampler=args.sampler or "dpmpp_2m", height=args.height, width=args.width,
                           seed=args.seed, num_images=args.num_images, eta=args.eta, cuda_graphs=args.cuda_graphs)
    out = args.out
    stem, ext = os.path.splitext(out)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    for i, image in enumerate(images):
        path = out if len(images) == 1 else f"{stem}-{i}{ext}"
        save_image(image.numpy(), path)
        print(f"wrote {path}")


def run_of(params: str | None) -> str:
    """The train.py run folder that tracked `params` (<run>/tracking/seq.npz): the default --avatar."""
    if params:
        run = os.path.dirname(os.path.dirname(os.path.abspath(params)))
        if os.path.isfile(os.path.join(run, "avatar.safetensors")):
            return run
    where = f" ({params} is not in the tracking/ folder of a trained run)" if params else ""
    raise ValueError(f"which avatar? pass --avatar RUN, the run folder of train.py{where}; or --ckpt for text to image")


def avatar_main(args):
    from tracking.video import write_video
    if not args.params:
        raise ValueError("--params seq.npz is required with --avatar")
    seq = svp.load_seq(args.params)
    frames = args.frames or range(seq.n_frames)
    if frames.stop > seq.n_frames:
        raise ValueError(f"--frames {frames.start}:{frames.stop}: {args.params} has {seq.n_frames} frames")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if len(frames) < world:  # before the processes meet: each would wait for the others
        raise ValueError(f"{len(frames)} frames cannot be split over {world} processes; use fewer processes")
    ranks = svp.init_processes(args.device)
    avatar = svp.load_avatar(args.avatar, base=args.base, flame=args.flame, device=ranks.device,
                             dtype=default_dtype(args, ranks.device), tokenizer=args.tokenizer, loras=args.lora,
                             decoder=args.decoder)
    images, hints = avatar.render(seq, args.prompt, args.morph, args.morph_weight, args.negative_prompt,
                                 ranks.share(frames), video_settings(args), progress=ranks.main)
    if args.side_by_side:
        normals = (hints[:, :3].permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
        images = np.concatenate([normals, images], axis=2)
    images = ranks.gather(images)
    if not ranks.main:
        return
    out = args.out
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_video(out, images, seq.fps)
    if args.png_dir:
        os.makedirs(args.png_dir, exist_ok=True)
        for i, image in zip(frames, images):
            save_image(image, os.path.join(args.png_dir, f"{i:05d}.png"))
    print(f"wrote {out} ({len(images)} frames)")


def live_main(args, device):
    """--drive: the avatar driven frame by frame (live/loop.py), written to --out as it goes, with its take."""
    avatar = svp.load_avatar(args.avatar, base=args.base, flame=args.flame, device=device,
                             dtype=default_dtype(args, device), tokenizer=args.tokenizer, loras=args.lora,
                             decoder=args.decoder)
    if args.page is not None:
        print(f"serving {args.page.start().url}", flush=True)

    def progress(frame, stats):
        if stats["frames"] % 10 == 1:
            print(f"frame {stats['frames']}: {stats['fps']:.1f} frames/s, latency {stats['latency_ms']['median']:.0f} ms, "
                  f"{stats['dropped']} dropped", flush=True)
    run = drive(avatar, args.drive, args.out, video_settings(args), args.controls, args.page, args.side_by_side,
                args.negative_prompt, on_frame=progress)
    how = "stopped by Ctrl-C; " if run.stopped else ""
    stages = ", ".join(f"{name} {ms:.0f}" for name, ms in run.stats["stages_ms"].items())
    print(f"wrote {args.out} and {run.take} ({how}{run.frames} frames in {run.seconds:.1f} s, "
          f"{run.frames / run.seconds:.1f} frames/s; {run.dropped} source frames dropped; latency median "
          f"{run.stats['latency_ms']['median']:.0f} ms, p90 {run.stats['latency_ms']['p90']:.0f} ms; "
          f"stage ms: {stages})")


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.ckpt:
            text_to_image_main(args, svp.init_processes(args.device).device)
        elif args.drive:
            args.avatar = args.avatar or run_of(args.drive if args.drive.endswith(".npz") else None)
            live_main(args, svp.init_processes(args.device).device)
        else:
            args.avatar = args.avatar or run_of(args.params)
            avatar_main(args)
    finally:
        svp.end_processes()


if __name__ == "__main__":
    run_command(main)
