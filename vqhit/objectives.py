"""What a training step optimises, phase by phase (as StyleGAN2-ADA's loss module): the generator's phase (its
task's terms and the adversarial term) and the discriminator's (logistic loss, R1, bCR, LeCam). The two tasks differ
only in an *objective* object: what G makes from a batch, and its non-adversarial terms.

The phases return losses; the training loop (`vqhit.training`) owns the optimisers and their updates.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from torchvision.utils import save_image

from . import distributed
from .evaluation import save_reconstruction_grid
from .losses import (PerceptualLoss, R1Schedule, adaptive_adversarial_weight, bcr_penalty, d_logistic_loss,
                     delayed_weight, g_nonsaturating_loss, l2_reconstruction_loss, r1_penalty)
from .train_config import TrainConfig


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

    def usage_logs(self, model: nn.Module, accelerator, step: int) -> dict:
        return {}

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

    def usage_logs(self, model: nn.Module, accelerator, step: int) -> dict:
        """The codebook's use since the last log step (a collective): its figures, and a histogram of every
        process's picks to TensorBoard."""
        quantize = model.quantize
        logs = {f"codebook/{k}": float(v) for k, v in quantize.usage_stats().items()}
        counts = distributed.all_reduce_sum(quantize.code_counts.clone())
        if accelerator.is_main_process:
            accelerator.get_tracker("tensorboard", unwrap=True).add_histogram("codebook/code_use", counts.float(), step)
        quantize.reset_usage()
        return logs

    @torch.no_grad()
    def save_sample_grid(self, ema_model: nn.Module, fixed_real: torch.Tensor, path: Path) -> None:
        """The fixed training images above their reconstructions, as the held-out grid."""
        reconstruction, _ = ema_model(fixed_real)
        save_reconstruction_grid(fixed_real.cpu(), reconstruction.cpu(), path)


OBJECTIVES = {"gan": GANObjective, "vqhit": TokenizerObjective}


def generator_phase(objective, forward, D: nn.Module, real: torch.Tensor, step: int, autocast, model: nn.Module):
    """(fake, terms): what G made and its loss terms, the adversarial one included once its weight is on. `D` is the
    plain discriminator, frozen here and called outside DDP so that this phase leaves its gradients alone."""
    with autocast():
        fake, terms = objective.generate(forward, real, step)
    weight = objective.adversarial_weight(step)
    if weight != 0.0:
        D.requires_grad_(False)
        with autocast():
            g_adv = g_nonsaturating_loss(D(fake).float())
        D.requires_grad_(True)
        weight = weight * objective.adaptive_scale(terms, g_adv, model)
        terms = {**terms, "adversarial": weight * g_adv}
    return fake, terms


def discriminator_phase(D: nn.Module, real: torch.Tensor, fake: torch.Tensor, step: int, config: TrainConfig,
                        lecam, autocast) -> tuple[torch.Tensor, dict]:
    """(loss, logs) of the discriminator on real and (detached) fake images. D sees the real images once: on R1
    steps that one forward is R1's (fp32, autocast off, the input requiring grad) and its logits serve the logistic
    loss too, which then runs on fp32 logits whatever the precision; bCR reuses both logits."""
    r1_schedule = R1Schedule(config.r1_weight, config.r1_interval)
    r1_due = r1_schedule.due(step)
    if r1_due:
        r1, real_logits = r1_penalty(D, real, weight=r1_schedule.scaled_weight, return_logits=True)
        with autocast():
            fake_logits = D(fake)
    else:
        with autocast():
            real_logits, fake_logits = D(real), D(fake)
    real_logits, fake_logits = real_logits.float(), fake_logits.float()
    loss = d_logistic_loss(real_logits, fake_logits)
    logs = {"loss/discriminator": loss.detach(), "D/real_logits": real_logits.detach().mean(),
            "D/fake_logits": fake_logits.detach().mean()}
    if r1_due:
        loss = loss + r1
        logs["loss/r1"] = r1.detach()
    if config.bcr_weight > 0:
        bcr = bcr_penalty(D, real, fake, weight=config.bcr_weight, real_logits=real_logits, fake_logits=fake_logits)
        loss = loss + bcr
        logs["loss/bcr"] = bcr.detach()
    if config.lecam_weight > 0:
        lecam_loss = lecam.penalty(real_logits, fake_logits)  # weighted; anchors averaged over processes
        loss = loss + lecam_loss
        logs["loss/lecam"] = lecam_loss.detach()
    return loss, logs
