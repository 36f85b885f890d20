"""AutoencoderKL parity against diffusers on the same random weights, loaded from both layouts."""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from model.config import VAEConfig
from model.vae import AutoencoderKL, diffusers_to_ldm_vae, tiled_apply

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402

TINY = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8)


def diffusers_config(config: VAEConfig) -> dict:
    levels = len(config.ch_mult)
    return dict(in_channels=config.in_channels, out_channels=config.out_channels,
                down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                block_out_channels=tuple(config.ch * m for m in config.ch_mult),
                layers_per_block=config.num_res_blocks, latent_channels=config.z_channels,
                norm_num_groups=config.norm_groups, scaling_factor=config.scale_factor)


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Perturb every parameter so GroupNorm affines and biases are not at their trivial init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model.eval()


def rel_err(ours, ref):
    return ((ours - ref).norm() / ref.norm()).item()


def assert_same_outputs(ours: AutoencoderKL, theirs, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 3, 32, 24, generator=generator) * 2 - 1
    latents = torch.randn(2, 4, 16, 12, generator=generator)
    with torch.no_grad():
        posterior, ref_posterior = ours.encode(images), theirs.encode(images).latent_dist
        decoded, ref_decoded = ours.decode(latents), theirs.decode(latents).sample
    assert rel_err(posterior.mean, ref_posterior.mean) <= 1e-5
    assert rel_err(posterior.logvar, ref_posterior.logvar) <= 1e-5
    assert rel_err(posterior.std, ref_posterior.std) <= 1e-5
    assert rel_err(decoded, ref_decoded) <= 1e-5


def test_single_file_layout_matches_diffusers(tmp_path):
    source = randomize(AutoencoderKL(TINY), seed=1)
    path = tmp_path / "model.safetensors"
    save_file({f"first_stage_model.{k}": v.contiguous() for k, v in source.state_dict().items()}, path)
    checkpoint = load_file(path)

    ours = AutoencoderKL(TINY).eval()
    prefix = "first_stage_model."
    ours.load_state_dict({k[len(prefix):]: v for k, v in checkpoint.items()}, strict=True)

    config = diffusers_config(TINY)
    theirs = diffusers.AutoencoderKL(**config).eval()
    theirs.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, config), strict=True)
    assert_same_outputs(ours, theirs)


@pytest.mark.parametrize("legacy_attention_names", [False, True])
def test_diffusers_layout_loads_through_rename(tmp_path, legacy_attention_names):
    theirs = randomize(diffusers.AutoencoderKL(**diffusers_config(TINY)), seed=2)
    state_dict = {k: v.contiguous() for k, v in theirs.state_dict().items()}
    if legacy_attention_names:  # diffusers < 0.14 saved the mid attention under these names
        legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
        for new, old in legacy.items():
            for key in [k for k in state_dict if f".attentions.0.{new}." in k]:
                state_dict[key.replace(f".{new}.", f".{old}.")] = state_dict.pop(key)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file(state_dict, path)

    ours = AutoencoderKL(TINY).eval()
    ours.load_state_dict(diffusers_to_ldm_vae(load_file(path), TINY), strict=True)
    assert_same_outputs(ours, theirs, seed=3)


def test_full_sd_vae_matches_diffusers_shapes():
    config = VAEConfig()
    with torch.device("meta"):
        ours = AutoencoderKL(config)
        theirs = diffusers.AutoencoderKL(**diffusers_config(config))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(theirs)
    renamed = diffusers_to_ldm_vae(theirs.state_dict(), config)
    assert {k: v.shape for k, v in renamed.items()} == {k: v.shape for k, v in ours.state_dict().items()}


def test_encode_latents_round_trip_scaling():
    vae = randomize(AutoencoderKL(TINY), seed=4)
    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = vae.encode_latents(images, generator=torch.Generator().manual_seed(5))
        posterior = vae.encode(images)
        expected = posterior.sample(torch.Generator().manual_seed(5)) * TINY.scale_factor
        assert torch.equal(latents, expected)
        assert torch.allclose(vae.decode_latents(latents), vae.decode(latents / TINY.scale_factor))


def test_tiled_blending_reassembles_a_local_function_exactly():
    # Nearest upsampling is pointwise, so every tile agrees on its overlap and any convex blend of
    # the tiles must reproduce the untiled output. 13 with tiles of 6 forces uneven and triple
    # overlaps; 12 with tiles of 4 and no overlap makes tiles abut.
    upsample = lambda t: F.interpolate(t, scale_factor=4, mode="nearest")  # noqa: E731
    generator = torch.Generator().manual_seed(0)
    for shape, tile, overlap in [((13, 9), 6, 2), ((13, 9), 6, 0), ((13, 9), 5, 4), ((13, 9), 20, 3),
                                 ((12, 8), 4, 0)]:
        z = torch.randn(2, 3, *shape, generator=generator)
        torch.testing.assert_close(tiled_apply(upsample, z, tile, overlap, 4), upsample(z), rtol=1e-6, atol=1e-6)


def test_tiled_decode():
    vae = randomize(AutoencoderKL(TINY), seed=6)
    z = torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = vae.decode(z)
        assert torch.equal(vae.decode(z, tile_size=24, tile_overlap=4), full)  # one tile covers all
        hard_seams = vae.decode(z, tile_size=12, tile_overlap=0)
        blended = vae.decode(z, tile_size=12, tile_overlap=6)
        larger = vae.decode(z, tile_size=20, tile_overlap=10)
    assert blended.shape == full.shape
    # Tiles see their own GroupNorm statistics and attention context (large effects in a random
    # network), so tiling only approximates the full decode: blending must beat abutting tiles,
    # and larger tiles with wider overlaps must come closer still.
    assert rel_err(larger, full) < rel_err(blended, full) < rel_err(hard_seams, full) < 1
    with pytest.raises(ValueError, match="overlap"):
        vae.decode(z, tile_size=8, tile_overlap=8)


def test_kl_matches_diffusers():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from model.vae import DiagonalGaussian
    moments = torch.randn(3, 8, 5, 5, generator=torch.Generator().manual_seed(0)) * 2
    expected = DiagonalGaussianDistribution(moments).kl().mean()
    torch.testing.assert_close(DiagonalGaussian(moments).kl(), expected, rtol=1e-6, atol=0)
