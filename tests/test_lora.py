"""LoRA (model/lora.py) against diffusers' own loader: the same random LoRA file, in each layout people have,
fused by diffusers (`load_lora_weights` + `fuse_lora`, through peft) and by us, gives the same networks; so do
files written by diffusers' own `save_lora_weights`, whose strengths (alpha, patterns, rsLoRA) are in the header.

Every Linear and Conv2d of a tiny SD1- or SD2-layout UNet (attention projections, 1x1-conv or Linear
proj_in, 1x1 conv_shortcut, 3x3 ResBlock / down / up convs, the time MLP) and of a tiny CLIP text encoder
carries a LoRA layer."""
import functools
import json
import re
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.clip import CLIPTextModel, hf_to_ours, layers_run
from model.config import TINY, SDConfig
from model.loading import CheckpointError, StableDiffusion
from model.lora import fuse_lora, load_lora, unfuse_lora
from model.unet import UNet, diffusers_to_ldm_unet

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")  # diffusers' LoRA loading runs on peft
from peft.utils import get_peft_model_state_dict  # noqa: E402
from test_clip import SD2_TINY as SD2_TINY_CLIP, hf_reference  # noqa: E402
from test_unet import SD2_TINY as SD2_TINY_UNET  # noqa: E402
from test_unet import (diffusers_config, diffusers_forward, ldm_module_name, random_inputs,  # noqa: E402
                       randomize_, rel_err)

RANK, ALPHA, SCALE = 4, 2.0, 0.7


def lora_modules(model: torch.nn.Module) -> dict[str, tuple]:
    """Module name -> weight shape of every Linear / Conv2d (what a LoRA can target)."""
    return {name: tuple(m.weight.shape) for name, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def random_factor(shape: tuple, gen, up: bool) -> torch.Tensor:
    """A random down (r, in[, kh, kw]) or up (out, r[, 1, 1]) weight, small enough that the network stays sane."""
    scale = 0.3 * shape[1] ** -0.5 if up else torch.Size(shape[1:]).numel() ** -0.5
    return torch.randn(shape, generator=gen) * scale


def random_pair(shape: tuple, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """down and up of rank RANK for a weight of `shape`."""
    down = random_factor((RANK, *shape[1:]), gen, up=False)
    return down, random_factor((shape[0], RANK, *[1] * (len(shape) - 2)), gen, up=True)


def kohya_file(modules: dict, network: str, gen, name=lambda n: n) -> dict:
    """lora_<network>_<module with '_' for '.'>.lora_down.weight / lora_up.weight / alpha."""
    out = {}
    for module, shape in modules.items():
        stem = f"lora_{network}_{name(module).replace('.', '_')}"
        out[f"{stem}.lora_down.weight"], out[f"{stem}.lora_up.weight"] = random_pair(shape, gen)
        out[f"{stem}.alpha"] = torch.tensor(ALPHA)
    return out


def peft_file(modules: dict, network: str, gen, name=lambda n: n) -> dict:
    """<network>.<module>.lora_A.weight / lora_B.weight (alpha = rank: diffusers reads no .alpha here)."""
    out = {}
    for module, shape in modules.items():
        stem = f"{network}.{name(module)}"
        out[f"{stem}.lora_A.weight"], out[f"{stem}.lora_B.weight"] = random_pair(shape, gen)
    return out


def hf_name(module: str) -> str:
    """How LoRA files name the CLIP text model's modules (with transformers' `text_model.`)."""
    return "text_model." + module.removeprefix("text_model.")


def old_diffusers_key(peft_key: str) -> str:
    """A PEFT key as older diffusers spelled it: attention projections as unet.<attention>.processor.to_q_lora
    and text_encoder.<layer>.self_attn.to_q_lora (to_k, to_v, to_out likewise), other layers as
    unet.<module>.lora and text_encoder.<module>.lora_linear_layer; lora_A / lora_B as down / up."""
    module, role = peft_key.rsplit(".lora_", 1)
    role = "down" if role == "A.weight" else "up"
    if m := re.fullmatch(r"(unet\..+)\.(to_q|to_k|to_v|to_out)(?:\.0)?", module):
        return f"{m[1]}.processor.{m[2]}_lora.{role}.weight"
    if m := re.fullmatch(r"(text_encoder\..+\.self_attn)\.(q|k|v|out)_proj", module):
        return f"{m[1]}.to_{m[2]}_lora.{role}.weight"
    return f"{module}.{'lora' if module.startswith('unet.') else 'lora_linear_layer'}.{role}.weight"


LAYOUTS = {  # layout -> (UNet modules, text-encoder modules, generator) -> the file's tensors
    "kohya": lambda unet, te, gen: kohya_file(unet, "unet", gen) | kohya_file(te, "te", gen, hf_name),
    "peft": lambda unet, te, gen: peft_file(unet, "unet", gen) | peft_file(te, "text_encoder", gen, hf_name),
    "old diffusers": lambda unet, te, gen: {old_diffusers_key(k): v for k, v in LAYOUTS["peft"](unet, te, gen).items()},
}


# SD1: 1x1-conv proj_in/out, a 2-layer text tower; SD2: Linear proj_in/out, OpenCLIP-style GELU tower run
# without its last layer (diffusers' SD2 text encoder has that layer removed, so LoRAs never name it)
FAMILIES = {"sd1": TINY, "sd2": replace(TINY, name="tiny-sd2", unet=SD2_TINY_UNET, clip=SD2_TINY_CLIP)}


def reference_networks(config: SDConfig):
    return (diffusers.UNet2DConditionModel(**diffusers_config(config.unet)).eval(),
            hf_reference(config.clip, layers_run(config.clip)))


@functools.cache
def reference_weights(family: str) -> tuple[SDConfig, dict, dict]:
    """A family's config and random weights of diffusers' UNet and transformers' CLIP text model."""
    config = FAMILIES[family]
    unet, text_encoder = reference_networks(config)
    randomize_(unet, seed=3)
    return config, unet.state_dict(), text_encoder.state_dict()


@pytest.fixture
def reference():
    return reference_weights("sd1")


def reference_pipeline(reference):
    """A pipeline around fresh copies of the reference networks (diffusers loads LoRAs into pipelines)."""
    config, unet_state, te_state = reference
    unet, text_encoder = reference_networks(config)
    unet.load_state_dict(unet_state)
    text_encoder.load_state_dict(te_state)
    return diffusers.StableDiffusionPipeline(vae=None, text_encoder=text_encoder, tokenizer=None, unet=unet,
                                             scheduler=None, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)


def ours_from(reference) -> StableDiffusion:
    """Our UNet and text encoder with the reference's weights (through the rename tables)."""
    config, *states = reference
    unet_state, te_state = ({k: v.clone() for k, v in state.items()} for state in states)
    unet, text_encoder = UNet(config.unet).eval(), CLIPTextModel(config.clip).eval()
    unet.load_state_dict(diffusers_to_ldm_unet(unet_state, config.unet))
    text_encoder.load_state_dict(hf_to_ours(te_state, config.clip))
    return StableDiffusion(config, unet, None, text_encoder, None)


def outputs(config: SDConfig, unet_fn, te_fn):
    x, t, context = random_inputs(config.unet)
    ids = torch.randint(0, config.clip.vocab_size, (2, 12), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        return unet_fn(x, t, context), te_fn(ids)


def fused_by_diffusers(reference, path: str):
    """The UNet's and the text encoder's outputs once diffusers has loaded the LoRA file `path` and fused it."""
    pipe = reference_pipeline(reference)
    pipe.load_lora_weights(path)
    pipe.fuse_lora(lora_scale=SCALE)
    return outputs(reference[0], lambda *a: diffusers_forward(pipe.unet, *a),
                   lambda ids: pipe.text_encoder(ids).last_hidden_state)


def fused_by_us(reference, path: str):
    ours = ours_from(reference)
    fuse_lora(ours, load_lora(path), SCALE)
    return outputs(reference[0], ours.unet, ours.text_encoder)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_fused_lora_matches_diffusers(layout, family, tmp_path):
    reference = reference_weights(family)
    config = reference[0]
    unet, text_encoder = reference_networks(config)
    path = str(tmp_path / "lora.safetensors")
    save_file(LAYOUTS[layout](lora_modules(unet), lora_modules(text_encoder), torch.Generator().manual_seed(0)), path)
    expected_unet, expected_te = fused_by_diffusers(reference, path)

    ours = ours_from(reference)
    plain_unet, plain_te = outputs(config, ours.unet, ours.text_encoder)
    before = {k: v.clone() for k, v in [*ours.unet.state_dict().items(), *ours.text_encoder.state_dict().items()]}
    lora = load_lora(path)
    fuse_lora(ours, lora, SCALE)
    got_unet, got_te = outputs(config, ours.unet, ours.text_encoder)

    assert rel_err(got_unet, expected_unet) <= 1e-5
    assert rel_err(got_te, expected_te) <= 1e-5
    assert rel_err(plain_unet, expected_unet) > 1e-2 and rel_err(plain_te, expected_te) > 1e-2, "the LoRA did nothing"

    unfuse_lora(ours, lora, SCALE)
    after = {**ours.unet.state_dict(), **ours.text_encoder.state_dict()}
    for key, weight in before.items():
        torch.testing.assert_close(after[key], weight, rtol=0, atol=1e-6, msg=key)


ADAPTERS = {  # peft LoraConfig settings (besides target_modules) that set the layers' strengths
    "alpha": dict(r=RANK, lora_alpha=8),  # alpha / r = 2
    # rank_pattern makes those layers' tensors that rank; the header's pattern keys are sorted, and the first
    # that matches wins: attn1.to_q gets 5 in down_blocks too
    "patterns": dict(r=RANK, lora_alpha=8, rank_pattern={"attn2.to_k": 8, r"layers\.0\.self_attn\.q_proj": 2},
                     alpha_pattern={"conv.*": 16, "fc1": 1, "attn1.to_q": 5, "down_blocks.*attn1.to_q": 7}),
    "rslora": dict(r=RANK, lora_alpha=8, use_rslora=True),  # alpha / sqrt(r)
}


def diffusers_saved_lora(reference, directory: str, settings: dict) -> str:
    """Random LoRA layers on every Linear / Conv2d of a UNet and text encoder shaped like the reference's, made
    by peft with LoraConfig(**settings) and saved by diffusers' save_lora_weights with those configs as the
    header's adapter metadata, as diffusers' training scripts save them."""
    layers, metadata, gen = {}, {}, torch.Generator().manual_seed(5)
    for name, network in zip(("unet", "text_encoder"), reference_networks(reference[0])):
        config = peft.LoraConfig(target_modules=list(lora_modules(network)), **settings)
        peft.inject_adapter_in_model(config, network)
        with torch.no_grad():
            for key, weight in network.named_parameters():
                if ".lora_" in key:
                    weight.copy_(random_factor(weight.shape, gen, up=".lora_B." in key))
        layers[name], metadata[name] = get_peft_model_state_dict(network), config.to_dict()
    diffusers.StableDiffusionPipeline.save_lora_weights(
        directory, unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        unet_lora_adapter_metadata=metadata["unet"], text_encoder_lora_adapter_metadata=metadata["text_encoder"])
    return f"{directory}/pytorch_lora_weights.safetensors"


# one config for both networks: peft warns that the UNet's patterns match no text-encoder module and back
@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match")
@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_strengths_from_the_header_of_a_file_diffusers_saved(adapter, reference, tmp_path):
    """diffusers keeps alpha, the patterns and rsLoRA in the header's lora_adapter_metadata, not in tensors."""
    path = diffusers_saved_lora(reference, str(tmp_path), ADAPTERS[adapter])
    tensors = load_file(path)
    assert tensors and not [key for key in tensors if not key.endswith(("lora_A.weight", "lora_B.weight"))]
    bare = write(tmp_path, tensors, "bare.safetensors")  # the same tensors without the header
    for expected, got, headless in zip(fused_by_diffusers(reference, path), fused_by_us(reference, path),
                                       fused_by_us(reference, bare)):
        assert rel_err(got, expected) <= 1e-5
        assert rel_err(headless, expected) > 1e-3, "the header changed nothing: the test would not see it ignored"


def test_other_spellings_give_the_same_weights(reference, tmp_path):
    """LDM module names in a kohya file, `.alpha` beside PEFT weights, the old attention-processor keys:
    each fuses exactly like the spelling that diffusers itself was checked against above."""
    modules = lora_modules(reference_networks(TINY)[0])
    attention = {n: s for n, s in modules.items() if ".attn1.to_" in n or ".attn2.to_" in n}

    def fused(tensors: dict) -> dict:
        path = str(tmp_path / "lora.safetensors")
        save_file(tensors, path)
        ours = ours_from(reference)
        fuse_lora(ours, load_lora(path), SCALE)
        return ours.unet.state_dict()

    kohya = fused(kohya_file(modules, "unet", torch.Generator().manual_seed(1)))
    kohya_ldm = fused(kohya_file(modules, "unet", torch.Generator().manual_seed(1),
                                 lambda name: ldm_module_name(name, TINY.unet)))
    base = ours_from(reference).unet.state_dict()
    assert all(torch.equal(kohya[k], kohya_ldm[k]) for k in kohya)
    assert sum(not torch.equal(kohya[k], base[k]) for k in kohya) == len(modules), "some modules got no LoRA"

    peft = peft_file(attention, "unet", torch.Generator().manual_seed(2))
    with_alpha = peft | {k.replace(".lora_A.weight", ".alpha"): torch.tensor(ALPHA) for k in peft if "lora_A" in k}
    plain, alpha_scaled = fused(peft), fused(with_alpha)
    old = fused({old_diffusers_key(k): v for k, v in peft.items()})
    for key in plain:
        assert torch.equal(old[key], plain[key]), key
        torch.testing.assert_close(alpha_scaled[key] - base[key], (plain[key] - base[key]) * ALPHA / RANK,
                                   rtol=1e-4, atol=1e-6)


def write(tmp_path, tensors: dict, name="bad.safetensors") -> str:
    path = str(tmp_path / name)
    save_file(tensors, path)
    return path


def test_a_lora_that_does_not_fit_is_refused_before_any_weight_changes(reference, tmp_path):
    gen = torch.Generator().manual_seed(3)
    good = kohya_file({"down_blocks.0.attentions.0.proj_in": (32, 32, 1, 1)}, "unet", gen)
    unknown = kohya_file({"down_blocks.0.attentions.0.transformer_blocks.0.attn9.to_q": (32, 32)}, "unet", gen)
    # SD2's text context is 1024 wide: its cross-attention keys do not fit an SD1-family model
    sd2 = kohya_file({"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (32, 1024)}, "unet", gen)
    ours = ours_from(reference)
    before = {k: v.clone() for k, v in ours.unet.state_dict().items()}
    for tensors, message in ((good | unknown, "1 layers match no module: lora_unet_down_blocks_0_attentions_0_"
                                              "transformer_blocks_0_attn9_to_q$"),
                             (good | sd2, r"1 layers have the wrong width: lora_unet_down_blocks_0_attentions_0_"
                                          r"transformer_blocks_0_attn2_to_k \(\(32, 4\) x \(4, 1024\) for a weight "
                                          r"\(32, 32\)\)$")):
        path = write(tmp_path, tensors)
        expected = f"{re.escape(path)}: this LoRA does not fit family 'tiny'.*{message}"
        with pytest.raises(CheckpointError, match=expected):
            fuse_lora(ours, load_lora(path))
        assert all(torch.equal(v, before[k]) for k, v in ours.unet.state_dict().items())


@pytest.mark.parametrize("tensors, message", [
    ({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32)},
     r"1 tensors are not LoRA weights of an SD1/SD2 UNet or text encoder \(this looks like a SDXL \(two text "
     r"encoders\) file, which is not supported\): lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"),
    ({"unet.conv_in.lora_A.weight": torch.zeros(4, 4, 3, 3), "unet.conv_in.lora_magnitude_vector": torch.zeros(32)},
     r"\(this looks like a DoRA file, which is not supported\): unet.conv_in.lora_magnitude_vector$"),
    ({"lora_unet_conv_in.hada_w1_a": torch.zeros(4, 4)}, "looks like a LyCORIS"),
    ({"unet.conv_in.lora_A.weight": torch.zeros(4, 4, 3, 3)}, "lack a down or up weight.*: unet.conv_in"),
    ({"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 4, 3, 3),
      "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 8, 1, 1)}, "do not compose: lora_unet_conv_in"),
    ({"model.diffusion_model.out.2.bias": torch.zeros(4)},  # blamed on nothing it is not
     "1 tensors are not LoRA weights of an SD1/SD2 UNet or text encoder: model.diffusion_model.out.2.bias$"),
])
def test_malformed_files_are_refused_by_name(tensors, message, tmp_path):
    path = write(tmp_path, tensors)
    with pytest.raises(CheckpointError, match=f"{re.escape(path)}: .*{message}"):
        load_lora(path)
    with pytest.raises(CheckpointError, match="no such file"):
        load_lora(str(tmp_path / "missing.safetensors"))



@pytest.mark.parametrize("header, message", [
    (json.dumps({"unet.r": 4, "unet.use_dora": True}), r"a DoRA adapter \(unet.use_dora is true in its header\); "
                                                       "DoRA is not supported"),
    (json.dumps({"unet.r": 8}), "unet.conv_in has rank 4, its lora_adapter_metadata says r = 8"),
    (json.dumps({"unet.r": 8, "unet.rank_pattern": {"conv_in": 4}}), None),
    ("{not json", "its header's lora_adapter_metadata is not a JSON object"),
])
def test_adapter_metadata_that_does_not_fit_is_refused_by_name(header, message, tmp_path):
    path = str(tmp_path / "lora.safetensors")
    tensors = {"unet.conv_in.lora_A.weight": torch.zeros(4, 4, 3, 3),
               "unet.conv_in.lora_B.weight": torch.zeros(32, 4, 1, 1)}
    save_file(tensors, path, metadata={"lora_adapter_metadata": header})
    if message is None:
        assert load_lora(path).layers["unet"]["conv_in"].alpha == 8  # PEFT's default lora_alpha
        return
    with pytest.raises(CheckpointError, match=f"{re.escape(path)}: {message}$"):
        load_lora(path)
