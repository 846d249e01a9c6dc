"""What a training step tells the loop, read in one host sync per step.

During a step the trainer marks, on the device and without waiting for it, whether a loss was not finite and
whether the step's images were far out of range, and keeps the largest loss since the last checkpoint. At the end
of the step the loop adds whether a stop signal came and whether a timed checkpoint is due, and reads the flags
summed over processes in the collective that also averages the BatchNorm statistics: a GPU runs ahead of the CPU
for the rest of the step. A non-finite loss or gradient has already skipped its update on the device (the fused
Adam's `found_inf`); the run stops when the flags are read, before anything is saved.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from . import distributed
from .errors import DivergedError
from .resume import checkpoint_step, list_checkpoints, read_state

FLAGS = ("generator loss", "discriminator loss", "images", "stop", "timed")
# A checkpoint reached with a loss this large (in magnitude, since the checkpoint before) is already diverging:
# resuming it with a lower learning rate fails again, so the advice after a divergence does not name it.
SANE_LOSS = 1e4


class StepFlags:
    def __init__(self, device: torch.device):
        self.values = torch.zeros(len(FLAGS), device=device)  # summed on the device, read once a step
        self.loss_peak = torch.zeros((), device=device)  # the largest |loss| since the last checkpoint

    def mark(self, name: str, condition: torch.Tensor) -> None:
        self.values[FLAGS.index(name)] += condition

    def track_loss(self, name: str, loss: torch.Tensor) -> torch.Tensor:
        """Flag a non-finite loss of `name` ("generator", "discriminator"); returns that flag, on the device."""
        nonfinite = ~torch.isfinite(loss.detach())
        self.mark(f"{name} loss", nonfinite)
        self.loss_peak = torch.fmax(self.loss_peak, loss.detach().abs().float())
        return nonfinite

    def read(self, model: nn.Module, *, stop: bool, timed: bool) -> dict[str, bool]:
        """The step's flags, summed over processes while `model`'s BatchNorm statistics are averaged; the flags
        start again from zero."""
        self.values[FLAGS.index("stop")] = float(stop)
        self.values[FLAGS.index("timed")] = float(timed)
        summed = distributed.average_batchnorm_stats_(model, self.values).tolist()
        self.values.zero_()
        return {name: value > 0 for name, value in zip(FLAGS, summed)}

    def take_loss_peak(self) -> float:
        """The largest |loss| since the last call (a checkpoint's; a host sync)."""
        peak = float(self.loss_peak)
        self.loss_peak.zero_()
        return peak


def check_step(flags: dict[str, bool], step: int, output_dir: Path, config) -> None:
    """Stop the run after step `step` when its images or losses were not usable."""
    if flags["images"]:
        raise ValueError(f"training images at step {step} reach values far outside [-1, 1] (or NaN); check the data "
                         "pipeline")
    # The first loss of the step that was not finite: a generator's NaN makes the discriminator's loss NaN too.
    nonfinite = [name for name in ("generator", "discriminator") if flags[f"{name} loss"]][:1]
    if nonfinite:
        raise DivergedError(divergence_message(nonfinite, step - 1, output_dir, config))


def divergence_message(losses: list[str], started_from: int, output_dir: Path, config) -> str:
    """What to do after a non-finite loss in the step that started from step `started_from`'s weights: resume the
    newest checkpoint that can work (before that step, reached with sane losses) with a lower learning rate, or
    start again when there is none."""
    checkpoints = list_checkpoints(output_dir)
    good = [c for c in checkpoints
            if checkpoint_step(c) < started_from and read_state(c).get("loss_peak", 0.0) < SANE_LOSS]
    lr = config.lr
    # half the learning rate; a learning rate that is not a finite positive number has no lower one to try
    lower, example = ("a lower", f"{lr / 2:g}") if math.isfinite(lr) and lr > 0 else ("a finite positive", "1e-4")
    restart = f"start again with {lower} --lr (e.g. --lr {example} --overwrite)"
    where = (f"The last good checkpoint, {good[-1]}, is intact: resume it with {lower} learning rate, "
             f"--resume {good[-1]} --lr {example}" if good else
             f"No checkpoint was written yet: {restart}" if not checkpoints else
             f"No checkpoint of the run was reached before the losses grew out of bounds: {restart}")
    return (f"non-finite {', '.join(f'{name} loss' for name in losses)} at step {started_from}: training stopped "
            f"before the update. {where}{', or --precision fp32' if config.precision != 'fp32' else ''}")
