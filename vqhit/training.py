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
import json
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
from torchvision.utils import save_image
from tqdm.auto import tqdm

from . import distributed, launcher
from .checkpointing import OutputFolder, export_model, load_checkpoint, save_checkpoint
from .resume import CHECKPOINT_PREFIX, agree_on_resume, checkpoint_step, list_checkpoints, read_state, resolve_resume
from .cli import naming, usable_cores
from .data import (BUILTIN_WHOLE_VIEW, DataConfig, TrainingBatches, build_dataloader, build_dataset, eval_dataset,
                   first_on_each_machine)
from .ema import EMA
from .errors import DivergedError, OwnDataError, UsageError
from .files import atomic_write
from .evaluation import heldout_report, save_reconstruction_grid
from .losses import (LeCam, PerceptualLoss, R1Schedule, adaptive_adversarial_weight, bcr_penalty, d_logistic_loss,
                     delayed_weight, g_nonsaturating_loss, l2_reconstruction_loss, r1_penalty)
from .models.discriminator import Discriminator
from .models.hit import HiTGenerator
from .models.vqhit import VQHiT
from .metrics import INPUT_RANGE_LIMIT
from .precision import autocast
from .preemption import WHILE_FINISHING, Interrupted, Preempted, StopSignals, parse_signals, preempted_advice
from .presets import GENERATOR_PRESETS, TOKENIZER_PRESETS
from .reproducibility import use_deterministic_algorithms
from .train_config import SCRIPT, TrainConfig, describe, save_config, saved_config, summary

__all__ = ["EMA", "Trainer", "build_model", "list_checkpoints", "train"]


BAR_LOSSES = ("loss/l2", "loss/generator", "loss/discriminator")  # what the progress bar shows
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


# -- objectives -----------------------------------------------------------------------------------------
class GANObjective:
    """Unconditional GAN: G(z) with z ~ N(0, I), seeded per process; no loss terms beyond the adversarial one."""

    def __init__(self, config: TrainConfig, model: nn.Module, device: torch.device):
        self.latent_dim = model.config.latent_dim
        g = torch.Generator().manual_seed(config.seed)  # fixed latents: the same grid every time
        self.sample_latents = torch.randn(config.num_samples, self.latent_dim, generator=g).to(device)

    def generate(self, forward, real: torch.Tensor, step: int):
        z = torch.randn(real.shape[0], self.latent_dim, device=real.device)
        return forward(z), {}

    def adversarial_weight(self, step: int) -> float:
        return 1.0

    def adaptive_scale(self, terms: dict, adv_loss: torch.Tensor, model: nn.Module) -> float:
        return 1.0

    @torch.no_grad()
    def save_sample_grid(self, ema_model: nn.Module, fixed_real: torch.Tensor, path: Path) -> None:
        """Samples of the fixed latents, in a square grid."""
        samples = ema_model(self.sample_latents).float().clamp(-1, 1)
        save_image((samples + 1) / 2, path, nrow=int(math.sqrt(len(samples)) + 0.5))


class TokenizerObjective:
    """VQ-HiT: x_hat = AE(x); L2 + perceptual + codebook/commitment + (delayed, optionally adaptive) adversarial.

    The L2 and perceptual terms use the reduction convention of `vqhit.losses` (see the comment above
    `l2_reconstruction_loss`).
    """

    def __init__(self, config: TrainConfig, model: nn.Module, device: torch.device):
        self.config = config
        self.perceptual = None
        if config.perceptual != "none":
            self.perceptual = PerceptualLoss(config.perceptual, pretrained=config.perceptual_pretrained,
                                             vgg_weights_path=config.vgg_weights).to(device)

    def generate(self, forward, real: torch.Tensor, step: int):
        reconstruction, aux = forward(real, check_range=False)  # the loop checks its batches' range on the device
        terms = {"l2": l2_reconstruction_loss(real, reconstruction), "vq": aux["vq_loss"]}
        if self.perceptual is not None:
            terms["perceptual"] = self.config.perceptual_weight * self.perceptual(real, reconstruction)
        return reconstruction, terms

    def adversarial_weight(self, step: int) -> float:
        return delayed_weight(step, self.config.adv_start, self.config.adv_weight)

    def adaptive_scale(self, terms: dict, adv_loss: torch.Tensor, model: nn.Module) -> float | torch.Tensor:
        """taming's ratio of gradient norms at the decoder's last layer (when enabled)."""
        if not self.config.adaptive_adv_weight:
            return 1.0
        rec = terms["l2"] + terms.get("perceptual", 0.0)
        return adaptive_adversarial_weight(rec, adv_loss, model.last_decoder_layer())

    @torch.no_grad()
    def save_sample_grid(self, ema_model: nn.Module, fixed_real: torch.Tensor, path: Path) -> None:
        """The fixed training images above their reconstructions, as the held-out grid."""
        reconstruction, _ = ema_model(fixed_real)
        save_reconstruction_grid(fixed_real.cpu(), reconstruction.cpu(), path)


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
        distributed.run_on_main(self._prepare_output_folder)

    def _build(self, config: TrainConfig, task: str) -> None:
        acc = self.accelerator
        set_seed(config.seed, device_specific=True)  # per-process streams: different latents on every rank
        self.autocast = lambda: autocast(config.precision, acc.device)

        model = build_model(config, task)
        resolution = model.config.resolution
        D = Discriminator(resolution, config.disc_channel_multiplier, max_channels=config.disc_max_channels)
        with first_on_each_machine():  # one download or folder table per machine, which the others then read
            self.dataset = build_dataset(self._data_config(resolution), seed=config.seed)
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
        objective_cls = GANObjective if task == "gan" else TokenizerObjective
        self.objective = objective_cls(config, acc.unwrap_model(self.model), acc.device)
        self.fixed_real = self._fixed_real_batch()

    def _data_config(self, resolution: int) -> DataConfig:
        c = self.config
        return DataConfig(source=c.data, split=c.data_split, image_column=c.image_column,
                          label_column=c.label_column, streaming=c.streaming, resolution=resolution,
                          transform=c.transform, flip=c.flip, min_crop_area=c.min_crop_area, bad_images=c.bad_images,
                          min_size=c.min_size, max_images=c.max_images, shuffle_buffer=c.shuffle_buffer,
                          open_shards=c.open_shards)

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
    def save_checkpoint(self) -> Path:
        acc = self.accelerator
        train_state = {**self.state.state_dict(), "num_processes": acc.num_processes,
                       "batch_size": self.config.batch_size, "grad_accum": self.config.grad_accum,
                       "loss_peak": float(self.loss_peak)}
        self.loss_peak.zero_()
        return save_checkpoint(acc, self.output_dir, self.state.step, ema_model=self.ema.model, config=self.config,
                               train_state=train_state, data_state=self.batches.state_dict(), folder=self.folder)

    def export(self) -> Path:
        return export_model(self.ema.model, self.output_dir, self.state.step)

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
        cfg, acc, step = self.config, self.accelerator, self.state.step
        D_plain = acc.unwrap_model(self.D)
        logs = {}
        # 1. generator / autoencoder
        with self.autocast():
            fake, terms = self.objective.generate(self.forward, real, step)
        weight = self.objective.adversarial_weight(step)
        adv_on = weight != 0.0
        D_plain.requires_grad_(False)  # frozen and outside DDP: the G step leaves D's gradients alone
        if adv_on:
            with self.autocast():
                g_adv = g_nonsaturating_loss(D_plain(fake).float())
            weight = weight * self.objective.adaptive_scale(terms, g_adv, acc.unwrap_model(self.model))
            terms = {**terms, "adversarial": weight * g_adv}
        D_plain.requires_grad_(True)
        g_loss = sum(terms.values())
        self._update("generator", g_loss, self.model, self.opt_g, logs)
        self.step_flags[STEP_FLAGS.index("images")] += ~(real.abs().amax() <= INPUT_RANGE_LIMIT)  # NaN too
        logs.update({f"loss/{k}": v.detach() for k, v in terms.items()})
        logs["loss/generator"] = g_loss.detach()

        # 2. discriminator (from the step the adversarial term is on). D sees the real images once per step: on R1
        # steps that one forward is R1's (fp32, autocast off, the input requiring grad) and its logits serve the
        # logistic loss too, which then runs on fp32 logits whatever the precision; bCR reuses both logits.
        if adv_on:
            fake = fake.detach()
            r1_schedule = R1Schedule(cfg.r1_weight, cfg.r1_interval)
            if r1_schedule.due(step):
                r1, real_logits = r1_penalty(self.D, real, weight=r1_schedule.scaled_weight, return_logits=True)
                with self.autocast():
                    fake_logits = self.D(fake)
            else:
                with self.autocast():
                    real_logits, fake_logits = self.D(real), self.D(fake)
            real_logits, fake_logits = real_logits.float(), fake_logits.float()
            d_loss = d_logistic_loss(real_logits, fake_logits)
            logs.update({"loss/discriminator": d_loss.detach(), "D/real_logits": real_logits.detach().mean(),
                         "D/fake_logits": fake_logits.detach().mean()})
            if r1_schedule.due(step):
                d_loss = d_loss + r1
                logs["loss/r1"] = r1.detach()
            if cfg.bcr_weight > 0:
                bcr = bcr_penalty(self.D, real, fake, weight=cfg.bcr_weight, real_logits=real_logits,
                                  fake_logits=fake_logits)
                d_loss = d_loss + bcr
                logs["loss/bcr"] = bcr.detach()
            if cfg.lecam_weight > 0:
                lecam = self.lecam.penalty(real_logits, fake_logits)  # weighted; anchors averaged over processes
                d_loss = d_loss + lecam
                logs["loss/lecam"] = lecam.detach()
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
        start_step = self.state.step
        if acc.is_main_process:
            print(f"effective config ({SCRIPT[self.task]}):\n{describe(cfg)}", flush=True)
            global_batch = cfg.batch_size * acc.num_processes * cfg.grad_accum
            print(f"global batch {global_batch} = {cfg.batch_size} per process x {acc.num_processes} processes x "
                  f"{cfg.grad_accum} accumulation steps", flush=True)
            save_config(cfg, self.output_dir / "train_config.yaml")
            self._forget_logs_after(start_step)
            if start_step >= cfg.steps:
                print(f"the run is already finished at step {start_step} (--steps {cfg.steps}): nothing to train; "
                      f"its model is exported again if model/ does not hold it", flush=True)
        # purge_step: TensorBoard hides what a killed run logged after the checkpoint this run starts from
        acc.init_trackers("tensorboard", config={k: str(v) for k, v in cfg.to_dict().items()},
                          init_kwargs={"tensorboard": {"purge_step": start_step + 1}})
        bar = tqdm(total=cfg.steps, initial=self.state.step, disable=not acc.is_main_process,
                   desc=f"train {self.task}", dynamic_ncols=True)
        seen, t0 = 0, time.perf_counter()
        last_checkpoint = time.monotonic()
        window = {}  # the bar's losses since the last log step, {key: (sum, steps)}: it shows their means
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
                    seen += real.shape[0]
                self.state.step += 1
                step = self.state.step
                timed = cfg.checkpoint_every_minutes > 0 and \
                    time.monotonic() - last_checkpoint >= 60 * cfg.checkpoint_every_minutes
                flags = self._read_step_flags(unwrapped, stop, timed)  # the step's one collective and host sync
                self.ema.update(unwrapped, step)
                for key in BAR_LOSSES:
                    if key in logs:  # summed as tensors: no device sync per step
                        total, count = window.get(key, (0.0, 0))
                        window[key] = (total + logs[key], count + 1)
                bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.steps:
                    logs = distributed.reduce_scalars(logs)  # the mean over processes: what all of them did
                    logs["images_per_second"] = distributed.all_reduce_sum(torch.tensor([float(seen)])).item() / (
                        time.perf_counter() - t0)
                    logs["lr"] = self.opt_g.param_groups[0]["lr"]
                    seen, t0 = 0, time.perf_counter()
                    if self.task == "vqhit":
                        quantize = unwrapped.quantize
                        logs.update({f"codebook/{k}": float(v) for k, v in quantize.usage_stats().items()})
                        quantize.reset_usage()
                    acc.log(logs, step=step)
                    self._log_line(step, logs)
                    bar.set_postfix_str(self._bar_text(window, logs))
                    window = {}
                if step % cfg.sample_every == 0 or step == cfg.steps:
                    distributed.run_on_main(self.save_samples, step)  # the others wait outside the deadline
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
                    message = (f"stopped at step {step} of {cfg.steps} by {by}: {checkpoint} is written. "
                               f"{preempted_advice()}")
                    acc.print(message, flush=True)
                    raise Preempted(message)
        bar.close()
        with StopSignals(parse_signals(cfg.stop_signals), WHILE_FINISHING):  # short: a stop signal lets it finish
            distributed.run_on_main(self.export)  # also when a resume found the run already finished
            if self.task == "vqhit" and cfg.heldout_data:
                if self._heldout_reported(self.state.step):  # a finished run resumed: logs.jsonl keeps each step once
                    acc.print(f"the held-out report of step {self.state.step} is in {self.output_dir / 'logs.jsonl'}")
                else:
                    self.heldout_report()
        acc.end_training()
        if acc.is_main_process:
            model = self.output_dir / "model"
            print(f"finished at step {self.state.step}: the EMA model is in {model} "
                  f"({model_class(self.task).__name__}.from_pretrained(\"{model}\"))", flush=True)
        return self.ema.model

    def _interrupted_message(self) -> str:
        found = list_checkpoints(self.output_dir)  # complete ones only: one being written is a .tmp folder
        where = (f"the latest checkpoint is {found[-1]}: the same command with --resume auto continues from it, and "
                 f"the training since its step {checkpoint_step(found[-1])} is lost" if found else
                 "no checkpoint was written yet: the training so far is lost")
        return f"interrupted at step {self.state.step} of {self.config.steps}; {where}"

    def _forget_logs_after(self, step: int) -> None:
        """Drop the logs.jsonl lines a killed run wrote after the checkpoint this run starts from, so that after any
        number of kills and resumes each step appears once."""
        path = self.output_dir / "logs.jsonl"
        if path.is_file():
            kept = []
            for line in path.read_text().splitlines(keepends=True):
                try:
                    if json.loads(line)["step"] <= step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):  # a line cut short by a kill
                    pass
            atomic_write(path, lambda tmp: tmp.write_text("".join(kept)))  # a kill leaves the old log or the new

    def _heldout_reported(self, step: int) -> bool:
        """Whether logs.jsonl holds the held-out report of `step` already (read by the main process, told to all)."""
        found = False
        path = self.output_dir / "logs.jsonl"
        if self.accelerator.is_main_process and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                found = found or (isinstance(row, dict) and row.get("step") == step and "heldout/psnr" in row)
        return bool(distributed.all_reduce_sum(torch.tensor([float(found)]))[0])

    def _bar_text(self, window: dict, logs: dict) -> str:
        """The progress bar's figures: each loss as its mean since the last log step (one batch's value jumps
        around), and how many codes of the codebook those steps used."""
        means = distributed.reduce_scalars({k: total / count for k, (total, count) in window.items()})
        steps = max((count for _, count in window.values()), default=0)
        text = f"mean of {steps} steps: " + ", ".join(f"{k.split('/')[-1]} {v:.3g}" for k, v in means.items())
        if "codebook/codes_used" in logs:
            size = self.accelerator.unwrap_model(self.model).config.codebook_size
            text += f"; codes used {int(logs['codebook/codes_used'])} of {size}"
        return text

    def _log_line(self, step: int, logs: dict) -> None:
        """The logged scalars also as one JSON line per log step (logs.jsonl): easy to read without TensorBoard."""
        if self.accelerator.is_main_process:
            with open(self.output_dir / "logs.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **logs}) + "\n")

    def save_samples(self, step: int) -> Path:
        """The EMA model's sample grid of `step` (main-process work: see `distributed.run_on_main`)."""
        path = self.output_dir / "samples" / f"step-{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.objective.save_sample_grid(self.ema.model, self.fixed_real, path)
        return path

    def heldout_report(self) -> dict | None:
        """Reconstruct the held-out images (`heldout_data`) with the EMA model on the main process, and, for the
        generalisation gap, the training photographs seen the same way (`train_source_view`): PSNR, SSIM and codebook
        usage of each set are printed, logged and written to logs.jsonl; the grid goes beside the training grids."""
        return distributed.run_on_main(self._heldout_report)

    def _heldout_report(self) -> dict:
        acc, step, cfg = self.accelerator, self.state.step, self.config
        model, resolution = self.ema.model, self.ema.model.config.resolution
        sets = {"heldout": cfg.heldout_data, "train_source": train_source_view(cfg.data)}
        reports, lines = {}, []
        for name, source in sets.items():
            if source is None:
                continue
            dataset = eval_dataset(source, resolution, min_size=cfg.min_size, max_images=MAX_TRAIN_SOURCE_IMAGES
                                   if name == "train_source" else None)
            grid = self.output_dir / "samples" / f"heldout-step-{step:07d}.png" if name == "heldout" else None
            reports[name] = report = heldout_report(model, dataset, device=acc.device, grid_path=grid)
            what = "never trained on" if name == "heldout" else "the training images"
            lines.append(f"  {source} ({report['num_images']} images, {what}): PSNR {report['psnr']:.2f} dB "
                         f"(std {report['psnr_std']:.2f} over images), SSIM {report['ssim']:.3f}, codebook usage "
                         f"{100 * report['codebook_usage']:.1f}% (perplexity {report['codebook_perplexity']:.1f})")
        figures = {f"{name}/{k}": v for name, report in reports.items() for k, v in report.items()
                   if isinstance(v, (int, float))}
        if "train_source" in reports:
            figures["heldout/gap_psnr"] = reports["train_source"]["psnr"] - reports["heldout"]["psnr"]
            lines.append(f"  generalisation gap: {figures['heldout/gap_psnr']:.2f} dB PSNR (training photographs "
                         "minus held-out)")
        acc.log(figures, step=step)
        self._log_line(step, figures)
        print(f"reconstruction at step {step} (EMA model, {resolution}x{resolution}, every image downsampled whole "
              f"by a centre crop of its short side):\n" + "\n".join(lines) +
              f"\n  grid: {reports['heldout']['grid']}", flush=True)
        return reports


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


MAX_TRAIN_SOURCE_IMAGES = 256  # the training set's figure, for the gap: a sample is enough, and a large set is slow


def train_source_view(data: str) -> str | None:
    """The training images as the held-out report reads them (whole, centre-cropped): the whole photographs of a
    built-in tiled source, a local folder itself; None for a Hub dataset (scoring it would download it)."""
    if data in BUILTIN_WHOLE_VIEW:
        return BUILTIN_WHOLE_VIEW[data]
    return data if data.startswith("builtin:") or Path(data).expanduser().is_dir() else None


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
