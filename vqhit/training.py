"""The training loop shared by `scripts/train_gan.py` and `scripts/train_vqhit.py`, on top of Accelerate.

One iteration = one micro-batch inside `accelerator.accumulate(G, D)`:
  1. generator / autoencoder step: fake = G(z) or x_hat = AE(x); loss = task terms + adversarial term,
     with D frozen and called outside DDP so its gradients are not touched;
  2. discriminator step: logistic loss on real and (detached) fake, + R1 (every step or lazily), + bCR, + LeCam;
     D runs once on the reals (on R1 steps, R1's fp32 forward, whose logits the logistic loss reuses).
After each optimiser step the BatchNorm running statistics are averaged over processes and the EMA is updated,
so every process holds the same model (the buffer policy of `vqhit.distributed`).
The two tasks differ only in an *objective* object (what G makes, and its non-adversarial loss terms).

Checkpoints (`vqhit.checkpointing`) hold the models, optimisers, per-process RNG, EMA, LeCam anchors and the data
position (`vqhit.data.TrainingBatches`); `--resume` continues at the same step, data position and RNG, with the
settings the command line gives. A stop signal (`vqhit.preemption`) ends the run with a checkpoint at the step reached.
"""
from __future__ import annotations

import difflib
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin, set_seed
from torch import nn
from tqdm.auto import tqdm

from . import distributed, heldout, launcher
from .checkpointing import OutputFolder, export_model, load_checkpoint, save_checkpoint
from .cli import naming, usable_cores
from .data import DataConfig, TrainingBatches, build_dataloader, build_dataset
from .ema import EMA
from .errors import DivergedError, OwnDataError, UsageError
from .losses import LeCam
from .metrics import INPUT_RANGE_LIMIT
from .models.discriminator import Discriminator
from .models.hit import HiTGenerator
from .models.vqhit import VQHiT
from .objectives import OBJECTIVES, discriminator_phase, generator_phase
from .precision import autocast
from .preemption import WHILE_FINISHING, Interrupted, Preempted, StopSignals, parse_signals, preempted_advice
from .presets import GENERATOR_PRESETS, TOKENIZER_PRESETS
from .reproducibility import use_deterministic_algorithms
from .resume import CHECKPOINT_PREFIX, agree_on_resume, checkpoint_step, list_checkpoints, read_state, resolve_resume
from .run_log import RunLog
from .train_config import SCRIPT, TrainConfig, describe, save_config, saved_config, summary

__all__ = ["EMA", "Trainer", "build_model", "list_checkpoints", "train"]


# What a step tells the loop, summed over processes once per step (`Trainer._read_step_flags`).
STEP_FLAGS = ("generator loss", "discriminator loss", "images", "stop", "timed")
# A checkpoint reached with a loss this large (in magnitude, since the checkpoint before) is already diverging:
# resuming it with a lower learning rate fails again, so the advice after a divergence does not name it.
SANE_LOSS = 1e4


class TrainState:
    """The optimiser step reached: saved as the checkpoint's train_state.json (written last, so it also marks the
    checkpoint complete) with the layout of the run that wrote it."""

    def __init__(self):
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


# -- building -------------------------------------------------------------------------------------------
def model_class(task: str):
    return HiTGenerator if task == "gan" else VQHiT


def check_preset(config: TrainConfig, task: str) -> None:
    presets = GENERATOR_PRESETS if task == "gan" else TOKENIZER_PRESETS
    if config.model not in presets:
        close = difflib.get_close_matches(config.model, presets, n=1)
        raise UsageError(f"--model {config.model}: {SCRIPT[task]} trains "
                         f"{'generator (hit-*)' if task == 'gan' else 'tokenizer'} presets"
                         f"{f'; did you mean {close[0]}?' if close else ''} Choose one of {', '.join(presets)}")


@contextmanager
def naming_model_options(config: TrainConfig) -> Iterator[None]:
    """A ValueError raised while the preset's config or modules are built with the run's --model-option values
    (an unknown key, a wrong type, an impossible architecture, a zero codebook size) is the user's: name them.
    Without options the preset itself failed: a bug, which keeps its traceback."""
    try:
        yield
    except ValueError as err:
        if not config.model_options:
            raise
        options = " ".join(f"{k}={v}" for k, v in config.model_options.items())
        raise UsageError(f"--model {config.model} --model-option {options}: {err}") from None


def build_model(config: TrainConfig, task: str) -> nn.Module:
    check_preset(config, task)
    cls = model_class(task)
    with naming_model_options(config):
        model = cls(cls.config_class.from_preset(config.model, **config.model_options))
    loads = [("--init-from", config.init_from, model.load_weights)]
    if task == "vqhit":
        loads.append(("--taming-checkpoint", config.taming_checkpoint, model.load_taming_checkpoint))
    for option, path, load in loads:
        if path:
            with naming(option, path):
                load(path)
    return model


DISCRIMINATOR_OPTIONS = ("disc_channel_multiplier", "disc_max_channels")  # its architecture, beside the resolution


def check_same_architecture(config: TrainConfig, checkpoint: Path, task: str) -> None:
    """Refuse, in one sentence, to resume a checkpoint of another preset, architecture option or discriminator
    architecture (before anything in the output folder is touched)."""
    saved = saved_config(checkpoint)
    config_class = model_class(task).config_class
    try:
        theirs = config_class.from_preset(saved["model"], **(saved.get("model_options") or {}))
    except Exception as e:  # noqa: BLE001 - the saved config itself no longer builds
        raise UsageError(f"{checkpoint}/train_config.yaml does not describe a model this version builds ({e})") \
            from None
    with naming_model_options(config):
        ours = config_class.from_preset(config.model, **config.model_options)
    diff = ours.architecture_differences(theirs)
    if diff:
        raise UsageError(
            f"cannot resume {checkpoint}: it was trained as --model {saved['model']} with model options "
            f"{saved.get('model_options') or {}}, this run asks for a different architecture; differing keys "
            f"(checkpoint, this run): {diff}. Resume without changing the model, or start a new run "
            f"(--init-from {checkpoint.parent / 'model'} keeps the weights)")
    disc = {f"--{key.replace('_', '-')}": (saved[key], getattr(config, key)) for key in DISCRIMINATOR_OPTIONS
            if key in saved and saved[key] != getattr(config, key)}
    if disc:
        changes = ", ".join(f"{option} {theirs} -> {ours}" for option, (theirs, ours) in disc.items())
        raise UsageError(
            f"cannot resume {checkpoint}: this run asks for another discriminator architecture ({changes}; checkpoint "
            f"-> this run). Resume without changing {' or '.join(disc)}, or start a new run (--init-from "
            f"{checkpoint.parent / 'model'} keeps the generator's weights)")


def check_steps_reach(config: TrainConfig, checkpoint: Path) -> None:
    """Refuse a --steps below the step of the checkpoint to resume: the run is already past it, and training cannot go
    back (equal is fine: the run is finished, and a resume only makes sure its model is exported)."""
    step = read_state(checkpoint)["step"]
    if config.steps < step:
        raise UsageError(f"--steps {config.steps} is below the step of {checkpoint} ({step}): the run is already past "
                         f"it. Give --steps {step} or more to continue it, or resume a checkpoint at or before step "
                         f"{config.steps} (--resume {checkpoint.parent}/{CHECKPOINT_PREFIX}M)")


class Trainer:
    """Builds a run (models, data, optimisers, output folder), then `fit()` trains it.

    Every check that can fail on a user's input (the resume checkpoint, the model, the data) runs before anything
    is created on disk; the output folder is locked last.
    """

    def __init__(self, config: TrainConfig, task: str, stop: StopSignals | None = None):
        if task not in ("gan", "vqhit"):
            raise ValueError(f"task must be 'gan' or 'vqhit', got {task!r}")
        self.config, self.task = config, task
        self.stop = stop  # the stop signals' catcher when the caller installed it before building (`train`)
        self.output_dir = Path(config.output_dir)
        check_preset(config, task)
        self.resume_path = resolve_resume(config.resume, self.output_dir)
        if self.resume_path is not None:
            check_same_architecture(config, self.resume_path, task)
            check_steps_reach(config, self.resume_path)
        distributed.check_elastic_launch()
        if config.deterministic:  # before CUDA starts (in the Accelerator): cuBLAS reads its setting once
            use_deterministic_algorithms()
        # Autocast is ours, not Accelerate's: Accelerate would patch the discriminator's forward with autocast,
        # and R1 must stay in fp32. So precision, compilation and accumulation are pinned against the launcher's
        # settings, which the configuration has turned into options (vqhit.launcher). DDP kwargs: the buffer policy
        # of vqhit.distributed.
        distributed.init_restarted_process_group(config.collective_timeout)
        self.accelerator = Accelerator(**launcher.PINNED_ACCELERATOR_SETTINGS, log_with="tensorboard",
                                       gradient_accumulation_plugin=GradientAccumulationPlugin(
                                           num_steps=config.grad_accum),
                                       project_dir=str(self.output_dir),
                                       kwargs_handlers=[*distributed.ddp_kwargs(),
                                                        *distributed.process_group_kwargs(config.collective_timeout)])
        distributed.process_state()  # torchrun's processes that Accelerate took for one each (no GPU, no --cpu)
        self.resume_path = agree_on_resume(self.resume_path)
        if self.accelerator.device.type == "cpu" and config.cpu_threads:
            torch.set_num_threads(_cpu_threads(config.cpu_threads))
        if self.accelerator.is_main_process:
            resuming = f"resuming {self.resume_path}: " if self.resume_path else ""
            print(resuming + summary(config, task), flush=True)
            for note in launcher.notes():
                print(note, flush=True)
        self._build(config, task)
        self.folder = OutputFolder(self.output_dir)
        self.log = RunLog(self.output_dir, self.accelerator.is_main_process)
        distributed.run_on_main(self._prepare_output_folder)

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
        self.step_flags = torch.zeros(len(STEP_FLAGS), device=acc.device)  # summed on the device, read once a step
        self.loss_peak = torch.zeros((), device=acc.device)  # the largest |loss| since the last checkpoint
        self.lecam = LeCam(config.lecam_weight, config.lecam_decay)
        acc.register_for_checkpointing(self.ema, self.lecam)  # the step and data position go to json files
        self.objective = OBJECTIVES[task](config, acc.unwrap_model(self.model), acc.device)
        self.fixed_real = self._fixed_real_batch()

    def _prepare_output_folder(self) -> None:
        self.folder.lock()
        try:
            messages = self.folder.prepare(self.resume_path, self.config.overwrite)
        except BaseException:
            self.folder.unlock()
            raise
        for message in messages:
            print(message, flush=True)

    def _fixed_real_batch(self) -> torch.Tensor:
        """The first `num_samples` training images: the originals of every reconstruction grid."""
        streaming = isinstance(self.dataset, torch.utils.data.IterableDataset)
        images = []
        for item in iter(self.dataset) if streaming else (self.dataset[i] for i in range(len(self.dataset))):
            if item is not None:
                images.append(item["image"])
            if len(images) == self.config.num_samples:
                break
        if not images:
            raise UsageError(f"--data {self.config.data}: no readable image")
        return torch.stack(images).to(self.accelerator.device)

    # -- checkpoints ----------------------------------------------------------------------------------
    def _train_state(self) -> dict:
        """What train_state.json records besides the files: the step, the run's layout, and the largest loss since
        the last checkpoint (read here, a checkpoint step's sync)."""
        acc = self.accelerator
        state = {**self.state.state_dict(), "num_processes": acc.num_processes, "batch_size": self.config.batch_size,
                 "grad_accum": self.config.grad_accum, "loss_peak": float(self.loss_peak)}
        self.loss_peak.zero_()
        return state

    def resume(self, path: Path) -> None:
        acc = self.accelerator
        saved, data_state = load_checkpoint(acc, path)
        self.state.load_state_dict(saved)
        if data_state is None:  # a checkpoint written before data positions had their own file
            data_state = {k: saved[k] for k in ("micro_batches", "batch_size", "num_processes")}
        warnings = self.batches.load_state_dict(data_state)
        if saved.get("num_processes", acc.num_processes) != acc.num_processes:
            warnings.append(f"{path} was written by {saved['num_processes']} processes, this run has "
                            f"{acc.num_processes}: random streams continue differently")
        for warning in warnings:
            acc.print(f"warning: {warning}")
        for optimizer in (self.opt_g, self.opt_d):  # the settings of this command line, not the checkpoint's
            for group in optimizer.param_groups:
                group["lr"], group["betas"] = self.config.lr, tuple(self.config.adam_betas)
        acc.print(f"resumed from {path} at step {self.state.step} (lr {self.config.lr}, betas "
                  f"{self.config.adam_betas})")

    # -- one iteration --------------------------------------------------------------------------------
    def _read_step_flags(self, model: nn.Module, stop: StopSignals, timed: bool) -> dict[str, bool]:
        """The step's flags, summed over processes in the collective that also averages the BatchNorm statistics,
        and read in one host sync: a GPU runs ahead of the CPU for the rest of the step. A non-finite loss or
        gradient skipped its update on the device (`_update`); the run stops here, before anything is saved."""
        flags = self.step_flags
        flags[STEP_FLAGS.index("stop")] = float(stop.received is not None)
        flags[STEP_FLAGS.index("timed")] = float(timed)
        values = dict(zip(STEP_FLAGS, (v > 0 for v in distributed.average_batchnorm_stats_(model, flags).tolist())))
        flags.zero_()
        # The first loss of the step that was not finite: a generator's NaN makes the discriminator's loss NaN too.
        nonfinite = [name for name in ("generator", "discriminator") if values[f"{name} loss"]][:1]
        if values["images"]:
            raise ValueError(f"training images at step {self.state.step} reach values far outside [-1, 1] (or NaN); "
                             "check the data pipeline")
        if nonfinite:
            raise DivergedError(divergence_message(nonfinite, self.state.step - 1, self.output_dir, self.config))
        return values

    def train_step(self, real: torch.Tensor) -> dict:
        """One micro-batch: the generator's phase, then (once the adversarial term is on) the discriminator's."""
        acc, step = self.accelerator, self.state.step
        logs = {}
        fake, terms = generator_phase(self.objective, self.forward, acc.unwrap_model(self.D), real, step,
                                      self.autocast, acc.unwrap_model(self.model))
        g_loss = sum(terms.values())
        self._update("generator", g_loss, self.model, self.opt_g, logs)
        self.step_flags[STEP_FLAGS.index("images")] += ~(real.abs().amax() <= INPUT_RANGE_LIMIT)  # NaN too
        logs.update({f"loss/{k}": v.detach() for k, v in terms.items()})
        logs["loss/generator"] = g_loss.detach()
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
        nonfinite = ~torch.isfinite(loss.detach())
        self.step_flags[STEP_FLAGS.index(f"{name} loss")] += nonfinite
        self.loss_peak = torch.fmax(self.loss_peak, loss.detach().abs().float())
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
            raise e if isinstance(e, Interrupted) else Interrupted(self._interrupted_message()) from None
        finally:
            self.batches.close()
            self.folder.unlock()

    def _fit(self) -> nn.Module:
        cfg, acc = self.config, self.accelerator
        if self.resume_path is not None:
            self.resume(self.resume_path)
        self._start()
        bar = tqdm(total=cfg.steps, initial=self.state.step, disable=not acc.is_main_process,
                   desc=f"train {self.task}", dynamic_ncols=True)
        self.seen, self.since = 0, time.perf_counter()  # images and time since the last log step: images/s
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
                    self.seen += real.shape[0]
                self.state.step += 1
                step = self.state.step
                timed = cfg.checkpoint_every_minutes > 0 and \
                    time.monotonic() - last_checkpoint >= 60 * cfg.checkpoint_every_minutes
                flags = self._read_step_flags(unwrapped, stop, timed)  # the step's one collective and host sync
                self.ema.update(unwrapped, step)
                self.log.add_to_bar(logs)
                bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.steps:
                    bar.set_postfix_str(self._log_step(step, logs))
                if step % cfg.sample_every == 0 or step == cfg.steps:
                    distributed.run_on_main(self.save_samples, step)  # the others wait outside the deadline
                stopping = flags["stop"]
                if stopping or flags["timed"] or step % cfg.checkpoint_every == 0 or step == cfg.steps:
                    checkpoint = save_checkpoint(acc, self.output_dir, step, ema_model=self.ema.model, config=cfg,
                                                 train_state=self._train_state(), data_state=self.batches.state_dict(),
                                                 folder=self.folder)
                    last_checkpoint = time.monotonic()
                    # A signal that came while the checkpoint was written stops the run at it, not one step later.
                    stopping = stopping or bool(distributed.all_reduce_sum(
                        torch.tensor([float(stop.received is not None)]))[0])
                if stopping and step < cfg.steps:
                    bar.close()
                    acc.end_training()
                    by = stop.received or "a signal to another process"
                    message = (f"stopped at step {step} of {cfg.steps} by {by}: {checkpoint} is written. "
                               f"{preempted_advice()}")
                    acc.print(message, flush=True)
                    raise Preempted(message)
        bar.close()
        self._finish()
        return self.ema.model

    def _start(self) -> None:
        """Say what runs, save its config, drop what a killed run logged after its checkpoint."""
        cfg, acc, start_step = self.config, self.accelerator, self.state.step
        if acc.is_main_process:
            print(f"effective config ({SCRIPT[self.task]}):\n{describe(cfg)}", flush=True)
            global_batch = cfg.batch_size * acc.num_processes * cfg.grad_accum
            print(f"global batch {global_batch} = {cfg.batch_size} per process x {acc.num_processes} processes x "
                  f"{cfg.grad_accum} accumulation steps", flush=True)
            save_config(cfg, self.output_dir / "train_config.yaml")
            self.log.forget_after(start_step)
            if start_step >= cfg.steps:
                print(f"the run is already finished at step {start_step} (--steps {cfg.steps}): nothing to train; "
                      f"its model is exported again if model/ does not hold it", flush=True)
        # purge_step: TensorBoard hides what a killed run logged after the checkpoint this run starts from
        acc.init_trackers("tensorboard", config={k: str(v) for k, v in cfg.to_dict().items()},
                          init_kwargs={"tensorboard": {"purge_step": start_step + 1}})

    def _log_step(self, step: int, logs: dict) -> str:
        """Log the step's scalars (means over processes), images/s, the lr and codebook usage; returns the bar's
        text."""
        acc, unwrapped = self.accelerator, self.accelerator.unwrap_model(self.model)
        logs = distributed.reduce_scalars(logs)  # the mean over processes: what all of them did
        seen = distributed.all_reduce_sum(torch.tensor([float(self.seen)])).item()
        logs["images_per_second"] = seen / (time.perf_counter() - self.since)
        logs["lr"] = self.opt_g.param_groups[0]["lr"]
        self.seen, self.since = 0, time.perf_counter()
        if self.task == "vqhit":
            quantize = unwrapped.quantize
            logs.update({f"codebook/{k}": float(v) for k, v in quantize.usage_stats().items()})
            counts = distributed.all_reduce_sum(quantize.code_counts.clone())  # every process's picks
            if acc.is_main_process:  # how many times each code was picked since the last log step
                acc.get_tracker("tensorboard", unwrap=True).add_histogram("codebook/code_use", counts.float(), step)
            quantize.reset_usage()
        acc.log(logs, step=step)
        self.log.write(step, logs)
        return self.log.bar_text(logs, getattr(unwrapped.config, "codebook_size", None))

    def _finish(self) -> None:
        """After the last step: export model/ and, for a tokenizer, the held-out report (once per step, however
        often a finished run is resumed). Both are short: a stop signal now lets them finish."""
        acc, step = self.accelerator, self.state.step
        with StopSignals(parse_signals(self.config.stop_signals), WHILE_FINISHING):
            distributed.run_on_main(export_model, self.ema.model, self.output_dir, step)  # also for a finished run
            if self.task == "vqhit" and self.config.heldout_data:
                if self.log.holds_heldout_report(step):
                    acc.print(f"the held-out report of step {step} is in {self.log.path}")
                else:
                    self.heldout_report()
        acc.end_training()
        if acc.is_main_process:
            model = self.output_dir / "model"
            print(f"finished at step {step}: the EMA model is in {model} "
                  f"({model_class(self.task).__name__}.from_pretrained(\"{model}\"))", flush=True)

    def _interrupted_message(self) -> str:
        found = list_checkpoints(self.output_dir)  # complete ones only: one being written is a .tmp folder
        where = (f"the latest checkpoint is {found[-1]}: the same command with --resume auto continues from it, and "
                 f"the training since its step {checkpoint_step(found[-1])} is lost" if found else
                 "no checkpoint was written yet: the training so far is lost")
        return f"interrupted at step {self.state.step} of {self.config.steps}; {where}"

    def save_samples(self, step: int) -> Path:
        """The EMA model's sample grid of `step` (main-process work: see `distributed.run_on_main`)."""
        path = self.output_dir / "samples" / f"step-{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.objective.save_sample_grid(self.ema.model, self.fixed_real, path)
        return path

    def heldout_report(self) -> dict | None:
        """The held-out report of the EMA model (`vqhit.heldout`), made on the main process: printed, logged to
        TensorBoard and logs.jsonl."""
        def report():
            reports, figures, text = heldout.report(self.ema.model, self.config, self.output_dir, self.state.step,
                                                    self.accelerator.device)
            self.accelerator.log(figures, step=self.state.step)
            self.log.write(self.state.step, figures)
            print(text, flush=True)
            return reports
        return distributed.run_on_main(report)


def divergence_message(losses: list[str], started_from: int, output_dir: Path, config: TrainConfig) -> str:
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
