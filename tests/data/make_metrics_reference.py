"""Make tests/data/metrics_reference.npz: the reference metric implementations' outputs on test inputs.

The oracles (lpips, pytorch-fid, torch-fidelity, torchmetrics) import torchvision, whose registry wheels are
CUDA builds that break beside the CPU torch of requirements.txt, so they live in their own venv (a CUDA torch
runs fine on a CPU). From the repository root:
    python3.11 -m venv /work/venvs/oracle
    /work/venvs/oracle/bin/pip install torch==2.14.1 torchvision==0.29.1
    /work/venvs/oracle/bin/pip install lpips==0.1.4 pytorch-fid==0.3.0 torch-fidelity==0.4.0 torchmetrics==1.9.0 \
        scikit-image scipy numpy safetensors
    /work/venvs/oracle/bin/python tests/data/make_metrics_reference.py
tests/test_metrics.py rebuilds the same weights, images and features with the numpy-only functions below
(RandomState streams are stable across numpy versions) and compares model/metrics.py with the stored outputs.
The networks' weights are random, seeded per tensor name, never the published ones: the fixture stays small
and carries no third-party data; what is compared is the computation. The npz also stores this script and the
oracles' versions.
"""
import json
import os
import tempfile
import zlib

import numpy as np
import skimage.data

HERE = os.path.dirname(os.path.abspath(__file__))
OUTPUT = os.path.join(HERE, "metrics_reference.npz")
SEED = 19
# LPIPS pairs (image names) and the images the Inception sees: a TF resize up, none, and down.
LPIPS_PAIRS = [("a64", "a64_noisy"), ("a64", "a64_dark"), ("b96x80", "b96x80_shifted")]
INCEPTION_IMAGES = {"64": ["a64", "a64_noisy", "a64_dark"], "96x80": ["b96x80", "b96x80_shifted"],
                    "299": ["c299"], "320": ["d320"]}
KID_SUBSETS, KID_SUBSET_SIZE = 10, 30


def random_tensor(key: str, shape: tuple) -> np.ndarray:
    """A float32 tensor for parameter `key`, seeded by its name (independent of every other key), scaled so a
    random network keeps its activations in range: He-scaled conv weights, batch-norm statistics near 1."""
    rng = np.random.RandomState((zlib.crc32(key.encode()) + SEED) % 2 ** 32)
    if key.startswith("lin"):                                   # LPIPS heads are non-negative
        x = np.abs(rng.standard_normal(shape)) * 0.1
    elif key.endswith(("running_var", "bn.weight")):
        x = rng.uniform(0.5, 1.5, shape)
    elif key.endswith(("running_mean", "bn.bias")):
        x = rng.standard_normal(shape) * 0.1
    elif len(shape) >= 2:                                       # conv / linear weights
        x = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
    else:                                                       # conv / linear biases
        x = rng.standard_normal(shape) * 0.01
    return x.astype(np.float32)


def random_weights(shapes: dict) -> dict:
    return {key: random_tensor(key, tuple(shape)) for key, shape in shapes.items()}


def reference_images() -> dict:
    """name -> uint8 (H, W, 3) image, from skimage's astronaut without interpolation, plus seeded noise."""
    rgb = skimage.data.astronaut()
    rng = np.random.RandomState(SEED)
    a64 = np.ascontiguousarray(rgb[::8, ::8])
    return {
        "a64": a64,
        "a64_noisy": np.clip(a64 + rng.normal(0, 20, a64.shape), 0, 255).astype(np.uint8),
        "a64_dark": (a64 // 2).astype(np.uint8),
        "b96x80": np.ascontiguousarray(rgb[100:292:2, 150:310:2]),
        "b96x80_shifted": np.ascontiguousarray(rgb[106:298:2, 146:306:2]),
        "c299": np.ascontiguousarray(rgb[60:359, 110:409]),
        "d320": np.ascontiguousarray(rgb[:320, 100:420]),
    }


def random_features() -> dict:
    """Feature sets for FID / KID: two overlapping Gaussians, and a pair with fewer samples than dimensions."""
    rng = np.random.RandomState(SEED + 1)
    return {
        "real": rng.standard_normal((60, 16)),
        "fake": 0.8 * rng.standard_normal((60, 16)) + 0.3,
        "few_real": rng.standard_normal((6, 16)),
        "few_fake": rng.standard_normal((6, 16)) + 0.5,
    }


def weights_sum(weights: dict) -> float:
    """A checksum of a weight set, so the test can tell a rebuild that differs from the one used here."""
    return float(sum(np.float64(v).sum() for v in weights.values()))


def lpips_reference(images):
    import lpips
    import torch
    net = lpips.LPIPS(net="alex", version="0.1", pretrained=False, pnet_rand=True, verbose=False).eval()
    # lpips names AlexNet's layers net.sliceK.N.* (N: torchvision's index); the published files say features.N.*
    # (torchvision's alexnet-owt-7be5be79.pth) and linK.model.1.weight (lpips' alex.pth; lins.K is the same module).
    ours = {("features." + k.split(".", 2)[2] if k.startswith("net.") else k): k
            for k in net.state_dict() if k.startswith(("net.", "lin")) and not k.startswith("lins.")}
    weights = random_weights({k: net.state_dict()[v].shape for k, v in ours.items()})
    net.load_state_dict({v: torch.from_numpy(weights[k]) for k, v in ours.items()}, strict=False)
    for i, lin in enumerate(net.lins):   # what the forward pass uses
        assert np.array_equal(lin.model[1].weight.detach().numpy(), weights[f"lin{i}.model.1.weight"])
    with torch.no_grad():
        d = [net(lpips.im2tensor(images[a]), lpips.im2tensor(images[b])).item() for a, b in LPIPS_PAIRS]
    return np.array(d), weights_sum(weights)


def inception_reference(images):
    import torch
    from pytorch_fid import inception as pytorch_fid_inception
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    # pytorch-fid builds its network (torchvision's Inception with the FID blocks swapped in), then asks for the
    # published weights; it gets random ones in their layout instead. torch-fidelity reads the same weights.
    built, weights = [], {}
    make = pytorch_fid_inception._inception_v3
    pytorch_fid_inception._inception_v3 = lambda *args, **kwargs: built.append(make(*args, **kwargs)) or built[-1]

    def random_state(*args, **kwargs):
        weights.update(random_weights({k: v.shape for k, v in built[-1].state_dict().items()
                                       if not k.endswith("num_batches_tracked")}))
        return {k: torch.from_numpy(v) for k, v in weights.items()}
    pytorch_fid_inception.load_state_dict_from_url = random_state
    net = pytorch_fid_inception.InceptionV3([3], resize_input=False, normalize_input=False).eval()
    state = {k: torch.from_numpy(v) for k, v in weights.items()}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pt_inception-random.pth")
        torch.save(state, path)
        fidelity = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=path)
    fidelity_features = {}
    with torch.no_grad():
        for size, names in INCEPTION_IMAGES.items():
            batch = torch.from_numpy(np.stack([images[n] for n in names])).permute(0, 3, 1, 2).contiguous()
            fidelity_features[size] = fidelity(batch)[0].numpy()

    # pytorch-fid's InceptionV3([3]) on 299x299 input (its resize is torch's bilinear, not TF's: not used).
    x = torch.from_numpy(images["c299"]).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        pytorch_fid_features = net((x - 128) / 128)[0].flatten(1).numpy()
    return fidelity_features, pytorch_fid_features, weights_sum({k: v for k, v in weights.items()
                                                                 if not k.startswith("fc.")})


def fid_kid_reference(features):
    import torch
    from pytorch_fid.fid_score import calculate_frechet_distance
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torchmetrics.image.fid import _compute_fid
    from torchmetrics.image.kid import poly_mmd

    out = {}
    for case, (a, b) in {"many": ("real", "fake"), "few": ("few_real", "few_fake")}.items():
        x, y = torch.from_numpy(features[a]), torch.from_numpy(features[b])   # float64 throughout
        sx, sy = fid_features_to_statistics(x), fid_features_to_statistics(y)
        out[f"fid_{case}_torch_fidelity"] = fid_statistics_to_metric(sx, sy, False)["frechet_inception_distance"]
        out[f"fid_{case}_torchmetrics"] = _compute_fid(torch.from_numpy(sx["mu"]), torch.from_numpy(sx["sigma"]),
                                                       torch.from_numpy(sy["mu"]), torch.from_numpy(sy["sigma"])).item()
        out[f"fid_{case}_pytorch_fid"] = calculate_frechet_distance(sx["mu"], sx["sigma"], sy["mu"], sy["sigma"])
        out[f"kid_{case}_torchmetrics_all_samples"] = poly_mmd(x, y).item()
    kid = kid_features_to_metric(torch.from_numpy(features["real"]), torch.from_numpy(features["fake"]),
                                 kid_subsets=KID_SUBSETS, kid_subset_size=KID_SUBSET_SIZE, verbose=False)
    out["kid_many_torch_fidelity_mean"] = kid["kernel_inception_distance_mean"]
    out["kid_many_torch_fidelity_std"] = kid["kernel_inception_distance_std"]
    return {k: np.float64(v) for k, v in out.items()}


def main():
    from importlib.metadata import version
    images = reference_images()
    lpips_d, lpips_sum = lpips_reference(images)
    fidelity_features, pytorch_fid_features, inception_sum = inception_reference(images)
    with open(__file__) as f:
        script = f.read()
    oracles = {name: version(name) for name in ("torch", "torchvision", "lpips", "pytorch-fid", "torch-fidelity",
                                                "torchmetrics", "numpy", "scipy")}
    arrays = dict(lpips=lpips_d, lpips_weights_sum=lpips_sum, inception_weights_sum=inception_sum,
                  pytorch_fid_299=pytorch_fid_features, oracles=json.dumps(oracles), script=script,
                  **{f"torch_fidelity_{size}": v for size, v in fidelity_features.items()},
                  **fid_kid_reference(random_features()))
    tmp = OUTPUT + ".tmp.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, OUTPUT)
    print(f"wrote {OUTPUT} ({os.path.getsize(OUTPUT) // 1024} KB) with {oracles}")


if __name__ == "__main__":
    main()
