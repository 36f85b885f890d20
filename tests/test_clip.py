"""CLIP text encoder: parity with transformers' CLIPTextModel, loaded through diffusers' own
converters from tiny random checkpoints written in the real SD1 / SD2 / diffusers layouts."""
from dataclasses import replace

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig
from transformers import CLIPTextModel as HFCLIPTextModel

from model.clip import CLIPCheckpointError, CLIPTextModel, hf_to_ours, openclip_to_ours, single_file_to_ours
from model.config import CLIPConfig

SD1_TINY = CLIPConfig(vocab_size=1000, width=64, layers=3, heads=4)
SD2_TINY = CLIPConfig(vocab_size=1000, width=64, layers=3, heads=4, activation="gelu", skip_last_layers=1,
                      pad_with_eos=False, layout="openclip")
PROJECTION_DIM = 48  # width of CLIP's contrastive head, stored in SD2 files but unused


def rel_err(ours, ref):
    return ((ours - ref).norm() / ref.norm()).item()


def random_like(t, gen):
    """Random weights of t's shape; LayerNorm-like ones stay near 1 so activations stay sane."""
    noise = torch.randn(t.shape, generator=gen) * 0.1
    return noise + 1 if t.dim() == 1 and torch.all(t == 1) else noise


def hf_reference(config: CLIPConfig, num_layers: int) -> HFCLIPTextModel:
    """transformers' CLIPTextModel of the same shape, built offline."""
    hf_config = CLIPTextConfig(
        vocab_size=config.vocab_size, hidden_size=config.width, num_hidden_layers=num_layers,
        num_attention_heads=config.heads, intermediate_size=config.width * config.mlp_ratio,
        max_position_embeddings=config.context_length, hidden_act=config.activation,
        pad_token_id=1, bos_token_id=config.vocab_size - 2, eos_token_id=config.vocab_size - 1,
        attn_implementation="eager")
    return HFCLIPTextModel(hf_config).eval()


def hf_layout(model: HFCLIPTextModel, gen) -> dict:
    """Random weights under the names diffusers' text_encoder/model.safetensors uses (`text_model.*`).
    Recent transformers flattened CLIPTextModel; the files on the hub keep the prefix."""
    return {"text_model." + k.removeprefix("text_model."): random_like(v, gen).contiguous()
            for k, v in model.state_dict().items()}


def openclip_layout(config: CLIPConfig, gen) -> dict:
    """Random weights in OpenCLIP's text-tower layout, as SD2 files store it under `cond_stage_model.model.`."""
    w, hidden = config.width, config.width * config.mlp_ratio

    def r(*shape):
        return torch.randn(shape, generator=gen) * 0.1

    sd = {"token_embedding.weight": r(config.vocab_size, w), "positional_embedding": r(config.context_length, w),
          "ln_final.weight": 1 + r(w), "ln_final.bias": r(w),
          "text_projection": r(w, PROJECTION_DIM), "logit_scale": torch.tensor(4.6052)}
    for i in range(config.layers):
        block = f"transformer.resblocks.{i}."
        sd |= {block + "ln_1.weight": 1 + r(w), block + "ln_1.bias": r(w),
               block + "attn.in_proj_weight": r(3 * w, w), block + "attn.in_proj_bias": r(3 * w),
               block + "attn.out_proj.weight": r(w, w), block + "attn.out_proj.bias": r(w),
               block + "ln_2.weight": 1 + r(w), block + "ln_2.bias": r(w),
               block + "mlp.c_fc.weight": r(hidden, w), block + "mlp.c_fc.bias": r(hidden),
               block + "mlp.c_proj.weight": r(w, hidden), block + "mlp.c_proj.bias": r(w)}
    return sd


def token_ids(config: CLIPConfig, gen) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (2, config.context_length), generator=gen)


def save_and_reload(sd: dict, path) -> dict:
    save_file(sd, str(path))
    return load_file(str(path))


def ours_from(sd: dict, config: CLIPConfig) -> CLIPTextModel:
    model = CLIPTextModel(config).eval()
    model.load_state_dict(sd, strict=True)
    return model


def load_reference(ref: HFCLIPTextModel, diffusers_sd: dict, allowed_unexpected=frozenset()):
    """Load a diffusers-converted dict the way diffusers does (strict=False), checking what it left out."""
    flat = {k.removeprefix("text_model."): v for k, v in diffusers_sd.items()}
    missing, unexpected = ref.load_state_dict(flat, strict=False)
    assert missing == [] and set(unexpected) == set(allowed_unexpected), (missing, unexpected)


@torch.no_grad()
def test_sd1_single_file_matches_transformers(tmp_path):
    gen = torch.Generator().manual_seed(0)
    ref = hf_reference(SD1_TINY, SD1_TINY.layers)
    checkpoint = {"cond_stage_model.transformer." + k: v for k, v in hf_layout(ref, gen).items()}
    # Real SD1 files also hold the position_ids buffer and, of course, the other models.
    checkpoint["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    checkpoint["model.diffusion_model.out.2.bias"] = torch.zeros(4)
    checkpoint = save_and_reload(checkpoint, tmp_path / "sd1.safetensors")

    load_reference(ref, convert_ldm_clip_checkpoint(checkpoint),
                   allowed_unexpected={"embeddings.position_ids"})
    ours = ours_from(single_file_to_ours(checkpoint, SD1_TINY), SD1_TINY)

    ids = token_ids(SD1_TINY, gen)
    assert rel_err(ours(ids), ref(ids).last_hidden_state) <= 1e-5


@torch.no_grad()
def test_sd2_single_file_matches_diffusers_penultimate_layer(tmp_path):
    gen = torch.Generator().manual_seed(1)
    checkpoint = {"cond_stage_model.model." + k: v for k, v in openclip_layout(SD2_TINY, gen).items()}
    checkpoint["model.diffusion_model.out.2.bias"] = torch.zeros(4)
    checkpoint = save_and_reload(checkpoint, tmp_path / "sd2.safetensors")

    # diffusers' SD2 text encoder has the last layer removed: its last_hidden_state (after the
    # final LayerNorm) is the penultimate layer of the OpenCLIP tower, which the UNet was trained on.
    ref = hf_reference(SD2_TINY, SD2_TINY.layers - 1)
    last = SD2_TINY.layers - 1
    last_layer_keys = {k for k in hf_reference(SD2_TINY, SD2_TINY.layers).state_dict()
                       if k.startswith(f"encoder.layers.{last}.")}
    load_reference(ref, convert_open_clip_checkpoint(ref, checkpoint), allowed_unexpected=last_layer_keys)
    ours = ours_from(single_file_to_ours(checkpoint, SD2_TINY), SD2_TINY)

    ids = token_ids(SD2_TINY, gen)
    assert rel_err(ours(ids), ref(ids).last_hidden_state) <= 1e-5

    # The same context, computed the other way: penultimate hidden state of the full tower + final LayerNorm.
    full = hf_reference(SD2_TINY, SD2_TINY.layers)
    load_reference(full, convert_open_clip_checkpoint(full, checkpoint))
    hidden = full(ids, output_hidden_states=True).hidden_states[-2]
    assert rel_err(ours(ids), full.final_layer_norm(hidden)) <= 1e-5


@pytest.mark.parametrize("config", [SD1_TINY, SD2_TINY], ids=["sd1", "sd2"])
@pytest.mark.parametrize("prefixed", [True, False], ids=["text_model-prefix", "flat"])
@torch.no_grad()
def test_diffusers_text_encoder_matches_transformers(tmp_path, config, prefixed):
    gen = torch.Generator().manual_seed(2)
    ref = hf_reference(config, config.layers - config.skip_last_layers)  # SD2 folders hold 23 of 24 layers
    weights = hf_layout(ref, gen)
    if not prefixed:  # what recent transformers' save_pretrained writes
        weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    (tmp_path / "text_encoder").mkdir()
    weights = save_and_reload(weights, tmp_path / "text_encoder" / "model.safetensors")

    load_reference(ref, weights)
    ours = ours_from(hf_to_ours(weights, config), config)

    ids = token_ids(config, gen)
    assert rel_err(ours(ids), ref(ids).last_hidden_state) <= 1e-5


def test_converters_share_memory_with_the_checkpoint():
    gen = torch.Generator().manual_seed(3)
    openclip = openclip_layout(SD2_TINY, gen)
    ours = openclip_to_ours(openclip, SD2_TINY)
    fused = openclip["transformer.resblocks.0.attn.in_proj_weight"]
    q = ours["encoder.layers.0.self_attn.q_proj.weight"]
    v = ours["encoder.layers.0.self_attn.v_proj.weight"]
    assert q.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    assert torch.equal(v, fused[2 * SD2_TINY.width:])
    assert ours["embeddings.token_embedding.weight"] is openclip["token_embedding.weight"]


def test_skipped_layer_is_dropped_not_loaded():
    gen = torch.Generator().manual_seed(4)
    ours = openclip_to_ours(openclip_layout(SD2_TINY, gen), SD2_TINY)
    assert not any(k.startswith(f"encoder.layers.{SD2_TINY.layers - 1}.") for k in ours)
    assert len(CLIPTextModel(SD2_TINY).encoder.layers) == SD2_TINY.layers - 1


def test_unknown_and_missing_keys_are_reported():
    gen = torch.Generator().manual_seed(5)
    openclip = openclip_layout(SD2_TINY, gen)
    with pytest.raises(CLIPCheckpointError, match="transformer.resblocks.0.attn.bogus"):
        openclip_to_ours(openclip | {"transformer.resblocks.0.attn.bogus": torch.zeros(1)}, SD2_TINY)
    with pytest.raises(CLIPCheckpointError, match="missing keys.*final_layer_norm.bias"):
        openclip_to_ours({k: v for k, v in openclip.items() if k != "ln_final.bias"}, SD2_TINY)
    # A deeper tower than configured (e.g. an SD2 file read as SD1-depth) is not silently truncated.
    with pytest.raises(CLIPCheckpointError, match="encoder.layers.2"):
        openclip_to_ours(openclip, replace(SD2_TINY, layers=2, skip_last_layers=0))
    with pytest.raises(CLIPCheckpointError, match="cond_stage_model.transformer."):
        single_file_to_ours({"cond_stage_model.model.x": torch.zeros(1)}, SD1_TINY)
