"""Evaluation protocols: rFID and friends for a tokenizer, FID and IS for a generator.

    from vqhit import VQHiT
    from vqhit.data import eval_dataset
    from vqhit.evaluation import evaluate_tokenizer, format_report

    report = evaluate_tokenizer(VQHiT.from_pretrained("runs/vqhit-demo/model"),
                                eval_dataset("/data/imagenet/val", 256, transform="adm_center_crop"),
                                ref_stats="imagenet256_val_adm.npz")
    print(format_report(report, "rFID"))

Every function runs unchanged on one process or many (`accelerate launch`): the data are sharded
rank::world_size with no padding, generated samples are split into exact per-process shares, and all
sums (float64 feature statistics, metric sums, code histograms) are added over processes before any
number is computed. The report states every setting that decides the numbers.

Conventions (beyond those of `vqhit.metrics`):
- Images enter Inception as uint8 by rounding; PSNR / SSIM / LPIPS are computed on the same rounded
  reconstructions, i.e. on the images one would save and look at.
- Reference statistics are cached in an .npz (mu, sigma, n, and the protocol that made them as JSON);
  a cached file made under another protocol (data, split, crop, resolution, #images, Inception weights)
  is refused rather than silently compared against.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from PIL import Image
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from . import distributed
from .config_values import differences
from .distributed import process_state, state_and_device
from .data import ImageDataset, build_dataloader, check_eval_dataset, collate_images, data_settings
from .errors import UsageError
from .files import atomic_write
from .metrics import (FeatureStatistics, InceptionFeatures, LPIPSMetric, codebook_usage, frechet_distance,
                      histogram_usage, inception_score, psnr, ssim, to_uint8)
from .precision import autocast, check_precision

INTERPOLATIONS = ("linear", "slerp")
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's port of the TF FID network


# --------------------------------------------------------------------------------------------------
# Reference statistics


@dataclass
class ReferenceStatistics:
    """Inception pool-feature statistics of a reference set, and the protocol that produced them."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int | None = None          # None for foreign files that do not record it
    protocol: dict | None = None  # None for foreign files (pytorch-fid / torch-fidelity .npz with mu, sigma)

    @classmethod
    def from_statistics(cls, stats: FeatureStatistics, protocol: dict | None) -> "ReferenceStatistics":
        mu, sigma = stats.mean_cov()
        return cls(mu, sigma, stats.n, protocol)

    def save(self, path: str | os.PathLike) -> None:
        """Write an .npz (written to a temporary name and renamed: a killed run never leaves half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object, so numpy does not append ".npz" to the temporary name
                np.savez(f, mu=self.mu, sigma=self.sigma, n=np.int64(self.n),
                         protocol=np.array(json.dumps(self.protocol, sort_keys=True)))
        atomic_write(path, write)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ReferenceStatistics":
        """Read an .npz with mu and sigma; a folder, a damaged file or another kind of file is one UsageError
        naming --ref-stats and the fix."""
        if Path(path).is_dir():
            raise _ref_stats_is_folder(path)
        try:
            data = np.load(path)  # allow_pickle=False: a statistics file holds plain arrays only
            if isinstance(data, np.ndarray):
                raise _not_statistics_file(path, "it is a single .npy array, not an .npz archive")
            with data:
                if "mu" not in data or "sigma" not in data:
                    raise _not_statistics_file(path, f"it has {sorted(data.keys())}")
                n = int(data["n"]) if "n" in data else None
                protocol = json.loads(str(data["protocol"])) if "protocol" in data else None
                return cls(data["mu"].astype(np.float64), data["sigma"].astype(np.float64), n, protocol)
        except UsageError:
            raise
        except Exception as err:  # whatever a damaged file trips over: BadZipFile, pickled data, bad JSON, EOF ...
            raise _not_statistics_file(path, _unreadable(err)) from err

    def check_protocol(self, protocol: dict, path) -> None:
        if self.protocol is None:
            warnings.warn(_unrecorded_protocol(path))
            return
        diff = differences(self.protocol, protocol)
        if diff:
            raise _other_protocol(path, diff)


def _ref_stats_is_folder(path) -> UsageError:
    return UsageError(f"--ref-stats {path} is a folder; pass the path of an .npz file (loaded if it exists, "
                      f"else computed from --data and saved there).")


def _not_statistics_file(path, why: str) -> UsageError:
    return UsageError(f"--ref-stats {path}: not a statistics file ({why}); pass an .npz with 'mu' and 'sigma' "
                      f"arrays (the format of vqhit, pytorch-fid and torch-fidelity), or delete the file so "
                      f"that it is computed from --data and saved there.")


def _unreadable(err: Exception) -> str:
    """Why a damaged file could not be read, in a short phrase: the error's type and the first sentence of its
    message."""
    first_line = (str(err).strip().splitlines() or [""])[0].split(". ")[0][:200]
    return f"unreadable: {type(err).__name__} {first_line}".strip()


def _unrecorded_protocol(path) -> str:
    return (f"{path} does not record how it was made; it is used as the reference without checking "
            f"that it matches this evaluation's data and crop.")


def _other_protocol(path, diff: dict) -> UsageError:
    return UsageError(f"{path} holds reference statistics of another protocol; differing settings "
                      f"(file, this run): {diff}. Delete the file to recompute it, or pass another path.")


def reference_protocol(dataset: ImageDataset, inception_weights) -> dict:
    """The settings reference statistics depend on (a cached file must match all of them)."""
    weights = INCEPTION_FILE if inception_weights is None else Path(inception_weights).name
    return {**data_settings(dataset), "inception_weights": weights, "features": "pool3 2048, uint8 rounded"}


def _load_reference(path, protocol: dict | None) -> ReferenceStatistics | None:
    if path is None or not Path(path).exists():
        return None
    reference = ReferenceStatistics.load(path)
    if protocol is not None:
        reference.check_protocol(protocol, path)
    return reference


def dataset_statistics(dataset: ImageDataset, inception: InceptionFeatures, *, batch_size: int = 50,
                       num_workers: int = 0, progress: bool = True) -> FeatureStatistics:
    """Inception pool-feature statistics of every image of `dataset`, summed over processes."""
    stats = FeatureStatistics(InceptionFeatures.FEATURE_DIM, device=inception.device)
    loader = build_dataloader(dataset, batch_size, num_workers, shuffle=False, drop_last=False)
    for batch in _bar(loader, "reference statistics", progress):
        if batch is not None:
            stats.update(inception(to_uint8(batch["image"]))[0])
    return stats.all_reduce()


def reference_statistics(dataset: ImageDataset | None, ref_stats=None, *, inception: InceptionFeatures,
                         inception_weights=None, batch_size: int = 50, num_workers: int = 0,
                         progress: bool = True) -> tuple[ReferenceStatistics, str]:
    """Load `ref_stats` if the file exists (checked against `dataset`'s protocol when one is given), else
    compute the statistics of `dataset` and save them there. Returns (statistics, "loaded" | "computed")."""
    protocol = None if dataset is None else reference_protocol(dataset, inception_weights)
    reference = _load_reference(ref_stats, protocol)
    if reference is not None:
        return reference, "loaded"
    if dataset is None:
        raise UsageError(f"no reference: the statistics file {ref_stats!r} does not exist and no dataset was given; "
                         f"pass the dataset (--data) to compute it, or the path of an existing .npz.")
    stats = dataset_statistics(dataset, inception, batch_size=batch_size, num_workers=num_workers, progress=progress)
    reference = ReferenceStatistics.from_statistics(stats, protocol)
    _save_on_main(reference, ref_stats)
    return reference, "computed"


def _save_on_main(reference: ReferenceStatistics, path) -> None:
    state = process_state()
    if path is not None and state.is_main_process:
        reference.save(path)
    state.wait_for_everyone()


# --------------------------------------------------------------------------------------------------
# Tokenizer: rFID, PSNR, SSIM, LPIPS, codebook usage


@torch.no_grad()
def evaluate_tokenizer(model, dataset: ImageDataset, *, model_id: str | None = None, fid: bool = True,
                       ref_stats=None, inception_weights=None, lpips: bool = True, lpips_backbone=None,
                       batch_size: int = 32, num_workers: int = 0, precision: str = "fp32", device=None,
                       progress: bool = True, codebook_plot=None) -> dict:
    """Reconstruct every image of `dataset` through the tokens (decode_indices(encode(x))) and measure.

    Returns {"metrics": {rfid, psnr, ssim, lpips, codebook_usage, codebook_perplexity, num_images,
    num_skipped, num_upsampled}, "settings": {...every setting that decides the numbers...}}. ref_stats: an
    .npz of the originals' statistics, loaded if it exists (and checked against this protocol), else computed
    in the same pass and saved there. fid=False skips Inception altogether (rfid is None); lpips=False skips
    LPIPS (lpips is None). With both off nothing is downloaded: PSNR, SSIM, codebook usage and perplexity need
    no weights. lpips_backbone: a local torchvision AlexNet state dict (offline use); None loads torchvision's
    ImageNet weights (downloaded once). codebook_plot: a PNG path where the main process plots the code
    frequencies of the whole set (`save_codebook_plot`).
    """
    check_eval_dataset(dataset, model.config.resolution)
    precision = check_precision(precision)
    if not fid and (ref_stats is not None or inception_weights is not None):
        raise _rfid_inputs_without_rfid()
    state, device = state_and_device(device)
    protocol = reference_protocol(dataset, inception_weights)
    reference = _load_reference(ref_stats, protocol)  # first: a mismatching file fails before any work
    model = model.to(device).eval()
    inception = InceptionFeatures(inception_weights, device=device) if fid else None
    lpips_metric = LPIPSMetric(net="alex", backbone_path=lpips_backbone).to(device) if lpips else None
    real = FeatureStatistics(InceptionFeatures.FEATURE_DIM, device) if fid and reference is None else None
    fake = FeatureStatistics(InceptionFeatures.FEATURE_DIM, device) if fid else None
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # psnr, ssim, lpips, images, upsampled images
    codes, positions = [torch.zeros(0, dtype=torch.int32)], [torch.zeros(0, dtype=torch.int64)]
    loader = build_dataloader(dataset, batch_size, num_workers, shuffle=False, drop_last=False)
    batches = _bar(loader, "reconstruct" + (" (rFID)" if fid else ""), progress)
    for batch, x, indices, rec8, rec, psnrs, ssims in _reconstruct_and_measure(model, batches, device, precision):
        if real is not None:
            real.update(inception(to_uint8(x))[0])
        if fake is not None:
            fake.update(inception(rec8)[0])
        sums[:4] += torch.stack([psnrs.double().sum(), ssims.double().sum(),
                                 lpips_metric(x, rec).double().sum() if lpips_metric is not None
                                 else sums.new_zeros(()), sums.new_tensor(len(x))])
        codes.append(indices.to("cpu", torch.int32))
        positions.append(batch["index"].cpu())
    # This process's images that were smaller than the resolution (upsampled by the crop), counted once each.
    sums[4] = len(dataset.upsampled_positions() & set(torch.cat(positions).tolist()))
    sums = distributed.all_reduce_sum(sums).cpu()
    n = int(sums[3])
    if n < 2:
        raise _too_few_images(n)
    rfid, status = None, "not used (no rFID)"
    if fid:
        fake.all_reduce()
        status = "loaded"
        if reference is None:
            reference, status = ReferenceStatistics.from_statistics(real.all_reduce(), protocol), "computed"
            _save_on_main(reference, ref_stats)
        rfid = frechet_distance(reference.mu, reference.sigma, *fake.mean_cov())
    usage = codebook_usage(torch.cat(codes), model.config.codebook_size)
    if codebook_plot is not None and state.is_main_process:
        save_codebook_plot(usage["counts"], codebook_plot)
    metrics = {
        "rfid": rfid, "psnr": float(sums[0] / n), "ssim": float(sums[1] / n),
        "lpips": float(sums[2] / n) if lpips_metric is not None else None,
        "codebook_usage": usage["usage"], "codebook_perplexity": usage["perplexity"],
        "num_images": n, "num_skipped": len(dataset) - n + len(dataset.dangling), "num_upsampled": int(sums[4]),
    }
    config = model.config
    settings = {
        "model": model_id or config.preset, "preset": config.preset, "resolution": config.resolution,
        "grid": config.grid, "codebook_size": config.codebook_size, **data_settings(dataset),
        "reference_statistics": {"path": None if ref_stats is None else str(ref_stats), "status": status,
                                 "n": None if reference is None else reference.n},
        "inception_weights": _inception_source(inception_weights) if fid else "not used (no rFID)",
        "lpips": ("off" if not lpips else f"alex, backbone {lpips_backbone}" if lpips_backbone
                  else "alex, torchvision ImageNet backbone"),
        "metrics_on": "uint8-rounded reconstructions; PSNR/SSIM on [0, 1], SSIM Gaussian 11/1.5",
        "fid_statistics": "float64 sums over all processes, covariance ddof=1" if fid else "not used (no rFID)",
        **_run_settings(state, device, precision, batch_size),
    }
    return {"metrics": metrics, "settings": settings}


def _rfid_inputs_without_rfid() -> UsageError:
    return UsageError("reference statistics and Inception weights are for rFID, which fid=False (--no-fid) turns "
                      "off; drop them, or drop --no-fid.")


def _too_few_images(n: int) -> UsageError:
    return UsageError(f"the evaluation needs at least 2 readable images; got {n}. Use more images "
                      f"(--num-images).")


def save_codebook_plot(counts: torch.Tensor, path) -> Path:
    """Plot a code histogram `counts` (codebook_size,) as a PNG: the codes' frequencies sorted from the most used,
    on a log scale (unused codes are the empty tail), beside a uniform codebook's; codebook usage and perplexity in
    the title, which the PNG's Title text also holds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # not pyplot: no global figure state, no GUI backend

    counts = counts.detach().double().cpu()
    figures, size = histogram_usage(counts), len(counts)
    used = int((counts > 0).sum())
    frequencies = (counts / counts.sum()).sort(descending=True).values[:used]
    title = (f"codebook usage {100 * figures['usage']:.1f}% ({used} of {size} codes), "
             f"perplexity {figures['perplexity']:.1f}")
    figure = Figure(figsize=(7, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.step(np.arange(1, used + 1), frequencies.numpy(), where="mid", label="codes, most used first")
    axes.axhline(1 / size, color="grey", linestyle="--", linewidth=1, label=f"uniform (1/{size})")
    axes.set(yscale="log", xlim=(0, size + 1), xlabel="code rank", ylabel="frequency", title=title)
    axes.legend(loc="upper right")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: figure.savefig(p, format="png", metadata={"Title": title}))
    return path


def _reconstruct_and_measure(model, batches, device, precision: str = "fp32"):
    """The reconstruct-and-measure loop of `evaluate_tokenizer` and `heldout_report`: for every batch of `batches`
    that holds an image (None: every image of it was unreadable), reconstruct it through the tokens
    (decode_indices(encode(x)) at `precision`) and yield (batch, x on `device`, indices, the reconstruction as
    uint8 (what one would save and look at), that image back in [-1, 1], per-image PSNR, per-image SSIM)."""
    for batch in batches:
        if batch is None:
            continue
        x = batch["image"].to(device)
        with autocast(precision, device):
            indices = model.encode(x)
            reconstruction = model.decode_indices(indices)
        rec8 = to_uint8(reconstruction.float())
        rec = rec8.float() / 127.5 - 1  # the saved image, back in [-1, 1]
        yield batch, x, indices, rec8, rec, psnr(x, rec), ssim(x, rec)


# --------------------------------------------------------------------------------------------------
# Generator: FID, Inception Score, sample grid, interpolation strips


def process_shares(total: int, num_processes: int) -> list[int]:
    """Exact per-process counts summing to `total`: the first total % num_processes get one more."""
    return [total // num_processes + (rank < total % num_processes) for rank in range(num_processes)]


def process_rng(seed: int, rank: int) -> torch.Generator:
    """A CPU generator whose stream depends on (seed, rank): every process draws different latents."""
    mixed = int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0]) & (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


@torch.no_grad()
def evaluate_generator(generator, *, num_samples: int = 50_000, dataset: ImageDataset | None = None,
                       ref_stats=None, model_id: str | None = None, inception_weights=None, batch_size: int = 50,
                       num_workers: int = 0, seed: int = 0, is_split_size: int = 5000, precision: str = "fp32",
                       device=None, progress: bool = True) -> dict:
    """FID of `num_samples` samples z ~ N(0, I) against a reference, and their Inception Score.

    The reference is `ref_stats` (an .npz, loaded if it exists) or the statistics of `dataset` (saved to
    `ref_stats` when given). Process r draws exactly its share of num_samples from a generator seeded by
    (seed, r); the IS logits of all processes are gathered in rank order and split into chunks of
    `is_split_size`. Returns {"metrics": {fid, inception_score, inception_score_std, num_samples},
    "settings": {...}}.
    """
    if num_samples < 2:
        raise UsageError(f"num_samples={num_samples} (--num-samples): FID needs at least 2 samples.")
    if dataset is not None:
        check_eval_dataset(dataset, generator.config.resolution)
    precision = check_precision(precision)
    state, device = state_and_device(device)
    generator = generator.to(device).eval()
    inception = InceptionFeatures(inception_weights, device=device)
    reference, status = reference_statistics(dataset, ref_stats, inception=inception,
                                             inception_weights=inception_weights, batch_size=batch_size,
                                             num_workers=num_workers, progress=progress)
    shares = process_shares(num_samples, state.num_processes)
    mine, latent_dim = shares[state.process_index], generator.config.latent_dim
    rng = process_rng(seed, state.process_index)
    stats = FeatureStatistics(InceptionFeatures.FEATURE_DIM, device)
    logits = [torch.zeros(0, 1008)]
    for start in _bar(range(0, mine, batch_size), "FID samples", progress):
        z = torch.randn(min(batch_size, mine - start), latent_dim, generator=rng).to(device)
        with autocast(precision, device):
            images = generator(z)
        pool, batch_logits = inception(to_uint8(images.float()))
        stats.update(pool)
        logits.append(batch_logits.float().cpu())
    stats.all_reduce()
    all_logits = distributed.all_gather_cat(torch.cat(logits)).cpu()  # rank order, no padding kept
    is_mean, is_std = inception_score(all_logits, split_size=is_split_size)
    metrics = {"fid": frechet_distance(reference.mu, reference.sigma, *stats.mean_cov()),
               "inception_score": is_mean, "inception_score_std": is_std, "num_samples": stats.n}
    config = generator.config
    settings = {
        "model": model_id or config.preset, "preset": config.preset, "resolution": config.resolution,
        "latent_dim": config.latent_dim,
        "sampling": "z ~ N(0, I), no truncation; per-process CPU generators seeded by (seed, rank)", "seed": seed,
        "is_split_size": is_split_size, "is_splits": max(1, stats.n // is_split_size),
        "reference_statistics": {"path": None if ref_stats is None else str(ref_stats), "status": status,
                                 "n": reference.n, "protocol": reference.protocol},
        "inception_weights": _inception_source(inception_weights),
        "fid_statistics": "float64 sums over all processes, covariance ddof=1; uint8-rounded samples",
        **_run_settings(state, device, precision, batch_size),
    }
    return {"metrics": metrics, "settings": settings}


def interpolate_latents(z0: torch.Tensor, z1: torch.Tensor, steps: int, mode: str = "linear") -> torch.Tensor:
    """(R, D) endpoints -> (R, steps, D) latents from z0 to z1 inclusive, linear or spherical (slerp)."""
    if mode not in INTERPOLATIONS:
        raise ValueError(f"interpolation mode {mode!r} is unknown; use one of {INTERPOLATIONS}.")
    if steps < 2:
        raise ValueError(f"an interpolation needs at least 2 steps (the two endpoints); got {steps}.")
    t = torch.linspace(0, 1, steps, dtype=z0.dtype, device=z0.device)[None, :, None]
    z0, z1 = z0[:, None], z1[:, None]
    if mode == "linear":
        return z0 + t * (z1 - z0)
    cos = torch.nn.functional.cosine_similarity(z0, z1, dim=-1)[..., None].clamp(-1 + 1e-7, 1 - 1e-7)
    omega = torch.arccos(cos)
    return (torch.sin((1 - t) * omega) * z0 + torch.sin(t * omega) * z1) / torch.sin(omega)


@torch.no_grad()
def save_sample_grid(generator, path, *, rows: int = 8, cols: int = 8, seed: int = 0, batch_size: int = 64,
                     device=None) -> Path:
    """A rows x cols PNG of samples (no padding: rows*R by cols*R pixels) from latents seeded by `seed`."""
    device = state_and_device(device)[1]
    z = torch.randn(rows * cols, generator.config.latent_dim, generator=torch.Generator().manual_seed(seed))
    return _save_png(_generate(generator.to(device).eval(), z, batch_size, device), cols, path)


@torch.no_grad()
def save_interpolations(generator, path, *, rows: int = 4, steps: int = 8, seed: int = 0, mode: str = "linear",
                        batch_size: int = 64, device=None) -> Path:
    """The paper's Figure 7: each row walks from one latent to another in `steps` images (rows*R by steps*R)."""
    device = state_and_device(device)[1]
    z = torch.randn(2, rows, generator.config.latent_dim, generator=torch.Generator().manual_seed(seed))
    latents = interpolate_latents(z[0], z[1], steps, mode).flatten(0, 1)
    return _save_png(_generate(generator.to(device).eval(), latents, batch_size, device), steps, path)


def _generate(generator, z: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    return torch.cat([to_uint8(generator(chunk.to(device)).float()).cpu() for chunk in z.split(batch_size)])


def _save_png(images: torch.Tensor, nrow: int, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid(images, nrow=nrow, padding=0)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
    return path


# --------------------------------------------------------------------------------------------------
# Reports


def format_report(report: dict, title: str) -> str:
    """A two-column text table of a report: metrics first, then every setting (nested keys as a.b)."""
    rows = []
    for section in report:
        rows.append((f"[{section}]", ""))
        rows += [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in flatten(report[section]).items()]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 40)
    return "\n".join([title, line, *(f"{k:<{width}}  {v}" for k, v in rows), line])


def flatten(tree: dict, prefix: str = "") -> dict:
    """Nested dicts as one flat dict with keys a.b.c (for tables: printed reports, model cards)."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        flat.update(flatten(value, name) if isinstance(value, dict) else {name: value})
    return flat


def write_report(report: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


# --------------------------------------------------------------------------------------------------
# Helpers


def _bar(iterable, desc: str, progress: bool):
    """tqdm on the main process only."""
    return tqdm(iterable, desc=desc, disable=not (progress and process_state().is_main_process), dynamic_ncols=True)


def _inception_source(weights) -> str:
    return f"{INCEPTION_FILE} (torch-fidelity download)" if weights is None else f"local file {weights}"


def _run_settings(state: PartialState, device: torch.device, precision: str, batch_size: int) -> dict:
    import torch_fidelity

    from . import __version__
    return {"precision": precision, "inception_dtype": "float32", "num_processes": state.num_processes,
            "batch_size_per_process": batch_size, "device": str(device), "vqhit": __version__,
            "torch": torch.__version__, "torch_fidelity": torch_fidelity.__version__}


# --------------------------------------------------------------------------------------------------
# Held-out reconstruction report (the end of a tokenizer training run)


@torch.no_grad()
def heldout_report(model, dataset: ImageDataset, *, batch_size: int = 32, device=None, grid_path=None,
                   grid_images: int = 16) -> dict:
    """Reconstruct every image of a held-out `dataset` through the tokens and measure it; save a grid.

    Returns {"psnr", "ssim" (means over images), "psnr_std" (over images), "codebook_usage",
    "codebook_perplexity" (over all the tokens of the set), "num_images", "grid" (the PNG's path, or None)}. The
    images are reconstructed and measured by `evaluate_tokenizer`'s own loop (uint8-rounded reconstructions; PSNR/SSIM
    from vqhit.metrics), without Inception or LPIPS weights, so a training run can end with them offline. Pass the
    EMA model: it is put in eval mode (its BatchNorm uses running statistics) and left as it was found.

    Runs on the calling process alone over the whole set (call it on the main process only): held-out sets
    are small, and no process waits on another. The grid (`save_reconstruction_grid`) has `grid_images` images
    spread evenly over the set (every source photograph appears when the set is ordered by photo).
    """
    check_eval_dataset(dataset, model.config.resolution)
    if len(dataset) == 0:
        raise UsageError("heldout_report got an empty dataset; build it with eval_dataset('builtin:photos-heldout', "
                         "resolution) or point it at a folder of images.")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    shown = set(np.linspace(0, len(dataset) - 1, min(grid_images, len(dataset))).round().astype(int).tolist())
    # By index, unsharded: this process sees every image; unreadable files are skipped (and counted).
    batches = (collate_images([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
               for start in range(0, len(dataset), batch_size))
    psnrs, ssims, codes, originals, reconstructions = [], [], [], [], []
    for batch, x, indices, _, reconstruction, psnr_, ssim_ in _reconstruct_and_measure(model, batches, device):
        psnrs.append(psnr_.cpu())
        ssims.append(ssim_.cpu())
        codes.append(indices.cpu())
        keep = [k for k, i in enumerate(batch["index"].tolist()) if i in shown]
        originals.append(x[keep].cpu())
        reconstructions.append(reconstruction[keep].cpu())
    model.train(was_training)
    if not codes:
        raise UsageError("heldout_report: every image of the held-out set was unreadable.")
    usage = codebook_usage(torch.cat(codes), model.config.codebook_size, all_reduce=False)
    grid = None
    if grid_path is not None:
        grid = save_reconstruction_grid(torch.cat(originals), torch.cat(reconstructions), grid_path)
    psnrs = torch.cat(psnrs)
    return {"psnr": float(psnrs.mean()), "psnr_std": float(psnrs.std()) if len(psnrs) > 1 else 0.0,
            "ssim": float(torch.cat(ssims).mean()), "codebook_usage": usage["usage"],
            "codebook_perplexity": usage["perplexity"], "num_images": len(psnrs),
            "grid": None if grid is None else str(grid)}


GRID_GAP = 2  # pixels of white between images
GRID_ROW_GAP = 8  # between one (originals, reconstructions) pair of rows and the next
GRID_LABELS = ("original", "reconstruction")
GRID_LABEL_WIDTH = 90  # the left strip holding the labels (PIL's default font: "reconstruction" is 84 pixels)


def grid_cell(index: int, reconstruction: bool, size: int, columns: int) -> tuple[int, int]:
    """(x, y) of the top-left pixel of image `index` (or of its reconstruction) in `save_reconstruction_grid`."""
    pair, column = divmod(index, columns)
    y = pair * (2 * (size + GRID_GAP) + GRID_ROW_GAP) + int(reconstruction) * (size + GRID_GAP)
    return GRID_LABEL_WIDTH + column * (size + GRID_GAP), y


def save_reconstruction_grid(originals: torch.Tensor, reconstructions: torch.Tensor, path, *,
                             columns: int = 8) -> Path:
    """A PNG comparing images with their reconstructions: rows of `columns` originals, each row above the row of
    their reconstructions, white gaps between images, and the two rows labelled on the left ("original",
    "reconstruction"). Images are (N, 3, R, R) in [-1, 1]; reconstructions are clamped."""
    from PIL import ImageDraw

    n, size = len(originals), originals.shape[-1]
    columns = min(columns, n)
    pairs = [to_uint8(originals.float()), to_uint8(reconstructions.float().clamp(-1, 1))]
    width = grid_cell(columns - 1, True, size, columns)[0] + size
    height = grid_cell(n - 1, True, size, columns)[1] + size
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for index in range(n):
        for row, label in enumerate(GRID_LABELS):
            x, y = grid_cell(index, bool(row), size, columns)
            canvas.paste(Image.fromarray(pairs[row][index].permute(1, 2, 0).numpy()), (x, y))
            if index % columns == 0:
                draw.text((4, y + size // 2 - 5), label, fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
