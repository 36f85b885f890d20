"""Track a video: python -m tracking VIDEO --out DIR [--flame generic_model.pkl]

Writes DIR/seq.npz (FLAME parameters per frame, schema in tracking/sequence.py), DIR/crops.npy,
DIR/landmarks.npy, DIR/preview.mp4 (the fitted mesh and landmarks over the face crops) and
DIR/source.json (what they were made from). VIDEO may be `demo` for a short offline demo video
(tracking/demo.py). Memory does not grow with the video's length; an interrupted track resumes when
the same command is run again; a rerun with other inputs tracks again.
"""
import argparse
import logging
import os
import sys

from tracking.cli import add_tracking_args
from tracking.pipeline import load_flame, track_video


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
    tracked = track_video(args.video, args.out, load_flame(args.flame), size=args.size, bbox=args.bbox,
                          max_frames=args.max_frames, max_gap=args.max_gap, preview=not args.no_preview)
    print(f"tracked {tracked.seq.n_frames} frames -> {os.path.join(args.out, 'seq.npz')}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # every svp input error derives from these
        sys.exit(f"error: {e}")
