"""What a training run tells as it goes: its effective config at the start, and at each log step the scalars
(means over processes) to TensorBoard and to `logs.jsonl` (one JSON line per log step, easy to read without
TensorBoard, each step once however many times the run was killed and resumed), and the progress bar's figures
(each loss as its mean since the last log step: one batch's value jumps around)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from . import distributed
from .files import atomic_write
from .train_config import SCRIPT, TrainConfig, describe, save_config

BAR_LOSSES = ("loss/l2", "loss/generator", "loss/discriminator")  # what the progress bar shows


class RunLog:
    def __init__(self, output_dir: Path, accelerator: Accelerator):
        self.output_dir, self.accelerator = Path(output_dir), accelerator
        self.path = self.output_dir / "logs.jsonl"
        self.is_main_process = accelerator.is_main_process
        self.window = {}  # the bar's losses since the last log step, {key: (sum, steps)}
        self.images, self.since = 0, time.perf_counter()  # images trained on and time since the last log step

    def start(self, config: TrainConfig, task: str, start_step: int) -> None:
        """Say what runs, save its config, drop what a killed run logged after the checkpoint it starts from."""
        acc = self.accelerator
        if acc.is_main_process:
            print(f"effective config ({SCRIPT[task]}):\n{describe(config)}", flush=True)
            global_batch = config.batch_size * acc.num_processes * config.grad_accum
            print(f"global batch {global_batch} = {config.batch_size} per process x {acc.num_processes} processes x "
                  f"{config.grad_accum} accumulation steps", flush=True)
            save_config(config, self.output_dir / "train_config.yaml")
            self.forget_after(start_step)
            if start_step >= config.steps:
                print(f"the run is already finished at step {start_step} (--steps {config.steps}): nothing to "
                      f"train; its model is exported again if model/ does not hold it", flush=True)
        # purge_step: TensorBoard hides what a killed run logged after the checkpoint this run starts from
        acc.init_trackers("tensorboard", config={k: str(v) for k, v in config.to_dict().items()},
                          init_kwargs={"tensorboard": {"purge_step": start_step + 1}})
        self.since = time.perf_counter()

    def log_step(self, step: int, logs: dict, codebook_size: int | None) -> str:
        """Log a log step's scalars (means over processes) and images/s since the last one to TensorBoard and
        logs.jsonl (a collective); returns the bar's text."""
        logs = distributed.reduce_scalars(logs)  # the mean over processes: what all of them did
        images = distributed.all_reduce_sum(torch.tensor([float(self.images)])).item()
        logs["images_per_second"] = images / (time.perf_counter() - self.since)
        self.images, self.since = 0, time.perf_counter()
        self.accelerator.log(logs, step=step)
        self.write(step, logs)
        return self.bar_text(logs, codebook_size)

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
