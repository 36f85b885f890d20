"""How close rendered frames are to the real ones: the numbers Stable Video Portraits and the monocular avatar
papers report, each computed as its reference implementation does (tests/test_metrics.py holds the parity).

Per frame pair: PSNR (dB), SSIM (scikit-image's standard setting: Gaussian window sigma 1.5, population
covariances, data range 255, mean over RGB) and LPIPS (AlexNet, v0.1, as the `lpips` package). Over the sets:
FID and KID on the FID Inception's 2048-d pool features (as torch-fidelity: KID is the unbiased
polynomial-kernel MMD^2 over random subsets). Over time: flicker (see `temporal_flicker`).

The two networks' weights are brought by the user, like Stable Diffusion's (nothing is downloaded):
  LPIPS: alexnet-owt-7be5be79.pth (torchvision's AlexNet) and alex.pth (in the `lpips` wheel, weights/v0.1/);
  FID / KID: pt_inception-2015-12-05-6726825d.pth (pytorch-fid's release; torch-fidelity's
  weights-inception-2015-12-05-6726825d.pth is the same file).
.pth files are read with torch's weights-only loader (no code runs); .safetensors with the same keys work too.
"""
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from model.inception import FIDInception
from model.loading import DTYPES, CheckpointError, assign_weights, open_safetensors, read_tensors
from model.lpips import LPIPS

LPIPS_FILES = ("alexnet-owt-7be5be79", "alex")    # stems; .pth or .safetensors
INCEPTION_FILES = ("pt_inception-2015-12-05-6726825d", "weights-inception-2015-12-05-6726825d")
LPIPS_NEEDS = "alexnet-owt-7be5be79.pth from torchvision and alex.pth from the lpips wheel's lpips/weights/v0.1/"
INCEPTION_NEEDS = "pt_inception-2015-12-05-6726825d.pth from pytorch-fid's release"
UNUSED_KEYS = ("classifier.", "fc.")   # AlexNet's and the Inception's classifiers: the metrics do not use them
MIN_FRAMES_FID_KID = 2    # a covariance, and the unbiased MMD, need two samples
KID_SEED = 2020           # torch-fidelity's default, so our subsets are its subsets


class MetricWeightsError(CheckpointError):
    """A metric network's weight file that cannot be used: the message names the file and the problem."""


# ----------------------------------------------------------------------------- per-frame metrics

def _check_pair(real: np.ndarray, fake: np.ndarray):
    if real.shape != fake.shape or real.ndim != 4 or real.shape[-1] != 3:
        raise ValueError(f"expected two uint8 videos of one shape (T, H, W, 3), got {real.shape} and {fake.shape}")


def psnr(real: np.ndarray, fake: np.ndarray) -> np.ndarray:
    """Per-frame PSNR in dB of uint8 (T, H, W, 3) videos (inf for identical frames)."""
    _check_pair(real, fake)
    mse = ((real.astype(np.float64) - fake.astype(np.float64)) ** 2).mean((1, 2, 3))
    with np.errstate(divide="ignore"):
        return 10 * np.log10(255.0 ** 2 / mse)


SSIM_SIGMA, SSIM_RADIUS = 1.5, 5    # scipy's gaussian_filter radius: int(truncate 3.5 * sigma + 0.5)


def ssim(real: np.ndarray, fake: np.ndarray, chunk: int = 8) -> np.ndarray:
    """Per-frame SSIM of uint8 (T, H, W, 3) videos, equal to skimage.metrics.structural_similarity(
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=-1), the
    standard setting (Wang et al. 2004).

    scikit-image filters with padding and then crops the window radius off every side, so the padding never
    reaches the mean: a filter without padding gives the same map."""
    _check_pair(real, fake)
    if min(real.shape[1:3]) < 2 * SSIM_RADIUS + 1:
        raise ValueError(f"SSIM needs frames of at least {2 * SSIM_RADIUS + 1} pixels, got {real.shape[1:3]}")
    x = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    g = g / g.sum()

    def blur(image):    # (N, 1, H, W) -> (N, 1, H - 10, W - 10), separable
        return F.conv2d(F.conv2d(image, g.view(1, 1, -1, 1)), g.view(1, 1, 1, -1))

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    out = []
    for start in range(0, len(real), chunk):
        a, b = (torch.from_numpy(v[start:start + chunk]).double().permute(0, 3, 1, 2).reshape(-1, 1, *v.shape[1:3])
                for v in (real, fake))
        ma, mb = blur(a), blur(b)
        va, vb, cov = blur(a * a) - ma * ma, blur(b * b) - mb * mb, blur(a * b) - ma * mb
        s = (2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))
        out.append(s.view(-1, 3 * s[0].numel()).mean(1))
    return torch.cat(out).numpy()


def temporal_flicker(frames: np.ndarray) -> float:
    """Flicker of a video: the mean absolute difference between each frame and the average of its two
    neighbours, on [0, 1] pixels, halved (mean |x[t+1] - 2 x[t] + x[t-1]| / 2).

    Motion that is locally steady (a head turning, a mouth opening) cancels out; what a frame does on
    its own, against both neighbours (details that pop in and out), does not. It is a comparison
    between samplings of the same sequence: the motion of the sequence itself adds a floor."""
    if len(frames) < 3:
        raise ValueError(f"flicker needs at least 3 frames, got {len(frames)}")
    return float(flicker_series(frames)[0].mean())


# ----------------------------------------------------------------------------- set metrics

def fid(feats_real: np.ndarray, feats_fake: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D), in float64:
    |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2), with unbiased covariances as the references use.

    With X1, X2 the centred features, tr sqrt(S1 S2) is the sum of the singular values of X1 X2^T, divided
    by sqrt((N1 - 1)(N2 - 1)) (S1 S2 and X1 X2^T X2 X1^T share their nonzero eigenvalues). No D x D square
    root: exact when the covariances are singular (fewer frames than the 2048 dimensions, where scipy's sqrtm
    needs an offset), and an N1 x N2 problem for few frames; past D frames each set is first reduced to its
    D x D QR factor R (R^T R = X^T X)."""
    a, b = np.asarray(feats_real, np.float64), np.asarray(feats_fake, np.float64)
    if min(len(a), len(b)) < MIN_FRAMES_FID_KID:
        raise ValueError(f"FID needs >= {MIN_FRAMES_FID_KID} samples per set, got {len(a)} and {len(b)}")
    xa, xb = a - a.mean(0), b - b.mean(0)
    na, nb = len(a) - 1, len(b) - 1
    cross = _gram_factor(xa) @ _gram_factor(xb).T
    tr_covmean = np.linalg.svd(cross, compute_uv=False).sum() / np.sqrt(na * nb)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + (xa ** 2).sum() / na + (xb ** 2).sum() / nb
                 - 2 * tr_covmean)


def _gram_factor(x: np.ndarray) -> np.ndarray:
    """A matrix F with F^T F = x^T x and at most min(N, D) rows."""
    return np.linalg.qr(x, mode="r") if len(x) > x.shape[1] else x


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the polynomial kernel k(x, y) = (x.y / D + 1)^3 (KID's kernel)."""
    m, d = len(x), x.shape[1]
    kxx, kyy, kxy = ((p @ q.T / d + 1) ** 3 for p, q in ((x, x), (y, y), (x, y)))
    off_diagonal = kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)
    return float(off_diagonal / (m * (m - 1)) - 2 * kxy.sum() / (m * m))


def kid(feats_real: np.ndarray, feats_fake: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = KID_SEED) -> tuple[float, float]:
    """Kernel Inception Distance: mean and std of the unbiased MMD^2 over `subsets` random subsets of
    `subset_size` samples of each set (drawn as torch-fidelity draws them, numpy RandomState(seed)).

    subset_size is clipped to the smaller set (`kid_subset_size` tells the size used): with every sample in
    each subset, all subsets agree and the std is 0."""
    x, y = np.asarray(feats_real, np.float64), np.asarray(feats_fake, np.float64)
    m = kid_subset_size(len(x), len(y), subset_size)
    rng = np.random.RandomState(seed)
    mmds = [mmd2_unbiased(x[rng.choice(len(x), m, replace=False)], y[rng.choice(len(y), m, replace=False)])
            for _ in range(subsets)]
    return float(np.mean(mmds)), float(np.std(mmds))


def kid_subset_size(n_real: int, n_fake: int, subset_size: int = 1000) -> int:
    m = min(subset_size, n_real, n_fake)
    if m < MIN_FRAMES_FID_KID:
        raise ValueError(f"KID needs >= {MIN_FRAMES_FID_KID} samples per set, got {n_real} and {n_fake}")
    return m


# ----------------------------------------------------------------------------- metric networks

def read_weights(path: str) -> dict:
    """The tensors of one .safetensors or .pth file (the latter through torch's weights-only unpickler)."""
    if not os.path.isfile(path):
        raise MetricWeightsError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        try:
            return read_tensors(open_safetensors(path), "", None)
        except CheckpointError as e:
            raise MetricWeightsError(str(e)) from e
    if not path.endswith((".pth", ".pt")):
        raise MetricWeightsError(f"{path}: expected a .pth or .safetensors weight file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a truncated zip, a legacy file, a code-carrying pickle
        raise MetricWeightsError(f"{path}: not a readable weights-only .pth file (corrupt, or a pickle that "
                                 f"needs code to load): {str(e).splitlines()[0][:200]}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MetricWeightsError(f"{path}: not a state dict of tensors")
    return state


def files_in(folder: str, stems: Sequence[str]) -> list[str]:
    return [os.path.join(folder, stem + ext) for stem in stems for ext in (".safetensors", ".pth")
            if os.path.isfile(os.path.join(folder, stem + ext))]


def weight_files(path: str | Sequence[str], stems: Sequence[str], needs: str) -> list[str]:
    """The files to read: `path` itself, each of a list, or in a folder the files named by `stems`."""
    if not isinstance(path, str):
        return list(path)
    if not os.path.isdir(path):
        return [path]
    found = files_in(path, stems)
    if not found:
        raise MetricWeightsError(f"{path}: no metric weights in this folder; it needs {needs}")
    return found


def load_network(build, files: list[str], kind: str, needs: str, device, dtype):
    dtype = DTYPES.get(dtype, dtype)   # "fp32", "fp16", "bf16" or a torch dtype
    state = {}
    for file in files:
        state.update(read_weights(file))
    state = {k: v for k, v in state.items()   # num_batches_tracked: a training counter of torch's batch norm
             if not k.startswith(UNUSED_KEYS) and not k.endswith("num_batches_tracked")}
    try:
        net = assign_weights(build, state, "set of weights", ", ".join(files), f"the {kind} network")
    except CheckpointError as e:
        raise MetricWeightsError(f"{e} ({kind} needs {needs})") from e
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise MetricWeightsError(f"{', '.join(files)}: non-finite values in {', '.join(bad[:3])}")
    return net.to(device=device, dtype=dtype)


def load_lpips(path: str | Sequence[str], device="cpu", dtype=torch.float32) -> LPIPS:
    """LPIPS (alex, v0.1) from a folder holding alexnet-owt-7be5be79.pth and alex.pth (or .safetensors of
    those stems), from a list of files, or from one file with both key sets (`features.*`, `lin*.*`)."""
    return load_network(LPIPS, weight_files(path, LPIPS_FILES, LPIPS_NEEDS), "LPIPS", LPIPS_NEEDS, device, dtype)


def load_inception(path: str | Sequence[str], device="cpu", dtype=torch.float32) -> FIDInception:
    """The FID Inception from pt_inception-2015-12-05-6726825d.pth (or a folder holding it, or a
    .safetensors with its keys)."""
    return load_network(FIDInception, weight_files(path, INCEPTION_FILES, INCEPTION_NEEDS), "FID Inception",
                        INCEPTION_NEEDS, device, dtype)


def load_networks(folder: str | None, device="cpu", dtype=torch.float32) -> tuple[LPIPS | None, FIDInception | None]:
    """Both metric networks from one folder; a network none of whose files are there is None (its metrics are
    then reported missing), one whose files are there but incomplete or unreadable is a MetricWeightsError."""
    if folder is None:
        return None, None
    if not os.path.isdir(folder):
        raise MetricWeightsError(f"{folder}: not a folder (of {LPIPS_NEEDS}; {INCEPTION_NEEDS})")
    lpips = load_lpips(folder, device, dtype) if files_in(folder, LPIPS_FILES) else None
    inception = load_inception(folder, device, dtype) if files_in(folder, INCEPTION_FILES) else None
    return lpips, inception


def _batches(frames: np.ndarray, batch: int, device):
    """(N, 3, H, W) float32 tensors on `device`, `batch` frames at a time, values 0..255: what the metric
    networks take, whatever the frames' dtype (the networks run in float32, as the reference packages do)."""
    for start in range(0, len(frames), batch):
        yield torch.from_numpy(np.ascontiguousarray(frames[start:start + batch])).to(device).permute(0, 3, 1, 2).float()


@torch.no_grad()
def lpips_distances(net: LPIPS, real: np.ndarray, fake: np.ndarray, device="cpu", batch: int = 16,
                    progress: bool = True) -> np.ndarray:
    """Per-frame LPIPS of uint8 (T, H, W, 3) videos (lpips' im2tensor scaling: x / 127.5 - 1)."""
    _check_pair(real, fake)
    out = []
    with tqdm(total=len(real), disable=not progress, desc="LPIPS", unit="frame") as bar:
        for a, b in zip(_batches(real, batch, device), _batches(fake, batch, device)):
            out.append(net(a / 127.5 - 1, b / 127.5 - 1).double().cpu())
            bar.update(len(a))
    return torch.cat(out).numpy()


@torch.no_grad()
def inception_features(net: FIDInception, frames: np.ndarray, device="cpu", batch: int = 16,
                       progress: bool = True, desc: str = "Inception") -> np.ndarray:
    """(T, 2048) pool features of uint8 (T, H, W, 3) frames."""
    out = []
    with tqdm(total=len(frames), disable=not progress, desc=desc, unit="frame") as bar:
        for x in _batches(frames, batch, device):
            out.append(net(x).cpu())
            bar.update(len(x))
    return torch.cat(out).numpy()


# ----------------------------------------------------------------------------- chunk by chunk

def _summary(per_frame: np.ndarray) -> dict:
    return {"mean": float(per_frame.mean()), "per_frame": [float(v) for v in per_frame]}


class FrameScores:
    """Every metric of a render against the real frames, fed chunk by chunk (`add`) in memory that does not
    grow with the video beyond what the metrics keep: the per-frame numbers, two 2048-d Inception features
    per frame (FID and KID need the sets) and the last two frames of each video (flicker's second differences).

    Frames are scored in the batches `frame_metrics` would make of the whole video (chunks are buffered up to
    `batch` frames), so the numbers are the all-at-once path's whatever the chunks (tests/test_metrics.py)."""

    def __init__(self, lpips: LPIPS | None = None, inception: FIDInception | None = None, device="cpu",
                 batch: int = 16):
        self.lpips, self.inception, self.device, self.batch = lpips, inception, device, batch
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.scores = {"psnr": [], "ssim": [], "lpips": [], "flicker_render": [], "flicker_real": []}
        self.features = {"real": [], "fake": []}
        self.tail = {"real": None, "fake": None}   # the last two frames so far, [0, 1] float32
        self.frames = 0

    def add(self, real: np.ndarray, fake: np.ndarray):
        """The next frames, uint8 (T, H, W, 3) each."""
        _check_pair(real, fake)
        self.pending.append((real, fake))
        while sum(len(r) for r, _ in self.pending) >= self.batch:
            self._score(*self._take(self.batch))

    def _take(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        real, fake = (np.concatenate(v) for v in zip(*self.pending))
        self.pending = [(real[n:], fake[n:])] if n < len(real) else []
        return real[:n], fake[:n]

    def _score(self, real: np.ndarray, fake: np.ndarray):
        # Per-frame numbers are kept as Python floats: small numpy arrays kept between the large temporaries of
        # every batch fragment the heap, which then grows with the video (about 60 KB a frame, measured).
        self.frames += len(real)
        self.scores["psnr"] += psnr(real, fake).tolist()
        self.scores["ssim"] += ssim(real, fake).tolist()
        if self.lpips is not None:
            self.scores["lpips"] += lpips_distances(self.lpips, real, fake, self.device, len(real), False).tolist()
        for name, frames in (("real", real), ("fake", fake)):
            if self.inception is not None:
                self.features[name].append(inception_features(self.inception, frames, self.device, len(frames), False))
            series, self.tail[name] = flicker_series(frames, self.tail[name])
            self.scores["flicker_" + ("render" if name == "fake" else "real")] += series.tolist()

    def result(self) -> dict:
        """The metrics of every frame added (see `frame_metrics`)."""
        if self.pending:
            self._score(*self._take(sum(len(r) for r, _ in self.pending)))
        n = self.frames
        per_frame = {k: np.asarray(v, np.float64) for k, v in self.scores.items()}
        out = {"frames": n, "psnr": _summary(per_frame["psnr"]), "ssim": _summary(per_frame["ssim"])}
        out["lpips"] = ({"missing": f"LPIPS needs {LPIPS_NEEDS}"} if self.lpips is None else
                        _summary(per_frame["lpips"]))
        if self.inception is None:
            out["fid"], out["kid"] = ({"missing": f"FID and KID need {INCEPTION_NEEDS}"} for _ in range(2))
        elif n < MIN_FRAMES_FID_KID:
            out["fid"], out["kid"] = ({"missing": f"needs >= {MIN_FRAMES_FID_KID} frames, got {n}"} for _ in range(2))
        else:
            out["fid"], out["kid"] = set_metrics(*(np.concatenate(self.features[k]) for k in ("real", "fake")))
        if n >= 3:
            render, truth = float(per_frame["flicker_render"].mean()), float(per_frame["flicker_real"].mean())
            out["flicker"] = {"render": render, "real": truth, "excess": render - truth}
            out["flicker_per_frame"] = {k: self.scores["flicker_" + k] for k in ("render", "real")}
        else:
            out["flicker"] = {"missing": f"needs >= 3 frames, got {n}"}
        return out


def flicker_series(frames: np.ndarray, before: torch.Tensor | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """Per-frame flicker (`temporal_flicker`'s terms, frame t against t - 1 and t + 1) of uint8 frames that
    follow `before` (the last two frames of the video so far, [0, 1] float32; None: the video starts here).
    Returns the terms of the frames that now have both neighbours, and the new last two frames."""
    video = torch.from_numpy(np.ascontiguousarray(frames)).float() / 255
    video = video if before is None else torch.cat([before, video])
    second = (video[2:] - 2 * video[1:-1] + video[:-2]).abs().double().mean((1, 2, 3)) / 2
    return second.numpy(), video[-2:].clone()


def set_metrics(feats_real: np.ndarray, feats_fake: np.ndarray) -> tuple[dict, dict]:
    """FID and KID entries of two feature sets (KID on torch-fidelity's 100 subsets of 1000, clipped)."""
    n = len(feats_real)
    subsets, subset_size = 100, kid_subset_size(n, len(feats_fake))
    mean, std = kid(feats_real, feats_fake, subsets, subset_size)
    kid_entry = {"mean": mean, "std": std, "subsets": subsets, "subset_size": subset_size}
    if subset_size < 1000:
        kid_entry["note"] = (f"subset size clipped from the usual 1000 to the {n} frames: every subset is all frames, "
                             "so the std is 0 up to rounding")
    return {"value": fid(feats_real, feats_fake), "samples": n}, kid_entry


def frame_metrics(real: np.ndarray, fake: np.ndarray, lpips: LPIPS | None = None,
                  inception: FIDInception | None = None, device="cpu", batch: int = 16,
                  progress: bool = True) -> dict:
    """Every metric of a render `fake` against the real frames `real`, uint8 (T, H, W, 3) each, all at once.

    A metric whose network is None, or that has too few frames, is {"missing": "<what it needs>"}; the
    others are still computed. KID's entry tells the subset size it used (clipped to T); flicker_per_frame
    holds flicker's terms of frames 1 .. T - 2 (the render's and the real video's)."""
    _check_pair(real, fake)
    scores = FrameScores(lpips, inception, device, batch)
    for start in tqdm(range(0, len(real), batch), disable=not progress, desc="metrics", unit="batch"):
        scores.add(real[start:start + batch], fake[start:start + batch])
    return scores.result()
