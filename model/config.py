"""Every difference between the Stable Diffusion families, in one place.

A family is an `SDConfig`: the shapes of its UNet, VAE and text encoder, its prediction
target and its noise schedule. Model code reads these fields and never asks "is this SD2?";
loaders pick a family from a checkpoint's keys and shapes (see model/loading.py).
"""
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple = (0, 1, 2)   # levels of channel_mult that carry spatial transformers
    num_heads: int | None = 8             # SD1 fixes the head count ...
    head_dim: int | None = None           # ... SD2 fixes the head width (64) instead
    transformer_depth: int = 1
    context_dim: int = 768                # width of the text encoder's output
    use_linear_proj: bool = False         # SD2: Linear proj_in/proj_out; SD1: 1x1 convs
    norm_groups: int = 32
    norm_eps: float = 1e-5

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(number of heads, head width) of a transformer with `channels` channels."""
        if self.head_dim is not None:
            return channels // self.head_dim, self.head_dim
        return self.num_heads, channels // self.num_heads


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    norm_groups: int = 32
    norm_eps: float = 1e-6
    scale_factor: float = 0.18215         # latents are scaled by this before the UNet sees them


@dataclass(frozen=True)
class CLIPConfig:
    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    context_length: int = 77
    mlp_ratio: int = 4
    activation: str = "quick_gelu"        # OpenAI CLIP: x*sigmoid(1.702x); OpenCLIP ViT-H: exact GELU
    skip_last_layers: int = 0             # SD2 reads the penultimate layer (then the final LayerNorm)
    pad_with_eos: bool = True             # SD1 pads token ids with EOS, SD2 with 0 ("!")
    layout: str = "openai"                # checkpoint layout of the text tower: "openai" | "openclip"
    tokenizer: str = "clip"               # "clip": the real CLIP vocabulary file; "bytes": byte-level, no file


@dataclass(frozen=True)
class SDConfig:
    name: str
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    prediction_type: str = "epsilon"      # "epsilon" | "v_prediction"
    image_size: int = 512                 # native resolution in pixels
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085           # scaled-linear schedule: betas = linspace(sqrt(b0), sqrt(b1))**2
    beta_end: float = 0.012


SD1 = SDConfig("sd1")

SD2_BASE = SDConfig(
    "sd2-base",
    unet=UNetConfig(num_heads=None, head_dim=64, context_dim=1024, use_linear_proj=True),
    clip=CLIPConfig(width=1024, layers=24, heads=16, activation="gelu", skip_last_layers=1,
                    pad_with_eos=False, layout="openclip"),
)

SD2_V = replace(SD2_BASE, name="sd2-v", prediction_type="v_prediction", image_size=768)



def config_to_dict(config: SDConfig) -> dict:
    """A JSON-ready dict of a family config (stored in checkpoint metadata and avatar configs)."""
    from dataclasses import asdict
    return asdict(config)


def config_from_dict(d: dict) -> SDConfig:
    def tuples(sub: dict) -> dict:  # JSON turned our tuples into lists
        return {k: tuple(v) if isinstance(v, list) else v for k, v in sub.items()}
    return SDConfig(**{**d, "unet": UNetConfig(**tuples(d["unet"])), "vae": VAEConfig(**tuples(d["vae"])),
                       "clip": CLIPConfig(**d["clip"])})


# A small SD1-shaped model for the offline demo and tests: four UNet levels (so the 12 skips are all
# there), a 4-level VAE (8x down, like SD) and a 2-layer text tower over a byte-level vocabulary
# (no vocabulary file needed).
TINY = SDConfig(
    "tiny",
    unet=UNetConfig(model_channels=32, channel_mult=(1, 2, 2, 2), num_heads=2, context_dim=32, norm_groups=8),
    vae=VAEConfig(ch=16, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8),
    clip=CLIPConfig(vocab_size=514, width=32, layers=2, heads=2, tokenizer="bytes"),
    image_size=64,
)
