"""Track a video: python -m tracking VIDEO --out DIR [--flame generic_model.pkl]

Writes DIR/seq.npz (FLAME parameters per frame, schema in tracking/sequence.py), DIR/crops.npy,
DIR/landmarks.npy, DIR/preview.mp4 (the fitted mesh and landmarks over the face crops),
DIR/people.json and DIR/report.png (the shots, who each shows, the frames left out of training) and
DIR/source.json (what they were made from). VIDEO may be `demo` for a short offline demo video
(tracking/demo.py). Memory does not grow with the video's length; an interrupted track resumes when
the same command is run again; a rerun with other inputs tracks again.
"""
import argparse
import logging
import os

from tracking.cli import ArgumentParser, add_tracking_args, output_dir_problem, positive_int, run_command
from tracking.people import report_lines
from tracking.pipeline import load_flame, track_video


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m tracking", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("video", help="input video (any format ffmpeg reads) or `demo`")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--size", type=positive_int, default=512, help="side of the square face crops in pixels")
    p.add_argument("--no-preview", action="store_true", help="skip preview.mp4")
    add_tracking_args(p)
    args = p.parse_args(argv)
    problem = output_dir_problem(args.out)
    if problem:
        p.error(f"argument --out: {problem}")
    return args


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tracked = track_video(args.video, args.out, load_flame(args.flame), size=args.size, bbox=args.bbox,
                          max_frames=args.max_frames, max_gap=args.max_gap, preview=not args.no_preview,
                          person=args.person)
    print(f"tracked {tracked.seq.n_frames} frames -> {os.path.join(args.out, 'seq.npz')}")
    print("\n".join(report_lines(args.out)))


if __name__ == "__main__":
    run_command(main)
