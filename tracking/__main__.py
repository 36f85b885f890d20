"""Track a video: python -m tracking VIDEO --out DIR [--flame generic_model.pkl]
Track live:    python -m tracking live SOURCE [--serve PORT] [--out FILE.mp4] [--flame generic_model.pkl]

Writes DIR/seq.npz (FLAME parameters per frame, schema in tracking/sequence.py), DIR/crops.npy,
DIR/landmarks.npy, DIR/preview.mp4 (the fitted mesh and landmarks over the face crops),
DIR/people.json and DIR/report.png (the shots, who each shows, the frames left out of training) and
DIR/source.json (what they were made from). VIDEO may be `demo` for a short offline demo video
(tracking/demo.py). Memory does not grow with the video's length; an interrupted track resumes when
the same command is run again; a rerun with other inputs tracks again.

`live` tracks a video file (played at its own frame rate: the frames the tracking cannot keep up with are
dropped and counted) or a camera (/dev/video0) frame by frame as it plays, with no avatar: the page
(--serve) shows the face crop beside the conditioning's normals over the face, so you can check the
tracking before you train, and --out records it, with the tracked FLAME sequence beside it (FILE.seq.npz,
for sample.py --params). The identity shape is FLAME's mean and the focal a generic one (live/loop.py).
(A video file named `live`: pass it as ./live.)
"""
import argparse
import logging
import os

import sys

from cli import (ArgumentParser, add_tracking_args, output_dir_problem, output_file_problem, port, positive_int,
                 run_command)
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


def parse_live_args(argv):
    p = ArgumentParser(prog="python -m tracking live", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a video file (played at its frame rate) or a camera (/dev/video0)")
    p.add_argument("--out", default=None, help="record: the mp4 (driving | conditioning) and FILE.seq.npz beside "
                   "it; default: nothing is written")
    p.add_argument("--serve", type=port, metavar="PORT", help="show it at http://127.0.0.1:PORT/ while it runs "
                   "(0: a free port, printed)")
    p.add_argument("--size", type=positive_int, default=512, help="side of the face crop and the conditioning image")
    p.add_argument("--serial", action="store_true", help="one frame through every stage before the next is "
                   "read (the loop without pipelining; to compare)")
    add_tracking_args(p, offline=False)
    args = p.parse_args(argv)
    from live.take import take_path
    for path, what, ending in ((args.out, "video", ".mp4"), (args.out and take_path(args.out), "take", ".npz")):
        problem = path and output_file_problem(path, what, (ending,))
        if problem:
            p.error(f"argument --out: {problem}")
    args.page = None
    if args.serve is not None:  # bound now: a port in use is refused before any work
        from live.page import LivePage
        try:
            args.page = LivePage(args.serve)
        except OSError as error:
            p.error(f"argument --serve: cannot listen on 127.0.0.1:{args.serve} ({error.strerror})")
    return args


def live_main(argv):
    from live.loop import track_live
    args = parse_live_args(argv)
    if args.page is not None:
        print(f"serving {args.page.start().url}", flush=True)

    def progress(frame, stats):
        if stats["frames"] % 30 == 1:
            print(f"frame {stats['frames']}: {stats['fps']:.1f} frames/s, {stats['dropped']} dropped", flush=True)
    run = track_live(args.source, load_flame(args.flame), args.size, args.out, args.page, args.max_gap,
                     args.max_frames, args.serial, progress)
    stages = ", ".join(f"{name} {ms:.1f}" for name, ms in run.stats["stages_ms"].items())
    wrote = f"wrote {args.out} and {run.take}; " if args.out else ""
    print(f"{wrote}{'stopped by Ctrl-C; ' if run.stopped else ''}{run.frames} frames in {run.seconds:.1f} s, "
          f"{run.frames / run.seconds:.1f} frames/s; {run.dropped} source frames dropped; latency median "
          f"{run.stats['latency_ms']['median']:.0f} ms, p90 {run.stats['latency_ms']['p90']:.0f} ms; "
          f"stage ms: {stages}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["live"]:
        return live_main(argv[1:])
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tracked = track_video(args.video, args.out, load_flame(args.flame), size=args.size, bbox=args.bbox,
                          max_frames=args.max_frames, max_gap=args.max_gap, preview=not args.no_preview,
                          person=args.person)
    print(f"tracked {tracked.seq.n_frames} frames -> {os.path.join(args.out, 'seq.npz')}")
    print("\n".join(report_lines(args.out)))


if __name__ == "__main__":
    run_command(main)
