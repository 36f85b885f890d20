"""Checkpoint loading: single-file and diffusers layouts through the real loader, strictness, bad files,
and sample.py's text-to-image end to end on a tiny checkpoint."""
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from model.clip import CLIPTextModel
from model.config import SD1, TINY, config_to_dict
from model.loading import (CLIP_PREFIX, UNET_PREFIX, V_PREDICTION_PROBE, VAE_PREFIX, CheckpointError,
                           StableDiffusion, load_stable_diffusion, open_safetensors, resolve_prediction,
                           save_single_file)
from model.tokenizer import CLIPTokenizer, TokenizerFilesNotFoundError
from model.unet import UNet
from model.vae import AutoencoderKL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny preset with the real CLIP vocabulary, so that tokenizer discovery is exercised too.
TINY_CLIP = replace(TINY, name="tiny-clip", clip=replace(TINY.clip, vocab_size=49408, tokenizer="clip"))


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values in every tensor, so zero-initialised layers cannot hide a wrong load."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module.eval()


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tokenizer_folder):
    """A tiny SD1-shaped single-file checkpoint, with the CLIP vocabulary beside it."""
    folder = tmp_path_factory.mktemp("tiny")
    shutil.copytree(tokenizer_folder, folder / "tokenizer")
    sd = StableDiffusion(TINY_CLIP, randomize(UNet(TINY.unet), 0), randomize(AutoencoderKL(TINY.vae), 1),
                         randomize(CLIPTextModel(TINY_CLIP.clip), 2),
                         CLIPTokenizer.from_path(str(tokenizer_folder)))
    path = str(folder / "tiny.safetensors")
    save_single_file(sd, path)
    return sd, path


def run_all(sd: StableDiffusion):
    torch.manual_seed(0)
    ids = sd.tokenizer(["a photo of sks person"])
    context = sd.text_encoder(ids)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        return context, sd.unet(x, torch.tensor([500]), context), sd.vae.decode(x), sd.vae.encode(torch.randn(1, 3, 64, 64)).mean


def test_single_file_round_trip(tiny_checkpoint):
    sd, path = tiny_checkpoint
    loaded = load_stable_diffusion(path)
    assert loaded.config == TINY_CLIP and loaded.prediction_source == "svp metadata"
    for net, ref_net in ((loaded.unet, sd.unet), (loaded.vae, sd.vae), (loaded.text_encoder, sd.text_encoder)):
        ref = ref_net.state_dict()
        assert all(torch.equal(v, ref[k]) for k, v in net.state_dict().items())
    for ours, ref in zip(run_all(loaded), run_all(sd)):
        assert rel_err(ours, ref) < 1e-5  # same weights: only oneDNN's summation order may differ


def test_half_precision_load_casts_every_weight(tiny_checkpoint):
    loaded = load_stable_diffusion(tiny_checkpoint[1], dtype="fp16")
    for net in (loaded.unet, loaded.vae, loaded.text_encoder):
        assert {p.dtype for p in net.parameters()} == {torch.float16}


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_diffusers_folder_matches_reference_models(family, tmp_path, tokenizer_folder):
    """A diffusers pipeline folder (random tiny weights saved by diffusers/transformers themselves)
    loads through config.json translation + key renames and computes what the reference models do."""
    from diffusers import AutoencoderKL as RefVAE, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel as RefCLIP

    sd2 = family == "sd2"
    width = 32
    unet = randomize(UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64, 64, 64), layers_per_block=2, norm_num_groups=8,
        cross_attention_dim=24 if sd2 else 32, attention_head_dim=(4, 8, 8, 8) if sd2 else 2,
        use_linear_projection=sd2), 3)
    vae = randomize(RefVAE(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8,
                           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4), 4)
    text = randomize(RefCLIP(CLIPTextConfig(
        vocab_size=49408, hidden_size=24 if sd2 else width, intermediate_size=96 if sd2 else 4 * width,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
        hidden_act="gelu" if sd2 else "quick_gelu")), 5)
    unet.save_pretrained(tmp_path / "unet")
    vae.save_pretrained(tmp_path / "vae")
    text.save_pretrained(tmp_path / "text_encoder")
    shutil.copytree(tokenizer_folder, tmp_path / "tokenizer")
    os.makedirs(tmp_path / "scheduler")
    prediction = "v_prediction" if sd2 else "epsilon"
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": prediction}))

    ours = load_stable_diffusion(str(tmp_path))
    assert ours.config.prediction_type == prediction
    assert ours.prediction_source == "scheduler/scheduler_config.json"
    assert ours.tokenizer.pad_id == (0 if sd2 else ours.tokenizer.eos_id)
    ids = ours.tokenizer(["a photo of sks person"])
    x, t, z = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        context = ours.text_encoder(ids)
        assert rel_err(context, text(ids).last_hidden_state) < 1e-5
        ctx = torch.randn(2, 77, ours.config.unet.context_dim)
        assert rel_err(ours.unet(x, t, ctx), unet(x, t, ctx).sample) < 1e-5
        assert rel_err(ours.vae.decode(z), vae.decode(z).sample) < 1e-5


@pytest.mark.slow
def test_full_size_sd15_checkpoint_loads_strictly_and_runs(tmp_path, tokenizer_folder):
    """Random weights at SD 1.5's real size and key layout, written in fp16 like most released files."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel as RefCLIP

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for prefix, build in ((UNET_PREFIX, lambda: UNet(SD1.unet)), (VAE_PREFIX, lambda: AutoencoderKL(SD1.vae)),
                          (CLIP_PREFIX["openai"] + "text_model.", lambda: CLIPTextModel(SD1.clip))):
        with torch.device("meta"):
            names = {k: v.shape for k, v in build().state_dict().items()}
        tensors.update({prefix + k: (torch.randn(shape, generator=g) * 0.02).half() for k, shape in names.items()})
    tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    path = str(tmp_path / "sd15.safetensors")
    save_file(tensors, path)
    del tensors

    sd = load_stable_diffusion(path, tokenizer=str(tokenizer_folder))
    assert sd.config == SD1
    with torch.device("meta"):
        ref_unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
        ref_clip = RefCLIP(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                           num_hidden_layers=12, hidden_act="quick_gelu"))
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(sd.unet) == count(ref_unet)
    assert count(sd.text_encoder) == count(ref_clip)
    with torch.no_grad():
        out = sd.unet(torch.randn(1, 4, 64, 64), torch.tensor([999]), sd.text_encoder(sd.tokenizer("a cat")))
    assert out.shape == (1, 4, 64, 64) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- bad input

def test_missing_and_pickle_files_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_stable_diffusion(str(tmp_path / "nope.safetensors"))
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="pickle checkpoints are refused"):
        load_stable_diffusion(str(ckpt))


def test_truncated_and_garbage_files_are_reported(tiny_checkpoint, tmp_path):
    data = open(tiny_checkpoint[1], "rb").read()
    for name, content in (("truncated.safetensors", data[: len(data) // 2]), ("garbage.safetensors", os.urandom(4096))):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=f"{name}: not a readable .safetensors file"):
            load_stable_diffusion(str(tmp_path / name))


def test_file_without_a_unet_is_reported(tmp_path):
    path = tmp_path / "vae_only.safetensors"
    save_file({VAE_PREFIX + "quant_conv.weight": torch.zeros(8, 8, 1, 1)}, str(path))
    with pytest.raises(CheckpointError, match="no Stable Diffusion UNet"):
        load_stable_diffusion(str(path))


def test_missing_unexpected_and_misshaped_keys_are_listed(tiny_checkpoint, tmp_path, tokenizer_folder):
    from safetensors.torch import load_file
    tensors = load_file(tiny_checkpoint[1])
    meta = {"svp_config": json.dumps(config_to_dict(TINY_CLIP))}
    del tensors[UNET_PREFIX + "out.2.weight"]
    tensors[UNET_PREFIX + "extra.weight"] = torch.zeros(1)
    tensors[UNET_PREFIX + "time_embed.0.bias"] = torch.zeros(3)
    path = str(tmp_path / "broken.safetensors")
    save_file(tensors, path, metadata=meta)
    with pytest.raises(CheckpointError) as e:
        load_stable_diffusion(path, tokenizer=str(tokenizer_folder))
    message = str(e.value)
    for expected in ("broken.safetensors", "family 'tiny-clip'", "missing (1): out.2.weight",
                     "unexpected (1): extra.weight", "time_embed.0.bias (3,)"):
        assert expected in message


def test_wrong_family_is_reported(tiny_checkpoint, tmp_path, tokenizer_folder):
    """A tiny checkpoint stripped of its metadata is taken for SD1, and every shape disagrees."""
    from safetensors.torch import load_file
    path = str(tmp_path / "no_metadata.safetensors")
    save_file(load_file(tiny_checkpoint[1]), path)
    with pytest.raises(CheckpointError, match="cross-attention width 32 matches no supported family"):
        load_stable_diffusion(path)
    tensors = load_file(tiny_checkpoint[1])
    tensors = {k: v for k, v in tensors.items() if "attn2" not in k}
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match="does not match family 'sd1'.*wrong shape"):
        load_stable_diffusion(path, tokenizer=str(tokenizer_folder))


def test_byte_level_tiny_preset_needs_no_vocabulary(tmp_path):
    sd = StableDiffusion(TINY, UNet(TINY.unet), AutoencoderKL(TINY.vae), CLIPTextModel(TINY.clip),
                         CLIPTokenizer.byte_level())
    save_single_file(sd, str(tmp_path / "tiny.safetensors"))
    loaded = load_stable_diffusion(str(tmp_path / "tiny.safetensors"))
    assert loaded.config == TINY
    assert torch.equal(loaded.tokenizer("sks"), sd.tokenizer("sks"))


def test_missing_vocabulary_is_reported_before_any_weight_is_read(tiny_checkpoint, tmp_path, tokenizer_folder,
                                                                 monkeypatch):
    lonely = tmp_path / "lonely.safetensors"
    shutil.copy(tiny_checkpoint[1], lonely)
    monkeypatch.delenv("SVP_TOKENIZER", raising=False)

    def no_weights_yet(*args):
        raise AssertionError("weights were read before the vocabulary was found")

    with monkeypatch.context() as patch:
        patch.setattr("model.loading.read_tensors", no_weights_yet)
        with pytest.raises(TokenizerFilesNotFoundError) as e:
            load_stable_diffusion(str(lonely))
        for option in ("lonely.safetensors: no CLIP vocabulary", "--tokenizer", "$SVP_TOKENIZER",
                       "tokenizer/ folder", "bpe_simple_vocab_16e6.txt.gz", "next to the checkpoint"):
            assert option in str(e.value)
        with pytest.raises(TokenizerFilesNotFoundError, match=r"nowhere \(--tokenizer\)"):
            load_stable_diffusion(str(lonely), tokenizer=str(tmp_path / "nowhere"))
        monkeypatch.setenv("SVP_TOKENIZER", str(tmp_path / "elsewhere"))
        with pytest.raises(TokenizerFilesNotFoundError, match=r"elsewhere \(\$SVP_TOKENIZER\)"):
            load_stable_diffusion(str(lonely))

    monkeypatch.setenv("SVP_TOKENIZER", str(tokenizer_folder))  # the fallback when nothing is beside the file
    assert load_stable_diffusion(str(lonely)).config == TINY_CLIP


# ----------------------------------------------------------------------------- prediction type

def sd2_probe_file(path, probe_std: float | None) -> str:
    """The few tensors SD2 detection reads: an SD2-wide cross-attention and, unless None, the probe
    LayerNorm shift with a population std of `probe_std` (the rest of the UNet is absent)."""
    tensors = {UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 1024)}
    if probe_std is not None:
        probe = torch.randn(320, generator=torch.Generator().manual_seed(0))
        tensors[UNET_PREFIX + V_PREDICTION_PROBE] = (probe - probe.mean()) / probe.std(unbiased=False) * probe_std
    save_file(tensors, str(path))
    return str(path)


@pytest.mark.parametrize("probe_std, family, prediction", [(0.2, "sd2-v", "v_prediction"),
                                                           (0.03, "sd2-base", "epsilon")])
def test_sd2_prediction_type_is_told_from_the_weights(tmp_path, probe_std, family, prediction):
    path = sd2_probe_file(tmp_path / "sd2.safetensors", probe_std)
    config, how = resolve_prediction(open_safetensors(path), path, None)
    assert (config.name, config.prediction_type) == (family, prediction)
    assert how.startswith("detected from the weights") and f"{probe_std:.3f}" in how
    assert config.image_size == (768 if prediction == "v_prediction" else 512)
    # An explicit choice wins, and picks the matching SD2 model (epsilon: the 512 px base).
    other = "epsilon" if prediction == "v_prediction" else "v_prediction"
    config, how = resolve_prediction(open_safetensors(path), path, other)
    assert (config.prediction_type, how) == (other, "as requested")
    assert config.name == ("sd2-base" if other == "epsilon" else "sd2-v")


def test_sd2_without_the_probe_defaults_to_v(tmp_path):
    path = sd2_probe_file(tmp_path / "sd2.safetensors", None)
    config, how = resolve_prediction(open_safetensors(path), path, None)
    assert config.prediction_type == "v_prediction" and how.startswith("default")


def test_detection_is_logged_in_one_line_before_the_weights_load(tmp_path, tokenizer_folder, caplog):
    """The real loader on an SD2 base file: the line comes before the (here missing) weights are refused."""
    path = sd2_probe_file(tmp_path / "sd2-base.safetensors", 0.03)
    with caplog.at_level("INFO", logger="model.loading"), pytest.raises(CheckpointError, match="missing"):
        load_stable_diffusion(path, tokenizer=str(tokenizer_folder))
    (line,) = [r.getMessage() for r in caplog.records if r.name == "model.loading"]
    assert line.startswith("sd2-base.safetensors: sd2-base, epsilon (detected from the weights: std of "
                           f"{V_PREDICTION_PROBE} 0.030 <= 0.09)")


# ----------------------------------------------------------------------------- sample.py

def test_sample_py_text_to_image(tiny_checkpoint, tmp_path):
    from PIL import Image
    out = tmp_path / "img.png"
    cmd = [sys.executable, "sample.py", "--ckpt", tiny_checkpoint[1], "--prompt", "a photo of sks person",
           "--steps", "3", "--out", str(out), "--seed", "1"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    image = Image.open(out)
    assert image.size == (64, 64)
    again = tmp_path / "again.png"
    subprocess.run(cmd[:-3] + [str(again), "--seed", "1"], cwd=ROOT, check=True, capture_output=True)
    assert open(out, "rb").read() == open(again, "rb").read()  # same seed, same image


def test_sample_py_bad_checkpoint_exits_with_one_line(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    out = tmp_path / "img.png"
    result = subprocess.run([sys.executable, "sample.py", "--ckpt", str(bad), "--prompt", "x", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.strip().startswith("error:") and "bad.safetensors" in result.stderr
    assert "Traceback" not in result.stderr
    assert not os.listdir(tmp_path) == [] and not out.exists()
