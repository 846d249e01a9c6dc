"""A tokenizer run's held-out report: the EMA model reconstructs images it never trained on (`--heldout-data`) and,
for the generalisation gap, the training images seen the same way (whole, centre-cropped); PSNR, SSIM and codebook
usage of each set, and the gap between them."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import distributed
from .data import BUILTIN_WHOLE_VIEW, eval_dataset
from .evaluation import heldout_report
from .run_log import RunLog
from .train_config import TrainConfig

MAX_TRAIN_SOURCE_IMAGES = 256  # the training set's figure, for the gap: a sample is enough, and a large set is slow


def train_source_view(data: str) -> str | None:
    """The training images as the held-out report reads them (whole, centre-cropped): the whole photographs of a
    built-in tiled source, a local folder itself; None for a Hub dataset (scoring it would download it)."""
    if data in BUILTIN_WHOLE_VIEW:
        return BUILTIN_WHOLE_VIEW[data]
    return data if data.startswith("builtin:") or Path(data).expanduser().is_dir() else None


def report(model: nn.Module, config: TrainConfig, output_dir: Path, step: int, device: torch.device):
    """(reports by set, the figures to log, the text to print) of `model` at training step `step`; the held-out
    grid goes beside the training grids."""
    resolution = model.config.resolution
    sets = {"heldout": config.heldout_data, "train_source": train_source_view(config.data)}
    reports, lines = {}, []
    for name, source in sets.items():
        if source is None:
            continue
        dataset = eval_dataset(source, resolution, min_size=config.min_size,
                               max_images=MAX_TRAIN_SOURCE_IMAGES if name == "train_source" else None)
        grid = output_dir / "samples" / f"heldout-step-{step:07d}.png" if name == "heldout" else None
        reports[name] = found = heldout_report(model, dataset, device=device, grid_path=grid)
        what = "never trained on" if name == "heldout" else "the training images"
        lines.append(f"  {source} ({found['num_images']} images, {what}): PSNR {found['psnr']:.2f} dB "
                     f"(std {found['psnr_std']:.2f} over images), SSIM {found['ssim']:.3f}, codebook usage "
                     f"{100 * found['codebook_usage']:.1f}% (perplexity {found['codebook_perplexity']:.1f})")
    figures = {f"{name}/{k}": v for name, found in reports.items() for k, v in found.items()
               if isinstance(v, (int, float))}
    if "train_source" in reports:
        figures["heldout/gap_psnr"] = reports["train_source"]["psnr"] - reports["heldout"]["psnr"]
        lines.append(f"  generalisation gap: {figures['heldout/gap_psnr']:.2f} dB PSNR (training photographs "
                     "minus held-out)")
    text = (f"reconstruction at step {step} (EMA model, {resolution}x{resolution}, every image downsampled whole by "
            f"a centre crop of its short side):\n" + "\n".join(lines) + f"\n  grid: {reports['heldout']['grid']}")
    return reports, figures, text


def report_once(model: nn.Module, config: TrainConfig, step: int, log: RunLog) -> dict | None:
    """The report of `model` (the EMA model) after training step `step`, made by the main process (the others wait
    outside the collective deadline): printed, logged to TensorBoard and logs.jsonl. A finished run resumed again
    says where its report is instead of making it again."""
    acc = log.accelerator
    if log.holds_heldout_report(step):
        acc.print(f"the held-out report of step {step} is in {log.path}")
        return None

    def make() -> dict:
        reports, figures, text = report(model, config, log.output_dir, step, acc.device)
        acc.log(figures, step=step)
        log.write(step, figures)
        print(text, flush=True)
        return reports
    return distributed.run_on_main(make)
