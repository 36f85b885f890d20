"""Track a video: python -m tracking VIDEO --out DIR [--flame generic_model.pkl]

Writes DIR/seq.npz (FLAME parameters per frame, schema in tracking/fit.py), DIR/crops.npy,
DIR/landmarks.npy and DIR/preview.mp4 (the fitted mesh and landmarks over the face crops).
VIDEO may be `demo` for a short offline demo video (tracking/demo.py).
"""
import argparse
import logging
import os
import sys

from tracking.pipeline import DEFAULT_MAX_GAP


def parse_bbox(text: str):
    try:
        x0, y0, x1, y1 = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--bbox wants x0,y0,x1,y1 in pixels, got {text!r}") from None
    if x1 <= x0 or y1 <= y0:
        raise argparse.ArgumentTypeError(f"--bbox {text!r}: x1 must exceed x0 and y1 exceed y0")
    return (x0, y0, x1, y1)


def add_tracking_args(p: argparse.ArgumentParser):
    """The tracking flags, shared with train.py."""
    p.add_argument("--flame", default=None, help="FLAME generic_model.pkl (its landmark embedding beside it); "
                   "default: the built-in toy head")
    p.add_argument("--bbox", type=parse_bbox, default=None, help="x0,y0,x1,y1 face box in the first frame "
                   "(default: detected)")
    p.add_argument("--max-frames", type=int, default=None, help="track only the first N frames")
    p.add_argument("--max-gap", type=int, default=DEFAULT_MAX_GAP,
                   help="longest run of frames without a face that is bridged by interpolation")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tracking", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("video", help="input video (any format ffmpeg reads) or `demo`")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--size", type=int, default=512, help="side of the square face crops in pixels")
    p.add_argument("--no-preview", action="store_true", help="skip preview.mp4")
    add_tracking_args(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from svp import track
    tracked = track(args.video, args.out, args.flame, size=args.size, bbox=args.bbox, max_frames=args.max_frames,
                    max_gap=args.max_gap, preview=not args.no_preview)
    print(f"tracked {tracked.seq.n_frames} frames -> {os.path.join(args.out, 'seq.npz')}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # every svp input error derives from these
        sys.exit(f"error: {e}")
