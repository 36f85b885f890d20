"""The ControlNet against diffusers' ControlNetModel on the same random weights.

Weights travel the real way: ours are written by `save_controlnet` in the original single-file layout
(`control_model.*`) and read back by `load_controlnet`, and diffusers' own single-file converter turns the
same file into its layout. A diffusers folder written by `save_pretrained` comes back through
`diffusers_to_ldm_controlnet`. Every parameter is random, the zero convs included, so no path can hide.
"""
import json
import os

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint, convert_ldm_unet_checkpoint
from safetensors.torch import load_file, save_file

from model.config import SD1, SD2_BASE
from model.controlnet import (CONTROLNET_PREFIX, PUBLIC_HINTS, ControlNet, diffusers_to_ldm_controlnet,
                              load_controlnet, save_controlnet)
from model.loading import CheckpointError
from model.unet import UNet
from tracking.conditioning import CONDITIONING_CHANNELS
from test_unet import (PREFIX as UNET_PREFIX, SD1_TINY, SD2_TINY, TINY, diffusers_config, diffusers_forward,
                       randomize_, random_inputs, rel_err)

HINT_CHANNELS = 7            # e.g. normals (3), depth (1), eye / mouth / face masks (3)
HINT_WIDTHS = (4, 8, 8, 16)  # four widths like the original (so 8x down), narrower to keep the tests fast
LATENT = 8


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """These shapes are too small to share out: extra threads only wait on each other, which made the
    file ~4x slower on a busy machine. Restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_controlnet(config, hint_channels=HINT_CHANNELS, widths=HINT_WIDTHS) -> ControlNetModel:
    """diffusers' ControlNetModel for a UNet of `config`, configured by diffusers' own from_unet."""
    unet = UNet2DConditionModel(**diffusers_config(config))
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=widths,
                                     conditioning_channels=hint_channels, load_weights_from_unet=False)


def random_hint(batch=2, channels=HINT_CHANNELS, size=8 * LATENT, seed=7):
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def reference_residuals(ref: ControlNetModel, x, t, context, hint, scale):
    with torch.no_grad():
        return ref(x, t, context, hint, conditioning_scale=scale, return_dict=False)


def assert_same_residuals(ours, ref):
    (down, mid), (ref_down, ref_mid) = ours, ref
    assert len(down) == len(ref_down) == 12
    for i, (a, b) in enumerate(zip(down, ref_down)):
        assert a.shape == b.shape and rel_err(a, b) <= 1e-5, f"down residual {i}"
    assert rel_err(mid, ref_mid) <= 1e-5


@TINY
def test_single_file_layout_matches_diffusers(config, tmp_path):
    path = str(tmp_path / "controlnet.safetensors")
    save_controlnet(randomize_(ControlNet(config, HINT_CHANNELS, HINT_WIDTHS), seed=1), path)
    assert os.listdir(tmp_path) == ["controlnet.safetensors"], "a temporary file was left behind"
    ours = load_controlnet(path, config, hint_channels=HINT_CHANNELS)
    assert ours.hint_widths == HINT_WIDTHS

    checkpoint = load_file(path)
    assert all(key.startswith(CONTROLNET_PREFIX) for key in checkpoint)
    ref = reference_controlnet(config).eval()
    converted = convert_controlnet_checkpoint(checkpoint, ref.config)
    assert len(converted) == len(checkpoint), "diffusers' converter skipped some of our keys: layout differs"
    ref.load_state_dict(converted, strict=True)

    x, t, context = random_inputs(config, size=LATENT)
    hint = random_hint()
    with torch.no_grad():
        residuals = ours(x, t, context, hint, scale=0.7)
    ref_residuals = reference_residuals(ref, x, t, context, hint, scale=0.7)
    assert_same_residuals(residuals, ref_residuals)

    # The residuals drive the UNet as diffusers' residuals drive diffusers' UNet.
    unet = randomize_(UNet(config), seed=2).eval()
    ref_unet = UNet2DConditionModel(**diffusers_config(config)).eval()
    ref_unet.load_state_dict(convert_ldm_unet_checkpoint(
        {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}, diffusers_config(config)), strict=True)
    with torch.no_grad():
        plain = unet(x, t, context)
        controlled = unet(x, t, context, *residuals)
    assert rel_err(controlled, diffusers_forward(ref_unet, x, t, context, *ref_residuals)) <= 1e-5
    assert rel_err(controlled, plain) > 1e-3, "the residuals had no effect"


@TINY
def test_diffusers_folder_matches_diffusers(config, tmp_path):
    ref = randomize_(reference_controlnet(config), seed=3).eval()
    state = ref.state_dict()
    renamed = diffusers_to_ldm_controlnet(state, config)
    assert {id(v) for v in renamed.values()} == {id(v) for v in state.values()}, "tensors were copied"

    ref.save_pretrained(tmp_path / "controlnet")
    ours = load_controlnet(str(tmp_path / "controlnet"), config, hint_channels=HINT_CHANNELS)
    x, t, context = random_inputs(config, size=LATENT, seed=4)
    hint = random_hint(seed=5)
    with torch.no_grad():
        residuals = ours(x, t, context, hint)
    assert_same_residuals(residuals, reference_residuals(ref, x, t, context, hint, scale=1.0))


def test_from_unet_copies_the_encoder_and_starts_as_a_no_op():
    unet = randomize_(UNet(SD1_TINY), seed=6).eval()
    controlnet = ControlNet.from_unet(unet, HINT_CHANNELS, HINT_WIDTHS)
    unet_state = unet.state_dict()
    for name in ("time_embed", "input_blocks", "middle_block"):
        for key, value in getattr(controlnet, name).state_dict().items():
            assert torch.equal(value, unet_state[f"{name}.{key}"]), f"{name}.{key}"
            assert value.data_ptr() != unet_state[f"{name}.{key}"].data_ptr(), "the copy shares the UNet's memory"
    zero_init = [p for name, p in controlnet.named_parameters()
                 if name.startswith(("zero_convs.", "middle_block_out.", "input_hint_block.14."))]
    assert len(zero_init) == 2 * (12 + 1 + 1) and all(not p.any() for p in zero_init)
    assert controlnet.input_hint_block[12].weight.abs().sum() > 0, "only the hint encoder's last conv starts at zero"

    x, t, context = random_inputs(SD1_TINY, size=LATENT)
    down, mid = controlnet(x, t, context, random_hint())
    assert all(not r.any() for r in [*down, mid])
    with torch.no_grad():
        assert torch.equal(unet(x, t, context, down, mid), unet(x, t, context))

    # Trainable from the first step: the zero convs receive gradients (nothing behind them does yet).
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(8))
    (unet(x, t, context, down, mid) * weights).sum().backward()
    for name, p in controlnet.named_parameters():
        if name.startswith(("zero_convs.", "middle_block_out.")) and name.endswith("weight"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gradient_checkpointing_gives_the_same_gradients():
    controlnet = randomize_(ControlNet(SD2_TINY, HINT_CHANNELS, HINT_WIDTHS), seed=9).train()
    x, t, context = random_inputs(SD2_TINY, size=LATENT)
    hint = random_hint()

    def gradients(checkpointed: bool):
        controlnet.gradient_checkpointing = checkpointed
        controlnet.zero_grad()
        down, mid = controlnet(x, t, context, hint)
        (sum(r.square().mean() for r in down) + mid.square().mean()).backward()
        return {name: p.grad.clone() for name, p in controlnet.named_parameters()}

    plain, checkpointed = gradients(False), gradients(True)
    for name, grad in plain.items():
        assert rel_err(checkpointed[name], grad) <= 1e-5, name


@pytest.mark.parametrize("family", [SD1, SD2_BASE], ids=["sd1", "sd2"])
def test_full_size_layout_matches_diffusers(family):
    """The real sizes and the original hint encoder (input_hint_block.0 ... .14), compared by shape only."""
    config = family.unet
    with torch.device("meta"):
        ours = ControlNet(config, hint_channels=3)
        ref = reference_controlnet(config, hint_channels=3, widths=(16, 32, 96, 256))
    shapes = lambda state: {k: tuple(v.shape) for k, v in state.items()}
    ours_state, ref_state = ours.state_dict(), ref.state_dict()
    assert sorted({int(k.split(".")[1]) for k in ours_state if k.startswith("input_hint_block.")}) == list(range(0, 15, 2))
    as_single_file = {CONTROLNET_PREFIX + k: v for k, v in ours_state.items()}
    assert shapes(convert_controlnet_checkpoint(as_single_file, ref.config)) == shapes(ref_state)
    assert shapes(diffusers_to_ldm_controlnet(ref_state, config)) == shapes(ours_state)


def test_bare_single_file_without_prefix_loads(tmp_path):
    source = randomize_(ControlNet(SD1_TINY, HINT_CHANNELS, HINT_WIDTHS), seed=10)
    path = str(tmp_path / "bare.safetensors")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path)
    loaded = load_controlnet(path, SD1_TINY)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_clear_errors(tmp_path):
    path = str(tmp_path / "controlnet.safetensors")
    save_controlnet(ControlNet(SD1_TINY, HINT_CHANNELS, HINT_WIDTHS), path)
    with pytest.raises(CheckpointError, match=r"controlnet.safetensors: this ControlNet takes 7-channel hints, "
                                              r"but ours have 3 channels; .*a public 3-channel"):
        load_controlnet(path, SD1_TINY, hint_channels=3)
    with pytest.raises(ValueError, match="public_hint 'canny': expected one of normal, normal-opencv, depth"):
        load_controlnet(path, SD1_TINY, public_hint="canny")
    save_controlnet(ControlNet(SD1_TINY, 3, HINT_WIDTHS), str(tmp_path / "public.safetensors"))
    with pytest.raises(CheckpointError, match="public.safetensors: a depth ControlNet feeds hint channel 3, but ours "
                                              "have only 2 channels"):
        load_controlnet(str(tmp_path / "public.safetensors"), SD1_TINY, hint_channels=2, public_hint="depth")

    checkpoint = load_file(path)
    del checkpoint[CONTROLNET_PREFIX + "zero_convs.5.0.weight"]
    save_file(checkpoint, str(tmp_path / "incomplete.safetensors"))
    with pytest.raises(CheckpointError, match=r"incomplete.safetensors: the ControlNet does not match .*"
                                              r"missing \(1\): zero_convs.5.0.weight"):
        load_controlnet(str(tmp_path / "incomplete.safetensors"), SD1_TINY)

    with pytest.raises(CheckpointError, match="wrong shape"):                 # an SD2-shaped ControlNet on SD1
        load_controlnet(path, SD2_TINY)

    save_file({UNET_PREFIX + "out.2.bias": torch.zeros(4)}, str(tmp_path / "unet.safetensors"))
    with pytest.raises(CheckpointError, match="no ControlNet in this file"):
        load_controlnet(str(tmp_path / "unet.safetensors"), SD1_TINY)

    with pytest.raises(ValueError, match=r"hint of shape \(2, 3, 64, 64\), expected \(2, 7, 64, 64\)"):
        x, t, context = random_inputs(SD1_TINY, size=LATENT)
        ControlNet(SD1_TINY, HINT_CHANNELS, HINT_WIDTHS)(x, t, context, random_hint(channels=3))


def test_diffusers_folder_with_other_attention_heads_is_refused(tmp_path):
    folder = tmp_path / "controlnet"
    reference_controlnet(SD1_TINY).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "attention_head_dim": 4}))
    with pytest.raises(CheckpointError, match="config.json: 4 attention heads at level 0, but the UNet has 2"):
        load_controlnet(str(folder), SD1_TINY)


# ----------------------------------------------------------------------------- public 3-channel ControlNets

OUR_HINT = len(CONDITIONING_CHANNELS)


def test_public_hint_table_names_our_channels():
    assert [CONDITIONING_CHANNELS[c] for c in PUBLIC_HINTS["normal"][0]] == ["normal_x", "normal_y", "normal_z"]
    assert PUBLIC_HINTS["normal-opencv"][0] == PUBLIC_HINTS["normal"][0]
    assert {CONDITIONING_CHANNELS[c] for c in PUBLIC_HINTS["depth"][0]} == {"depth"}


def public_and_our_hints(public_hint: str, seed=11):
    """The same picture as the public ControlNet reads it (3 channels) and as ours does (the channels it
    feeds, all others zero). A depth map is one grayscale image, repeated in R, G, B for the public one."""
    into, _ = PUBLIC_HINTS[public_hint]
    shared = random_hint(channels=len(set(into)), seed=seed)
    public = shared.expand(-1, 3, -1, -1) if len(set(into)) == 1 else shared
    ours = torch.zeros(public.shape[0], OUR_HINT, *public.shape[2:])
    ours[:, sorted(set(into))] = shared
    return public, ours


@pytest.mark.parametrize("public_hint", ["normal-opencv", "depth"])
def test_widened_public_controlnet_matches_diffusers(public_hint, tmp_path):
    """A diffusers-format 3-channel ControlNet, widened to our hint: with our extra channels zero it gives
    diffusers' residuals on the original weights and the public hint."""
    config = SD1_TINY
    ref = randomize_(reference_controlnet(config, hint_channels=3), seed=12).eval()
    ref.save_pretrained(tmp_path / "pipeline" / "controlnet")
    ours = load_controlnet(str(tmp_path / "pipeline"), config, hint_channels=OUR_HINT, public_hint=public_hint)
    assert ours.hint_channels == OUR_HINT
    first = ours.input_hint_block[0].weight
    unused = [c for c in range(OUR_HINT) if c not in PUBLIC_HINTS[public_hint][0]]
    assert not first[:, unused].any(), "the channels the public ControlNet never saw must start at zero"

    x, t, context = random_inputs(config, size=LATENT, seed=13)
    public, hint = public_and_our_hints(public_hint)
    with torch.no_grad():
        residuals = ours(x, t, context, hint, scale=0.8)
    assert_same_residuals(residuals, reference_residuals(ref, x, t, context, public, scale=0.8))


def test_widened_single_file_equals_the_original_on_its_channels(tmp_path):
    """The single-file path widens the same way: on hints that are zero outside the normal channels the
    widened encoder is the 3-channel one (our own model, loaded unwidened, as the reference)."""
    source = randomize_(ControlNet(SD2_TINY, 3, HINT_WIDTHS), seed=14).eval()
    path = str(tmp_path / "normal.safetensors")
    save_controlnet(source, path)
    widened = load_controlnet(path, SD2_TINY, hint_channels=OUR_HINT, public_hint="normal-opencv")
    x, t, context = random_inputs(SD2_TINY, size=LATENT, seed=15)
    public, hint = public_and_our_hints("normal-opencv", seed=16)
    with torch.no_grad():
        assert_same_residuals(widened(x, t, context, hint), source(x, t, context, public))


def test_public_normal_convention_is_flipped_into_ours(tmp_path):
    """Public normal ControlNets read x left, y up, z toward the camera, i.e. 1 - our channels: the widened
    first conv on our normals equals theirs on 1 - ours, except on the one-pixel border (zero padding)."""
    ref = randomize_(reference_controlnet(SD1_TINY, hint_channels=3), seed=17).eval()
    ref.save_pretrained(tmp_path / "controlnet")
    ours = load_controlnet(str(tmp_path / "controlnet"), SD1_TINY, hint_channels=OUR_HINT)   # "normal" by default
    _, hint = public_and_our_hints("normal", seed=18)
    with torch.no_grad():
        widened = ours.input_hint_block[0](hint)
        public = ref.controlnet_cond_embedding.conv_in(1 - hint[:, :3])
    inside = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    assert rel_err(widened[inside], public[inside]) <= 1e-5
    assert rel_err(widened, public) > 1e-3, "the border should differ: the public conv pads 1 - ours with zeros"
