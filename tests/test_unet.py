"""The hand-written UNet against diffusers' UNet2DConditionModel on the same random weights.

Weights travel the real way: our UNet writes an original single-file layout (`model.diffusion_model.*`)
to a .safetensors file, we load it back strictly, and diffusers' own single-file converter turns the
same tensors into its layout. diffusers-layout weights come back through `diffusers_to_ldm_unet`.
"""
import dataclasses

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm
from safetensors.torch import load_file, save_file

from model.config import SD1, SD2_BASE, UNetConfig
from model.unet import UNet, diffusers_to_ldm_unet

PREFIX = "model.diffusion_model."
# Four levels, so 12 skip connections like the real model; level 3 has no attention like SD.
SD1_TINY = UNetConfig(model_channels=32, channel_mult=(1, 2, 2, 2), num_heads=2, context_dim=32, norm_groups=8)
SD2_TINY = UNetConfig(model_channels=32, channel_mult=(1, 2, 2, 2), num_heads=None, head_dim=8, context_dim=24,
                      use_linear_proj=True, transformer_depth=2, norm_groups=8)
TINY = pytest.mark.parametrize("config", [SD1_TINY, SD2_TINY], ids=["sd1", "sd2"])


def rel_err(ours, ref):
    """||ours - ref|| / ||ref||; two exact zeros agree (a gradient that vanishes by construction, such as
    self-attention's query gradient over a single token), while any value against a zero reference is inf."""
    if not ref.any():
        return 0.0 if not ours.any() else float("inf")
    return ((ours - ref).norm() / ref.norm()).item()


def randomize_(module: torch.nn.Module, seed: int = 0):
    """Random values for every parameter, including those LDM zero-initialises, so no path can hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                p.copy_(noise * p[0].numel() ** -0.5)      # matrices and kernels: unit gain
            elif name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)                   # norm scales
            else:
                p.copy_(0.1 * noise)                       # biases and norm shifts
    return module


def diffusers_config(config: UNetConfig) -> dict:
    """diffusers' config for `config`, derived by diffusers itself from the equivalent LDM yaml."""
    heads = {"num_heads": config.num_heads} if config.head_dim is None else {"num_head_channels": config.head_dim}
    ldm_params = {
        "in_channels": config.in_channels, "out_channels": config.out_channels,
        "model_channels": config.model_channels, "channel_mult": list(config.channel_mult),
        "num_res_blocks": config.num_res_blocks, "transformer_depth": config.transformer_depth,
        "attention_resolutions": [2 ** level for level in config.attention_levels],  # LDM counts downsampling factors
        "context_dim": config.context_dim, "use_linear_in_transformer": config.use_linear_proj, **heads,
    }
    original = {"model": {"params": {"unet_config": {"params": ldm_params},
                                     "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    out = create_unet_diffusers_config_from_ldm(original, checkpoint={})
    # LDM hard-codes 32 groups; our config makes it a field, diffusers too.
    return {**out, "norm_num_groups": config.norm_groups, "norm_eps": config.norm_eps}


def ldm_module_name(diffusers_name: str, config: UNetConfig) -> str:
    (key,) = diffusers_to_ldm_unet({f"{diffusers_name}.weight": None}, config)
    return key.removesuffix(".weight")


def random_inputs(config: UNetConfig, batch=2, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, size, size, generator=g)
    timesteps = torch.tensor([3.5, 917.0])[:batch]                  # float timesteps are allowed
    context = torch.randn(batch, 7, config.context_dim, generator=g)
    return x, timesteps, context


def random_residuals(unet: UNet, x, timesteps, context, seed=2):
    """Tensors shaped like each skip and the middle output (recorded by hooks), filled with noise."""
    shapes = []
    hooks = [b.register_forward_hook(lambda m, i, o: shapes.append(o.shape))
             for b in [*unet.input_blocks, unet.middle_block]]
    with torch.no_grad():
        unet(x, timesteps, context)
    for h in hooks:
        h.remove()
    g = torch.Generator().manual_seed(seed)
    residuals = [torch.randn(s, generator=g) for s in shapes]
    return residuals[:-1], residuals[-1]


def diffusers_forward(model, x, timesteps, context, down=None, mid=None):
    with torch.no_grad():
        return model(x, timesteps, context, down_block_additional_residuals=down,
                     mid_block_additional_residual=mid, return_dict=False)[0]


@TINY
def test_single_file_layout_matches_diffusers(config, tmp_path):
    source = randomize_(UNet(config))
    path = tmp_path / "unet.safetensors"
    save_file({PREFIX + k: v.contiguous() for k, v in source.state_dict().items()}, str(path))

    checkpoint = load_file(str(path))
    ours = UNet(config).eval()
    ours.load_state_dict({k.removeprefix(PREFIX): v for k, v in checkpoint.items()}, strict=True)

    cfg = diffusers_config(config)
    converted = convert_ldm_unet_checkpoint(checkpoint, cfg)
    assert len(converted) == len(checkpoint), "diffusers' converter skipped some of our keys: layout differs"
    ref = UNet2DConditionModel(**cfg).eval()
    ref.load_state_dict(converted, strict=True)

    x, t, context = random_inputs(config)
    with torch.no_grad():
        plain = ours(x, t, context)
    assert plain.shape == x.shape
    assert rel_err(plain, diffusers_forward(ref, x, t, context)) <= 1e-5

    down, mid = random_residuals(ours, x, t, context)
    assert len(down) == 12
    with torch.no_grad():
        injected = ours(x, t, context, down_residuals=down, mid_residual=mid)
    assert rel_err(injected, diffusers_forward(ref, x, t, context, down, mid)) <= 1e-5
    assert rel_err(injected, plain) > 1e-3, "the residuals had no effect"


@TINY
def test_diffusers_layout_matches_diffusers(config):
    cfg = diffusers_config(config)
    ref = randomize_(UNet2DConditionModel(**cfg), seed=3).eval()
    diffusers_state = ref.state_dict()
    renamed = diffusers_to_ldm_unet(diffusers_state, config)
    assert {id(v) for v in renamed.values()} == {id(v) for v in diffusers_state.values()}, "tensors were copied"

    ours = UNet(config).eval()
    ours.load_state_dict(renamed, strict=True)
    x, t, context = random_inputs(config, seed=4)
    down, mid = random_residuals(ours, x, t, context, seed=5)
    with torch.no_grad():
        out = ours(x, t, context, down_residuals=down, mid_residual=mid)
    assert rel_err(out, diffusers_forward(ref, x, t, context, down, mid)) <= 1e-5


def test_scalar_timestep_is_broadcast():
    unet = randomize_(UNet(SD1_TINY)).eval()
    x, _, context = random_inputs(SD1_TINY)
    with torch.no_grad():
        scalar = unet(x, 250, context)
        batched = unet(x, torch.tensor([250, 250]), context)
    assert torch.equal(scalar, batched)


def test_rejects_bad_inputs():
    unet = UNet(SD1_TINY).eval()
    x, t, context = random_inputs(SD1_TINY)
    with pytest.raises(ValueError, match="multiple of 8"):
        unet(x[..., :12], t, context)
    with pytest.raises(ValueError, match="down_residuals"):
        unet(x, t, context, down_residuals=[torch.zeros(1)] * 3)
    with pytest.raises(ValueError, match="timesteps"):
        unet(x, torch.zeros(3), context)


def test_gradient_checkpointing_gives_the_same_gradients():
    unet = randomize_(UNet(SD1_TINY)).train()
    x, t, context = random_inputs(SD1_TINY, size=8)
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    block_calls = []
    # A pre-hook: the recomputation stops early, once it has what backward needs.
    unet.middle_block.register_forward_pre_hook(lambda *args: block_calls.append(1))

    def gradients(checkpointed: bool):
        unet.gradient_checkpointing = checkpointed
        unet.zero_grad()
        block_calls.clear()
        (unet(x, t, context) * weights).sum().backward()
        return {name: p.grad.clone() for name, p in unet.named_parameters()}, len(block_calls)

    plain, plain_calls = gradients(False)
    checkpointed, checkpointed_calls = gradients(True)
    assert (plain_calls, checkpointed_calls) == (1, 2), "the middle block was not recomputed in backward"
    for name, grad in plain.items():
        assert rel_err(checkpointed[name], grad) <= 1e-5, name


@pytest.mark.parametrize("family", [SD1, SD2_BASE], ids=["sd1", "sd2"])
def test_full_size_layout_and_parameter_count(family):
    config = family.unet
    with torch.device("meta"):
        ours = UNet(config)
        ref = UNet2DConditionModel(**diffusers_config(config))
    shapes = lambda state: {k: tuple(v.shape) for k, v in state.items()}
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())

    ours_state, ref_state = ours.state_dict(), ref.state_dict()
    as_single_file = {PREFIX + k: v for k, v in ours_state.items()}
    assert shapes(convert_ldm_unet_checkpoint(as_single_file, diffusers_config(config))) == shapes(ref_state)
    assert shapes(diffusers_to_ldm_unet(ref_state, config)) == shapes(ours_state)

    # Every norm's eps and group count (too small a difference for the output comparisons to see).
    ours_modules = dict(ours.named_modules())
    for name, module in ref.named_modules():
        if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            twin = ours_modules[ldm_module_name(name, config)]
            assert (twin.eps, getattr(twin, "num_groups", None)) == (module.eps, getattr(module, "num_groups", None)), name


@pytest.mark.slow
def test_full_size_sd15_forward_on_cpu():
    torch.manual_seed(0)
    with torch.no_grad():
        unet = UNet(SD1.unet).eval()
        out = unet(torch.randn(1, 4, 64, 64), 500, torch.randn(1, 77, SD1.unet.context_dim))
    assert out.shape == (1, 4, 64, 64)
    assert torch.isfinite(out).all() and out.std() > 0
