"""One denoising step of video sampling, fused: guidance, x0 estimate, solver update, temporal pull.

Every sampler step of model/sampling.py (DDIM with eta, DPM-Solver++(2M), ...) is expressed with the
same few coefficients, computed by the sampler from its noise schedule:

    out    = uncond_out + g * (cond_out - uncond_out)      classifier-free guidance (out = cond_out without it)
    x0     = a * x + b * out                                the model output converted to a clean-latent estimate
    x_next = c_x * x + c_0 * x0 + c_1 * x0_prev + c_n * noise
    x_next = (1 - w) * x_next + w * (r_0 * prev_frame_x0 + r_n * shared_noise)   only with prev_frame_x0

The last line is the temporal denoising: the previous frame's clean estimate, re-noised with the noise
shared by the whole video to the level of the next step (r_0, r_n), pulls the current frame toward
it, so consecutive frames agree and the video does not flicker. shared_noise is one frame's worth and
is broadcast over the frames.

As PyTorch this is ~12 elementwise kernels, each reading and writing a full latent; the Triton kernel
reads each input once and writes x_next and x0 once, in fp32 registers. Both paths live in
`temporal_step`; the reference also computes in fp32, so the two agree to rounding in every dtype.
"""
import torch
import triton
import triton.language as tl

from kernels.dispatch import Op, dtype_name, on_device, size_class


def temporal_step_reference(x, cond_out, uncond_out, x0_prev, noise, shared_noise, prev_frame_x0,
                            guidance, a, b, c_x, c_0, c_1, c_n, r_0, r_n, w):
    x, cond_out = x.float(), cond_out.float()
    out = cond_out if uncond_out is None else uncond_out.float() + guidance * (cond_out - uncond_out.float())
    x0 = a * x + b * out
    x_next = c_x * x + c_0 * x0
    if x0_prev is not None:
        x_next = x_next + c_1 * x0_prev.float()
    if noise is not None:
        x_next = x_next + c_n * noise.float()
    if prev_frame_x0 is not None:
        pull = r_0 * prev_frame_x0.float()
        if shared_noise is not None:
            pull = pull + r_n * shared_noise.float()  # (C, H, W) broadcasts over the frames
        x_next = (1 - w) * x_next + w * pull
    return x_next, x0


@triton.jit
def _temporal_step_kernel(
    X, COND_OUT, UNCOND_OUT, X0_PREV, NOISE, SHARED_NOISE, PREV_FRAME_X0, X_NEXT, X0,
    numel, frame_numel, guidance, a, b, c_x, c_0, c_1, c_n, r_0, r_n, w,
    HAS_UNCOND_OUT: tl.constexpr, HAS_X0_PREV: tl.constexpr, HAS_NOISE: tl.constexpr,
    HAS_PREV_FRAME: tl.constexpr, HAS_SHARED_NOISE: tl.constexpr, BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < numel
    x = tl.load(X + offsets, mask=inside).to(tl.float32)
    out = tl.load(COND_OUT + offsets, mask=inside).to(tl.float32)
    if HAS_UNCOND_OUT:
        uncond_out = tl.load(UNCOND_OUT + offsets, mask=inside).to(tl.float32)
        out = uncond_out + guidance * (out - uncond_out)
    x0 = a * x + b * out
    x_next = c_x * x + c_0 * x0
    if HAS_X0_PREV:
        x_next += c_1 * tl.load(X0_PREV + offsets, mask=inside).to(tl.float32)
    if HAS_NOISE:
        x_next += c_n * tl.load(NOISE + offsets, mask=inside).to(tl.float32)
    if HAS_PREV_FRAME:
        pull = r_0 * tl.load(PREV_FRAME_X0 + offsets, mask=inside).to(tl.float32)
        if HAS_SHARED_NOISE:
            pull += r_n * tl.load(SHARED_NOISE + offsets % frame_numel, mask=inside).to(tl.float32)
        x_next = (1 - w) * x_next + w * pull
    tl.store(X_NEXT + offsets, x_next.to(X_NEXT.dtype.element_ty), mask=inside)
    tl.store(X0 + offsets, x0.to(X0.dtype.element_ty), mask=inside)


def fused_temporal_step(x, cond_out, uncond_out, x0_prev, noise, shared_noise, prev_frame_x0,
                        guidance, a, b, c_x, c_0, c_1, c_n, r_0, r_n, w, block: int = 1024):
    """The Triton path of `temporal_step` (CUDA, or CPU when interpreted). Outputs are in x's dtype."""
    x = x.contiguous()

    def pointer(t):  # an absent input is never read (its HAS_ flag is off): any tensor can stand in
        return x if t is None else t.contiguous()

    x_next, x0 = torch.empty_like(x), torch.empty_like(x)
    with on_device(x):
        _temporal_step_kernel[(triton.cdiv(x.numel(), block),)](
            x, pointer(cond_out), pointer(uncond_out), pointer(x0_prev), pointer(noise), pointer(shared_noise),
            pointer(prev_frame_x0), x_next, x0,
            x.numel(), x[0].numel(), guidance, a, b, c_x, c_0, c_1, c_n, r_0, r_n, w,
            HAS_UNCOND_OUT=uncond_out is not None, HAS_X0_PREV=x0_prev is not None, HAS_NOISE=noise is not None,
            HAS_PREV_FRAME=prev_frame_x0 is not None, HAS_SHARED_NOISE=shared_noise is not None, BLOCK=block,
        )
    return x_next, x0


def _bucket(x, *args) -> tuple:
    """Shape class: dtype and elements (up to a power of two)."""
    return dtype_name(x.dtype), size_class(x.numel())


def _reference_in_dtype(*args):
    x_next, x0 = temporal_step_reference(*args)
    return x_next.to(args[0].dtype), x0.to(args[0].dtype)


TEMPORAL_STEP = Op("temporal_step", ours=fused_temporal_step, theirs=_reference_in_dtype, bucket=_bucket)


class TemporalStepError(ValueError):
    pass


def _check_inputs(x, cond_out, uncond_out, x0_prev, noise, shared_noise, prev_frame_x0, c_1, c_n, r_n):
    for name, t in (("cond_out", cond_out), ("uncond_out", uncond_out), ("x0_prev", x0_prev), ("noise", noise),
                    ("prev_frame_x0", prev_frame_x0)):
        if t is not None and t.shape != x.shape:
            raise TemporalStepError(f"temporal_step: {name} has shape {tuple(t.shape)}, x has {tuple(x.shape)}")
    if shared_noise is not None and shared_noise.numel() != x[0].numel():
        raise TemporalStepError(f"temporal_step: shared_noise has shape {tuple(shared_noise.shape)}, "
                                f"expected one frame {tuple(x.shape[1:])}")
    # A non-zero coefficient without its tensor is a sampler bug: refuse it rather than drop the term.
    needed = [("c_1", c_1, x0_prev), ("c_n", c_n, noise)]
    if prev_frame_x0 is not None:
        needed.append(("r_n", r_n, shared_noise))
    for name, coefficient, t in needed:
        if coefficient != 0 and t is None:
            raise TemporalStepError(f"temporal_step: {name}={coefficient} but its tensor is None")


def temporal_step(x: torch.Tensor, cond_out: torch.Tensor, uncond_out: torch.Tensor | None = None, *,
                  x0_prev: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                  shared_noise: torch.Tensor | None = None, prev_frame_x0: torch.Tensor | None = None,
                  guidance: float = 1.0, a: float, b: float, c_x: float, c_0: float, c_1: float = 0.0,
                  c_n: float = 0.0, r_0: float = 0.0, r_n: float = 0.0, w: float = 0.0,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """One sampler step for N frames x: (N, C, H, W) -> (x_next, x0), both like x. See the module doc.

    cond_out/uncond_out: the model's conditional and unconditional outputs (uncond_out None = no guidance); x0_prev: the previous step's x0 (DPM++(2M));
    noise: fresh noise (DDIM eta > 0); prev_frame_x0: each frame's previous frame's x0 (None = no
    temporal pull); shared_noise: one frame (C, H, W) of the video's shared noise.
    """
    if prev_frame_x0 is None and shared_noise is not None:
        shared_noise = None  # only the temporal pull uses it
    _check_inputs(x, cond_out, uncond_out, x0_prev, noise, shared_noise, prev_frame_x0, c_1, c_n, r_n)
    args = (x, cond_out, uncond_out, x0_prev, noise, shared_noise, prev_frame_x0,
            float(guidance), float(a), float(b), float(c_x), float(c_0), float(c_1), float(c_n),
            float(r_0), float(r_n), float(w))
    tensors = [t for t in args[:7] if t is not None]
    if x.dtype in (torch.float16, torch.bfloat16, torch.float32) and x.numel() > 0 \
            and TEMPORAL_STEP.use_ours(tensors, *args):
        return fused_temporal_step(*args)
    return _reference_in_dtype(*args)
