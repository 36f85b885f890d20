"""CUDA graphs (model/graphs.py) on the CPU: the wrapper's logic with a stand-in for capture, the eager fallback,
and the --no-cuda-graphs / VideoSampling.cuda_graphs switch from sample.py down to the samplers.

No GPU here: `ReplayingCapture` plays a graph's part. Its "capture" runs the call once on the static inputs
and keeps the outputs; its replay runs the call again on the static inputs and writes the results into
those same output tensors, as a CUDA graph replays its kernels into fixed addresses. A GraphedCall that
did not copy new inputs into the static buffers would replay the old ones, and the tests below see it.
"""
import contextlib
import re
import types

import numpy as np
import pytest
import torch

import model.graphs
from model.graphs import GraphedCall, device_scalar, flat_tensors


class ReplayingCapture:
    log: list[str] = []  # every warm-up, capture and replay, of every instance (the samplers make their own)

    def accepts(self, tensors):
        return bool(tensors)

    def warm_up(self, run, device):
        self.log.append("warm_up")
        return run()

    def __call__(self, run, device):
        self.log.append("capture")
        outputs = run()

        def replay():
            self.log.append("replay")
            for static, new in zip(flat_tensors(outputs), flat_tensors(run())):
                static.copy_(new)
        return replay, outputs


@pytest.fixture
def stand_in(monkeypatch):
    """Every GraphedCall made without an explicit capture uses ReplayingCapture; yields its log."""
    ReplayingCapture.log = []
    monkeypatch.setattr(model.graphs, "CudaGraphCapture", ReplayingCapture)
    yield ReplayingCapture.log


def affine(x, y, scale):
    return x * scale + y, None, [x.sum()]


def inputs(seed, rows=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 3, generator=g), torch.randn(rows, 3, generator=g)


def assert_same(a, b):
    assert len(flat_tensors(a)) == len(flat_tensors(b))
    for x, y in zip(flat_tensors(a), flat_tensors(b)):
        assert torch.equal(x, y)


def test_first_call_warms_up_the_second_captures_later_ones_replay_new_inputs(stand_in):
    call = GraphedCall(affine)
    for seed in range(4):
        assert_same(call(*inputs(seed), 0.5), affine(*inputs(seed), 0.5))
    assert stand_in == ["warm_up", "capture", "replay", "replay", "replay"]
    out = call(*inputs(9), 0.5)
    assert out[1] is None and isinstance(out[2], list)  # the output's structure, Nones included, comes back


def test_each_shape_and_each_python_value_gets_its_own_graph(stand_in):
    call = GraphedCall(affine)
    for rows, scale in [(2, 0.5), (4, 0.5), (2, 2.0)] * 3:
        assert_same(call(*inputs(rows, rows), scale), affine(*inputs(rows, rows), scale))
    assert len(call.graphs) == 3 and stand_in.count("capture") == 3 and stand_in.count("warm_up") == 3


def test_outputs_are_copies_unless_the_call_site_uses_them_before_the_next_call(stand_in):
    kept = GraphedCall(affine)
    kept(*inputs(0), 1.0)
    first = kept(*inputs(1), 1.0)
    kept(*inputs(2), 1.0)
    assert_same(first, affine(*inputs(1), 1.0))  # a copy: the next replay did not overwrite it

    shared = GraphedCall(affine, clone_outputs=False)
    shared(*inputs(0), 1.0)
    first = shared(*inputs(1), 1.0)
    second = shared(*inputs(2), 1.0)
    assert first[0] is second[0]  # the graph's own output, overwritten by every replay
    assert_same(first, affine(*inputs(2), 1.0))


class CompilationError(Exception):
    """Like Triton's errors: not a RuntimeError."""


class FailingCapture(ReplayingCapture):
    def __call__(self, run, device):
        self.log.append("capture failed")
        raise CompilationError("at 12:4: operation not permitted when stream is capturing\nmore detail")


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(model.graphs, "_WARNED", set())


def test_a_failed_capture_runs_that_signature_eagerly_from_then_on_with_one_warning_line(stand_in, caplog,
                                                                                          fresh_warnings):
    call = GraphedCall(affine, capture=FailingCapture())
    with caplog.at_level("WARNING", "model.graphs"):
        for seed in range(4):
            assert_same(call(*inputs(seed), 1.0), affine(*inputs(seed), 1.0))
        assert_same(call(*inputs(0, rows=3), 1.0), affine(*inputs(0, rows=3), 1.0))  # another signature
        assert_same(call(*inputs(1, rows=3), 1.0), affine(*inputs(1, rows=3), 1.0))
    # one capture tried per signature, never again; the other calls run the function itself
    assert stand_in == ["warm_up", "capture failed", "warm_up", "capture failed"] and not call.graphs
    assert len(caplog.records) == 1 and "\n" not in caplog.text.strip()
    assert re.search(r"affine .*CompilationError.*not permitted.*--no-cuda-graphs", caplog.records[0].getMessage())
    GraphedCall(affine, capture=FailingCapture())(*inputs(0), 1.0)
    assert len(caplog.records) == 1  # once per process and callable: the next render's GraphedCall says nothing


def test_a_warm_up_counts_only_once_it_returned(stand_in):
    class RunsOutOfMemoryOnce(ReplayingCapture):
        failed = False

        def warm_up(self, run, device):
            if not self.failed:
                self.failed = True
                raise torch.OutOfMemoryError("CUDA out of memory")
            return super().warm_up(run, device)
    call = GraphedCall(affine, capture=RunsOutOfMemoryOnce())
    with pytest.raises(torch.OutOfMemoryError):
        call(*inputs(0), 1.0)
    assert not call.warm
    # the retry warms up again (lazy initialisation and autotuning outside a capture), then captures
    for seed in range(3):
        assert_same(call(*inputs(seed), 1.0), affine(*inputs(seed), 1.0))
    assert stand_in == ["warm_up", "capture", "replay", "replay"]


class FakeStream:
    """A pooled CUDA stream: PyTorch's pool hands out `POOL` distinct ones, round robin."""
    POOL = 4
    drawn = 0

    def __init__(self, device):
        self.device, self.cuda_stream = device, FakeStream.drawn % self.POOL
        FakeStream.drawn += 1


def test_each_capture_owner_gets_a_stream_no_live_owner_holds_and_gives_it_back(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    FakeStream.drawn = 0
    lender, gpu = model.graphs.SideStreams(), torch.device("cuda", 0)
    first, second = lender.lend(gpu), lender.lend(gpu)
    assert first.cuda_stream != second.cuda_stream
    lender.give_back(gpu, first)
    assert lender.lend(gpu) is first  # reused: the number of streams (and their workspaces) stays flat
    third = lender.lend(gpu)
    FakeStream.drawn = 0  # the pool comes round again to streams that live owners hold: skipped
    fourth = lender.lend(gpu)
    assert [s.cuda_stream for s in (first, second, third, fourth)] == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="lent out"):
        lender.lend(gpu)


def test_a_failed_cuda_capture_puts_the_caller_back_on_its_stream_and_frees_its_memory(monkeypatch):
    """CudaGraphCapture with torch.cuda faked: the call fails inside the capture, and the capture's end then
    fails too without leaving the capture stream (as torch.cuda.graph's exit does when capture_end raises)."""
    current, emptied = ["the caller's stream"], []

    class FailingGraph:
        def __init__(self, graph, pool, stream, capture_error_mode):
            self.stream = stream

        def __enter__(self):
            current[0] = self.stream

        def __exit__(self, *error):
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    def run():
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")
    for name, fake in (("graph", FailingGraph), ("device", lambda device: contextlib.nullcontext()),
                       ("current_stream", lambda device=None: current[0]),
                       ("set_stream", lambda stream: current.__setitem__(0, stream)), ("CUDAGraph", object),
                       ("graph_pool_handle", lambda: "pool"), ("empty_cache", lambda: emptied.append(True)),
                       ("Stream", FakeStream)):
        monkeypatch.setattr(torch.cuda, name, fake)
    monkeypatch.setattr(model.graphs, "SIDE_STREAMS", model.graphs.SideStreams())
    with pytest.raises(model.graphs.GraphCaptureError, match=r"^RuntimeError: CUDA error: operation not permitted"):
        model.graphs.CudaGraphCapture()(run, torch.device("cuda", 0))
    assert current == ["the caller's stream"] and emptied == [True]


def test_a_capture_owner_stays_on_its_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(model.graphs, "SIDE_STREAMS", model.graphs.SideStreams())
    capture = model.graphs.CudaGraphCapture()
    on = [types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", i)) for i in range(2)]
    with torch.no_grad():
        assert capture.accepts([on[0]]) and capture.accepts([on[1]])
        stream = capture._side_stream(on[1].device)
        assert capture._side_stream(on[1].device) is stream  # made once
        assert capture.accepts([on[1]]) and not capture.accepts([on[0]])  # another GPU: eager
    lent = set(model.graphs.SIDE_STREAMS.lent)
    del capture
    assert lent and not model.graphs.SIDE_STREAMS.lent  # given back with the owner


def test_cpu_tensors_and_disabled_graphs_run_the_call_itself():
    calls = []

    def spy(x, y, scale):
        calls.append(x)
        return affine(x, y, scale)
    on_the_cpu = GraphedCall(spy)  # the real CudaGraphCapture: CPU tensors are never captured
    for seed in range(3):
        x, y = inputs(seed)
        assert_same(on_the_cpu(x, y, 0.5), affine(x, y, 0.5))
        assert calls[-1] is x  # the caller's own tensor, no static copy
    assert len(calls) == 3 and not on_the_cpu.graphs and not on_the_cpu.warm

    ReplayingCapture.log = []
    off = GraphedCall(spy, enabled=False, capture=ReplayingCapture())
    for seed in range(3):
        assert_same(off(*inputs(seed), 0.5), affine(*inputs(seed), 0.5))
    assert ReplayingCapture.log == [] and not off.graphs


def test_the_cuda_capture_takes_inference_on_one_gpu_only():
    capture = model.graphs.CudaGraphCapture()
    x = torch.zeros(2)
    assert not capture.accepts([]) and not capture.accepts([x])
    with torch.no_grad():
        assert not capture.accepts([x])  # a CPU tensor


def test_device_scalar_keeps_the_numbers_type():
    assert device_scalar(981, "cpu").dtype == torch.int64 and device_scalar(981, "cpu").item() == 981
    assert device_scalar(999.5, "cpu").dtype == torch.float32 and device_scalar(999.5, "cpu").item() == 999.5
    assert device_scalar(3, "cpu").ndim == 0


# ----------------------------------------------------------------------------- the samplers

def test_render_and_stream_replay_the_model_and_decoder_and_equal_the_eager_run(untrained_avatar_run, stand_in,
                                                                              one_torch_thread):
    """Through the real avatar (UNet + ControlNet + VAE, guidance on): the graphed calls give the eager frames
    exactly, the model is captured once per chunk size (timesteps go in as tensors, not baked in), the stream
    once per tick size that recurs, and --no-cuda-graphs' setting captures nothing."""
    import svp
    avatar = svp.load_avatar(str(untrained_avatar_run))
    seq = svp.load_seq(str(untrained_avatar_run / "tracking" / "seq.npz"))
    settings = svp.VideoSampling(steps=3, guidance=3.0, batch_frames=4, seed=1)
    eager_settings = svp.VideoSampling(steps=3, guidance=3.0, batch_frames=4, seed=1, cuda_graphs=False)

    graphed, hints = avatar.render(seq, frames=range(6), settings=settings, progress=False)
    # model: chunks of 4 and 2 frames, 3 steps each (warm-up, capture + replay, replay); decode: once per chunk size
    assert stand_in.count("capture") == 2 and stand_in.count("replay") == 4 and stand_in.count("warm_up") == 4
    stand_in.clear()
    eager, _ = avatar.render(seq, frames=range(6), settings=eager_settings, progress=False)
    assert stand_in == [] and np.array_equal(graphed, eager)

    streamed = np.stack(list(avatar.stream(iter(hints), settings)))
    # ticks of 1, 2, 3, 3, 3, 3, 2, 1 frames: each size warms up, then captures + replays (1 and 2 in the
    # drain, 3 on its second tick, then replays twice); the decode of each of the 6 frames: warm-up,
    # capture + replay, then replays
    assert stand_in.count("capture") == 3 + 1 and stand_in.count("replay") == 1 + 1 + 3 + 5
    stand_in.clear()
    eager_stream = np.stack(list(avatar.stream(iter(hints), eager_settings)))
    assert stand_in == [] and np.array_equal(streamed, eager_stream)


@pytest.mark.parametrize("mode", ["--params", "--drive"])
def test_sample_py_no_cuda_graphs_reaches_the_samplers(untrained_avatar_run, stand_in, tmp_path, mode,
                                                       one_torch_thread):
    import sample
    from cli import video_settings
    seq = str(untrained_avatar_run / "tracking" / "seq.npz")
    common = [mode, seq, "--avatar", str(untrained_avatar_run), "--steps", "2", "--out", str(tmp_path / "a.mp4")]
    common += ["--frames", "0:4"] if mode == "--params" else ["--sampler", "lcm", "--guidance", "1"]
    assert video_settings(sample.parse_args(common)).cuda_graphs
    assert not video_settings(sample.parse_args(common + ["--no-cuda-graphs"])).cuda_graphs
    sample.main(common + ["--no-cuda-graphs"])
    assert stand_in == []
    sample.main(common)
    assert "capture" in stand_in


# ----------------------------------------------------------------------------- on a GPU (skipped here)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


@cuda
def test_a_real_graph_replays_the_eager_network_for_new_inputs():
    """A tiny SD-shaped UNet + ControlNet, fp16, guidance on: every replay gives what the eager call gives."""
    from model.avatar import Denoiser
    from model.config import TINY
    from model.controlnet import ControlNet
    from model.unet import UNet
    torch.manual_seed(0)
    unet = UNet(TINY.unet)
    denoiser = Denoiser(unet, ControlNet.from_unet(unet, 8)).to("cuda", torch.float16).eval()
    context, uncond = torch.randn(2, 1, 77, TINY.unet.context_dim, device="cuda", dtype=torch.float16)
    call = GraphedCall(denoiser.guided)
    with torch.no_grad():
        for step in range(4):
            x = torch.randn(3, 4, 8, 8, device="cuda", dtype=torch.float16)
            hint = torch.rand(3, 8, 64, 64, device="cuda", dtype=torch.float16)
            t = device_scalar(999 - 250 * step, "cuda")
            graphed, eager = call(x, t, context, uncond, hint, 1.0), denoiser.guided(x, t, context, uncond, hint, 1.0)
            for a, b in zip(graphed, eager):
                torch.testing.assert_close(a, b)
    assert len(call.graphs) == 1


@cuda
def test_render_and_stream_on_the_gpu_equal_their_eager_runs(untrained_avatar_run):
    import svp
    avatar = svp.load_avatar(str(untrained_avatar_run), device="cuda", dtype="fp16")
    seq = svp.load_seq(str(untrained_avatar_run / "tracking" / "seq.npz"))
    on = svp.VideoSampling(steps=4, guidance=3.0, batch_frames=4, seed=1)
    off = svp.VideoSampling(steps=4, guidance=3.0, batch_frames=4, seed=1, cuda_graphs=False)
    graphed, hints = avatar.render(seq, frames=range(10), settings=on, progress=False)
    eager, _ = avatar.render(seq, frames=range(10), settings=off, progress=False)
    assert np.abs(graphed.astype(int) - eager).max() <= 1
    streamed = np.stack(list(avatar.stream(iter(hints), on)))
    assert np.abs(streamed.astype(int) - np.stack(list(avatar.stream(iter(hints), off)))).max() <= 1
