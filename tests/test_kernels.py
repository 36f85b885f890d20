"""Triton kernels vs their PyTorch references: compiled on a CUDA machine, interpreted on the CPU.

Without CUDA the kernels run in the Triton interpreter (TRITON_INTERPRET=1), on CPU tensors. The
interpreter is chosen when @triton.jit decorates a function, and triton.language's own helpers (tl.sum,
tl.max, ...) are decorated when triton is first imported, so the variable must be set before that: at
the top of this file. `kernel_module` loads private copies of the kernel modules with the interpreter on
(the same source as the GPU path), in case another test file imported `kernels` compiled already.

The interpreter never runs Triton's compiler, so the `test_compile_*` tests compile every kernel for an
H100 (sm_90) without one. One process can hold triton in one mode only: whichever group of tests this
process cannot run, a `test_*_in_a_fresh_process` runs in a process of its own (e.g. when another test
file imported triton compiled before this file could set TRITON_INTERPRET).

Tolerances are relative, ||out - ref|| / ||ref||, against the reference evaluated in float64 on the same
(already rounded) inputs: 1e-5 for fp32, 2e-3 for fp16, 1e-2 for bf16. bf16 is only tested compiled:
the interpreter's bf16 tl.dot is broken (rel. error ~1e9), which says nothing about the real kernel.
"""
import contextlib
import importlib
import importlib.util
import itertools
import json
import os
import pathlib
import subprocess
import sys
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ON_GPU = torch.cuda.is_available()
if not ON_GPU and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton.language  # noqa: E402  (after TRITON_INTERPRET on purpose)
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
# tl.sum & co. are interpreted only if triton was first imported with TRITON_INTERPRET=1.
INTERPRETED = isinstance(triton.language.sum, InterpretedFunction)
needs_kernels = pytest.mark.skipif(not (ON_GPU or INTERPRETED), reason="triton was imported compiled and there is "
                                   "no GPU: test_kernels_in_a_fresh_process runs these tests")
compile_test = pytest.mark.skipif(ON_GPU or INTERPRETED, reason="the GPU runs the kernels for real" if ON_GPU else
                                  "triton is interpreted here: test_compilation_in_a_fresh_process runs these tests")
KERNELS_DIR = pathlib.Path(__file__).resolve().parents[1] / "kernels"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])


def load_private_copy(name: str, interpret: bool):
    """A fresh copy of kernels/<name>.py whose kernels are decorated interpreted or compiled, whichever way
    the package's own `kernels.<name>` was imported (by this or another test file)."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        spec = importlib.util.spec_from_file_location(f"kernels_{name}_interpret_{interpret}", KERNELS_DIR / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    return module


@pytest.fixture(scope="module")
def kernel_module():
    """name -> kernels/<name>.py: the package module on a GPU; without one, a private interpreted copy."""
    modules = {}

    def load(name):
        if ON_GPU:
            return importlib.import_module(f"kernels.{name}")
        if name not in modules:
            modules[name] = load_private_copy(name, interpret=True)
        return modules[name]

    return load


def run_in_fresh_process(selection: str, interpret: bool):
    env = dict(os.environ, TRITON_INTERPRET="1" if interpret else "0")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", selection, __file__],
                            env=env, capture_output=True, text=True, cwd=pathlib.Path(__file__).parents[1])
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]


@pytest.mark.skipif(ON_GPU or INTERPRETED, reason="the kernel tests run in this process")
def test_kernels_in_a_fresh_process():
    run_in_fresh_process("not test_compile_ and not fresh_process", interpret=True)


@pytest.mark.slow
@pytest.mark.skipif(ON_GPU or not INTERPRETED, reason="the compilation tests run in this process")
def test_compilation_in_a_fresh_process():
    run_in_fresh_process("test_compile_", interpret=False)


def relative_error(out, ref):
    assert torch.isfinite(out).all(), "kernel output has NaN/inf"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def assert_close(outs, refs, dtype):
    for name, out, ref in zip(("output", "grad 1", "grad 2", "grad 3"), outs, refs):
        assert out.dtype == dtype, f"{name}: dtype {out.dtype}"
        assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} vs {tuple(ref.shape)}"
        error = relative_error(out, ref)
        assert error <= TOLERANCE[dtype], f"{name}: relative error {error:.2e} > {TOLERANCE[dtype]:.0e}"


def forward_backward(fn, inputs, grad_out_seed=1):
    """fn(*inputs) and the gradients of <fn(*inputs), random> w.r.t. every input."""
    inputs = [t.detach().to(DEVICE).requires_grad_() for t in inputs]
    out = fn(*inputs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_out_seed)).to(out)
    return [out.detach(), *torch.autograd.grad(out, inputs, grad_out)]


@needs_kernels
@pytest.mark.skipif(ON_GPU, reason="compiled kernels on the GPU")
def test_kernels_are_interpreted(kernel_module):
    assert isinstance(kernel_module("attention")._attention_forward_kernel, InterpretedFunction)
    assert isinstance(kernel_module("groupnorm")._group_norm_forward_kernel, InterpretedFunction)
    assert isinstance(kernel_module("temporal")._temporal_step_kernel, InterpretedFunction)


# ----------------------------------------------------------------------------------------------------
# Attention


def small_attention_config(module, block_m=16, block_n=16):
    """Small tiles: the interpreter's cost grows with the tile, and ragged lengths need several tiles."""
    blocks = module.AttentionBlocks(block_m, block_n, num_warps=4, num_stages=1)
    return module.AttentionConfig(blocks, blocks)


def check_attention(module, q, k, v, causal, config):
    outs = forward_backward(lambda q, k, v: module.flash_attention(q, k, v, causal, config), [q, k, v])
    refs = forward_backward(lambda q, k, v: module.attention_reference(q, k, v, causal),
                            [t.detach().double() for t in (q, k, v)])
    assert_close(outs, refs, q.dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("len_q, len_k, head_dim, causal", [
    (24, 77, 40, False),  # SD1 cross-attention: 77 text tokens, head dim 40 in chunks of 32 + 16 lanes
    (40, 40, 80, False),  # self-attention, length not a multiple of the block, head dim 80 = 64 + 16
    (32, 32, 64, True),  # SD2 head dim (one chunk), causal (CLIP), exact blocks
    (21, 21, 40, True),  # causal with a ragged last block
    (20, 37, 40, True),  # causal with Lq != Lk: top-left aligned like SDPA, the last keys seen by no query
])
def test_attention_matches_reference(kernel_module, dtype, len_q, len_k, head_dim, causal):
    module = kernel_module("attention")
    gen = torch.Generator().manual_seed(len_q * 1000 + head_dim)
    q, k, v = (torch.randn(1, 2, n, head_dim, generator=gen).to(dtype) for n in (len_q, len_k, len_k))
    check_attention(module, q, k, v, causal, small_attention_config(module))


def test_attention_head_chunks(kernel_module):
    """Head dims as two power-of-two chunks of >= 16 lanes where that computes fewer lanes than one."""
    chunks = kernel_module("attention").head_chunks
    assert [chunks(d) for d in (40, 80, 160, 64, 8, 96, 100, 320)] == [
        (32, 16), (64, 16), (128, 32), (64, 0), (16, 0), (64, 32), (128, 0), (256, 64)]


@needs_kernels
def test_attention_strided_views(kernel_module):
    """q, k, v as transposed views of (B, L, H, D) projections and slices of a packed qkv: no copies."""
    module = kernel_module("attention")
    gen = torch.Generator().manual_seed(3)
    batch, length, heads, head_dim = 2, 19, 2, 40
    qkv = torch.randn(batch, length, 3, heads, head_dim, generator=gen).to(DEVICE)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    check_attention(module, q, k, v, False, small_attention_config(module))


@needs_kernels
@pytest.mark.parametrize("len_q, len_k, head_dim", [(150, 77, 40), (20, 77, 160)])
def test_attention_default_config(kernel_module, len_q, len_k, head_dim):
    """The GPU tile sizes themselves (head dim 160 -> 256 takes the widest tile path)."""
    module = kernel_module("attention")
    gen = torch.Generator().manual_seed(head_dim)
    q, k, v = (torch.randn(1, 1, n, head_dim, generator=gen) for n in (len_q, len_k, len_k))
    check_attention(module, q, k, v, False, module.default_attention_config(head_dim, q.dtype))


@needs_kernels
def test_attention_without_config(kernel_module):
    """config=None: autotuned tiles on the GPU (head dim 160 has the fewest candidates to compile);
    interpreted, the hand-picked ones."""
    module = kernel_module("attention")
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, n, 160, generator=gen).to(torch.float16) for n in (24, 77, 77))
    check_attention(module, q, k, v, False, None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_autotune_candidates(kernel_module, dtype):
    """On the GPU each kernel is timed over the candidates that fit the head dim, the hand-picked default
    included; for head dim 64 they hold the tutorial's H100 tiles."""
    module = kernel_module("attention")
    for head_dim in (40, 64, 80, 160):
        default = module.default_attention_config(head_dim, dtype)
        for kernel, default_tiles in (("forward", default.forward), ("dkdv", default.backward),
                                      ("dq", default.backward)):
            tiles = module.candidate_tiles(kernel, head_dim, dtype)
            assert default_tiles in tiles and len(tiles) == len(set(tiles))
            block_d = module.padded_head_dim(head_dim)
            assert all(module._fits(t, block_d, 2, kernel) for t in tiles if t != default_tiles)
            assert head_dim == 160 or len(tiles) >= 4, (kernel, head_dim, tiles)
    tutorial = {"forward": (128, 64, 4, 3), "dkdv": (32, 128, 4, 5), "dq": (128, 32, 4, 5)}
    for kernel, tile in tutorial.items():
        assert module.AttentionBlocks(*tile) in module.candidate_tiles(kernel, 64, dtype)


# ----------------------------------------------------------------------------------------------------
# GroupNorm


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("one_program", [True, False], ids=["one program", "split"])
@pytest.mark.parametrize("shape, num_groups, silu, tiny_blocks", [
    ((2, 8, 5, 7), 4, True, True),  # 35-element rows over 16-element tiles; split: 2 tiles per chunk, 2 chunks
    ((1, 6, 33), 3, False, False),  # 1-D spatial, default blocks
    ((2, 4, 3, 3, 3), 2, True, True),  # 3-D spatial (video), one tile per chunk
])
def test_group_norm_matches_reference(kernel_module, dtype, one_program, shape, num_groups, silu, tiny_blocks):
    module = kernel_module("groupnorm")
    gen = torch.Generator().manual_seed(sum(shape))
    # Offset mean and large scale: E[x^2] - E[x]^2 would lose digits here; Welford/Chan must not.
    x = (torch.randn(shape, generator=gen) * 3 + 5).to(dtype)
    weight, bias = (torch.randn(shape[1], generator=gen).to(dtype) for _ in range(2))
    blocks = (module.GroupNormBlocks(block=16, chunk_tiles=1 if len(shape) == 5 else 2, num_warps=4) if tiny_blocks
              else module.default_group_norm_blocks(x[0, 0].numel()))
    blocks = blocks._replace(one_program_max=x[0].numel() if one_program else 0)
    assert module.plan(x.shape, num_groups, blocks).one_program == one_program
    outs = forward_backward(lambda x, w, b: module.fused_group_norm(x, num_groups, w, b, 1e-5, silu, blocks),
                            [x, weight, bias])
    refs = forward_backward(lambda x, w, b: module.group_norm_reference(x, num_groups, w, b, 1e-5, silu),
                            [t.double() for t in (x, weight, bias)])
    assert_close(outs, refs, dtype)


@needs_kernels
def test_group_norm_without_affine(kernel_module):
    module = kernel_module("groupnorm")
    x = torch.randn(2, 6, 4, 4, generator=torch.Generator().manual_seed(5))
    outs = forward_backward(lambda x: module.fused_group_norm(x, 3, None, None, 1e-6, True), [x])
    refs = forward_backward(lambda x: module.group_norm_reference(x, 3, None, None, 1e-6, True), [x.double()])
    assert_close(outs, refs, x.dtype)


# ----------------------------------------------------------------------------------------------------
# Temporal denoising step

STEP_COEFFICIENTS = dict(guidance=7.5, a=1.3, b=-0.6, c_x=0.7, c_0=0.4, c_1=-0.2, c_n=0.3, r_0=0.8, r_n=0.5, w=0.35)


def step_inputs(dtype, present):
    gen = torch.Generator().manual_seed(len(present))
    frames, latent = 3, (4, 5, 6)
    names = ("uncond_out", "x0_prev", "noise", "prev_frame_x0")
    inputs = {name: torch.randn(frames, *latent, generator=gen).to(dtype) if name in present else None
              for name in names}
    inputs["shared_noise"] = torch.randn(latent, generator=gen).to(dtype) if "shared_noise" in present else None
    x, cond_out = (torch.randn(frames, *latent, generator=gen).to(dtype) for _ in range(2))
    return x, cond_out, inputs


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("present", [
    ("uncond_out", "x0_prev", "noise", "prev_frame_x0", "shared_noise"),  # every term
    ("uncond_out", "x0_prev"),  # DPM-Solver++(2M), no temporal pull
    (),  # first step, no guidance
    ("prev_frame_x0",),  # temporal pull without re-noising
])
def test_temporal_step_matches_reference(kernel_module, dtype, present):
    module = kernel_module("temporal")
    x, cond_out, inputs = step_inputs(dtype, present)
    coefficients = dict(STEP_COEFFICIENTS)
    for name, coefficient in (("x0_prev", "c_1"), ("noise", "c_n"), ("shared_noise", "r_n")):
        if inputs[name] is None:
            coefficients[coefficient] = 0.0
    args = (x, cond_out, inputs["uncond_out"], inputs["x0_prev"], inputs["noise"], inputs["shared_noise"],
            inputs["prev_frame_x0"], *coefficients.values())
    args = [t.to(DEVICE) if torch.is_tensor(t) else t for t in args]
    outs = module.fused_temporal_step(*args, block=64)
    refs = module.temporal_step_reference(*[t.double() if torch.is_tensor(t) else t for t in args])
    assert_close(outs, refs, dtype)


def test_temporal_step_rejects_inconsistent_inputs():
    from kernels import temporal_step
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="uncond_out has shape"):
        temporal_step(x, x, x[:1], a=1.0, b=0.0, c_x=1.0, c_0=0.0)
    with pytest.raises(ValueError, match="c_1"):
        temporal_step(x, x, a=1.0, b=0.0, c_x=1.0, c_0=0.0, c_1=0.5)
    with pytest.raises(ValueError, match="one frame"):
        temporal_step(x, x, a=1.0, b=0.0, c_x=1.0, c_0=0.0, prev_frame_x0=x, shared_noise=x, r_n=1.0)


# ----------------------------------------------------------------------------------------------------
# Launches per call


class LaunchRecorder:
    """Stands in for a jitted kernel: records each launch (kernel name) instead of running it."""

    def __init__(self, name, launches):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(self.name)


class AtenOps(TorchDispatchMode):
    """Records the PyTorch ops that compute (each a kernel launch on a GPU), not those that only allocate."""
    ALLOCATING = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "view", "select",
                  "unbind", "alias", "detach", "_unsafe_view", "split", "slice"}

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in self.ALLOCATING:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("shape, forward_kernels, backward_kernels", [
    # UNet at 512 px: every GroupNorm call is one launch forward, one Triton launch + two small ops backward
    ((2, 320, 64, 64), ["one_program_forward"], ["one_program_backward"]),
    ((2, 1280, 8, 8), ["one_program_forward"], ["one_program_backward"]),
    # VAE decoder at 512 px: the split path, measured faster there
    ((1, 256, 256, 256), ["stats", "finalize", "forward"], ["backward_reduce", "backward_dx"]),
])
def test_group_norm_launches_per_call(kernel_module, monkeypatch, shape, forward_kernels, backward_kernels):
    """Counts launches at full size without running them: the kernels are replaced by recorders."""
    module = kernel_module("groupnorm")
    launches = []
    for name in dir(module):
        if name.startswith("_group_norm_") and name.endswith("_kernel"):
            monkeypatch.setattr(module, name, LaunchRecorder(name.removeprefix("_group_norm_").removesuffix("_kernel"),
                                                             launches))
    x = torch.empty(shape, dtype=torch.float16, requires_grad=True)
    weight, bias = (torch.ones(shape[1], dtype=torch.float16, requires_grad=True) for _ in range(2))
    with AtenOps() as forward_ops:
        y = module.fused_group_norm(x, 32, weight, bias, 1e-5, True)
    assert launches == forward_kernels and forward_ops.ops == []
    launches.clear()
    with AtenOps() as backward_ops:
        torch.autograd.grad(y, (x, weight, bias), torch.empty_like(y))
    assert launches == backward_kernels
    if len(backward_kernels) == 1:  # one program: the batch sum of dweight and dbias, and one cast to fp16
        assert sorted(backward_ops.ops) == ["_to_copy", "sum"]


def test_group_norm_plan_is_worked_out_once_per_shape(kernel_module):
    module = kernel_module("groupnorm")
    first = module.plan(torch.Size([2, 64, 9, 9]), 32)
    hits = module.plan.cache_info().hits
    assert module.plan(torch.Size([2, 64, 9, 9]), 32) is first and module.plan.cache_info().hits == hits + 1
    assert first.one_program and first.row_len == 81 and first.groups == 64


# ----------------------------------------------------------------------------------------------------
# Dispatch: SVP_KERNELS, the measured table, the per-GPU cache, first-use timing


def fake_cuda_tensor(requires_grad=False, index=0):
    return types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", index), requires_grad=requires_grad)


class FakeGPU:
    """An Op whose two implementations only record that they ran, a timer that reads fake times, and a
    policy built on them with its table and cache in tmp_path."""
    IDENTITY = dict(gpu="Fake GPU 80GB", arch="sm00", torch="2.0", triton="3.0")

    def __init__(self, tmp_path, ours_ms=1.0, torch_ms=2.0):
        from kernels import dispatch
        self.ran, self.timed, self.timed_on = [], [], []
        self.ms = {"ours": ours_ms, "torch": torch_ms}
        self.op = dispatch.Op("fake", ours=lambda n: self.ran.append("ours"),
                              theirs=lambda n: self.ran.append("torch"), bucket=lambda n: (dispatch.size_class(n),))
        self.table_dir, self.cache = tmp_path, tmp_path / "cache" / "kernels-fake.json"
        self.identity = dict(self.IDENTITY)
        self.identified = 0
        self.policy = self.new_policy()

    def new_policy(self):
        from kernels import dispatch
        return dispatch.KernelPolicy(timer=self.timer, identify=self.identify, table_dir=self.table_dir,
                                     cache_path=lambda gpu: self.cache)

    def identify(self, device):
        self.identified += 1
        return self.identity

    def timer(self, run, device):
        self.ran.clear()
        run()
        self.timed.append(self.ran[-1])
        self.timed_on.append(device)
        return self.ms[self.ran[-1]]

    def prefers_ours(self, n, requires_grad=False, index=0):
        return self.policy.prefers_ours(self.op, [fake_cuda_tensor(requires_grad, index)], (n,))

    def write_table(self, entries):
        (self.table_dir / "sm00.json").write_text(json.dumps(dict(gpu="Fake GPU", arch="sm00", entries=entries)))


def test_svp_kernels_modes(monkeypatch, tmp_path):
    from kernels import dispatch
    gpu = FakeGPU(tmp_path, ours_ms=3.0, torch_ms=2.0)  # ours is slower
    monkeypatch.setattr(dispatch, "POLICY", gpu.policy)
    monkeypatch.delenv("SVP_KERNELS", raising=False)
    assert not gpu.op.use_ours([fake_cuda_tensor()], 100)  # auto: measured slower -> torch
    assert gpu.timed == ["torch", "ours"]
    assert not gpu.op.use_ours([fake_cuda_tensor(), torch.zeros(1)], 100)  # any CPU tensor -> reference
    monkeypatch.setenv("SVP_KERNELS", "triton")
    assert gpu.op.use_ours([fake_cuda_tensor()], 100)
    assert not gpu.op.use_ours([torch.zeros(1)], 100)  # CPU tensors take the reference even then
    monkeypatch.setenv("SVP_KERNELS", "torch")
    assert not gpu.op.use_ours([fake_cuda_tensor()], 100)
    monkeypatch.setenv("SVP_KERNELS", "trition")
    with pytest.raises(dispatch.KernelModeError, match="SVP_KERNELS"):
        gpu.op.use_ours([fake_cuda_tensor()], 100)
    assert gpu.timed == ["torch", "ours"]  # timed once, at the first auto call


def test_table_decides_and_first_use_is_timed_once_per_bucket(tmp_path):
    from kernels.dispatch import entry_key
    gpu = FakeGPU(tmp_path, ours_ms=1.0, torch_ms=2.0)
    gpu.write_table({entry_key("fake", (False, 128)): dict(ours_ms=5.0, torch_ms=4.0),  # table: ours loses
                     entry_key("fake", (True, 128)): dict(ours_ms=1.0, torch_ms=4.0)})  # training: ours wins
    assert not gpu.prefers_ours(100) and not gpu.prefers_ours(128)  # both in bucket 128: from the table
    assert gpu.prefers_ours(100, requires_grad=True)  # forward + backward has its own entry
    assert gpu.timed == []
    assert gpu.prefers_ours(200) and gpu.prefers_ours(256)  # bucket 256, not in the table: timed once
    assert gpu.timed == ["torch", "ours"]
    assert gpu.identified == 1  # the GPU, its table and its cache are read once; then a decision is a lookup
    cached = json.loads(gpu.cache.read_text())
    assert cached["gpu"] == "Fake GPU 80GB" and cached["entries"] == {
        entry_key("fake", (False, 256)): dict(ours_ms=1.0, torch_ms=2.0)}
    second_process = gpu.new_policy()  # reads the cache: no new timing
    assert second_process.prefers_ours(gpu.op, [fake_cuda_tensor()], (256,)) and gpu.timed == ["torch", "ours"]


def test_training_calls_are_timed_forward_and_backward(tmp_path):
    from kernels import dispatch
    gpu = FakeGPU(tmp_path)
    x = torch.randn(3, requires_grad=True)
    runs = []

    def square(x):
        runs.append(torch.is_grad_enabled())
        return x * x

    op = dispatch.Op("square", ours=square, theirs=square, bucket=lambda x: (x.numel(),))
    times = itertools.cycle([2.0, 1.0])  # torch, then ours
    policy = dispatch.KernelPolicy(timer=lambda run, device: (run(), next(times))[1], identify=lambda device: gpu.identity,
                                   table_dir=tmp_path, cache_path=lambda name: gpu.cache)
    assert policy.prefers_ours(op, [x], (x,))
    assert runs == [True, True] and x.grad is None  # with autograd on, on a detached copy
    with torch.no_grad():
        policy.prefers_ours(op, [x], (x,))
    assert runs == [True, True, False, False]


def test_corrupt_or_stale_cache_is_rebuilt(tmp_path):
    from kernels.dispatch import entry_key
    gpu = FakeGPU(tmp_path)
    gpu.cache.parent.mkdir()
    gpu.cache.write_text('{"entries": {"fake|False|128": {"ours_ms": 1.0')  # cut short
    with pytest.warns(UserWarning, match="not a kernel timing cache; rebuilt"):
        assert gpu.prefers_ours(128)
    assert json.loads(gpu.cache.read_text())["entries"] == {entry_key("fake", (False, 128)): dict(ours_ms=1.0,
                                                                                                  torch_ms=2.0)}
    gpu.identity = dict(gpu.identity, triton="3.1")  # a new triton: the old timings no longer count
    gpu.ms = {"ours": 9.0, "torch": 2.0}
    assert not gpu.new_policy().prefers_ours(gpu.op, [fake_cuda_tensor()], (128,))
    assert json.loads(gpu.cache.read_text())["triton"] == "3.1"


def test_no_timing_during_cuda_graph_capture(monkeypatch, tmp_path):
    gpu = FakeGPU(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not gpu.prefers_ours(128) and gpu.timed == [] and not gpu.cache.exists()
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert gpu.prefers_ours(128) and gpu.timed == ["torch", "ours"]  # decided at the next eager call


def test_a_kernel_that_fails_its_timing_never_wins(tmp_path):
    gpu = FakeGPU(tmp_path)

    def timer(run, device):
        gpu.ran.clear()
        run()
        if gpu.ran[-1] == "ours":
            raise RuntimeError("out of resources")
        return 1.0

    gpu.timer = timer
    policy = gpu.new_policy()
    with pytest.warns(UserWarning, match="failed its timing"):
        assert not policy.prefers_ours(gpu.op, [fake_cuda_tensor()], (128,))


def test_a_first_use_is_timed_on_the_tensors_gpu(tmp_path):
    """A call on cuda:1 is timed on cuda:1 whichever GPU is current (torchrun's rank 1, --device cuda:1)."""
    gpu = FakeGPU(tmp_path)
    assert gpu.prefers_ours(128, index=1)
    assert gpu.timed_on == [torch.device("cuda", 1)] * 2


class FakeCuda:
    """torch.cuda's device, stream and event calls, on the CPU: which device is current, and where each
    event was recorded and each timed call ran."""

    def __init__(self, monkeypatch):
        self.current, self.log = 0, []
        monkeypatch.setattr(torch.cuda, "device", self.device)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"stream of cuda:{self.index(device)}")
        monkeypatch.setattr(torch.cuda, "Event", self.event)

    def index(self, device):
        return self.current if device is None else torch.device(device).index

    @contextlib.contextmanager
    def device(self, device):
        before, self.current = self.current, torch.device(device).index
        try:
            yield
        finally:
            self.current = before

    def event(self, enable_timing):
        cuda = self

        class Event:
            def record(self, stream=None):
                cuda.log.append(("record", stream or torch.cuda.current_stream()))

            def synchronize(self):
                pass

            def elapsed_time(self, end):
                return 1.0
        return Event()


def test_cuda_time_ms_records_on_the_timed_gpus_stream_with_that_gpu_current(monkeypatch):
    from kernels.dispatch import cuda_time_ms
    cuda = FakeCuda(monkeypatch)
    assert cuda_time_ms(lambda: cuda.log.append(("run on", cuda.current)), torch.device("cuda", 1), warmup=1,
                        repeats=2) == 1.0
    assert cuda.log == [("run on", 1)] + [("record", "stream of cuda:1"), ("run on", 1),
                                          ("record", "stream of cuda:1")] * 2
    assert cuda.current == 0  # the caller's device is current again


def test_the_cache_folder_follows_svp_cache_then_xdg_then_home(monkeypatch, tmp_path):
    from kernels.dispatch import cache_dir, default_cache_path
    monkeypatch.delenv("SVP_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "svp"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "svp"
    monkeypatch.setenv("SVP_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    assert default_cache_path("NVIDIA H100 80GB HBM3") == tmp_path / "mine" / "kernels-nvidia-h100-80gb-hbm3.json"


def test_repo_tables_are_valid():
    """Every kernels/sm*.json reads as a table whose keys name a known op."""
    from kernels.dispatch import TABLE_DIR, read_entries
    tables = sorted(TABLE_DIR.glob("sm*.json"))
    assert tables, "no measured table in kernels/"
    for path in tables:
        data = read_entries(path)
        assert data is not None, path
        assert {key.split("|")[0] for key in data["entries"]} <= {"attention", "group_norm", "temporal_step"}


def test_bench_writes_the_table_dispatch_reads(tmp_path, monkeypatch):
    """bench/kernels.py --write-table: rows of one shape class add up, ours must win eager and graphed,
    and entries this run did not measure stay."""
    from kernels import dispatch
    bench = importlib.import_module("bench.kernels")
    monkeypatch.setattr(dispatch, "gpu_identity", lambda device: dict(FakeGPU.IDENTITY))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    path = tmp_path / "sm00.json"
    path.write_text(json.dumps(dict(entries={"fake|False|1": dict(ours_ms=1.0, torch_ms=2.0)})))
    op = dispatch.Op("fake", ours=None, theirs=None, bucket=None)
    recorder = bench.Recorder()
    recorder.add(op, False, (256,), dict(ours_ms=1.0, torch_ms=3.0, graphed_ours_ms=2.0, graphed_torch_ms=1.5))
    recorder.add(op, False, (512,), dict(ours_ms=1.0, torch_ms=3.0, graphed_ours_ms=1.0, graphed_torch_ms=1.5))
    recorder.add(op, True, (256,), dict(ours_ms=1.0, torch_ms=3.0))
    recorder.add(op, True, (256,), dict(ours_ms=4.0, torch_ms=1.0))  # same class: 5 ms ours vs 4 ms torch
    bench.write_table(path, recorder.entries)
    assert json.loads(path.read_text())["gpu"] == "Fake GPU 80GB"
    policy, device = FakeGPU(tmp_path).policy, torch.device("cuda", 0)
    assert policy.known(device, "fake", (False, 256)) is False  # faster eager, slower graphed
    assert policy.known(device, "fake", (False, 512)) is True
    assert policy.known(device, "fake", (True, 256)) is False
    assert policy.known(device, "fake", (False, 1)) is True  # from before, kept
    assert policy.known(device, "fake", (False, 64)) is None  # never measured: timed at first use


def refuse(*args, **kwargs):
    raise AssertionError("the Triton path ran on CPU tensors")


def test_cpu_tensors_take_the_reference(monkeypatch):
    import kernels
    monkeypatch.setenv("SVP_KERNELS", "triton")
    modules = {name: importlib.import_module(f"kernels.{name}") for name in ("attention", "groupnorm", "temporal")}
    monkeypatch.setattr(modules["attention"], "flash_attention", refuse)
    monkeypatch.setattr(modules["groupnorm"], "fused_group_norm", refuse)
    monkeypatch.setattr(modules["temporal"], "fused_temporal_step", refuse)
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 5, 8, generator=gen) for _ in range(3))
    assert torch.equal(kernels.attention(q, k, v, causal=True), modules["attention"].attention_reference(q, k, v, True))
    x, w, b = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(4, generator=gen), torch.randn(4, generator=gen)
    assert torch.equal(kernels.group_norm(x, 2, w, b, 1e-5, silu=True),
                       modules["groupnorm"].group_norm_reference(x, 2, w, b, 1e-5, True))
    x_next, x0 = kernels.temporal_step(x, w.view(1, 4, 1, 1).expand_as(x), a=2.0, b=1.0, c_x=0.5, c_0=0.25)
    assert torch.allclose(x0, 2 * x + w.view(1, 4, 1, 1)) and torch.allclose(x_next, 0.5 * x + 0.25 * x0)


def test_kernel_path_is_chosen_when_dispatch_says_ours(monkeypatch):
    """With the op's dispatch saying ours (as on CUDA), the public functions call the Triton launchers."""
    import kernels
    from kernels import dispatch
    calls = []
    monkeypatch.setattr(dispatch.Op, "use_ours", lambda self, tensors, *args: True)
    for name, launcher in (("attention", "flash_attention"), ("groupnorm", "fused_group_norm"),
                           ("temporal", "fused_temporal_step")):
        module = importlib.import_module(f"kernels.{name}")
        monkeypatch.setattr(module, launcher, lambda *args, _name=launcher, **kwargs: calls.append(_name))
    q = torch.randn(1, 1, 4, 8)
    kernels.attention(q, q, q)
    kernels.group_norm(torch.randn(1, 4, 2, 2), 2, None, None)
    kernels.temporal_step(q, q, a=1.0, b=0.0, c_x=1.0, c_0=0.0)
    assert calls == ["flash_attention", "fused_group_norm", "fused_temporal_step"]


# ----------------------------------------------------------------------------------------------------
# Compiling for the GPU, without one

FLOAT_ARGS = {"qk_scale", "sm_scale", "eps", "guidance", "a", "b", "c_x", "c_0", "c_1", "c_n", "r_0", "r_n", "w"}
FP32_POINTERS = {"LSE", "DELTA", "COUNT", "MEAN", "M2", "GROUP_MEAN", "GROUP_RSTD", "RSTD", "SUM_DZ", "SUM_DZ_XHAT",
                 "MEAN_WDZ", "MEAN_WDZ_XHAT", "SUMS"}
MAX_SHARED_MEMORY = 99 * 1024  # per block on every NVIDIA GPU from sm_80 on (A100 and H100 allow more)


def compile_for_gpu(kernel, element: str, constexprs: dict, num_warps: int, num_stages: int = 1):
    """Compile a kernel to an sm_90 cubin, as a launch on an H100 would, and return its shared memory use.

    The interpreter never runs Triton's compiler, which rejects code the interpreter accepts (a loop-carried
    variable changing type, dots under 16x16, ...). Arguments are typed by the kernels' naming convention:
    upper case = pointer (to `element`, or fp32 for statistics), FLOAT_ARGS = fp32, other = int32.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def arg_type(param):
        if param.is_constexpr:
            return "constexpr"
        if param.name.isupper():
            return "*fp32" if param.name in FP32_POINTERS else f"*{element}"
        return "fp32" if param.name in FLOAT_ARGS else "i32"

    signature = {param.name: arg_type(param) for param in kernel.params}
    names = list(signature)
    source = ASTSource(kernel, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    return compiled.metadata.shared


@pytest.mark.slow
@compile_test
@pytest.mark.parametrize("head_dim, element, causal", [(40, "fp16", True), (80, "bf16", False), (160, "fp16", False),
                                                      (64, "fp16", False)])
def test_compile_attention_for_gpu(head_dim, element, causal):
    module = load_private_copy("attention", interpret=False)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[element]
    config = module.default_attention_config(head_dim, dtype)
    head = module._head_meta(head_dim)
    for kernel, blocks in ((module._attention_forward_kernel, config.forward),
                           (module._attention_backward_dkdv_kernel, config.backward),
                           (module._attention_backward_dq_kernel, config.backward)):
        constexprs = dict(CAUSAL=causal, PRECISION="tf32", BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n,
                          **head)
        assert compile_for_gpu(kernel, element, constexprs, blocks.num_warps, blocks.num_stages) <= MAX_SHARED_MEMORY
    compile_for_gpu(module._attention_backward_delta_kernel, element,
                    dict(BLOCK_M=config.backward.block_m, **head), config.backward.num_warps)


@pytest.mark.slow
@compile_test
@pytest.mark.parametrize("row_len", [64, 4096])
def test_compile_group_norm_and_temporal_for_gpu(row_len):
    module = load_private_copy("groupnorm", interpret=False)
    blocks = module.default_group_norm_blocks(row_len)
    tile = dict(BLOCK=blocks.block)
    for kernel, constexprs in ((module._group_norm_one_program_forward_kernel, dict(tile, SILU=True)),
                               (module._group_norm_one_program_backward_kernel, dict(tile, SILU=True)),
                               (module._group_norm_stats_kernel, tile),
                               (module._group_norm_finalize_kernel, dict(PARTS=64)),
                               (module._group_norm_forward_kernel, dict(tile, SILU=True)),
                               (module._group_norm_backward_reduce_kernel, dict(tile, SILU=True)),
                               (module._group_norm_backward_dx_kernel, dict(tile, SILU=False))):
        assert compile_for_gpu(kernel, "bf16", constexprs, blocks.num_warps) <= MAX_SHARED_MEMORY
    flags = dict(HAS_UNCOND_OUT=True, HAS_X0_PREV=True, HAS_NOISE=True, HAS_PREV_FRAME=True, HAS_SHARED_NOISE=True)
    compile_for_gpu(load_private_copy("temporal", interpret=False)._temporal_step_kernel, "fp16",
                    dict(flags, BLOCK=1024), num_warps=4)
