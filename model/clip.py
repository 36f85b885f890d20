"""The CLIP text encoder that turns a tokenised prompt into the UNet's cross-attention context.

One model covers both Stable Diffusion families (see CLIPConfig):
- SD 1.x: OpenAI CLIP ViT-L/14 text tower, 12 layers of width 768, quick-GELU; the context is
  the last layer's output after the final LayerNorm.
- SD 2.x: OpenCLIP ViT-H/14 text tower, 24 layers of width 1024, exact GELU; the context is
  the *penultimate* layer's output after the final LayerNorm (`skip_last_layers=1`).

Parameter names follow the HuggingFace CLIPTextModel (`embeddings.*`, `encoder.layers.N.*`,
`final_layer_norm.*`), which is also what SD1 single-file checkpoints store under
`cond_stage_model.transformer.text_model.`. The model builds only the layers it runs: layers
skipped by `skip_last_layers` are never allocated, and the converters below drop their
weights explicitly.

Converters map a checkpoint's text-encoder state dict onto our names. They never copy a
tensor: renamed entries are the same tensors, OpenCLIP's fused q/k/v projection is split
into views. Every key is either converted, dropped on purpose (listed below), or reported.
"""
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import attention
from model.config import CLIPConfig


class CLIPCheckpointError(ValueError):
    """A text-encoder state dict does not match the configured CLIP model."""


# ---------------------------------------------------------------------------------------------
# Model


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU; the weights were trained with it."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class CLIPAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape

        def split_heads(t):  # (B, L, C) -> (B, heads, L, head_dim)
            return t.view(B, L, self.heads, C // self.heads).transpose(1, 2)

        q, k, v = split_heads(self.q_proj(x)), split_heads(self.k_proj(x)), split_heads(self.v_proj(x))
        # Causal: CLIP is a left-to-right text model, a token never sees the tokens after it.
        y = attention(q, k, v, causal=True)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, C))


class CLIPMLP(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.width)
        self.self_attn = CLIPAttention(config.width, config.heads)
        self.layer_norm2 = nn.LayerNorm(config.width)
        self.mlp = CLIPMLP(config.width, config.width * config.mlp_ratio, config.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Embedding(config.context_length, config.width)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = self.position_embedding.weight[: input_ids.shape[1]]
        return self.token_embedding(input_ids) + positions


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPConfig, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def layers_run(config: CLIPConfig) -> int:
    """How many transformer layers produce the context (the others are never built)."""
    return config.layers - config.skip_last_layers


class CLIPTextModel(nn.Module):
    """input_ids (B, L<=context_length) -> hidden states (B, L, width) for cross-attention."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPEmbeddings(config)
        self.encoder = CLIPEncoder(config, layers_run(config))
        self.final_layer_norm = nn.LayerNorm(config.width)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() != 2 or input_ids.shape[1] > self.config.context_length:
            raise ValueError(f"input_ids must have shape (batch, <= {self.config.context_length}), "
                             f"got {tuple(input_ids.shape)}")
        return self.final_layer_norm(self.encoder(self.embeddings(input_ids)))


# ---------------------------------------------------------------------------------------------
# Checkpoint conversion

# Where each layout keeps the text encoder inside a single-file SD checkpoint.
SINGLE_FILE_PREFIX = {"openai": "cond_stage_model.transformer.", "openclip": "cond_stage_model.model."}

# OpenCLIP name -> our name, outside the transformer blocks.
OPENCLIP_TOP_LEVEL = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
# OpenCLIP module -> our module, inside transformer block N.
OPENCLIP_LAYER_MODULES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
# Weights of CLIP's contrastive image-text head: stored in SD2 checkpoints, never used by SD.
OPENCLIP_UNUSED = {"text_projection", "logit_scale"}
# A buffer (0..76) that older transformers versions saved; positions are implicit here.
HF_UNUSED = {"embeddings.position_ids"}

OPENCLIP_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.(\w+)")  # block, module, parameter
OUR_LAYER = re.compile(r"encoder\.layers\.(\d+)\.")


def hf_to_ours(sd: dict, config: CLIPConfig) -> dict:
    """transformers CLIPTextModel keys (diffusers `text_encoder/`, or an SD1 single file after
    stripping `cond_stage_model.transformer.`), with or without the `text_model.` prefix."""
    out = {}
    for key, tensor in sd.items():
        name = key.removeprefix("text_model.")
        if name not in HF_UNUSED:
            out[name] = tensor
    return _check(_drop_skipped_layers(out, config), config)


def openclip_to_ours(sd: dict, config: CLIPConfig) -> dict:
    """OpenCLIP text-tower keys (an SD2 single file after stripping `cond_stage_model.model.`)."""
    out = {}
    for key, tensor in sd.items():
        if key in OPENCLIP_UNUSED:
            continue
        block = OPENCLIP_BLOCK.fullmatch(key)
        if block is None:
            out[OPENCLIP_TOP_LEVEL.get(key, key)] = tensor  # unknown names pass through: _check reports them
            continue
        index, module, param = block.groups()
        prefix = f"encoder.layers.{index}."
        if module == "attn" and param in ("in_proj_weight", "in_proj_bias"):
            # nn.MultiheadAttention fuses q, k, v along the output dimension; chunk() returns views.
            for proj, part in zip("qkv", tensor.chunk(3, dim=0)):
                out[f"{prefix}self_attn.{proj}_proj.{param.removeprefix('in_proj_')}"] = part
        elif module in OPENCLIP_LAYER_MODULES:
            out[f"{prefix}{OPENCLIP_LAYER_MODULES[module]}.{param}"] = tensor
        else:
            out[key] = tensor
    return _check(_drop_skipped_layers(out, config), config)


def single_file_to_ours(checkpoint: dict, config: CLIPConfig) -> dict:
    """The text encoder of a whole single-file SD checkpoint, in our names."""
    prefix = SINGLE_FILE_PREFIX[config.layout]
    text = {key[len(prefix):]: tensor for key, tensor in checkpoint.items() if key.startswith(prefix)}
    if not text:
        raise CLIPCheckpointError(f"checkpoint has no text-encoder weights under '{prefix}' "
                                  f"(expected for the '{config.layout}' layout)")
    convert = openclip_to_ours if config.layout == "openclip" else hf_to_ours
    return convert(text, config)


def _drop_skipped_layers(sd: dict, config: CLIPConfig) -> dict:
    """Drop the weights of layers past the ones we run (SD2's 24th layer), and only those."""
    run = layers_run(config)

    def skipped(key):
        layer = OUR_LAYER.match(key)
        return layer is not None and run <= int(layer.group(1)) < config.layers

    return {key: tensor for key, tensor in sd.items() if not skipped(key)}


def expected_keys(config: CLIPConfig) -> set[str]:
    with torch.device("meta"):  # names and shapes only, no memory
        return set(CLIPTextModel(config).state_dict())


def _check(sd: dict, config: CLIPConfig) -> dict:
    expected = expected_keys(config)
    unexpected, missing = sorted(set(sd) - expected), sorted(expected - set(sd))
    if unexpected or missing:
        raise CLIPCheckpointError(
            f"text-encoder weights do not match a {config.layers}-layer CLIP of width {config.width} "
            f"(skip_last_layers={config.skip_last_layers}): "
            f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}, "
            f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    return sd
