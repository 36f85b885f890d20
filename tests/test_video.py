import os
import threading
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tracking.video import (
    VideoError,
    VideoNotFoundError,
    VideoWriter,
    crop_frames,
    iter_frames,
    paste_back,
    probe_video,
    read_video,
    smooth_crop_boxes,
    video_fps,
    write_video,
)


def moving_pattern(frames=12, height=48, width=64):
    """Smooth colour waves drifting over time: easy for a lossy codec, different in every frame."""
    t = np.arange(frames)[:, None, None]
    y = np.arange(height)[None, :, None]
    x = np.arange(width)[None, None, :]
    zero = np.zeros((frames, height, width))
    channels = [128 + 60 * np.sin(x / 8 + t / 3), 128 + 60 * np.cos(y / 6 - t / 4), 100 + 40 * np.sin((x + y) / 10 + t / 5)]
    return np.stack([c + zero for c in channels], -1).round().astype(np.uint8)


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / mse)


@pytest.mark.parametrize("fps", [25, Fraction(30000, 1001), 29.97, 12.5])
def test_write_read_round_trip(tmp_path, fps):
    frames = moving_pattern()
    path = tmp_path / "clip.mp4"
    write_video(path, frames, fps)
    decoded, rate = read_video(path)
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    assert rate == Fraction(fps).limit_denominator(1001) and isinstance(rate, Fraction)
    assert psnr(decoded, frames) > 30
    # Frames come back in order: each decoded frame is closest to its own original.
    errors = ((decoded[:, None].astype(float) - frames[None].astype(float)) ** 2).mean((2, 3, 4))
    assert (errors.argmin(1) == np.arange(len(frames))).all()
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.name == "h264"
        assert container.streams.video[0].format.name == "yuv420p"
    assert os.listdir(tmp_path) == ["clip.mp4"]


def test_streaming_reader_and_max_frames(tmp_path):
    frames = moving_pattern()
    path = tmp_path / "clip.mp4"
    write_video(path, iter(frames), 25)  # an iterator of frames streams into the encoder
    assert video_fps(path) == 25
    info = probe_video(path)
    assert (info.fps, info.frames, info.height, info.width) == (25, 12, 48, 64)
    first = list(iter_frames(path, max_frames=5))
    assert len(first) == 5 and first[0].shape == (48, 64, 3)
    decoded, _ = read_video(path, max_frames=3)
    assert decoded.shape[0] == 3 and psnr(decoded, frames[:3]) > 30
    with pytest.raises(ValueError, match="max_frames"):
        iter_frames(path, max_frames=0)


def test_reader_starts_late_prefetches_and_stops_early(tmp_path):
    frames = moving_pattern()
    path = tmp_path / "clip.mp4"
    write_video(path, frames, 25)
    decoded = np.stack(list(iter_frames(path, prefetch=0)))
    late = np.stack(list(iter_frames(path, max_frames=9, start=4)))  # frames 4..8
    assert np.array_equal(late, decoded[4:9])
    threads_before = set(threading.enumerate())  # other tests may leave threads (tqdm's monitor, ...)
    reader = iter_frames(path, prefetch=2)
    assert np.array_equal(next(reader), decoded[0])
    assert set(threading.enumerate()) - threads_before, "no decoding thread was started"
    reader.close()  # stops the decoding thread
    assert set(threading.enumerate()) <= threads_before


def test_video_writer_writes_frame_by_frame(tmp_path):
    """The incremental writer: nothing at the target until close(), which leaves a playable file;
    abort() or an error in its block leaves nothing."""
    frames = moving_pattern(5)
    path = tmp_path / "live.mp4"
    writer = VideoWriter(path, 25)
    for frame in frames:
        writer.write(frame)
    assert not path.exists()
    writer.close()
    decoded, rate = read_video(path)
    assert decoded.shape == frames.shape and rate == 25 and psnr(decoded, frames) > 30
    aborted = VideoWriter(tmp_path / "aborted.mp4", 25)
    aborted.write(frames[0])
    aborted.abort()
    with pytest.raises(ZeroDivisionError), VideoWriter(tmp_path / "failed.mp4", 25) as video:
        video.write(frames[0])
        1 / 0
    assert os.listdir(tmp_path) == ["live.mp4"]


def test_odd_sizes_are_padded_by_repeating_the_edge(tmp_path):
    frames = moving_pattern(4, 47, 63)
    path = tmp_path / "odd.mp4"
    write_video(path, frames, 10)
    decoded, _ = read_video(path)
    assert decoded.shape == (4, 48, 64, 3)
    assert psnr(decoded[:, :47, :63], frames) > 30
    assert psnr(decoded[:, 47, :63], frames[:, 46]) > 30


def test_failed_write_leaves_nothing_behind(tmp_path):
    path = tmp_path / "out.mp4"
    frames = moving_pattern(6)

    def broken_source():
        yield from frames[:3]
        raise RuntimeError("renderer crashed")

    with pytest.raises(RuntimeError, match="renderer crashed"):
        write_video(path, broken_source(), 25)
    assert os.listdir(tmp_path) == []
    # A failed overwrite keeps the previous complete video.
    write_video(path, frames, 25)
    before = path.read_bytes()
    with pytest.raises(VideoError, match="frame size changed"):
        write_video(path, [frames[0], frames[1, :40]], 25)
    with pytest.raises(VideoError, match="uint8"):
        write_video(path, frames.astype(np.float32), 25)
    with pytest.raises(VideoError, match="no frames"):
        write_video(path, [], 25)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["out.mp4"]
    with pytest.raises(VideoNotFoundError, match="output folder does not exist"):
        write_video(tmp_path / "no" / "out.mp4", frames, 25)


def _audio_file(path, with_video_stream):
    """A Matroska file with a short silent audio track and optionally an (empty) H.264 stream."""
    with av.open(str(path), "w", format="matroska") as container:
        if with_video_stream:
            video = container.add_stream("libx264", rate=25)
            video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(audio.encode(frame))
        container.mux(audio.encode())


def test_bad_inputs_raise_clear_errors(tmp_path):
    missing = tmp_path / "missing.mp4"
    with pytest.raises(VideoNotFoundError, match="missing.mp4: no such file") as error:
        read_video(missing)
    assert isinstance(error.value, FileNotFoundError) and isinstance(error.value, ValueError)
    with pytest.raises(VideoNotFoundError, match="is not a file"):
        iter_frames(tmp_path)

    text = tmp_path / "notes.mp4"
    text.write_text("not a video " * 100)
    with pytest.raises(VideoError, match="notes.mp4: not a readable video file"):
        read_video(text)

    write_video(tmp_path / "good.mp4", moving_pattern(), 25)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes((tmp_path / "good.mp4").read_bytes()[:300])
    with pytest.raises(VideoError, match="truncated.mp4"):
        read_video(truncated)

    audio = tmp_path / "audio.mkv"
    _audio_file(audio, with_video_stream=False)
    with pytest.raises(VideoError, match="audio.mkv: contains no video stream"):
        read_video(audio)
    empty = tmp_path / "empty.mkv"
    _audio_file(empty, with_video_stream=True)
    with pytest.raises(VideoError, match="empty.mkv: the video stream has no decodable frames"):
        read_video(empty)


def test_crop_boxes_are_square_smooth_and_inside():
    rng = np.random.default_rng(0)
    frames = 40
    centre = np.stack([np.linspace(60, 100, frames), np.full(frames, 70.0)], 1)
    jitter = rng.normal(0, 3, (frames, 2))
    faces = np.concatenate([centre + jitter - 20, centre + jitter + 20], 1)  # 40 px faces
    faces[7] = np.nan  # no detection in frame 7
    boxes = smooth_crop_boxes(faces, (120, 160), margin=1.5, sigma=3.0)
    side = boxes[:, 2] - boxes[:, 0]
    assert boxes.dtype == np.int64 and (side == boxes[:, 3] - boxes[:, 1]).all()
    assert (np.abs(side - 60) <= 1).all()
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 160).all() and (boxes[:, 3] <= 120).all()
    smoothed = (boxes[:, :2] + boxes[:, 2:]) / 2
    raw = centre + jitter
    # Smoothing removes most of the jitter and follows the motion without lag.
    assert np.abs(np.diff(smoothed[1:-1], axis=0)).std() < 0.5 * np.abs(np.diff(raw, axis=0)).std()
    assert np.abs(smoothed[5:-5] - centre[5:-5]).mean() < 1.5
    # Near the border the box shifts inside; a face bigger than the frame gives the largest square.
    edge = smooth_crop_boxes([[0, 0, 30, 30]], (120, 160), margin=2.0, sigma=0)
    np.testing.assert_array_equal(edge, [[0, 0, 60, 60]])
    huge = smooth_crop_boxes([[0, 0, 200, 200]], (120, 160), margin=1.0, sigma=0)
    np.testing.assert_array_equal(huge, [[40, 0, 160, 120]])
    with pytest.raises(ValueError, match="no frame has a face"):
        smooth_crop_boxes(np.full((3, 4), np.nan), (120, 160))


@pytest.mark.parametrize("side, size", [(249, 512), (720, 512), (333, 96), (512, 512 + 1)])
def test_crops_match_the_filter_on_floats_within_one_level(side, size):
    """The uint8 fixed-point resize against the same antialiased filter computed on floats and rounded
    once (the reference, and what the crops were before): never more than one level apart."""
    rng = np.random.default_rng(side)
    frame = rng.integers(0, 256, (side + 40, side + 60, 3), np.uint8)
    frame[:, : side // 2] = moving_pattern(1, side + 40, side // 2)[0]  # smooth and noisy halves
    box = np.array([30, 20, 30 + side, 20 + side])
    crop = crop_frames(frame[None], box[None], size)[0]
    planar = torch.from_numpy(frame[20:20 + side, 30:30 + side].copy()).permute(2, 0, 1)[None].float()
    reference = F.interpolate(planar, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    reference = reference[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    difference = np.abs(crop.astype(int) - reference)
    assert crop.shape == (size, size, 3) and difference.max() <= 1 and difference.mean() < 0.3


def test_crop_and_paste_back_round_trip():
    frame = moving_pattern(1, 120, 160)[0]
    box = np.array([30, 20, 130, 120])  # 100 x 100
    exact = crop_frames(frame[None], box[None], size=100)
    assert exact.shape == (1, 100, 100, 3)
    np.testing.assert_array_equal(exact[0], frame[20:120, 30:130])
    np.testing.assert_array_equal(paste_back(frame, exact[0], box), frame)

    small = crop_frames(frame[None], box[None], size=64)[0]
    restored = paste_back(np.zeros_like(frame), small, box)
    assert psnr(restored[20:120, 30:130], frame[20:120, 30:130]) > 30
    assert (restored[:20] == 0).all() and (restored[:, :30] == 0).all() and (restored[:, 130:] == 0).all()

    # Feathering keeps the frame at the box border and the crop in its middle.
    white = np.full((64, 64, 3), 255, np.uint8)
    blended = paste_back(np.zeros_like(frame), white, box, feather=10)
    assert blended[20, 30].max() < 20 and (blended[40:100, 50:110] == 255).all()
    assert 0 < blended[25, 80, 0] < 255
    with pytest.raises(ValueError, match="not inside"):
        paste_back(frame, white, [100, 20, 200, 120])


def test_writer_preset_reaches_the_encoder(tmp_path):
    # x264 writes its settings into the stream (an SEI message): veryfast searches subpixels at level 2,
    # the default (medium) at 7.
    for preset, subme in ((None, b"subme=7"), ("veryfast", b"subme=2")):
        path = tmp_path / f"{preset}.mp4"
        with VideoWriter(path, 25, preset=preset) as video:
            for frame in moving_pattern(4):
                video.write(frame)
        assert subme in path.read_bytes()
