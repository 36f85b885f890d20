"""The tiny decoder (model/taesd.py, sample.py --decoder): parity with diffusers' AutoencoderTiny on random
weights saved in the real layouts, bad files, and the avatar decoding its frames with it."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import svp
from model.loading import CheckpointError
from model.taesd import TinyDecoder, load_tiny_decoder

diffusers = pytest.importorskip("diffusers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
pytestmark = pytest.mark.usefixtures("one_torch_thread")
TAESD = dict()  # diffusers' defaults are TAESD's: 4 latent channels, 64 wide, blocks (3, 3, 3, 1), 8x
SMALL = dict(latent_channels=16, decoder_block_out_channels=(16, 16, 16), num_decoder_blocks=(2, 1, 1),
             encoder_block_out_channels=(16, 16, 16), num_encoder_blocks=(1, 1, 1))  # 16 channels as in TAESD3


def reference(seed: int = 0, **config) -> "diffusers.AutoencoderTiny":
    """A random AutoencoderTiny. Why not its default init: that shrinks the activations layer by layer to
    near-constant images; std 1/sqrt(fan_in) keeps them spread (about 1 at the output)."""
    torch.manual_seed(seed)
    model = diffusers.AutoencoderTiny(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 1 / math.sqrt(p[0].numel()) if p.ndim == 4 else 0.1)
    return model


def save_diffusers(model, path) -> str:
    """The whole AutoencoderTiny, encoder included, as diffusers writes diffusion_pytorch_model.safetensors."""
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def madebyollin_layout(model) -> dict:
    """The decoder as madebyollin's taesd.py holds it: one nn.Sequential whose index 0 is the latent clamp."""
    return {f"{int(k.split('.')[2]) + 1}.{k.split('.', 3)[3]}": v.contiguous()
            for k, v in model.state_dict().items() if k.startswith("decoder.layers.")}


@pytest.mark.parametrize("config, channels, downscale", [(TAESD, 4, 8), (SMALL, 16, 4)], ids=["taesd", "small"])
def test_matches_diffusers_autoencoder_tiny(config, channels, downscale, tmp_path):
    ref = reference(**config)
    ours = load_tiny_decoder(save_diffusers(ref, tmp_path / "diffusion_pytorch_model.safetensors"))
    assert (ours.latent_channels, ours.downscale) == (channels, downscale)
    latents = 2.5 * torch.randn(2, channels, 6, 5, generator=torch.Generator().manual_seed(1))  # wide: the clamp bites
    with torch.no_grad():
        expected, got = ref.decode(latents).sample, ours.decode_latents(latents)
    assert got.shape == expected.shape == (2, 3, 6 * ours.downscale, 5 * ours.downscale)
    assert expected.std() > 0.5, "images this flat would not show a wrong op"
    assert (got - expected).abs().max() <= 1e-5


def test_madebyollin_files_load_the_same_network(tmp_path):
    ref = reference()
    state = madebyollin_layout(ref)
    # taesd.py's Decoder: 1 the first conv, 3-5 Blocks, 6 an upsample, 7 a bias-free conv, ..., 19 the RGB conv
    assert {"1.weight", "3.conv.0.weight", "3.conv.4.bias", "7.weight", "18.conv.2.weight", "19.bias"} <= set(state)
    assert "7.bias" not in state and max(int(k.split(".")[0]) for k in state) == 19
    save_file(state, str(tmp_path / "taesd_decoder.safetensors"))
    torch.save(state, str(tmp_path / "taesd_decoder.pth"))
    latents = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        expected = ref.decode(latents).sample
        for name in ("taesd_decoder.safetensors", "taesd_decoder.pth"):
            assert (load_tiny_decoder(str(tmp_path / name))(latents) - expected).abs().max() <= 1e-5, name
    half = load_tiny_decoder(str(tmp_path / "taesd_decoder.pth"), dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


class RunsCode:
    """A pickle that would create a file when unpickled without weights_only."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_bad_files_are_one_line_naming_the_file(tmp_path):
    ref = reference(**SMALL)
    good = madebyollin_layout(ref)
    marker = tmp_path / "ran"
    garbage, truncated = tmp_path / "garbage.safetensors", tmp_path / "truncated.pth"
    garbage.write_bytes(b"\x00not a safetensors file" * 10)
    torch.save(good, str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:2000])
    torch.save({"weights": RunsCode(str(marker))}, str(tmp_path / "code.pth"))
    torch.save([v for v in good.values()], str(tmp_path / "list.pth"))
    save_file({"encoder.conv_in.weight": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    save_file({k: v for k, v in good.items() if k != "3.conv.2.weight"}, str(tmp_path / "missing.safetensors"))
    cases = {"garbage.safetensors": "not a readable .safetensors file", "truncated.pth": "not a readable PyTorch",
             "code.pth": "not a readable PyTorch", "list.pth": "not a state dict of tensors",
             "other.safetensors": "not a tiny autoencoder decoder",
             "missing.safetensors": "missing (1): layers.2.conv.2",
             "nowhere.safetensors": "no such file"}
    for name, words in cases.items():
        path = str(tmp_path / name)
        with pytest.raises(CheckpointError) as error:
            load_tiny_decoder(path)
        message = str(error.value)
        assert message.startswith(path) and words in message and "\n" not in message, message
    assert not marker.exists(), "loading a .pth ran pickled code"


def test_the_avatar_decodes_frames_with_it(untrained_avatar_run, tmp_path):
    run = str(untrained_avatar_run)
    path = save_diffusers(reference(), tmp_path / "taesd.safetensors")
    seq = svp.load_seq(os.path.join(run, "tracking", "seq.npz"))
    settings = svp.VideoSampling(sampler="lcm", steps=2, guidance=1.0)
    plain = svp.load_avatar(run)
    tiny = svp.load_avatar(run, decoder=path)
    assert isinstance(tiny.decoder, TinyDecoder) and plain.decoder is plain.sd.vae
    rendered, hints = tiny.render(seq, frames=range(4), settings=settings, progress=False)
    vae_rendered, _ = plain.render(seq, frames=range(4), settings=settings, progress=False)
    assert rendered.shape == vae_rendered.shape == (4, 64, 64, 3)
    assert np.abs(rendered.astype(int) - vae_rendered).mean() > 10, "the tiny decoder was not used"
    streamed = np.stack(list(tiny.stream(list(hints), settings)))  # live mode decodes with it too
    assert np.abs(streamed.astype(int) - rendered).max() <= 1

    # sample.py --decoder writes the frames the API renders
    out = tmp_path / "tiny"
    result = subprocess.run([sys.executable, "sample.py", "--avatar", run, "--params", os.path.join(run, "tracking",
                             "seq.npz"), "--frames", "0:4", "--sampler", "lcm", "--steps", "2", "--guidance", "1",
                             "--decoder", path, "--out", f"{out}.mp4", "--png-dir", str(out)],
                            cwd=REPO, env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    pngs = np.stack([np.asarray(Image.open(out / f"{i:05d}.png"), dtype=int) for i in range(4)])
    assert np.abs(pngs - rendered).max() <= 1

    sixteen = save_diffusers(reference(**SMALL), tmp_path / "taesd3.safetensors")
    with pytest.raises(CheckpointError, match="taesd3.safetensors: the tiny decoder takes 16-channel latents"):
        svp.load_avatar(run, decoder=sixteen)


def test_a_bad_decoder_file_ends_a_live_run_before_it_starts(untrained_avatar_run, tmp_path):
    bad, out = tmp_path / "taesd_decoder.pth", tmp_path / "live.mp4"
    bad.write_bytes(b"PK\x03\x04 truncated")
    seq = str(untrained_avatar_run / "tracking" / "seq.npz")
    result = subprocess.run([sys.executable, "sample.py", "--drive", seq, "--decoder", str(bad), "--out", str(out)],
                            cwd=REPO, env=ENV, capture_output=True, text=True)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert lines[0].startswith(f"error: {bad}: not a readable PyTorch state dict")
    assert os.listdir(tmp_path) == [bad.name]  # no mp4, no temp file
