"""The tracking command-line flags, shared by `python -m tracking` and train.py."""
import argparse

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
    p.add_argument("--flame", default=None, help="FLAME generic_model.pkl (its landmark embedding beside it); "
                   "default: the built-in toy head")
    p.add_argument("--bbox", type=parse_bbox, default=None, help="x0,y0,x1,y1 face box in the first frame "
                   "(default: detected)")
    p.add_argument("--max-frames", type=int, default=None, help="track only the first N frames")
    p.add_argument("--max-gap", type=int, default=DEFAULT_MAX_GAP,
                   help="longest run of frames without a face that is bridged by interpolation")
