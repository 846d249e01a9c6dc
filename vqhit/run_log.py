"""What a training run writes as it goes besides TensorBoard: `logs.jsonl` (one JSON line per log step, easy to read
without TensorBoard, each step once however many times the run was killed and resumed) and the progress bar's
figures (each loss as its mean since the last log step: one batch's value jumps around)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from . import distributed
from .files import atomic_write

BAR_LOSSES = ("loss/l2", "loss/generator", "loss/discriminator")  # what the progress bar shows


class RunLog:
    def __init__(self, output_dir: Path, is_main_process: bool):
        self.path = Path(output_dir) / "logs.jsonl"
        self.is_main_process = is_main_process
        self.window = {}  # the bar's losses since the last log step, {key: (sum, steps)}

    def forget_after(self, step: int) -> None:
        """Drop the lines a killed run wrote after the checkpoint this run starts from (main process)."""
        if self.path.is_file():
            kept = []
            for line in self.path.read_text().splitlines(keepends=True):
                try:
                    if json.loads(line)["step"] <= step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):  # a line cut short by a kill
                    pass
            atomic_write(self.path, lambda tmp: tmp.write_text("".join(kept)))  # a kill leaves the old log or the new

    def write(self, step: int, logs: dict) -> None:
        """One line of logged scalars (main process; the others write nothing)."""
        if self.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **logs}) + "\n")

    def holds_heldout_report(self, step: int) -> bool:
        """Whether the log holds the held-out report of `step` already (read by the main process, told to all)."""
        found = False
        if self.is_main_process and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                found = found or (isinstance(row, dict) and row.get("step") == step and "heldout/psnr" in row)
        return bool(distributed.all_reduce_sum(torch.tensor([float(found)]))[0])

    def add_to_bar(self, logs: dict) -> None:
        """Count a step's losses towards the bar's means, summed as tensors: no device sync per step."""
        for key in BAR_LOSSES:
            if key in logs:
                total, count = self.window.get(key, (0.0, 0))
                self.window[key] = (total + logs[key], count + 1)

    def bar_text(self, logs: dict, codebook_size: int | None) -> str:
        """The bar's figures at a log step (a collective), and the start of the next window: the losses' means over
        processes and steps, and how many codes those steps used."""
        means = distributed.reduce_scalars({k: total / count for k, (total, count) in self.window.items()})
        steps = max((count for _, count in self.window.values()), default=0)
        self.window = {}
        text = f"mean of {steps} steps: " + ", ".join(f"{k.split('/')[-1]} {v:.3g}" for k, v in means.items())
        if "codebook/codes_used" in logs:
            text += f"; codes used {int(logs['codebook/codes_used'])} of {codebook_size}"
        return text
