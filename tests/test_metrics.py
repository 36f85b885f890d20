"""model/metrics.py against the reference implementations.

Live, in this venv: SSIM and PSNR against scikit-image.
Stored in tests/data/metrics_reference.npz (the oracles import torchvision, which cannot live beside this venv's
CPU torch; tests/data/make_metrics_reference.py made it in its own venv, and the npz records their versions):
  * LPIPS against lpips 0.1.4's LPIPS(net='alex', version='0.1');
  * Inception pool features against torch-fidelity 0.4.0's FeatureExtractorInceptionV3 (uint8 images of four
    sizes: its TF1 resize, normalisation, network) and pytorch-fid 0.3.0's InceptionV3([3]) (299x299 input);
  * FID against torch-fidelity, torchmetrics 1.9.0 and pytorch-fid; KID against torch-fidelity (the same
    subsets) and torchmetrics' poly_mmd (all samples).
The networks get random weights, seeded per tensor name (make_metrics_reference.random_tensor), written by
conftest's metric_weights in the published files' layouts (alex.pth in torch's legacy format like the real
one) and read through load_lpips / load_inception.
"""
import json
import os

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from model import metrics
from model.inception import FIDInception
from model.lpips import LPIPS

from make_metrics_reference import (INCEPTION_IMAGES, KID_SUBSET_SIZE, KID_SUBSETS, LPIPS_PAIRS,  # tests/data
                                    random_features, random_weights, reference_images, weights_sum)

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

pytestmark = pytest.mark.usefixtures("one_torch_thread")   # the Inception's convolutions stall on shared cores


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(os.path.join(DATA, "metrics_reference.npz")))


@pytest.fixture(scope="module")
def images():
    return reference_images()


def shapes_of(build) -> dict:
    with torch.device("meta"):
        return {k: v.shape for k, v in build().state_dict().items()}


@pytest.fixture(scope="module")
def lpips_net(metric_weights):
    return metrics.load_lpips(str(metric_weights))


@pytest.fixture(scope="module")
def inception_net(metric_weights):
    return metrics.load_inception(str(metric_weights))


def video(*frames):
    return np.stack(frames)


def test_ssim_and_psnr_match_scikit_image(images):
    pairs = [("a64", "a64_noisy"), ("a64", "a64_dark"), ("b96x80", "b96x80_shifted"), ("a64", "a64")]
    for a, b in pairs:
        real, fake = video(images[a]), video(images[b])
        expected = structural_similarity(images[a], images[b], gaussian_weights=True, sigma=1.5,
                                         use_sample_covariance=False, data_range=255, channel_axis=-1)
        assert metrics.ssim(real, fake)[0] == pytest.approx(expected, abs=1e-12)
        if a != b:
            assert metrics.psnr(real, fake)[0] == pytest.approx(peak_signal_noise_ratio(
                images[a], images[b], data_range=255), rel=1e-12)
    assert metrics.psnr(video(images["a64"]), video(images["a64"]))[0] == np.inf
    small = images["a64"][:11, :11]
    assert metrics.ssim(video(small), video(small // 2))[0] == pytest.approx(structural_similarity(
        small, small // 2, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255,
        channel_axis=-1), abs=1e-12)
    with pytest.raises(ValueError, match="at least 11 pixels"):
        metrics.ssim(video(small[:10]), video(small[:10]))
    # frames are scored one by one: a video's scores are its frames' scores
    both = metrics.ssim(video(images["a64"], images["a64_dark"]), video(images["a64_noisy"], images["a64"]))
    assert both[1] == pytest.approx(metrics.ssim(video(images["a64_dark"]), video(images["a64"]))[0], abs=1e-12)


def test_random_weights_rebuild_as_the_reference_used_them(reference):
    """The weights rebuilt here under our modules' names are the ones the oracles ran with (names and values)."""
    assert weights_sum(random_weights(shapes_of(LPIPS))) == pytest.approx(float(reference["lpips_weights_sum"]),
                                                                          rel=1e-12)
    assert weights_sum(random_weights(shapes_of(FIDInception))) == pytest.approx(
        float(reference["inception_weights_sum"]), rel=1e-12)


def test_lpips_matches_the_lpips_package(reference, images, lpips_net):
    ours = [metrics.lpips_distances(lpips_net, video(images[a]), video(images[b]), progress=False)[0]
            for a, b in LPIPS_PAIRS]
    np.testing.assert_allclose(ours, reference["lpips"], rtol=1e-5)
    same = video(images["a64"], images["a64_dark"])
    assert np.array_equal(metrics.lpips_distances(lpips_net, same, same, progress=False), [0, 0])


def test_lpips_black_frames_in_bfloat16(lpips_net, metric_weights):
    """All-zero ReLU outputs have norm 0; the heads run in float32, so lpips' 1e-10 keeps that 0 / 0 away."""
    black = np.zeros((2, 64, 64, 3), np.uint8)
    net = metrics.load_lpips(str(metric_weights), dtype=torch.bfloat16)
    assert np.array_equal(metrics.lpips_distances(net, black, black, progress=False), [0, 0])


def test_inception_matches_torch_fidelity_and_pytorch_fid(reference, images, inception_net):
    for size, names in INCEPTION_IMAGES.items():
        ours = metrics.inception_features(inception_net, video(*(images[n] for n in names)), progress=False)
        expected = reference[f"torch_fidelity_{size}"]
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max(), err_msg=size)
        if size == "299":
            np.testing.assert_allclose(ours, reference["pytorch_fid_299"], rtol=1e-5,
                                       atol=1e-5 * np.abs(expected).max())


def test_fid_matches_three_references(reference):
    f = random_features()
    for case, (a, b) in {"many": ("real", "fake"), "few": ("few_real", "few_fake")}.items():
        ours = metrics.fid(f[a], f[b])
        for oracle in ("torch_fidelity", "torchmetrics", "pytorch_fid"):
            assert ours == pytest.approx(float(reference[f"fid_{case}_{oracle}"]), rel=1e-6), (case, oracle)
    assert metrics.fid(f["real"], f["real"]) == pytest.approx(0, abs=1e-9)
    with pytest.raises(ValueError, match=">= 2 samples"):
        metrics.fid(f["real"][:1], f["fake"][:1])


def test_kid_matches_torch_fidelity_and_torchmetrics(reference):
    f = random_features()
    mean, std = metrics.kid(f["real"], f["fake"], subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE)
    assert mean == pytest.approx(float(reference["kid_many_torch_fidelity_mean"]), rel=1e-6)
    assert std == pytest.approx(float(reference["kid_many_torch_fidelity_std"]), rel=1e-6)
    # subset size clipped to all 60 (6) samples: every subset is the whole set, whose MMD torchmetrics gives
    for case, (a, b) in {"many": ("real", "fake"), "few": ("few_real", "few_fake")}.items():
        mean, std = metrics.kid(f[a], f[b], subsets=3)
        assert mean == pytest.approx(float(reference[f"kid_{case}_torchmetrics_all_samples"]), rel=1e-6)
        assert std == pytest.approx(0, abs=1e-12)


def test_frame_metrics_reports_every_metric(images, lpips_net, inception_net):
    real = video(images["a64"], images["a64_dark"], images["a64"])
    fake = video(images["a64_noisy"], images["a64"], images["a64_noisy"])
    out = metrics.frame_metrics(real, fake, lpips_net, inception_net, batch=2, progress=False)
    assert set(out) == {"frames", "psnr", "ssim", "lpips", "fid", "kid", "flicker", "flicker_per_frame"}
    assert out["frames"] == 3
    numbers = [v for key in ("psnr", "ssim", "lpips") for v in [out[key]["mean"], *out[key]["per_frame"]]]
    numbers += [out["fid"]["value"], out["kid"]["mean"], out["kid"]["std"], *out["flicker"].values()]
    assert np.isfinite(numbers).all() and len(out["lpips"]["per_frame"]) == 3
    assert out["fid"]["value"] > 0 and out["kid"]["subset_size"] == 3 and "clipped" in out["kid"]["note"]
    assert out["lpips"]["per_frame"] == pytest.approx(metrics.lpips_distances(lpips_net, real, fake, progress=False))
    assert out["flicker"]["excess"] == pytest.approx(out["flicker"]["render"] - out["flicker"]["real"])
    json.dumps(out, allow_nan=False)

    bare = metrics.frame_metrics(real, fake, progress=False)
    assert "alexnet-owt-7be5be79.pth" in bare["lpips"]["missing"] and "alex.pth" in bare["lpips"]["missing"]
    assert "pt_inception-2015-12-05-6726825d.pth" in bare["fid"]["missing"] == bare["kid"]["missing"]
    assert bare["ssim"] == out["ssim"] and bare["flicker"] == out["flicker"]

    one = metrics.frame_metrics(real[:1], fake[:1], lpips_net, inception_net, progress=False)
    assert one["fid"] == one["kid"] == {"missing": "needs >= 2 frames, got 1"}
    assert one["flicker"] == {"missing": "needs >= 3 frames, got 1"} and np.isfinite(one["lpips"]["mean"])


def test_weight_files_read_from_safetensors_and_lists(tmp_path, metric_weights, lpips_net, images):
    from safetensors.torch import save_file
    features = torch.load(metric_weights / "alexnet-owt-7be5be79.pth", weights_only=True)
    heads = torch.load(metric_weights / "alex.pth", weights_only=True)
    save_file(features, tmp_path / "alexnet-owt-7be5be79.safetensors")
    both = metrics.load_lpips([str(tmp_path / "alexnet-owt-7be5be79.safetensors"), str(metric_weights / "alex.pth")])
    a, b = video(images["a64"]), video(images["a64_noisy"])
    assert metrics.lpips_distances(both, a, b, progress=False) == metrics.lpips_distances(lpips_net, a, b,
                                                                                          progress=False)
    save_file({**features, **heads}, tmp_path / "lpips.safetensors")
    assert metrics.load_lpips(str(tmp_path / "lpips.safetensors")).lin4.model[1].weight.shape == (1, 256, 1, 1)


def test_load_networks_from_one_folder(tmp_path, metric_weights):
    lpips, inception = metrics.load_networks(str(metric_weights), dtype="bf16")
    assert lpips.lin0.model[1].weight.dtype == inception.Conv2d_1a_3x3.conv.weight.dtype == torch.bfloat16
    os.link(metric_weights / "alex.pth", tmp_path / "alex.pth")
    os.link(metric_weights / "alexnet-owt-7be5be79.pth", tmp_path / "alexnet-owt-7be5be79.pth")
    lpips, inception = metrics.load_networks(str(tmp_path))
    assert isinstance(lpips, LPIPS) and inception is None       # FID / KID will be reported missing
    assert metrics.load_networks(None) == (None, None)
    os.remove(tmp_path / "alex.pth")
    with pytest.raises(metrics.MetricWeightsError, match="missing .5.: lin0.*alex.pth from the lpips wheel"):
        metrics.load_networks(str(tmp_path))


class RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())


def test_bad_weight_files_are_one_error_naming_the_file(tmp_path, metric_weights):
    garbage = tmp_path / "alex.pth"
    garbage.write_bytes(b"not a torch file" * 10)
    code = tmp_path / "code.pth"
    torch.save({"lin0.model.1.weight": RunsCode()}, code)
    truncated = tmp_path / "pt_inception-2015-12-05-6726825d.safetensors"
    truncated.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1")
    (tmp_path / "weights.txt").write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (lambda: metrics.load_lpips([str(metric_weights / "alexnet-owt-7be5be79.pth"), str(garbage)]),
         str(garbage), "not a readable weights-only .pth"),
        (lambda: metrics.load_lpips([str(metric_weights / "alexnet-owt-7be5be79.pth"), str(code)]),
         str(code), "not a readable weights-only .pth"),
        (lambda: metrics.load_inception(str(truncated)), str(truncated), "not a readable .safetensors"),
        (lambda: metrics.load_inception(str(metric_weights / "alex.pth")), "alex.pth", "missing"),
        (lambda: metrics.load_lpips(str(metric_weights / "alexnet-owt-7be5be79.pth")), "alexnet", "missing (5): lin0"),
        (lambda: metrics.load_lpips(str(tmp_path / "nothing.pth")), "nothing.pth", "no such file"),
        (lambda: metrics.load_inception(str(tmp_path / "weights.txt")), "weights.txt", "expected a .pth or"),
        (lambda: metrics.load_inception(str(empty)), str(empty), "pt_inception-2015-12-05-6726825d.pth"),
    ]
    for load, names, says in cases:
        with pytest.raises(metrics.MetricWeightsError) as error:
            load()
        message = str(error.value)
        assert names in message and says in message and "\n" not in message, message


def test_chunked_scores_equal_the_all_at_once_numbers(lpips_net, inception_net):
    """FrameScores fed in uneven chunks gives the numbers of the whole video scored at once: per-frame PSNR,
    SSIM and LPIPS, FID and KID on the Inception features of all frames, flicker as temporal_flicker's
    formula over the whole video (float32, as before the chunks)."""
    rng = np.random.default_rng(5)
    base = rng.integers(0, 256, (1, 48, 48, 3))
    real = np.clip(base + rng.integers(-40, 40, (11, 48, 48, 3)), 0, 255).astype(np.uint8)
    fake = np.clip(real + rng.integers(-30, 30, real.shape), 0, 255).astype(np.uint8)
    scores = metrics.FrameScores(lpips_net, inception_net, batch=4)
    start = 0
    for size in (3, 1, 5, 2):
        scores.add(real[start:start + size], fake[start:start + size])
        start += size
    chunked = scores.result()

    whole = lambda v: torch.from_numpy(v).float() / 255  # noqa: E731  the flicker of one tensor, as it was computed
    old_flicker = [(x[2:] - 2 * x[1:-1] + x[:-2]).abs().mean().item() / 2 for x in (whole(fake), whole(real))]
    feats = [metrics.inception_features(inception_net, v, batch=4, progress=False) for v in (real, fake)]
    reference = {"psnr": metrics.psnr(real, fake), "ssim": metrics.ssim(real, fake),
                 "lpips": metrics.lpips_distances(lpips_net, real, fake, batch=4, progress=False)}
    assert chunked["frames"] == 11
    for key, per_frame in reference.items():
        np.testing.assert_allclose(chunked[key]["per_frame"], per_frame, rtol=1e-6, atol=0)
        assert chunked[key]["mean"] == pytest.approx(per_frame.mean(), rel=1e-6)
    assert chunked["fid"]["value"] == pytest.approx(metrics.fid(*feats), rel=1e-6)
    assert chunked["kid"]["mean"] == pytest.approx(metrics.kid(*feats, subset_size=11)[0], rel=1e-6)
    assert [chunked["flicker"][k] for k in ("render", "real")] == pytest.approx(old_flicker, rel=1e-6)
    assert len(chunked["flicker_per_frame"]["render"]) == 9
    # all at once (frame_metrics) and chunk by chunk are the same arithmetic: identical numbers
    assert metrics.frame_metrics(real, fake, lpips_net, inception_net, batch=4, progress=False) == chunked


def test_fp16_frames_are_scored_in_float32(lpips_net, images):
    """Frames that arrive as float16 (an fp16 render before its uint8 rounding) get the float32 scores of
    the same values: the networks take float32 whatever the frames' dtype."""
    real = video(images["a64"], images["a64_dark"])
    fake = video(images["a64_noisy"], images["a64"])
    as_fp16 = fake.astype(np.float16)   # 0..255 integers are exact in fp16
    assert np.array_equal(metrics.lpips_distances(lpips_net, real, as_fp16, progress=False),
                          metrics.lpips_distances(lpips_net, real, fake, progress=False))
