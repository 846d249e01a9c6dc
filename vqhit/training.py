"""The training loop shared by `scripts/train_gan.py` and `scripts/train_vqhit.py`, on top of Accelerate.

One iteration = one micro-batch inside `accelerator.accumulate(G, D)`, in the phases of `vqhit.objectives`:
  1. generator / autoencoder step: fake = G(z) or x_hat = AE(x); loss = task terms + adversarial term,
     with D frozen and called outside DDP so its gradients are not touched;
  2. discriminator step: logistic loss on real and (detached) fake, + R1 (every step or lazily), + bCR, + LeCam;
     D runs once on the reals (on R1 steps, R1's fp32 forward, whose logits the logistic loss reuses).
After each optimiser step the BatchNorm running statistics are averaged over processes (with the step's flags,
`vqhit.step_flags`, in one collective and one host sync) and the EMA is updated, so every process holds the same
model (the buffer policy of `vqhit.distributed`). The two tasks differ only in an *objective* object (what G makes,
and its non-adversarial loss terms).

Checkpoints (`vqhit.checkpointing`) hold the models, optimisers, per-process RNG, EMA, LeCam anchors and the data
position (`vqhit.data.TrainingBatches`); `--resume` (resolved and checked with the configuration,
`vqhit.train_config.resolve_config`) continues at the same step, data position and RNG, with the settings the
command line gives. A stop signal (`vqhit.preemption`) ends the run with a checkpoint at the step reached.
"""
from __future__ import annotations

import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torch import nn
from tqdm.auto import tqdm

from . import distributed, heldout, launcher
from .checkpointing import OutputFolder, export_model, load_checkpoint, save_checkpoint
from .cli import naming, naming_model_options, usable_cores
from .data import DataConfig, TrainingBatches, build_dataloader, build_dataset, first_images
from .ema import EMA
from .errors import OwnDataError, UsageError
from .losses import LeCam
from .metrics import INPUT_RANGE_LIMIT
from .models import model_class
from .models.discriminator import Discriminator
from .objectives import OBJECTIVES, discriminator_phase, generator_phase
from .precision import autocast
from .preemption import WHILE_FINISHING, Interrupted, Preempted, StopSignals, parse_signals, preempted_advice
from .reproducibility import use_deterministic_algorithms
from .resume import agree_on_resume, interrupted_message, list_checkpoints
from .run_log import RunLog
from .step_flags import StepFlags, check_step
from .train_config import TASKS, TrainConfig, summary

__all__ = ["EMA", "Trainer", "build_model", "list_checkpoints", "train"]


class TrainState:
    """The optimiser step reached: saved as the checkpoint's train_state.json (written last, so it also marks the
    checkpoint complete) with the layout of the run that wrote it."""

    def __init__(self):
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def build_model(config: TrainConfig, task: str) -> nn.Module:
    """The network `task` trains, from the run's preset and options, with the weights it starts from."""
    cls = model_class(task)
    with naming_model_options(config.model, config.model_options):
        model = cls(cls.config_class.from_preset(config.model, **config.model_options))
    loads = [("--init-from", config.init_from, model.load_weights)]
    if task == "vqhit":
        loads.append(("--taming-checkpoint", config.taming_checkpoint, model.load_taming_checkpoint))
    for option, path, load in loads:
        if path:
            with naming(option, path):
                load(path)
    return model


class Trainer:
    """Builds a run (models, data, optimisers, output folder), then `fit()` trains it.

    The configuration (`vqhit.train_config.resolve_config`) has checked the user's input, the checkpoint to resume
    included; the output folder is locked last, once the models and the data are built.
    """

    def __init__(self, config: TrainConfig, task: str, stop: StopSignals | None = None):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.config, self.task = config, task
        self.stop = stop  # the stop signals' catcher when the caller installed it before building (`train`)
        self.output_dir = Path(config.output_dir)
        distributed.check_elastic_launch()
        if config.deterministic:  # before CUDA starts (in the Accelerator): cuBLAS reads its setting once
            use_deterministic_algorithms()
        self.accelerator = distributed.training_accelerator(str(self.output_dir), config.grad_accum,
                                                            config.collective_timeout)
        self.resume_path = agree_on_resume(config.resume_checkpoint)
        if self.accelerator.device.type == "cpu" and config.cpu_threads:
            torch.set_num_threads(_cpu_threads(config.cpu_threads))
        if self.accelerator.is_main_process:
            resuming = f"resuming {self.resume_path}: " if self.resume_path else ""
            print(resuming + summary(config, task), flush=True)
            for note in launcher.notes():
                print(note, flush=True)
        self._build(config, task)
        self.folder = OutputFolder(self.output_dir)
        self.log = RunLog(self.output_dir, self.accelerator)
        distributed.run_on_main(self.folder.open, self.resume_path, config.overwrite)

    def _build(self, config: TrainConfig, task: str) -> None:
        acc = self.accelerator
        set_seed(config.seed, device_specific=True)  # per-process streams: different latents on every rank
        self.autocast = lambda: autocast(config.precision, acc.device)

        model = build_model(config, task)
        resolution = model.config.resolution
        D = Discriminator(resolution, config.disc_channel_multiplier, max_channels=config.disc_max_channels)
        with distributed.first_on_each_machine():  # one download or folder table per machine, which the others then read
            self.dataset = build_dataset(DataConfig.from_training(config, resolution), seed=config.seed)
        loader = build_dataloader(self.dataset, config.batch_size, config.num_workers, shuffle=True,
                                  seed=config.seed, drop_last=True, ignore_signals=parse_signals(config.stop_signals),
                                  timeout=config.data_timeout)
        if not isinstance(self.dataset, torch.utils.data.IterableDataset) and len(loader) == 0:
            raise UsageError(f"--data {config.data} has fewer images ({len(self.dataset)}) than one batch per "
                             f"process ({config.batch_size} x {acc.num_processes}); lower --batch-size")
        self.batches = TrainingBatches(self.dataset, loader)
        # Fused: one kernel per update, which also skips the update on the device when told a loss was not finite.
        opt_g = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                 betas=tuple(config.adam_betas), fused=True)
        opt_d = torch.optim.Adam(D.parameters(), lr=config.lr, betas=tuple(config.adam_betas), fused=True)
        self.model, self.D, self.opt_g, self.opt_d = acc.prepare(model, D, opt_g, opt_d)
        # After prepare(): DDP has given every rank rank 0's parameters, so the EMA starts equal on every rank.
        self.ema = EMA(acc.unwrap_model(self.model), config.ema_decay, config.ema_start)
        self.ema.model.to(acc.device)
        self.forward = torch.compile(self.model) if config.compile else self.model
        self.state = TrainState()
        self.flags = StepFlags(acc.device)
        self.lecam = LeCam(config.lecam_weight, config.lecam_decay)
        acc.register_for_checkpointing(self.ema, self.lecam)  # the step and data position go to json files
        self.objective = OBJECTIVES[task](config, acc.unwrap_model(self.model), acc.device)
        self.fixed_real = first_images(self.dataset, config.num_samples, config.data).to(acc.device)


    def resume(self, path: Path) -> None:
        """Continue from checkpoint `path`: its step, models, optimisers, RNG and data position, with the learning
        rate and betas of this command line."""
        acc = self.accelerator
        saved, data_state = load_checkpoint(acc, path)
        self.state.load_state_dict(saved)
        warnings = self.batches.load_state_dict(data_state)
        if saved["num_processes"] != acc.num_processes:
            warnings.append(f"{path} was written by {saved['num_processes']} processes, this run has "
                            f"{acc.num_processes}: random streams continue differently")
        for warning in warnings:
            acc.print(f"warning: {warning}")
        for optimizer in (self.opt_g, self.opt_d):
            for group in optimizer.param_groups:
                group["lr"], group["betas"] = self.config.lr, tuple(self.config.adam_betas)
        acc.print(f"resumed from {path} at step {self.state.step} (lr {self.config.lr}, betas "
                  f"{self.config.adam_betas})")

    def save_checkpoint(self) -> Path:
        """checkpoint-<step>/ (every process), with the run's layout and the largest loss since the last one."""
        acc, cfg = self.accelerator, self.config
        train_state = {**self.state.state_dict(), "num_processes": acc.num_processes, "batch_size": cfg.batch_size,
                       "grad_accum": cfg.grad_accum, "loss_peak": self.flags.take_loss_peak()}
        return save_checkpoint(acc, self.output_dir, self.state.step, ema_model=self.ema.model, config=cfg,
                               train_state=train_state, data_state=self.batches.state_dict(), folder=self.folder)

    # -- one iteration --------------------------------------------------------------------------------
    def train_step(self, real: torch.Tensor) -> dict:
        """One micro-batch: the generator's phase, then (once the adversarial term is on) the discriminator's."""
        acc, step = self.accelerator, self.state.step
        fake, terms = generator_phase(self.objective, self.forward, acc.unwrap_model(self.D), real, step,
                                      self.autocast, acc.unwrap_model(self.model))
        g_loss = sum(terms.values())
        logs = {f"loss/{k}": v.detach() for k, v in terms.items()}
        logs["loss/generator"] = g_loss.detach()
        self._update("generator", g_loss, self.model, self.opt_g, logs)
        self.flags.mark("images", ~(real.abs().amax() <= INPUT_RANGE_LIMIT))  # NaN too
        if "adversarial" in terms:
            d_loss, d_logs = discriminator_phase(self.D, real, fake.detach(), step, self.config, self.lecam,
                                                 self.autocast)
            logs.update(d_logs)
            self._update("discriminator", d_loss, self.D, self.opt_d, logs)
        return logs

    def _update(self, name: str, loss: torch.Tensor, model: nn.Module, optimizer, logs: dict) -> None:
        """One optimiser update (skipped by Accelerate inside an accumulation window). A non-finite loss or gradient
        skips it on the device, with no host sync: the fused Adam reads `found_inf` (as it does under a gradient
        scaler), and the step's flags stop the run when they are read."""
        nonfinite = self.flags.track_loss(name, loss)
        self.accelerator.backward(loss)
        if self.accelerator.sync_gradients:
            norm = grad_norm(model)
            logs[f"grad_norm/{name}"] = norm
            optimizer.optimizer.found_inf = (nonfinite | ~torch.isfinite(norm)).float()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # -- the loop -------------------------------------------------------------------------------------
    def fit(self) -> nn.Module:
        """Train to `config.steps`; returns the EMA model. The output folder is unlocked and the data workers are
        stopped however this ends."""
        try:
            return self._fit()
        except KeyboardInterrupt as e:  # Ctrl-C, when SIGINT is not a stop signal: no checkpoint, say which to resume
            if isinstance(e, Interrupted):
                raise
            raise Interrupted(interrupted_message(self.output_dir, self.state.step, self.config.steps)) from None
        finally:
            self.batches.close()
            self.folder.unlock()

    def _fit(self) -> nn.Module:
        cfg, acc = self.config, self.accelerator
        if self.resume_path is not None:
            self.resume(self.resume_path)
        self.log.start(cfg, self.task, self.state.step)
        bar = tqdm(total=cfg.steps, initial=self.state.step, disable=not acc.is_main_process,
                   desc=f"train {self.task}", dynamic_ncols=True)
        last_checkpoint = time.monotonic()
        unwrapped = acc.unwrap_model(self.model)
        stopper = nullcontext(self.stop) if self.stop is not None else StopSignals(parse_signals(cfg.stop_signals))
        with bar, stopper as stop:  # the bar ends its line however this ends
            while self.state.step < cfg.steps:
                for _ in range(cfg.grad_accum):
                    try:
                        real = next(self.batches)["image"].to(acc.device, non_blocking=True)
                    except UsageError as err:  # an image of this process's shard: only this process knows it
                        raise OwnDataError(str(err)) from None
                    with acc.accumulate(self.model, self.D):
                        logs = self.train_step(real)
                    self.log.images += real.shape[0]
                self.state.step += 1
                step = self.state.step
                timed = cfg.checkpoint_every_minutes > 0 and \
                    time.monotonic() - last_checkpoint >= 60 * cfg.checkpoint_every_minutes
                flags = self.flags.read(unwrapped, stop=stop.received is not None, timed=timed)  # the one host sync
                check_step(flags, step, self.output_dir, cfg)
                self.ema.update(unwrapped, step)
                self.log.add_to_bar(logs)
                bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.steps:
                    logs = {**logs, "lr": self.opt_g.param_groups[0]["lr"],
                            **self.objective.usage_logs(unwrapped, acc, step)}
                    bar.set_postfix_str(self.log.log_step(step, logs, getattr(unwrapped.config, "codebook_size", None)))
                if step % cfg.sample_every == 0 or step == cfg.steps:  # the others wait outside the deadline
                    path = self.output_dir / "samples" / f"step-{step:07d}.png"
                    distributed.run_on_main(self.objective.save_sample_grid, self.ema.model, self.fixed_real, path)
                stopping = flags["stop"]
                if stopping or flags["timed"] or step % cfg.checkpoint_every == 0 or step == cfg.steps:
                    checkpoint = self.save_checkpoint()
                    last_checkpoint = time.monotonic()
                    # A signal that came while the checkpoint was written stops the run at it, not one step later.
                    stopping = stopping or bool(distributed.all_reduce_sum(
                        torch.tensor([float(stop.received is not None)]))[0])
                if stopping and step < cfg.steps:
                    bar.close()
                    acc.end_training()
                    by = stop.received or "a signal to another process"
                    message = f"stopped at step {step} of {cfg.steps} by {by}: {checkpoint} is written. " \
                              f"{preempted_advice()}"
                    acc.print(message, flush=True)
                    raise Preempted(message)
        bar.close()
        self._finish()
        return self.ema.model

    def _finish(self) -> None:
        """After the last step: export model/ and, for a tokenizer, the held-out report (once per step, however
        often a finished run is resumed). Both are short: a stop signal now lets them finish."""
        acc, step = self.accelerator, self.state.step
        with StopSignals(parse_signals(self.config.stop_signals), WHILE_FINISHING):
            distributed.run_on_main(export_model, self.ema.model, self.output_dir, step)  # also for a finished run
            if self.task == "vqhit" and self.config.heldout_data:
                heldout.report_once(self.ema.model, self.config, step, self.log)
        acc.end_training()
        if acc.is_main_process:
            model = self.output_dir / "model"
            print(f"finished at step {step}: the EMA model is in {model} "
                  f"({model_class(self.task).__name__}.from_pretrained(\"{model}\"))", flush=True)


def _cpu_threads(requested: int) -> int:
    """Threads for `--cpu-threads` (not 0): N, or for -1 the cores this process may run on, shared among the
    processes on this machine (a launcher starting one thread per process suits GPU training, not CPU training)."""
    if requested > 0:
        return requested
    return max(1, usable_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def grad_norm(model: nn.Module) -> torch.Tensor:
    """The L2 norm of every gradient of `model` together, on the device (read at log steps only)."""
    grads = [p.grad.detach() for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros((), device=next(model.parameters()).device)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def train(config: TrainConfig, task: str) -> nn.Module:
    """Train a HiT GAN (`task="gan"`) or a VQ-HiT tokenizer (`task="vqhit"`); returns the EMA model.

    The stop signals are caught from the start: one that arrives while the run starts up (reading the data, loading
    a checkpoint, which can take minutes on a cluster) stops it after its first step, with a checkpoint, as one
    during training does, instead of killing it before it can say so."""
    with StopSignals(parse_signals(config.stop_signals)) as stop:
        return Trainer(config, task, stop=stop).fit()
