"""The training loop shared by `scripts/train_gan.py` and `scripts/train_vqhit.py`, on top of Accelerate.

One iteration = one micro-batch inside `accelerator.accumulate(G, D)`:
  1. generator / autoencoder step: fake = G(z) or x_hat = AE(x); loss = task terms + adversarial term,
     with D frozen and called outside DDP so its gradients are not touched;
  2. discriminator step: logistic loss on real and (detached) fake, + R1 (every step or lazily), + bCR.
The two tasks differ only in an *objective* object (what G makes, and its non-adversarial loss terms).

Checkpoints are `accelerator.save_state` folders (models, optimisers, per-process RNG, EMA, step) written to a
temporary name and renamed; `--resume latest` continues at the same step, data position and RNG.
"""
from __future__ import annotations

import copy
import itertools
import math
import os
import shutil
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

from .data import DataConfig, build_dataloader, build_dataset
from .losses import (PerceptualLoss, adaptive_adversarial_weight, bcr_penalty, d_logistic_loss, delayed_weight,
                     g_nonsaturating_loss, l2_reconstruction_loss, r1_penalty)
from .models.discriminator import Discriminator
from .models.hit import HiTGenerator
from .models.vqhit import VQHiT
from .presets import GENERATOR_PRESETS, TOKENIZER_PRESETS
from .train_config import TrainConfig, save_config

CHECKPOINT_PREFIX = "checkpoint-"


class SkipFirst(Sampler):
    """A sampler without its first `n` indices: where a resumed run picks up inside an epoch."""

    def __init__(self, sampler: Sampler, n: int):
        self.sampler, self.n = sampler, n

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.n, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.n)


# -- EMA ------------------------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of a model's parameters *and* floating-point buffers (BatchNorm statistics).

    Before `start_step` the average is a copy of the model; from then on avg <- decay * avg + (1 - decay) * x.
    Integer buffers (BatchNorm's batch counter) are copied.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, start_step: int = 10):
        self.decay, self.start_step = decay, start_step
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._pairs = None  # (source model, [(average, source) float tensors], [(copy, source) int tensors])

    def _tensors(self, model: nn.Module):
        """Matching tensors of the average and the model, collected once: the first update runs after the model
        has been placed on its device, and training only changes tensors in place."""
        if self._pairs is None or self._pairs[0] is not model:
            ours, theirs = self.model.state_dict(), model.state_dict()
            pairs = [(ours[k], theirs[k].detach()) for k in ours]
            self._pairs = (model, [p for p in pairs if p[0].is_floating_point()],
                           [p for p in pairs if not p[0].is_floating_point()])
        return self._pairs[1], self._pairs[2]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        floats, others = self._tensors(model)
        for a, b in others:
            a.copy_(b)
        if step < self.start_step:
            torch._foreach_copy_([a for a, _ in floats], [b for _, b in floats])
        else:
            torch._foreach_lerp_([a for a, _ in floats], [b for _, b in floats], 1.0 - self.decay)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)


class TrainState:
    """What `save_state` does not know: the optimiser step reached."""

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
    def sample_grid(self, ema_model: nn.Module, fixed_real: torch.Tensor) -> torch.Tensor:
        return ema_model(self.sample_latents)


class TokenizerObjective:
    """VQ-HiT: x_hat = AE(x); L2 + perceptual + codebook/commitment + (delayed, optionally adaptive) adversarial."""

    def __init__(self, config: TrainConfig, model: nn.Module, device: torch.device):
        self.config = config
        self.perceptual = None
        if config.perceptual != "none":
            self.perceptual = PerceptualLoss(config.perceptual, pretrained=config.perceptual_pretrained,
                                             vgg_weights_path=config.vgg_weights).to(device)
        self.last_aux = {}

    def generate(self, forward, real: torch.Tensor, step: int):
        reconstruction, aux = forward(real)
        self.last_aux = aux
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
    def sample_grid(self, ema_model: nn.Module, fixed_real: torch.Tensor) -> torch.Tensor:
        reconstruction, _ = ema_model(fixed_real)
        pairs = torch.stack([fixed_real, reconstruction.clamp(-1, 1)], dim=1)  # original beside reconstruction
        return pairs.flatten(0, 1)


# -- building -------------------------------------------------------------------------------------------
def build_model(config: TrainConfig, task: str) -> nn.Module:
    presets = GENERATOR_PRESETS if task == "gan" else TOKENIZER_PRESETS
    script = "train_gan.py" if task == "gan" else "train_vqhit.py"
    if config.model not in presets:
        raise ValueError(f"{script} trains {'hit-*' if task == 'gan' else 'vqhit-*'} presets, got "
                         f"{config.model!r}; choose one of {', '.join(presets)}")
    cls = HiTGenerator if task == "gan" else VQHiT
    model = cls.from_preset(config.model, **config.model_options)
    if config.init_from:
        model.load_weights(config.init_from)
    if task == "vqhit" and config.taming_checkpoint:
        model.load_taming_checkpoint(config.taming_checkpoint)
    return model


def list_checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in output_dir.glob(CHECKPOINT_PREFIX + "*") if p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def resolve_resume(resume: str | None, output_dir: Path) -> Path | None:
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise ValueError(f"--resume latest: no {CHECKPOINT_PREFIX}N folder in {output_dir}")
        return found[-1]
    path = Path(resume)
    if not (path / "train_state.txt").exists():
        raise ValueError(f"--resume {resume}: not a checkpoint folder written by this trainer")
    return path


class Trainer:
    def __init__(self, config: TrainConfig, task: str):
        if task not in ("gan", "vqhit"):
            raise ValueError(f"task must be 'gan' or 'vqhit', got {task!r}")
        self.config, self.task = config, task
        self.output_dir = Path(config.output_dir)
        # Autocast is ours, not Accelerate's: Accelerate would patch the discriminator's forward with autocast,
        # and R1 must stay in fp32 (SPEC §4).
        self.accelerator = Accelerator(gradient_accumulation_steps=config.grad_accum, log_with="tensorboard",
                                       project_dir=str(self.output_dir))
        acc = self.accelerator
        set_seed(config.seed, device_specific=True)  # per-process streams: different latents on every rank
        self.autocast = (lambda: torch.autocast(acc.device.type, dtype=torch.bfloat16)) \
            if config.precision == "bf16" else nullcontext

        model = build_model(config, task)
        resolution = model.config.resolution
        D = Discriminator(resolution, config.disc_channel_multiplier, max_channels=config.disc_max_channels)
        self.ema = EMA(model, config.ema_decay, config.ema_start)
        self.ema.model.to(acc.device)
        self.dataset = build_dataset(DataConfig(
            source=config.data, split=config.data_split, image_column=config.image_column,
            label_column=config.label_column, streaming=config.streaming, resolution=resolution,
            transform=config.transform, flip=config.flip, bad_images=config.bad_images,
            max_images=config.max_images), seed=config.seed)
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
        acc.register_for_checkpointing(self.ema, self.state)
        objective_cls = GANObjective if task == "gan" else TokenizerObjective
        self.objective = objective_cls(config, acc.unwrap_model(self.model), acc.device)
        self.fixed_real = self._fixed_real_batch()

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
        return torch.stack(images).to(self.accelerator.device)

    # -- data position --------------------------------------------------------------------------------
    def _batches(self, start_step: int):
        """Micro-batches from optimiser step `start_step` on, as an uninterrupted run would have seen them."""
        micro = start_step * self.config.grad_accum
        if self.dataset_is_streaming:  # a stream can only be replayed: read and drop what was seen
            epoch, skip = 0, micro
        else:
            epoch, skip = divmod(micro, len(self.loader))
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
                elif batch is not None:  # None: every image of the batch was unreadable (and skipped)
                    yield batch
            epoch = epoch + 1

    # -- checkpoints ----------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        acc, step = self.accelerator, self.state.step
        final = self.output_dir / f"{CHECKPOINT_PREFIX}{step}"
        tmp = self.output_dir / f".{CHECKPOINT_PREFIX}{step}.tmp"
        if acc.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()  # the folder exists before any process writes its part (e.g. its RNG state)
        acc.save_state(str(tmp))
        acc.wait_for_everyone()  # every part is written before the folder is renamed
        if acc.is_main_process:
            self.ema.model.save_pretrained(tmp / "ema")
            save_config(self.config, tmp / "train_config.yaml")
            (tmp / "train_state.txt").write_text(f"step {step}\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)  # a kill before this line leaves only a .tmp folder, never a half checkpoint
            for old in list_checkpoints(self.output_dir)[:-self.config.keep_checkpoints]:
                shutil.rmtree(old)
            self.export(self.output_dir / "model")
        acc.wait_for_everyone()
        return final

    def export(self, directory: Path) -> None:
        """The EMA model as a save_pretrained folder, replaced atomically."""
        tmp = directory.with_name(directory.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        self.ema.model.save_pretrained(tmp)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)

    def resume(self, path: Path) -> None:
        self.accelerator.load_state(str(path))
        self.accelerator.print(f"resumed from {path} at step {self.state.step}")

    # -- one iteration --------------------------------------------------------------------------------
    def _check_finite(self, losses: dict) -> None:
        bad = torch.tensor([float(not torch.isfinite(v).all()) for v in losses.values()],
                           device=self.accelerator.device)
        bad = self.accelerator.reduce(bad, reduction="sum")  # every rank stops together
        if bad.any():
            names = [k for k, b in zip(losses, bad.tolist()) if b]
            last = list_checkpoints(self.output_dir)
            raise FloatingPointError(
                f"non-finite {', '.join(names)} at step {self.state.step}: training stopped before the update. "
                f"The last good checkpoint ({last[-1] if last else 'none yet'}) is intact: resume with "
                f"--resume latest and a lower --lr, or --precision no")

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
            d_loss = d_logistic_loss(real_logits.float(), fake_logits.float())
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
            self._update("discriminator", d_loss, self.D, self.opt_d, logs)
        return logs

    def _update(self, name: str, loss: torch.Tensor, model: nn.Module, optimizer, logs: dict) -> None:
        """One optimiser update (skipped by Accelerate inside an accumulation window), after the NaN guard."""
        self._check_finite({f"{name} loss": loss})
        self.accelerator.backward(loss)
        if self.accelerator.sync_gradients:
            logs[f"grad_norm/{name}"] = _grad_norm(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # -- the loop -------------------------------------------------------------------------------------
    def fit(self) -> nn.Module:
        cfg, acc = self.config, self.accelerator
        resume_path = resolve_resume(cfg.resume, self.output_dir)
        if resume_path is not None:
            self.resume(resume_path)
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.output_dir / "train_config.yaml")
        acc.init_trackers("tensorboard", config={k: str(v) for k, v in cfg.to_dict().items()})
        bar = tqdm(total=cfg.steps, initial=self.state.step, disable=not acc.is_main_process,
                   desc=f"train {self.task}", dynamic_ncols=True)
        batches = self._batches(self.state.step)
        seen, t0 = 0, time.perf_counter()
        while self.state.step < cfg.steps:
            for _ in range(cfg.grad_accum):
                real = next(batches)["image"].to(acc.device, non_blocking=True)
                with acc.accumulate(self.model, self.D):
                    logs = self.train_step(real)
                seen += real.shape[0] * acc.num_processes
            self.state.step += 1
            step = self.state.step
            self.ema.update(acc.unwrap_model(self.model), step)
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                logs = {k: float(v) for k, v in logs.items()}
                logs["images_per_second"] = seen / (time.perf_counter() - t0)
                logs["lr"] = self.opt_g.param_groups[0]["lr"]
                seen, t0 = 0, time.perf_counter()
                if self.task == "vqhit":
                    quantize = acc.unwrap_model(self.model).quantize
                    logs.update({f"codebook/{k}": float(v) for k, v in quantize.usage_stats().items()})
                    quantize.reset_usage()
                acc.log(logs, step=step)
                bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in logs.items()
                                 if k in ("loss/generator", "loss/discriminator", "loss/l2", "codebook/usage")})
            if step % cfg.sample_every == 0 or step == cfg.steps:
                self.save_samples(step)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                self.save_checkpoint()
        bar.close()
        acc.end_training()
        return self.ema.model

    def save_samples(self, step: int) -> Path | None:
        if not self.accelerator.is_main_process:
            return None
        path = self.output_dir / "samples" / f"step-{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid = self.objective.sample_grid(self.ema.model, self.fixed_real).float().clamp(-1, 1)
        save_image((grid + 1) / 2, path, nrow=8 if self.task == "vqhit" else int(math.sqrt(len(grid)) + 0.5))
        return path


def _grad_norm(model: nn.Module) -> float:
    grads = [p.grad.detach().flatten() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.cat(grads))) if grads else 0.0


def train(config: TrainConfig, task: str) -> nn.Module:
    """Train a HiT GAN (`task="gan"`) or a VQ-HiT tokenizer (`task="vqhit"`); returns the EMA model."""
    return Trainer(config, task).fit()
