"""Loading Stable Diffusion weights from .safetensors, strictly and with one copy in memory.

Two layouts are read:
  * a single-file original checkpoint: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE),
    `cond_stage_model.transformer.text_model.*` (SD1, OpenAI CLIP) or `cond_stage_model.model.*`
    (SD2, OpenCLIP with fused in_proj attention weights);
  * a diffusers folder: `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`.

Our modules carry the single-file names, so a single-file checkpoint loads by stripping a prefix; the
other layouts go through pure rename functions that live beside each model. Every model is built on
the meta device and receives the file's tensors by assignment (cast one tensor at a time), so loading
never holds two full copies of the weights.

The family (SD1 / SD2) is read from the keys and shapes. SD2-512 (epsilon) and SD2-768 (v) have
tensors of identical shapes, but not identical statistics: fine-tuning for v-prediction leaves the
LayerNorm shifts of the UNet's last transformer spread wider (a population std above 0.09 in the v
releases, far below in the epsilon ones; the heuristic ComfyUI's model detection uses too), so an SD2
single file's prediction type is read from that one tensor. `prediction_type=` (sample.py's
`--v-prediction` / `--epsilon`) overrides, and a diffusers folder's scheduler config decides for itself.
Checkpoints written by svp (tiny presets, tests) carry their exact config in the safetensors metadata
under `svp_config`. The outcome, and how it was decided, is logged in one line and kept on the loaded
`StableDiffusion` (`config.name`, `config.prediction_type`, `prediction_source`).

The CLIP vocabulary is found and read before any weight is, so a missing one costs no loading time.
"""
import json
import logging
import os
from dataclasses import dataclass, replace

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from model.clip import CLIPCheckpointError, CLIPTextModel, hf_to_ours, openclip_to_ours
from model.config import (SD1, SD2_BASE, SD2_V, TINY, CLIPConfig, SDConfig, UNetConfig, VAEConfig,
                          config_from_dict, config_to_dict)
from model.files import atomic_write, read_json
from model.tokenizer import CLIPTokenizer, TokenizerFilesNotFoundError
from model.unet import UNet, diffusers_to_ldm_unet
from model.vae import AutoencoderKL, diffusers_to_ldm_vae, fit_vae

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = {"openai": "cond_stage_model.transformer.", "openclip": "cond_stage_model.model."}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# The tensor that tells an SD2 v-prediction UNet from an epsilon one, and the threshold on its std.
V_PREDICTION_PROBE = "output_blocks.11.1.transformer_blocks.0.norm1.bias"
V_PREDICTION_MIN_STD = 0.09
TOKENIZER_OPTIONS = ("pass --tokenizer PATH, set $SVP_TOKENIZER=PATH, or put a tokenizer/ folder "
                     "(vocab.json + merges.txt), a tokenizer.json or OpenAI's bpe_simple_vocab_16e6.txt.gz "
                     "next to the checkpoint")

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file and the problem."""


@dataclass
class StableDiffusion:
    """The three networks and the tokenizer of one Stable Diffusion checkpoint."""
    config: SDConfig
    unet: UNet
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    prediction_source: str = "given"   # how config.prediction_type was decided (see `resolve_prediction`)

    def to(self, device=None, dtype=None):
        for net in (self.unet, self.vae, self.text_encoder):
            net.to(device=device, dtype=dtype)
        return self


# ----------------------------------------------------------------------------- reading files

def open_safetensors(path: str):
    """Open a .safetensors file lazily; refuse pickles and explain corrupt files."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file")
    if path.endswith(PICKLE_SUFFIXES):
        raise CheckpointError(f"{path}: pickle checkpoints are refused (they can run code when loaded); "
                              "convert it to .safetensors first")
    try:
        return safe_open(path, framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable .safetensors file (truncated or corrupt?): {e}") from e


def read_tensors(handle, prefix: str, dtype: torch.dtype | None) -> dict:
    """All tensors under `prefix`, with the prefix stripped, cast one at a time."""
    out = {}
    for key in handle.keys():
        if key.startswith(prefix):
            t = handle.get_tensor(key)
            out[key[len(prefix):]] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return out


def assign_weights(module_fn, state: dict, what: str, path: str, expected_as: str):
    """Build `module_fn()` on the meta device and hand it `state` strictly, by assignment.

    `expected_as` names what the file was taken for (a family), for the error message."""
    with torch.device("meta"):
        module = module_fn()
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k} {tuple(state[k].shape)} != {expected[k]}" for k in expected
                 if k in state and tuple(state[k].shape) != expected[k]]
    if missing or unexpected or misshaped:
        problems = [f"{name} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                    for name, keys in (("missing", missing), ("unexpected", unexpected),
                                       ("wrong shape", misshaped)) if keys]
        raise CheckpointError(f"{path}: the {what} does not match {expected_as}; "
                              + "; ".join(problems))
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def described(config: SDConfig) -> str:
    return f"family '{config.name}'"


def convert_clip(to_ours, state: dict, path: str, config: SDConfig) -> dict:
    try:
        return to_ours(state, config.clip)
    except CLIPCheckpointError as e:
        raise CheckpointError(f"{path}: the text encoder does not match family '{config.name}': {e}") from e


# ----------------------------------------------------------------------------- family detection

def detect_family(handle, path: str) -> SDConfig:
    """The family of a single-file checkpoint, from its metadata, keys and shapes (SD2: as SD2_V)."""
    meta = handle.metadata() or {}
    if "svp_config" in meta:
        return config_from_dict(json.loads(meta["svp_config"]))
    keys = set(handle.keys())
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise CheckpointError(f"{path}: no Stable Diffusion UNet in this file (no '{UNET_PREFIX}*' keys); "
                              "is it a LoRA, a VAE or a diffusers weight file?")
    cross_attn = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    context_dim = handle.get_slice(cross_attn).get_shape()[-1] if cross_attn in keys else None
    if context_dim == SD2_V.unet.context_dim or any(k.startswith(CLIP_PREFIX["openclip"]) for k in keys):
        return SD2_V
    if context_dim not in (None, SD1.unet.context_dim):
        raise CheckpointError(f"{path}: cross-attention width {context_dim} matches no supported family "
                              "(SD1: 768, SD2: 1024); SDXL and others are not supported")
    return SD1


def sd2_prediction_from_weights(handle) -> tuple[SDConfig, str]:
    """SD2_V or SD2_BASE, told apart by the spread of one LayerNorm shift (see the module docstring)."""
    key = UNET_PREFIX + V_PREDICTION_PROBE
    if key not in handle.keys():
        return SD2_V, f"default: no {V_PREDICTION_PROBE} to tell it from the weights"
    std = handle.get_tensor(key).float().std(unbiased=False).item()
    is_v = std > V_PREDICTION_MIN_STD
    return (SD2_V if is_v else SD2_BASE), (f"detected from the weights: std of {V_PREDICTION_PROBE} "
                                           f"{std:.3f} {'>' if is_v else '<='} {V_PREDICTION_MIN_STD}")


def resolve_prediction(handle, path: str, prediction_type: str | None) -> tuple[SDConfig, str]:
    """(config, how its prediction type was decided) for a single file: the caller's `prediction_type`,
    else svp's metadata, else the family (SD1: epsilon; SD2: from the weights). An SD2 family follows
    the prediction type: epsilon is the 512 px base model, v the 768 px one."""
    family = detect_family(handle, path)
    is_sd2 = family is SD2_V
    if prediction_type:
        config = ((SD2_V if prediction_type == "v_prediction" else SD2_BASE) if is_sd2
                  else replace(family, prediction_type=prediction_type))
        return config, "as requested"
    if "svp_config" in (handle.metadata() or {}):
        return family, "svp metadata"
    if is_sd2:
        return sd2_prediction_from_weights(handle)
    return family, "SD1 models predict epsilon"


def log_detection(path: str, config: SDConfig, how: str):
    log.info(f"{os.path.basename(os.path.normpath(path))}: {config.name}, {config.prediction_type} ({how})")


# ----------------------------------------------------------------------------- tokenizer

def load_tokenizer(config: SDConfig, checkpoint: str, tokenizer: str | None = None) -> CLIPTokenizer:
    """The tokenizer of `config`; the CLIP vocabulary comes from `tokenizer` if given, else from beside
    `checkpoint` (a diffusers folder: its tokenizer/), else from $SVP_TOKENIZER.

    Cheap next to the weights, so loaders call it first: a missing vocabulary fails at once."""
    if config.clip.tokenizer == "bytes":
        return CLIPTokenizer.byte_level(config.clip.pad_with_eos, config.clip.context_length)
    if tokenizer:
        places = [(tokenizer, "--tokenizer")]
    else:
        folder = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(os.path.abspath(checkpoint))
        places = [(folder, "next to the checkpoint")]
        if os.environ.get("SVP_TOKENIZER"):
            places.append((os.environ["SVP_TOKENIZER"], "$SVP_TOKENIZER"))
    for place, _ in places:
        try:
            return CLIPTokenizer.from_path(place, pad_with_eos=config.clip.pad_with_eos)
        except TokenizerFilesNotFoundError:
            continue
    tried = ", ".join(f"{place} ({source})" for place, source in places)
    raise TokenizerFilesNotFoundError(f"{checkpoint}: no CLIP vocabulary found (looked in {tried}); "
                                      f"{TOKENIZER_OPTIONS}")


# ----------------------------------------------------------------------------- single file

def load_single_file(path: str, dtype=torch.float32, prediction_type: str | None = None,
                     tokenizer: str | None = None) -> StableDiffusion:
    handle = open_safetensors(path)
    config, how = resolve_prediction(handle, path, prediction_type)
    tok = load_tokenizer(config, path, tokenizer)
    log_detection(path, config, how)
    unet = assign_weights(lambda: UNet(config.unet), read_tensors(handle, UNET_PREFIX, dtype),
                          "UNet", path, described(config))
    vae = assign_weights(lambda: AutoencoderKL(config.vae), read_tensors(handle, VAE_PREFIX, dtype),
                         "VAE", path, described(config))
    to_ours = openclip_to_ours if config.clip.layout == "openclip" else hf_to_ours
    clip_state = convert_clip(to_ours, read_tensors(handle, CLIP_PREFIX[config.clip.layout], dtype), path, config)
    text_encoder = assign_weights(lambda: CLIPTextModel(config.clip), clip_state, "text encoder", path,
                                  described(config))
    return StableDiffusion(config, unet, vae, text_encoder, tok, how)


def save_single_file(sd: StableDiffusion, path: str):
    """Write `sd` in the single-file layout (SD1-style text tower names), atomically.

    Used for the tiny offline preset and by tests; the config travels in the metadata.
    """
    if sd.config.clip.layout != "openai":
        raise CheckpointError(f"{path}: writing the OpenCLIP layout is not supported")
    from safetensors.torch import save_file
    tensors = {}
    for prefix, net in ((UNET_PREFIX, sd.unet), (VAE_PREFIX, sd.vae),
                        (CLIP_PREFIX["openai"] + "text_model.", sd.text_encoder)):
        tensors.update({prefix + k: v.contiguous() for k, v in net.state_dict().items()})
    with atomic_write(path) as tmp:
        save_file(tensors, tmp, metadata={"svp_config": json.dumps(config_to_dict(sd.config))})


def write_tiny_base(path: str, seed: int, crops: np.ndarray, vae_steps: int):
    """A random-initialised TINY model (seeded) in the single-file layout, its VAE fitted to `crops`
    (train.py --preset tiny without --base: an offline base model that shows the person).

    The VAE's latent scale is then measured the way LDM measured SD's 0.18215: one over the standard
    deviation of the latents of the images. Unscaled latents of the wrong spread would either drown in
    the noise at every timestep or never be reached by it.
    """
    torch.manual_seed(seed)
    images = torch.from_numpy(np.array(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1  # a copy: crops may be a memmap
    vae = fit_vae(AutoencoderKL(TINY.vae), images, vae_steps, seed)
    with torch.no_grad():
        scale = 1 / torch.cat([vae.encode(images[i:i + 8]).mean for i in range(0, len(images), 8)]).std().item()
    config = replace(TINY, vae=replace(TINY.vae, scale_factor=round(scale, 5)))
    vae.config = config.vae
    sd = StableDiffusion(config, UNet(config.unet), vae, CLIPTextModel(config.clip), load_tokenizer(config, ""))
    save_single_file(sd, path)


# ----------------------------------------------------------------------------- diffusers folder

def weights_file(folder: str) -> str:
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors",
                 "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors"):
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise CheckpointError(f"{folder}: no .safetensors weights here (pickled .bin weights are refused)")


def config_from_diffusers(root: str) -> SDConfig:
    """Translate the diffusers config.json files of a pipeline folder into one SDConfig."""
    u = read_json(os.path.join(root, "unet", "config.json"))
    v = read_json(os.path.join(root, "vae", "config.json"))
    t = read_json(os.path.join(root, "text_encoder", "config.json"))
    widths = u["block_out_channels"]
    heads = u["attention_head_dim"]  # diffusers' historic misnomer: SD1 stores a head *count* here
    if isinstance(heads, int):
        head_cfg = dict(num_heads=heads, head_dim=None)
    else:
        head_dims = {w // h for w, h in zip(widths, heads)}
        if len(head_dims) != 1:
            raise CheckpointError(f"{root}/unet/config.json: unequal head widths {sorted(head_dims)}")
        head_cfg = dict(num_heads=None, head_dim=head_dims.pop())
    unet = UNetConfig(
        in_channels=u["in_channels"], out_channels=u["out_channels"], model_channels=widths[0],
        channel_mult=tuple(w // widths[0] for w in widths), num_res_blocks=u["layers_per_block"],
        attention_levels=tuple(i for i, b in enumerate(u["down_block_types"]) if "CrossAttn" in b),
        transformer_depth=u.get("transformer_layers_per_block", 1) or 1,
        context_dim=u["cross_attention_dim"], use_linear_proj=bool(u.get("use_linear_projection")),
        norm_groups=u.get("norm_num_groups", 32), norm_eps=u.get("norm_eps", 1e-5), **head_cfg)
    vw = v["block_out_channels"]
    vae = VAEConfig(in_channels=v["in_channels"], out_channels=v["out_channels"], ch=vw[0],
                    ch_mult=tuple(w // vw[0] for w in vw), num_res_blocks=v["layers_per_block"],
                    z_channels=v["latent_channels"], embed_dim=v["latent_channels"],
                    norm_groups=v.get("norm_num_groups", 32), scale_factor=v.get("scaling_factor", 0.18215))
    openclip = t.get("hidden_act") == "gelu"  # SD2's OpenCLIP tower; diffusers stores it minus its last layer
    clip = CLIPConfig(vocab_size=t["vocab_size"], width=t["hidden_size"],
                      layers=t["num_hidden_layers"] + (1 if openclip else 0), heads=t["num_attention_heads"],
                      context_length=t["max_position_embeddings"], mlp_ratio=t["intermediate_size"] // t["hidden_size"],
                      activation=t["hidden_act"], skip_last_layers=1 if openclip else 0,
                      pad_with_eos=not openclip, layout="openclip" if openclip else "openai")
    family = SD2_BASE if openclip else SD1
    return replace(family, name=f"{family.name} (diffusers)", unet=unet, vae=vae, clip=clip,
                   image_size=u.get("sample_size", 64) * 8)


def diffusers_prediction(root: str, prediction_type: str | None) -> tuple[str, str]:
    """(prediction type, how it was decided): the caller's, else the scheduler config's, else epsilon."""
    if prediction_type:
        return prediction_type, "as requested"
    scheduler = os.path.join(root, "scheduler", "scheduler_config.json")
    if not os.path.exists(scheduler):
        return "epsilon", "default: no scheduler/scheduler_config.json"
    return read_json(scheduler).get("prediction_type", "epsilon"), "scheduler/scheduler_config.json"


def load_diffusers(root: str, dtype=torch.float32, prediction_type: str | None = None,
                   tokenizer: str | None = None) -> StableDiffusion:
    prediction, how = diffusers_prediction(root, prediction_type)
    config = replace(config_from_diffusers(root), prediction_type=prediction)
    tok = load_tokenizer(config, root, tokenizer)
    log_detection(root, config, how)

    def tensors(sub):
        path = weights_file(os.path.join(root, sub))
        return read_tensors(open_safetensors(path), "", dtype), path

    state, path = tensors("unet")
    unet = assign_weights(lambda: UNet(config.unet), diffusers_to_ldm_unet(state, config.unet), "UNet", path,
                          described(config))
    state, path = tensors("vae")
    vae = assign_weights(lambda: AutoencoderKL(config.vae), diffusers_to_ldm_vae(state, config.vae), "VAE", path,
                         described(config))
    state, path = tensors("text_encoder")
    text_encoder = assign_weights(lambda: CLIPTextModel(config.clip), convert_clip(hf_to_ours, state, path, config),
                                  "text encoder", path, described(config))
    return StableDiffusion(config, unet, vae, text_encoder, tok, how)


def load_stable_diffusion(path: str, dtype: str | torch.dtype = torch.float32, prediction_type: str | None = None,
                          tokenizer: str | None = None) -> StableDiffusion:
    """Load a single-file .safetensors checkpoint or a diffusers folder (see the module docstring)."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if os.path.isdir(path):
        return load_diffusers(path, dtype, prediction_type, tokenizer)
    return load_single_file(path, dtype, prediction_type, tokenizer)
