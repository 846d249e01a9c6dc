"""The training loop shared by `scripts/train_gan.py` and `scripts/train_vqhit.py`, on top of Accelerate.

One iteration = one micro-batch inside `accelerator.accumulate(G, D)`:
  1. generator / autoencoder step: fake = G(z) or x_hat = AE(x); loss = task terms + adversarial term,
     with D frozen and called outside DDP so its gradients are not touched;
  2. discriminator step: logistic loss on real and (detached) fake, + R1 (every step or lazily), + bCR, + LeCam.
After each optimiser step the BatchNorm running statistics are averaged over processes and the EMA is updated,
so every process holds the same model (the buffer policy of `vqhit.distributed`).
The two tasks differ only in an *objective* object (what G makes, and its non-adversarial loss terms).

Checkpoints (`vqhit.checkpointing`) hold the models, optimisers, per-process RNG, EMA, LeCam anchors and the data
position; `--resume` continues at the same step, data position and RNG, with the settings the command line gives.
"""
from __future__ import annotations

import itertools
import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, Sampler
from torchvision.utils import save_image
from tqdm.auto import tqdm

from . import distributed
from .checkpointing import (CHECKPOINT_PREFIX, STATE_FILE, OutputFolder, list_checkpoints, read_state,
                            replace_folder, resolve_resume)
from .data import BUILTIN_WHOLE_VIEW, DataConfig, build_dataloader, build_dataset
from .evaluation import eval_dataset, heldout_report, save_reconstruction_grid
from .ema import EMA
from .losses import (LeCam, PerceptualLoss, adaptive_adversarial_weight, bcr_penalty, d_logistic_loss,
                     delayed_weight, g_nonsaturating_loss, l2_reconstruction_loss, r1_penalty)
from .models.discriminator import Discriminator
from .models.hit import HiTGenerator
from .models.vqhit import VQHiT
from .presets import GENERATOR_PRESETS, TOKENIZER_PRESETS
from .train_config import SCRIPT, TrainConfig, describe, save_config, saved_config

__all__ = ["EMA", "Trainer", "build_model", "list_checkpoints", "train"]


class SkipFirst(Sampler):
    """A sampler without its first `n` indices: where a resumed run picks up inside an epoch."""

    def __init__(self, sampler: Sampler, n: int):
        self.sampler, self.n = sampler, n

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.n, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.n)


class TrainState:
    """What `save_state` does not know: the optimiser step reached and the data position. Saved as the checkpoint's
    train_state.json (written last, so it also marks the checkpoint complete) and read back from it on resume.

    `micro_batches` counts every batch drawn from the loader, including those whose images were all unreadable
    and skipped: the sampler's position, so that a resume continues with exactly the next batch.
    """

    def __init__(self):
        self.step = 0
        self.micro_batches = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "micro_batches": self.micro_batches}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.micro_batches = int(state["step"]), int(state["micro_batches"])


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

    The L2 and perceptual terms use the reduction convention of `vqhit.losses` (README, "Loss scales").
    """

    def __init__(self, config: TrainConfig, model: nn.Module, device: torch.device):
        self.config = config
        self.perceptual = None
        if config.perceptual != "none":
            self.perceptual = PerceptualLoss(config.perceptual, pretrained=config.perceptual_pretrained,
                                             vgg_weights_path=config.vgg_weights).to(device)

    def generate(self, forward, real: torch.Tensor, step: int):
        reconstruction, aux = forward(real)
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


def build_model(config: TrainConfig, task: str) -> nn.Module:
    presets = GENERATOR_PRESETS if task == "gan" else TOKENIZER_PRESETS
    if config.model not in presets:
        raise ValueError(f"{SCRIPT[task]} trains {'generator (hit-*)' if task == 'gan' else 'tokenizer'} presets, got "
                         f"{config.model!r}; choose one of {', '.join(presets)}")
    model = model_class(task).from_preset(config.model, **config.model_options)
    if config.init_from:
        model.load_weights(config.init_from)
    if task == "vqhit" and config.taming_checkpoint:
        model.load_taming_checkpoint(config.taming_checkpoint)
    return model


def check_same_architecture(config: TrainConfig, checkpoint: Path, task: str) -> None:
    """Refuse, in one sentence, to resume a checkpoint of another preset or architecture option (before anything in
    the output folder is touched)."""
    saved = saved_config(checkpoint)
    config_class = model_class(task).config_class
    try:
        theirs = config_class.from_preset(saved["model"], **(saved.get("model_options") or {}))
    except Exception as e:  # noqa: BLE001 - the saved config itself no longer builds
        raise ValueError(f"{checkpoint}/train_config.yaml does not describe a model this version builds ({e})") \
            from None
    ours = config_class.from_preset(config.model, **config.model_options)
    ours_arch, theirs_arch = ours.architecture_dict(), theirs.architecture_dict()
    if ours_arch != theirs_arch:
        diff = {k: (theirs_arch.get(k), ours_arch.get(k)) for k in sorted(ours_arch.keys() | theirs_arch.keys())
                if ours_arch.get(k) != theirs_arch.get(k)}
        raise ValueError(
            f"cannot resume {checkpoint}: it was trained as --model {saved['model']} with model options "
            f"{saved.get('model_options') or {}}, this run asks for a different architecture; differing keys "
            f"(checkpoint, this run): {diff}. Resume without changing the model, or start a new run "
            f"(--init-from {checkpoint.parent / 'model'} keeps the weights)")


class Trainer:
    def __init__(self, config: TrainConfig, task: str):
        if task not in ("gan", "vqhit"):
            raise ValueError(f"task must be 'gan' or 'vqhit', got {task!r}")
        self.config, self.task = config, task
        self.output_dir = Path(config.output_dir)
        # Autocast is ours, not Accelerate's: Accelerate would patch the discriminator's forward with autocast,
        # and R1 must stay in fp32 (SPEC §4). DDP kwargs: the buffer policy of vqhit.distributed.
        self.accelerator = Accelerator(gradient_accumulation_steps=config.grad_accum, log_with="tensorboard",
                                       project_dir=str(self.output_dir), kwargs_handlers=distributed.ddp_kwargs())
        acc = self.accelerator
        self.resume_path = resolve_resume(config.resume, self.output_dir)
        if self.resume_path is not None:
            check_same_architecture(config, self.resume_path, task)
        self.folder = OutputFolder(self.output_dir)
        self._on_main(self._prepare_output_folder)
        try:
            self._build(config, task)
        except BaseException:
            self.folder.unlock()  # a run that could not start leaves the folder free
            raise

    def _build(self, config: TrainConfig, task: str) -> None:
        acc = self.accelerator
        set_seed(config.seed, device_specific=True)  # per-process streams: different latents on every rank
        self.autocast = (lambda: torch.autocast(acc.device.type, dtype=torch.bfloat16)) \
            if config.precision == "bf16" else nullcontext

        model = build_model(config, task)
        resolution = model.config.resolution
        D = Discriminator(resolution, config.disc_channel_multiplier, max_channels=config.disc_max_channels)
        self.ema = EMA(model, config.ema_decay, config.ema_start)
        self.ema.model.to(acc.device)
        self.dataset = build_dataset(self._data_config(resolution), seed=config.seed)
        self.loader = build_dataloader(self.dataset, config.batch_size, config.num_workers, shuffle=True,
                                       seed=config.seed, drop_last=True)
        if not self.dataset_is_streaming and len(self.loader) == 0:
            raise ValueError(f"the dataset has fewer images ({len(self.dataset)}) than one batch per process "
                             f"({config.batch_size} x {acc.num_processes}); lower --batch-size")
        opt_g = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                 betas=tuple(config.adam_betas))
        opt_d = torch.optim.Adam(D.parameters(), lr=config.lr, betas=tuple(config.adam_betas))
        self.model, self.D, self.opt_g, self.opt_d = acc.prepare(model, D, opt_g, opt_d)
        self.forward = torch.compile(self.model) if config.compile else self.model
        self.state = TrainState()
        self.lecam = LeCam(config.lecam_weight, config.lecam_decay)
        acc.register_for_checkpointing(self.ema, self.lecam)  # self.state goes to train_state.json
        objective_cls = GANObjective if task == "gan" else TokenizerObjective
        self.objective = objective_cls(config, acc.unwrap_model(self.model), acc.device)
        self.fixed_real = self._fixed_real_batch()

    def _data_config(self, resolution: int) -> DataConfig:
        c = self.config
        return DataConfig(source=c.data, split=c.data_split, image_column=c.image_column,
                          label_column=c.label_column, streaming=c.streaming, resolution=resolution,
                          transform=c.transform, flip=c.flip, min_crop_area=c.min_crop_area, bad_images=c.bad_images,
                          min_size=c.min_size, max_images=c.max_images)

    def _on_main(self, fn) -> None:
        """Run `fn` on the main process only; if it fails there, every process stops (none waits forever)."""
        error = None
        if self.accelerator.is_main_process:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - re-raised below, after the other processes are told
                error = e
        failed = distributed.all_reduce_sum(torch.tensor([float(error is not None)]))
        if error is not None:
            raise error
        if failed.item():
            raise RuntimeError("the main process failed (its error is above); this process stops too")

    def _prepare_output_folder(self) -> None:
        self.folder.lock()
        try:
            messages = self.folder.prepare(self.resume_path, self.config.overwrite)
        except BaseException:
            self.folder.unlock()
            raise
        for message in messages:
            print(message, flush=True)

    @property
    def dataset_is_streaming(self) -> bool:
        return isinstance(self.dataset, torch.utils.data.IterableDataset)

    def _fixed_real_batch(self) -> torch.Tensor:
        """The first `num_samples` training images: the originals of every reconstruction grid."""
        images = []
        for item in (self.dataset[i] for i in range(len(self.dataset))) if not self.dataset_is_streaming \
                else iter(self.dataset):
            if item is not None:
                images.append(item["image"])
            if len(images) == self.config.num_samples:
                break
        if not images:
            raise ValueError(f"no readable image in {self.config.data}")
        return torch.stack(images).to(self.accelerator.device)

    # -- data position --------------------------------------------------------------------------------
    def _batches(self, start: int):
        """Loader batches from micro-batch number `start` on (None where every image was unreadable), as an
        uninterrupted run draws them: the order is a function of (seed, epoch), so skipping by index is exact."""
        if self.dataset_is_streaming:  # a stream can only be replayed: read and drop what was seen
            epoch, skip = 0, start
        else:
            epoch, skip = divmod(start, len(self.loader))
        while True:
            self.dataset.set_epoch(epoch)
            loader = self.loader
            if skip and not self.dataset_is_streaming:  # skip by index: seen images are not decoded again
                bs = self.loader.batch_size
                loader = DataLoader(self.dataset, batch_size=bs, sampler=SkipFirst(self.loader.sampler, skip * bs),
                                    num_workers=self.loader.num_workers, collate_fn=self.loader.collate_fn,
                                    drop_last=self.loader.drop_last, generator=self.loader.generator)
                skip = 0
            for batch in loader:
                if skip:
                    skip -= 1
                else:
                    yield batch
            epoch = epoch + 1

    def _next_batch(self, batches) -> dict:
        """The next batch that every process can use. A batch whose images were all unreadable is skipped on every
        process together, so the processes stay in step and the position (`micro_batches`) is the same on all."""
        while True:
            batch = next(batches)
            self.state.micro_batches += 1
            empty = torch.tensor([float(batch is None)])
            if not distributed.all_reduce_sum(empty).item():
                return batch

    # -- checkpoints ----------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        acc, step = self.accelerator, self.state.step
        final = self.output_dir / f"{CHECKPOINT_PREFIX}{step}"
        tmp = self.output_dir / f".{CHECKPOINT_PREFIX}{step}.tmp"
        if acc.is_main_process:
            tmp.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()  # the folder exists before any process writes its part (e.g. its RNG state)
        acc.save_state(str(tmp))
        acc.wait_for_everyone()  # every part is written before the folder is renamed
        if acc.is_main_process:
            self.ema.model.save_pretrained(tmp / "ema")
            save_config(self.config, tmp / "train_config.yaml")
            state = {**self.state.state_dict(), "num_processes": acc.num_processes,
                     "batch_size": self.config.batch_size, "grad_accum": self.config.grad_accum}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")  # last: marks the folder complete
            replace_folder(tmp, final)  # a kill before this leaves only a .tmp folder, never a half checkpoint
            self.folder.prune(self.config.keep_checkpoints)
            self.export()
        acc.wait_for_everyone()
        return final

    def export(self) -> Path:
        """The EMA model as a save_pretrained folder that is loadable at every instant: the first export appears
        complete by one rename; later ones replace each file by a rename (their configs are the same run's)."""
        directory = self.output_dir / "model"
        if directory.is_dir():
            self.ema.model.save_pretrained(directory)
        else:
            tmp = self.output_dir / ".model.tmp"
            self.ema.model.save_pretrained(tmp)
            replace_folder(tmp, directory)
        return directory

    def resume(self, path: Path) -> None:
        acc = self.accelerator
        saved = read_state(path)
        rng_file = path / f"random_states_{acc.process_index}.pkl"
        if saved.get("num_processes", acc.num_processes) == acc.num_processes:
            try:  # Accelerate only logs a failed RNG load and goes on with other randomness: check it first
                torch.load(rng_file, weights_only=False)
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"cannot resume exactly from {path}: {rng_file.name} is missing or damaged ({e}); "
                                 f"resume from an earlier checkpoint (--resume {path.parent}/{CHECKPOINT_PREFIX}M)") \
                    from None
        else:
            acc.print(f"warning: {path} was written by {saved['num_processes']} processes, this run has "
                      f"{acc.num_processes}: random streams and the data order continue differently")
        try:
            acc.load_state(str(path))
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file: name the checkpoint, not the library
            raise ValueError(f"cannot resume from {path}: a file in it is damaged or belongs to another model "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); resume from an "
                             f"earlier checkpoint in {path.parent}") from None
        self.state.load_state_dict(saved)
        if saved.get("batch_size", self.config.batch_size) != self.config.batch_size:
            self.state.micro_batches = self.state.micro_batches * saved["batch_size"] // self.config.batch_size
            acc.print(f"warning: batch size changed from {saved['batch_size']} to {self.config.batch_size}: the "
                      f"data continues at the same image count, not the same batches")
        for optimizer in (self.opt_g, self.opt_d):  # the settings of this command line, not the checkpoint's
            for group in optimizer.param_groups:
                group["lr"], group["betas"] = self.config.lr, tuple(self.config.adam_betas)
        acc.print(f"resumed from {path} at step {self.state.step} (lr {self.config.lr}, betas "
                  f"{self.config.adam_betas})")

    # -- one iteration --------------------------------------------------------------------------------
    def _check_finite(self, losses: dict) -> None:
        bad = torch.tensor([float(not torch.isfinite(v).all()) for v in losses.values()])
        bad = distributed.all_reduce_sum(bad)  # every rank stops together
        if bad.any():
            names = [k for k, b in zip(losses, bad.tolist()) if b]
            last = list_checkpoints(self.output_dir)
            where = (f"The last good checkpoint, {last[-1]}, is intact: resume it with a lower learning rate, "
                     f"--resume {last[-1]} --lr {self.config.lr / 2:g}" if last else
                     "No checkpoint was written yet: start again with a lower --lr "
                     f"(e.g. --lr {self.config.lr / 2:g} --overwrite)")
            raise FloatingPointError(
                f"non-finite {', '.join(names)} at step {self.state.step}: training stopped before the update. "
                f"{where}{', or --precision no' if self.config.precision != 'no' else ''}")

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
        logs.update({f"loss/{k}": v.detach() for k, v in terms.items()})
        logs["loss/generator"] = g_loss.detach()

        # 2. discriminator (from the step the adversarial term is on)
        if adv_on:
            fake = fake.detach()
            with self.autocast():
                real_logits, fake_logits = self.D(real), self.D(fake)
            real_logits, fake_logits = real_logits.float(), fake_logits.float()
            d_loss = d_logistic_loss(real_logits, fake_logits)
            logs.update({"loss/discriminator": d_loss.detach(), "D/real_logits": real_logits.detach().mean(),
                         "D/fake_logits": fake_logits.detach().mean()})
            if cfg.r1_weight > 0 and step % cfg.r1_interval == 0:
                r1 = r1_penalty(self.D, real, weight=cfg.r1_weight * cfg.r1_interval)  # fp32 inside
                d_loss = d_loss + r1
                logs["loss/r1"] = r1.detach()
            if cfg.bcr_weight > 0:
                bcr = bcr_penalty(self.D, real, fake, weight=cfg.bcr_weight)
                d_loss = d_loss + bcr
                logs["loss/bcr"] = bcr.detach()
            if cfg.lecam_weight > 0:
                lecam = self.lecam.penalty(real_logits, fake_logits)  # weighted; anchors averaged over processes
                d_loss = d_loss + lecam
                logs["loss/lecam"] = lecam.detach()
            self._update("discriminator", d_loss, self.D, self.opt_d, logs)
        return logs

    def _update(self, name: str, loss: torch.Tensor, model: nn.Module, optimizer, logs: dict) -> None:
        """One optimiser update (skipped by Accelerate inside an accumulation window), after the NaN guard."""
        self._check_finite({f"{name} loss": loss.detach()})
        self.accelerator.backward(loss)
        if self.accelerator.sync_gradients:
            logs[f"grad_norm/{name}"] = _grad_norm(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # -- the loop -------------------------------------------------------------------------------------
    def fit(self) -> nn.Module:
        """Train to `config.steps`; returns the EMA model. The output folder is unlocked however this ends."""
        try:
            return self._fit()
        finally:
            self.folder.unlock()

    def _fit(self) -> nn.Module:
        cfg, acc = self.config, self.accelerator
        if self.resume_path is not None:
            self.resume(self.resume_path)
        if acc.is_main_process:
            print(f"effective config ({SCRIPT[self.task]}):\n{describe(cfg)}", flush=True)
            global_batch = cfg.batch_size * acc.num_processes * cfg.grad_accum
            print(f"global batch {global_batch} = {cfg.batch_size} per process x {acc.num_processes} processes x "
                  f"{cfg.grad_accum} accumulation steps", flush=True)
            save_config(cfg, self.output_dir / "train_config.yaml")
        acc.init_trackers("tensorboard", config={k: str(v) for k, v in cfg.to_dict().items()})
        bar = tqdm(total=cfg.steps, initial=self.state.step, disable=not acc.is_main_process,
                   desc=f"train {self.task}", dynamic_ncols=True)
        batches = self._batches(self.state.micro_batches)
        seen, t0 = 0, time.perf_counter()
        unwrapped = acc.unwrap_model(self.model)
        while self.state.step < cfg.steps:
            for _ in range(cfg.grad_accum):
                real = self._next_batch(batches)["image"].to(acc.device, non_blocking=True)
                with acc.accumulate(self.model, self.D):
                    logs = self.train_step(real)
                seen += real.shape[0]
            self.state.step += 1
            step = self.state.step
            distributed.average_batchnorm_stats_(unwrapped)  # every rank, hence the EMA, holds the same statistics
            self.ema.update(unwrapped, step)
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
                bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in logs.items()
                                 if k in ("loss/generator", "loss/discriminator", "loss/l2", "codebook/usage")})
            if step % cfg.sample_every == 0 or step == cfg.steps:
                self.save_samples(step)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                self.save_checkpoint()
        bar.close()
        if acc.is_main_process:
            self.export()  # also when a resume found the run already finished
        acc.wait_for_everyone()
        if self.task == "vqhit" and cfg.heldout_data:
            self.heldout_report()
        acc.end_training()
        return self.ema.model

    def _log_line(self, step: int, logs: dict) -> None:
        """The logged scalars also as one JSON line per log step (logs.jsonl): easy to read without TensorBoard."""
        if self.accelerator.is_main_process:
            with open(self.output_dir / "logs.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **logs}) + "\n")

    def save_samples(self, step: int) -> Path | None:
        if not self.accelerator.is_main_process:
            return None
        path = self.output_dir / "samples" / f"step-{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.objective.save_sample_grid(self.ema.model, self.fixed_real, path)
        return path

    def heldout_report(self) -> dict | None:
        """Reconstruct the held-out images (`heldout_data`) with the EMA model on the main process, and, for the
        generalisation gap, the training photographs seen the same way (`train_source_view`): PSNR, SSIM and codebook
        usage of each set are printed, logged and written to logs.jsonl; the grid goes beside the training grids."""
        acc, step, cfg = self.accelerator, self.state.step, self.config
        reports = None
        if acc.is_main_process:
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
        acc.wait_for_everyone()
        return reports


MAX_TRAIN_SOURCE_IMAGES = 256  # the training set's figure, for the gap: a sample is enough, and a large set is slow


def train_source_view(data: str) -> str | None:
    """The training images as the held-out report reads them (whole, centre-cropped): the whole photographs of a
    built-in tiled source, a local folder itself; None for a Hub dataset (scoring it would download it)."""
    if data in BUILTIN_WHOLE_VIEW:
        return BUILTIN_WHOLE_VIEW[data]
    return data if data.startswith("builtin:") or Path(data).expanduser().is_dir() else None


def _grad_norm(model: nn.Module) -> float:
    grads = [p.grad.detach().flatten() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.cat(grads))) if grads else 0.0


def train(config: TrainConfig, task: str) -> nn.Module:
    """Train a HiT GAN (`task="gan"`) or a VQ-HiT tokenizer (`task="vqhit"`); returns the EMA model."""
    return Trainer(config, task).fit()
