"""LoRA: low-rank weight deltas read from the file layouts in circulation, fused into our modules.

A LoRA layer for a Linear weight W (out, in) is a pair down (r, in), up (out, r) and a scalar alpha:

    W' = W + scale * alpha / r * up @ down          (alpha defaults to r; rsLoRA: alpha / sqrt(r))

For a Conv2d W (out, in, kh, kw) down is a conv (r, in, kh, kw) and up a 1x1 conv (out, r, 1, 1); their
composition is the conv up.flatten(1) @ down.flatten(1), reshaped to W's shape. Fusing changes the weights
in place (no extra work per step); unfusing subtracts the same delta again.

Layouts read (one file may hold UNet and text-encoder layers):
  * diffusers / PEFT:  unet.<module>.lora_A.weight / lora_B.weight [/ .alpha], text_encoder.<module>...;
                       older diffusers: <module>.lora.down/up.weight, <module>.lora_linear_layer.down/up.weight,
                       unet.<attention>.processor.to_q_lora.down/up.weight and
                       text_encoder.<layer>.self_attn.to_q_lora.down/up.weight (to_k, to_v, to_out likewise).
                       diffusers' save_lora_weights keeps alpha in the safetensors header instead, under
                       `lora_adapter_metadata`: PEFT's LoraConfig per network as JSON (`unet.lora_alpha`,
                       `unet.r`, `unet.alpha_pattern`, `unet.use_rslora`, `text_encoder.lora_alpha`, ...),
                       read as diffusers reads it (an `.alpha` tensor, which diffusers never writes, comes first);
  * kohya / A1111:     lora_unet_<module>.lora_down.weight / lora_up.weight / alpha, lora_te_<module>...,
                       with the module path's dots written as underscores.
A module may be named the diffusers way (`down_blocks.0.attentions.0.proj_in`, what kohya trains SD1 on)
or the original LDM way (`input_blocks.1.1.proj_in`, our own names); text-encoder modules the
transformers way (`text_model.encoder.layers.0.self_attn.q_proj`). Since underscores are ambiguous
once dots become underscores, names are resolved by flattening every name each of OUR Linear and Conv2d
modules goes by and looking the LoRA's flattened name up there.
"""
import json
import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from model.loading import CheckpointError, StableDiffusion, open_safetensors
from model.unet import diffusers_to_ldm_prefixes, rename_key

# Each layout's key: which network, the module name (dots, or underscores for kohya), and the tensor's role.
KOHYA_KEY = re.compile(r"lora_(unet|te)_(\w+)\.(lora_down\.weight|lora_up\.weight|alpha)")
DIFFUSERS_KEY = re.compile(r"(unet|text_encoder)\.(.+?)\.(lora_A\.weight|lora_B\.weight|lora\.down\.weight|"
                           r"lora\.up\.weight|lora_linear_layer\.down\.weight|lora_linear_layer\.up\.weight|alpha)")
OLD_ATTENTION_KEY = re.compile(r"(unet|text_encoder)\.(.+?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\."
                               r"(down|up)\.weight")
ROLES = {"lora_down.weight": "down", "lora_A.weight": "down", "lora.down.weight": "down",
         "lora_linear_layer.down.weight": "down", "down": "down",
         "lora_up.weight": "up", "lora_B.weight": "up", "lora.up.weight": "up",
         "lora_linear_layer.up.weight": "up", "up": "up", "alpha": "alpha"}
NETWORKS = {"unet": "unet", "te": "text_encoder", "text_encoder": "text_encoder"}
OLD_PROJECTIONS = {"unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
                   "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}}
METADATA_KEY = "lora_adapter_metadata"
# What a file whose tensors we do not read probably is, told by their names (said in the error, if one fits).
OTHER_KINDS = {"DoRA": re.compile(r"lora_magnitude_vector|dora_scale"),
               "SDXL (two text encoders)": re.compile(r"lora_te[12]_|text_encoder_2\."),
               "LyCORIS (LoHa, LoKr)": re.compile(r"hada_|lokr_|\.lora_mid\.")}


@dataclass
class LoRALayer:
    """One low-rank delta; `name` is its module name as the file spells it (for messages)."""
    name: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None
    rslora: bool = False  # rank-stabilized LoRA: alpha / sqrt(r) instead of alpha / r

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, device=None) -> torch.Tensor:
        """alpha / r * up @ down (rsLoRA: alpha / sqrt(r)) in float32, flattened to (out, in * kh * kw)."""
        up, down = (t.to(device=device, dtype=torch.float32).flatten(1) for t in (self.up, self.down))
        alpha = self.alpha if self.alpha is not None else self.rank
        return (alpha / (math.sqrt(self.rank) if self.rslora else self.rank)) * (up @ down)


@dataclass
class LoRA:
    """The layers of one LoRA file, per network ("unet", "text_encoder"), keyed by flattened module name."""
    path: str
    layers: dict[str, dict[str, LoRALayer]]


def flatten(name: str) -> str:
    return name.replace(".", "_")


def _listed(keys: list[str], limit: int = 4) -> str:
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def parse_key(key: str) -> tuple[str, str, str, str] | None:
    """(network, module name as the file spells it, role, the key's layer part) of one LoRA tensor name;
    None if it is none."""
    if m := OLD_ATTENTION_KEY.fullmatch(key):
        network, attention, projection, role = m.groups()
        return network, f"{attention}.{OLD_PROJECTIONS[network][projection]}", role, key[:m.start(4) - 1]
    if m := KOHYA_KEY.fullmatch(key) or DIFFUSERS_KEY.fullmatch(key):
        network, module, role = m.groups()
        return NETWORKS[network], module, ROLES[role], key[:m.start(3) - 1]
    return None


def not_lora_weights(path: str, unknown: list[str]) -> CheckpointError:
    kinds = [kind for kind, names in OTHER_KINDS.items() if any(names.search(key) for key in unknown)]
    guess = f" (this looks like a {' / '.join(kinds)} file, which is not supported)" if kinds else ""
    return CheckpointError(f"{path}: {len(unknown)} tensors are not LoRA weights of an SD1/SD2 UNet or text "
                           f"encoder{guess}: {_listed(unknown)}")


def load_lora(path: str) -> LoRA:
    """Read a LoRA .safetensors file in any of the layouts of the module doc, its strengths from its
    `.alpha` tensors or else its header; malformed files raise CheckpointError naming the file and a few
    offending keys."""
    handle = open_safetensors(path)
    parts, unknown = {}, []
    for key in handle.keys():
        parsed = parse_key(key)
        if parsed is None:
            unknown.append(key)
            continue
        network, module, role, layer_name = parsed
        layer = parts.setdefault((network, flatten(module)), {"name": layer_name, "module": module})
        layer[role] = handle.get_tensor(key)
    if unknown:
        raise not_lora_weights(path, unknown)
    if not parts:
        raise CheckpointError(f"{path}: no LoRA weights in this file")
    configs = adapter_configs(path, handle.metadata() or {})
    layers, malformed = {}, []
    for (network, module), p in parts.items():
        if not composes(p.get("down"), p.get("up")):
            malformed.append(p["name"])
            continue
        layer = LoRALayer(p["name"], p["down"], p["up"])
        if "alpha" in p:
            layer.alpha = float(p["alpha"])
        elif network in configs:
            layer.alpha, layer.rslora = configs[network].strength(p["module"], layer)
        layers.setdefault(network, {})[module] = layer
    if malformed:
        raise CheckpointError(f"{path}: {len(malformed)} LoRA layers lack a down or up weight, or their shapes do "
                              f"not compose: {_listed(malformed)}")
    return LoRA(path, layers)


def composes(down: torch.Tensor | None, up: torch.Tensor | None) -> bool:
    """down (r, in) with up (out, r), or a conv down (r, in, kh, kw) with a 1x1 conv up (out, r, 1, 1)."""
    if down is None or up is None or down.ndim not in (2, 4) or up.ndim != down.ndim:
        return False
    return up.shape[1] == down.shape[0] and up.shape[2:] in ((), (1, 1))


# ----------------------------------------------------------------------------- diffusers' adapter metadata

STRENGTH_FIELDS = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora")


@dataclass
class AdapterConfig:
    """The fields of PEFT's LoraConfig that set a layer's strength, with PEFT's defaults (diffusers builds a
    LoraConfig from exactly this header, so a field it leaves out has PEFT's default there too)."""
    path: str
    r: int = 8
    lora_alpha: float = 8
    rank_pattern: dict | None = None
    alpha_pattern: dict | None = None
    use_rslora: bool = False

    def strength(self, module: str, layer: LoRALayer) -> tuple[float, bool]:
        """(alpha, rsLoRA) of the layer on `module` (its name in the file, without `unet.` / `text_encoder.`)."""
        rank = pattern_value(self.rank_pattern or {}, module, self.r)
        if rank != layer.rank:
            raise CheckpointError(f"{self.path}: {layer.name} has rank {layer.rank}, its lora_adapter_metadata says "
                                  f"r = {rank}")
        return float(pattern_value(self.alpha_pattern or {}, module, self.lora_alpha)), bool(self.use_rslora)


def pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern (peft.utils.other.get_pattern_key): the first key, a regular
    expression, that matches the whole module name or its end after a dot; else `default`."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def adapter_configs(path: str, header: dict) -> dict[str, AdapterConfig]:
    """network -> AdapterConfig, from the `lora_adapter_metadata` entry of a safetensors header (written by
    diffusers' save_lora_weights: `unet.lora_alpha`, `text_encoder.r`, ...); {} without one."""
    if METADATA_KEY not in header:
        return {}
    try:
        metadata = json.loads(header[METADATA_KEY])
    except ValueError:
        metadata = None
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: its header's {METADATA_KEY} is not a JSON object")
    fields = {}  # network -> its strength fields; a network with any entry gets PEFT's defaults for the rest
    for key, value in metadata.items():
        network, _, field = key.partition(".")
        if network not in NETWORKS.values():
            continue
        if field == "use_dora" and value:
            raise CheckpointError(f"{path}: a DoRA adapter ({key} is true in its header); DoRA is not supported")
        fields.setdefault(network, {})
        if field in STRENGTH_FIELDS:
            fields[network][field] = value
    return {network: AdapterConfig(path, **values) for network, values in fields.items()}


# ----------------------------------------------------------------------------- names of our modules

def lora_targets(module: nn.Module, aliases) -> dict[str, nn.Module]:
    """Flattened name -> module, for every Linear / Conv2d of `module` under each name `aliases(name)` gives."""
    targets = {}
    for name, sub in module.named_modules():
        if isinstance(sub, (nn.Linear, nn.Conv2d)):
            targets.update({flatten(alias): sub for alias in aliases(name)})
    return targets


def unet_targets(sd: StableDiffusion) -> dict[str, nn.Module]:
    """Our UNet modules under their LDM names and their diffusers names (the rename table, inverted)."""
    to_diffusers = {ldm: diffusers for diffusers, ldm in diffusers_to_ldm_prefixes(sd.config.unet).items()}
    return lora_targets(sd.unet, lambda name: (name, rename_key(name + ".weight", to_diffusers)[:-len(".weight")]))


def text_encoder_targets(sd: StableDiffusion) -> dict[str, nn.Module]:
    """Our text-encoder modules, also under transformers' names (which add `text_model.`, see clip.hf_to_ours)."""
    return lora_targets(sd.text_encoder, lambda name: (name, "text_model." + name))


# ----------------------------------------------------------------------------- fusing

def resolve(sd: StableDiffusion, lora: LoRA) -> list[tuple[nn.Module, LoRALayer]]:
    """Pair every LoRA layer with its module, or raise one CheckpointError listing all that do not fit."""
    targets = {"unet": unet_targets(sd), "text_encoder": text_encoder_targets(sd)}
    pairs, nowhere, misfit = [], [], []
    for network, layers in lora.layers.items():
        for module_name, layer in layers.items():
            module = targets[network].get(module_name)
            if module is None:
                nowhere.append(layer.name)
            elif (module.weight.shape[0], module.weight[0].numel()) != (layer.up.shape[0], layer.down[0].numel()):
                misfit.append(f"{layer.name} ({tuple(layer.up.shape[:2])} x {tuple(layer.down.shape)} "
                              f"for a weight {tuple(module.weight.shape)})")
            else:
                pairs.append((module, layer))
    problems = []
    if nowhere:
        problems.append(f"{len(nowhere)} layers match no module: {_listed(nowhere)}")
    if misfit:
        problems.append(f"{len(misfit)} layers have the wrong width: {_listed(misfit, 2)}")
    if problems:
        raise CheckpointError(f"{lora.path}: this LoRA does not fit family '{sd.config.name}' "
                              f"(a LoRA for another base model?): " + "; ".join(problems))
    return pairs


@torch.no_grad()
def fuse_lora(sd: StableDiffusion, lora: LoRA, scale: float = 1.0) -> None:
    """W += scale * delta for every layer of `lora`, in place. Checked completely before any weight changes."""
    for module, layer in resolve(sd, lora):
        w = module.weight
        w.copy_((w.float() + scale * layer.delta(w.device).reshape(w.shape)).to(w.dtype))


def unfuse_lora(sd: StableDiffusion, lora: LoRA, scale: float = 1.0) -> None:
    """Undo `fuse_lora(sd, lora, scale)` (exact up to the weights' float rounding)."""
    fuse_lora(sd, lora, -scale)

