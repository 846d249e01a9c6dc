"""Evaluation metrics: FID / rFID, Inception Score, PSNR, SSIM, LPIPS, codebook usage.

The building blocks here are deliberately small so the evaluation protocol is visible in the scripts
that use them:

    inception = InceptionFeatures(weights_path=None)          # None downloads; a path runs offline
    real, fake = FeatureStatistics(2048), FeatureStatistics(2048)
    for x, x_rec in loader:                                   # images in [-1, 1]
        real.update(inception(to_uint8(x))[0])
        fake.update(inception(to_uint8(x_rec))[0])
    real.all_reduce(); fake.all_reduce()                      # exact sums over processes
    fid = frechet_distance(*real.mean_cov(), *fake.mean_cov())

Conventions that decide the numbers (state them in every report):
- Inception is torch-fidelity's port of the TF FID network, fed uint8 images produced by ROUNDING.
- Feature statistics are float64 sums; the covariance uses ddof=1 (np.cov's default, as in
  pytorch-fid and torch-fidelity). There is no padded sampler: every process counts only its real samples.
- PSNR / SSIM / LPIPS take float images in [-1, 1] and clamp them to that range first (what saving the image
  would do; an overshoot beyond 1.5, such as [0, 255] images, and integer images are a ValueError) and return one
  value per image; the caller averages.
"""
from __future__ import annotations

import io
import math
import pickle
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed
from .downloads import explain_download_failure
from .errors import NotFoundError, UsageError

__all__ = [
    "to_uint8",
    "InceptionFeatures",
    "FeatureStatistics",
    "frechet_distance",
    "inception_score",
    "psnr",
    "ssim",
    "LPIPSMetric",
    "codebook_usage",
    "histogram_usage",
]


# ------------------------------------------------------------------------------------------------
# helpers


# Images are expected in [-1, 1]; a little overshoot (a decoder's output, resampling) is fine and clamped, [0, 255]
# is not. The tokenizer checks its inputs against the same limit.
INPUT_RANGE_LIMIT = 1.5


def _check_image_pair(x: torch.Tensor, y: torch.Tensor, name: str) -> None:
    if x.ndim != 4 or x.shape != y.shape:
        raise ValueError(
            f"{name} expects two image batches of the same shape (B, C, H, W); got {tuple(x.shape)} and "
            f"{tuple(y.shape)}. Add a batch dimension with x[None] for a single image."
        )
    for images in (x, y):  # clamping would turn uint8 or [0, 255] images into a plausible, wrong number
        if not images.is_floating_point():
            raise ValueError(f"{name} expects floating-point images in [-1, 1]; got dtype {images.dtype}. Convert "
                             f"uint8 images with x.float() / 127.5 - 1.")
        peak = images.detach().abs().max().item() if images.numel() else 0.0
        if peak > INPUT_RANGE_LIMIT:
            raise ValueError(f"{name} expects images in [-1, 1]; got values reaching {peak:.4g}. Convert [0, 255] "
                             f"images with x / 127.5 - 1 (a small overshoot, up to {INPUT_RANGE_LIMIT}, is "
                             f"clamped).")


def _to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> [0, 1], clamped (decoder outputs overshoot a little; _check_image_pair refuses more)."""
    return ((x.clamp(-1, 1) + 1) / 2)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 in [0, 255] by ROUNDING (truncation biases every pixel down by 0.5)."""
    if not torch.is_floating_point(images):
        raise ValueError(f"to_uint8 expects floating-point images in [-1, 1]; got dtype {images.dtype}.")
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# ------------------------------------------------------------------------------------------------
# Inception features (FID and IS)


class InceptionFeatures(nn.Module):
    """The TF-ported FID Inception-v3 of torch-fidelity: uint8 (B, 3, H, W) -> (pool (B, 2048), logits (B, 1008)).

    `weights_path=None` downloads the standard weights (weights-inception-2015-12-05-6726825d.pth, cached in
    the torch hub directory, so later runs work offline too); a path loads that file (a state dict in the
    format torch-fidelity saves), which is how to run with no network at all. Any H x W is accepted: the
    network resizes to 299 x 299 internally with TF1's bilinear resize, exactly as the reference does.
    The logits are torch-fidelity's "logits_unbiased" (no fc bias), the ones its Inception Score uses.
    """

    FEATURE_DIM = 2048

    def __init__(self, weights_path: str | Path | None = None, device: str | torch.device | None = None,
                 internal_dtype: str = "float32"):
        super().__init__()
        # Imported here: torch-fidelity takes seconds to import and most users of vqhit never need it.
        from torch_fidelity import feature_extractor_inceptionv3 as inception

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        state = _inception_state_dict(weights_path, inception.URL_INCEPTION_V3)
        # torch-fidelity's constructor takes its weights from a path it unpickles with weights_only=False. It gets
        # them from memory instead, written here from the weights-only load above: only tensors, so nothing in a
        # weights file ever runs, and no process-wide setting is touched.
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        try:
            self.net = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                             feature_extractor_weights_path=buffer,
                                                             feature_extractor_internal_dtype=internal_dtype)
        except RuntimeError as err:  # load_state_dict's: tensors of another network (its message lists every key)
            if weights_path is None or "Error(s) in loading state_dict" not in str(err):
                raise
            raise _not_a_weights_file(weights_path, INCEPTION_OPTION, _state_dict_mismatch(err)) from None
        self.to(device)

    @property
    def device(self) -> torch.device:
        return self.net.fc.weight.device

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dtype != torch.uint8:
            raise _inception_wants_uint8(images.dtype)
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"InceptionFeatures expects (B, 3, H, W) images; got shape {tuple(images.shape)}.")
        pool, logits = self.net(images.to(self.device))
        return pool, logits


def _inception_wants_uint8(dtype: torch.dtype) -> ValueError:
    return ValueError(f"InceptionFeatures expects uint8 images; got {dtype}. Convert [-1, 1] images with "
                      "vqhit.metrics.to_uint8(images).")


# The options that name local weights files, and what each should be: the errors name them and the fix.
INCEPTION_OPTION = ("--inception-weights", "weights file of torch-fidelity's FID Inception",
                    "pass weights-inception-2015-12-05-6726825d.pth, or leave the option out to download it")
LPIPS_OPTION = ("--lpips-backbone", "weights file of torchvision's AlexNet",
                "pass torchvision's alexnet-owt-7be5be79.pth, or leave the option out to download it (or --no-lpips)")


def _not_a_weights_file(path, option: tuple[str, str, str], why: str) -> UsageError:
    name, what, fix = option
    return UsageError(f"{name} {path}: not a {what} ({why}); {fix}")


def _load_weights_file(path, option: tuple[str, str, str]) -> dict:
    """A local weights file the user named, as a state dict of tensors, loaded with weights_only=True (a weights
    file cannot run code). A missing, damaged or foreign file is one UsageError naming the option and the fix."""
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"{option[0]} {path}: the file does not exist; {option[2]}")
    if path.is_dir():
        raise _not_a_weights_file(path, option, "it is a folder")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # objects beyond tensors: refused by weights_only=True
        raise _not_a_weights_file(path, option, _more_than_tensors(err)) from err
    except Exception as err:  # a damaged or non-torch file: the unpickler trips over it anywhere (KeyError, EOF ...)
        raise _not_a_weights_file(path, option, _unreadable_torch_file(err)) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise _not_a_weights_file(path, option, f"it holds a {type(state).__name__}, not a state dict of tensors")
    return state


def _more_than_tensors(err: pickle.UnpicklingError) -> str:
    """Why weights_only=True refused a file: the unpickler's own reason, and how to re-save the file."""
    reason = next((line.strip() for line in str(err).splitlines() if "Unpickler error" in line), type(err).__name__)
    return (f"it holds more than tensors, and weights files are loaded with weights_only=True so that they cannot "
            f"run code: {reason}; re-save a state dict with torch.save(state_dict, path)")


def _unreadable_torch_file(err: Exception) -> str:
    first_line = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
    return f"unreadable as a torch file: {type(err).__name__} {first_line}".strip()


def _state_dict_mismatch(err: RuntimeError) -> str:
    """load_state_dict's error (kilobytes: every key) in one short phrase."""
    counts = []
    for line in str(err).splitlines():
        for kind in ("Missing", "Unexpected"):
            if f"{kind} key(s)" in line:
                counts.append(f"{line.count(chr(34)) // 2} {kind.lower()}")  # the keys are listed in double quotes
    shapes = str(err).count("size mismatch")
    counts += [f"{shapes} of other shapes"] if shapes else []
    return f"the tensors of another network: {', '.join(counts)}"


def _inception_state_dict(weights_path, url: str) -> dict:
    """The Inception weights from `weights_path`, or downloaded from `url` (None), loaded with weights_only=True: a
    weights file cannot run code. The official file is a plain state dict and loads unchanged."""
    if weights_path is not None:
        return _load_weights_file(weights_path, INCEPTION_OPTION)
    try:
        with explain_download_failure(*INCEPTION_DOWNLOAD):
            return torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise _downloaded_inception_not_tensors(err) from err


# What the Inception download is, and how to do without it (`explain_download_failure`'s two arguments).
INCEPTION_DOWNLOAD = ("torch-fidelity's Inception weights (weights-inception-2015-12-05-6726825d.pth)",
                      "weights_path=..., or --inception-weights PATH in the scripts (or --no-fid in eval_rfid.py, to "
                      "skip rFID)")


def _downloaded_inception_not_tensors(err: pickle.UnpicklingError) -> UsageError:
    return UsageError(f"the downloaded Inception weights are not a plain state dict of tensors ({err}); delete "
                      f"the file from the torch hub cache to download it again.")


class FeatureStatistics:
    """Running mean / covariance of feature vectors, exact across processes.

    Keeps N, the float64 sum and the float64 sum of outer products, so batches (and processes) can be
    added in any order and the result equals one pass over all samples. `mean_cov()` returns numpy
    float64 (mu, sigma) with sigma = np.cov(features, rowvar=False), i.e. ddof=1.
    """

    def __init__(self, dim: int, device: str | torch.device = "cpu"):
        if dim < 1:
            raise ValueError(f"FeatureStatistics needs a positive feature dimension; got {dim}.")
        self.dim = dim
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self._reduced = False

    def update(self, features: torch.Tensor) -> None:
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"Expected features of shape (B, {self.dim}); got {tuple(features.shape)}.")
        f = features.detach().to(device=self.sum.device, dtype=torch.float64)
        self.n += f.shape[0]
        self.sum += f.sum(dim=0)
        self.sum_outer += f.T @ f

    def all_reduce(self) -> "FeatureStatistics":
        """Sum N and the sums over all processes (no-op when torch.distributed is not initialised).

        Call once, after the last update, on every process; afterwards every process holds the totals.
        """
        if not distributed.is_distributed():
            return self
        if self._reduced:
            raise RuntimeError("FeatureStatistics.all_reduce() was already called; a second call would "
                               "count every other process's samples again.")
        n = distributed.all_reduce_sum(torch.tensor([self.n], dtype=torch.int64, device=self.sum.device))
        self.n = int(n.item())
        distributed.all_reduce_sum(self.sum)
        distributed.all_reduce_sum(self.sum_outer)
        self._reduced = True
        return self

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"A covariance needs at least 2 samples; these statistics hold {self.n}.")
        mu = self.sum / self.n
        sigma = (self.sum_outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()

    def save(self, path: str | Path) -> None:
        """Write mu, sigma and n to an .npz file (reference statistics to reuse across evaluations)."""
        mu, sigma = self.mean_cov()
        np.savez(path, mu=mu, sigma=sigma, n=np.int64(self.n))

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "FeatureStatistics":
        """Read a file written by `save`; the sums are rebuilt from (mu, sigma, n) so it can be updated further."""
        with np.load(path) as data:
            if "n" not in data:
                raise _not_saved_statistics(path)
            mu = torch.from_numpy(data["mu"].astype(np.float64))
            sigma = torch.from_numpy(data["sigma"].astype(np.float64))
            n = int(data["n"])
        stats = cls(mu.shape[0], device=device)
        stats.n = n
        stats.sum = (n * mu).to(device)
        stats.sum_outer = ((n - 1) * sigma + n * torch.outer(mu, mu)).to(device)
        return stats


def _not_saved_statistics(path) -> ValueError:
    return ValueError(f"{path} has no 'n' entry, so it was not written by FeatureStatistics.save. For foreign "
                      "reference statistics use np.load(path)['mu'] / ['sigma'] with frechet_distance directly.")


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(s1) + Tr(s2) - 2 Tr sqrt(s1 s2), in float64.

    Tr sqrt(s1 s2) is computed as the sum of the square roots of the eigenvalues of sqrt(s1) s2 sqrt(s1),
    which has the eigenvalues of s1 s2 and, both covariances being symmetric PSD, is symmetric PSD itself:
    two symmetric eigendecompositions give pytorch-fid's `sqrtm` value without its complex intermediates or
    its singular-matrix fallback, and about ten times faster at 2048 dimensions.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, dtype=np.float64)), np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise _mismatched_statistics(mu1, sigma1, mu2, sigma2)
    w, v = np.linalg.eigh(sigma1)
    sqrt_sigma1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def _mismatched_statistics(mu1, sigma1, mu2, sigma2) -> ValueError:
    return ValueError(f"Mismatched statistics: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, sigma2 "
                      f"{sigma2.shape}; both sets must come from the same feature layer.")


def inception_score(logits: torch.Tensor, split_size: int = 5000) -> tuple[float, float]:
    """Inception Score (mean, std over splits) from Inception logits (N, classes).

    The samples are cut into max(1, N // split_size) nearly equal consecutive splits (50k samples with
    the default give the customary 10 splits of 5k; fewer than `split_size` samples give one split).
    Per split: exp(E_x KL(p(y|x) || p(y))). std is the population std over splits (numpy's default).
    """
    if logits.ndim != 2 or logits.shape[0] < 1:
        raise ValueError(f"inception_score expects logits of shape (N, classes); got {tuple(logits.shape)}.")
    if split_size < 1:
        raise ValueError(f"split_size must be positive; got {split_size}.")
    log_p = F.log_softmax(logits.detach().to(torch.float64), dim=1)
    num_splits = max(1, logits.shape[0] // split_size)
    scores = []
    for log_p_split in torch.tensor_split(log_p, num_splits, dim=0):
        log_py = torch.logsumexp(log_p_split, dim=0) - math.log(log_p_split.shape[0])  # log of mean p(y|x)
        # xlogy-style guard: classes with p = 0 contribute 0, not 0 * -inf = nan.
        p = log_p_split.exp()
        kl = torch.where(p > 0, p * (log_p_split - log_py), torch.zeros_like(p)).sum(dim=1)
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


# ------------------------------------------------------------------------------------------------
# per-image reconstruction metrics


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image (B,), computed on [0, 1] from [-1, 1] inputs; identical images give inf."""
    _check_image_pair(x, y, "psnr")
    mse = (_to_unit_range(x).double() - _to_unit_range(y).double()).pow(2).flatten(1).mean(dim=1)
    return (-10 * torch.log10(mse)).float()


def _gaussian_window(size: int, sigma: float, device, dtype) -> torch.Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-0.5 * (coords / sigma) ** 2)
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, window_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """SSIM per image (B,) on [0, 1] (data range 1) from [-1, 1] inputs.

    Matches skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1, channel_axis=0): an 11-tap Gaussian window applied as a
    valid (unpadded) convolution, K1 = 0.01, K2 = 0.03, SSIM map averaged per channel, then over channels.
    """
    _check_image_pair(x, y, "ssim")
    b, c, h, w = x.shape
    if h < window_size or w < window_size:
        raise ValueError(f"ssim needs images of at least {window_size}x{window_size}; got {h}x{w}.")
    x, y = _to_unit_range(x).double(), _to_unit_range(y).double()
    g = _gaussian_window(window_size, sigma, x.device, x.dtype)
    # The 2-D Gaussian is separable: filter rows then columns, all five moments and channels at once.
    moments = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # (B, 5C, H, W)
    groups = moments.shape[1]
    moments = F.conv2d(moments, g.view(1, 1, 1, -1).expand(groups, 1, 1, window_size), groups=groups)
    moments = F.conv2d(moments, g.view(1, 1, -1, 1).expand(groups, 1, window_size, 1), groups=groups)
    mu_x, mu_y, e_xx, e_yy, e_xy = moments.chunk(5, dim=1)
    var_x, var_y, cov_xy = e_xx - mu_x**2, e_yy - mu_y**2, e_xy - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(2, 3)).mean(dim=1).float()


class LPIPSMetric(nn.Module):
    """LPIPS distance per image (B,) between [-1, 1] image batches (the `lpips` package; AlexNet for evaluation).

    pretrained: load the package's calibrated linear heads (shipped inside the package, no download);
    model_path overrides their file. pnet_rand=False loads the ImageNet backbone through torchvision
    (downloaded once into the torch hub cache); for a machine with no network pass backbone_path, a
    torchvision state dict of the backbone (e.g. alexnet-owt-7be5be79.pth), or place that file in the cache.
    pnet_rand=True gives a random backbone (tests only: the numbers mean nothing).
    """

    def __init__(self, net: str = "alex", pretrained: bool = True, pnet_rand: bool = False,
                 model_path: str | Path | None = None, backbone_path: str | Path | None = None):
        super().__init__()
        import lpips  # imported here: it pulls in torchvision model definitions and takes seconds

        if net not in ("alex", "vgg", "squeeze"):
            raise ValueError(f"LPIPS net must be 'alex', 'vgg' or 'squeeze'; got {net!r}.")
        with warnings.catch_warnings(), explain_download_failure(*_lpips_backbone_download(net)):
            # lpips builds its backbone with torchvision's deprecated `pretrained=` argument; the warning
            # is about lpips' code, not the caller's, and would otherwise appear on every construction.
            warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*deprecated", category=UserWarning)
            self.lpips = lpips.LPIPS(net=net, pretrained=pretrained, pnet_rand=pnet_rand or backbone_path is not None,
                                     model_path=None if model_path is None else str(model_path), verbose=False)
        if backbone_path is not None:
            self._load_backbone(backbone_path)
        self.requires_grad_(False)
        self.eval()

    def _load_backbone(self, path: str | Path) -> None:
        # lpips splits torchvision's `features` Sequential into slices that keep the original indices
        # as module names ("slice2.3.weight" is torchvision's "features.3.weight").
        source = _load_weights_file(path, LPIPS_OPTION)
        target = self.lpips.net.state_dict()
        mapped = {name: source[_torchvision_key(name)] for name in target if _torchvision_key(name) in source}
        missing = sorted(_torchvision_key(name) for name in set(target) - set(mapped))
        if missing:
            raise _not_a_weights_file(path, LPIPS_OPTION, f"{len(missing)} of the {len(target)} backbone tensors "
                                      f"missing, e.g. {missing[0]}")
        shapes = [name for name in target if mapped[name].shape != target[name].shape]
        if shapes:
            raise _not_a_weights_file(path, LPIPS_OPTION, _other_shapes(shapes, mapped, target))
        self.lpips.net.load_state_dict(mapped)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _check_image_pair(x, y, "LPIPSMetric")
        return self.lpips(x.clamp(-1, 1), y.clamp(-1, 1)).flatten()


def _lpips_backbone_download(net: str) -> tuple[str, str]:
    """What the LPIPS backbone download is, and how to do without it (`explain_download_failure`'s arguments)."""
    return (f"the ImageNet {net} backbone of LPIPS", "LPIPSMetric(backbone_path=...), or --lpips-backbone PATH in the "
            "scripts (a torchvision state dict such as alexnet-owt-7be5be79.pth); or skip LPIPS with --no-lpips")


def _torchvision_key(name: str) -> str:
    """An lpips backbone parameter's name ("slice2.3.weight") as torchvision's ("features.3.weight")."""
    return "features." + name.split(".", 1)[1]


def _other_shapes(shapes: list[str], mapped: dict, target: dict) -> str:
    first = shapes[0]
    return (f"{len(shapes)} tensors of other shapes, e.g. {_torchvision_key(first)} {tuple(mapped[first].shape)} "
            f"instead of {tuple(target[first].shape)}")


# ------------------------------------------------------------------------------------------------
# tokenizer and data protocol helpers


def codebook_usage(indices: torch.Tensor, codebook_size: int, all_reduce: bool = True) -> dict:
    """Codebook usage over a whole evaluation set from its token indices (any shape).

    Returns {"usage": fraction of codes used at least once, "perplexity": exp(entropy of the code
    histogram), "counts": the (codebook_size,) int64 histogram}. With all_reduce (default) the histogram is
    summed over processes first, so each process passes only its own indices.
    """
    if indices.dtype not in (torch.int32, torch.int64, torch.uint8, torch.int16):
        raise ValueError(f"codebook_usage expects integer code indices; got {indices.dtype}.")
    flat = indices.detach().flatten().long()
    if flat.numel() and (flat.min() < 0 or flat.max() >= codebook_size):
        raise ValueError(f"Code indices must lie in [0, {codebook_size}); got range "
                         f"[{flat.min().item()}, {flat.max().item()}]. Is codebook_size right?")
    counts = torch.bincount(flat, minlength=codebook_size)
    if all_reduce:
        distributed.all_reduce_sum(counts)
    if counts.sum() == 0:
        raise ValueError("codebook_usage got no indices.")
    return {**histogram_usage(counts), "counts": counts}


def histogram_usage(counts: torch.Tensor) -> dict:
    """{"usage": fraction of codes counted at least once, "perplexity": exp(entropy of the histogram)} of a code
    histogram `counts` (codebook_size,) holding at least one count: `codebook_usage`'s numbers, and the quantizer's
    (`VectorQuantizer.usage_stats`) from the histogram it keeps while it runs."""
    p = counts.double() / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"usage": (counts > 0).double().mean().item(), "perplexity": entropy.exp().item()}
