"""Every loss of HiT and VQ-HiT training, as small functions the training code assembles.

- GAN: non-saturating logistic loss for D and G.
- R1 on real images, with the paper's convention: `weight * E_x ||grad_x D(x)||^2`, weight 10
  (StyleGAN writes the same penalty as gamma/2 * E||grad||^2, so the paper's 10 is StyleGAN's gamma = 20).
  `R1Schedule` applies it lazily (every k steps with weight * k).
- bCR: balanced consistency regularisation with DiffAugment "color, translation, cutout".
- LeCam: regularisation of D towards moving anchors of its own logits (an option beyond the paper).
- VQ-HiT: L2 reconstruction, a perceptual loss (LPIPS-VGG, or the paper's raw VGG16 feature L2),
  taming's adaptive adversarial weight and a delayed start for the adversarial term. Every squared norm is
  a per-element mean (see "reconstruction" below for why, and what the weights then mean).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed
from .downloads import explain_download_failure
from .errors import NotFoundError, UsageError

# ----------------------------------------------------------------------------------------------- GAN


def d_logistic_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Discriminator loss: mean softplus(-D(x)) + mean softplus(D(G(z)))."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def g_nonsaturating_loss(fake_logits: Tensor) -> Tensor:
    """Non-saturating generator loss: mean softplus(-D(G(z))) = -E[log sigmoid(D(G(z)))]."""
    return F.softplus(-fake_logits).mean()


# ------------------------------------------------------------------------------------------------ R1


def r1_penalty(discriminator: Callable[[Tensor], Tensor], real_images: Tensor, weight: float = 10.0,
               return_logits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """R1 gradient penalty on real images: `weight * E_x ||grad_x D(x)||^2` (the paper's form, weight 10).

    Computed in fp32 with autocast off (fp16/bf16 gradients of gradients are too coarse), with
    create_graph=True so that the penalty trains D. With `return_logits=True` also returns D(x) (fp32),
    so the caller can reuse it for the logistic loss instead of running D on the reals twice.
    """
    x = real_images.detach().float().requires_grad_(True)
    with torch.autocast(x.device.type, enabled=False):
        logits = discriminator(x)
        (grad,) = torch.autograd.grad(logits.float().sum(), x, create_graph=True)
        penalty = weight * grad.square().flatten(1).sum(1).mean()
    return (penalty, logits) if return_logits else penalty


@dataclass
class R1Schedule:
    """Lazy R1: apply the penalty only every `interval` steps, scaled by `interval` to keep its average strength.

    `interval=1` is the paper's every-step R1.
        if schedule.due(step): loss_d = loss_d + r1_penalty(D, reals, schedule.scaled_weight)
    """

    weight: float = 10.0
    interval: int = 1

    def __post_init__(self):
        if int(self.interval) != self.interval or self.interval < 1:
            raise ValueError(f"R1 interval must be a positive int, got {self.interval}")
        if self.weight < 0:
            raise ValueError(f"R1 weight must be >= 0, got {self.weight}")

    def due(self, step: int) -> bool:
        return self.weight > 0 and step % self.interval == 0

    @property
    def scaled_weight(self) -> float:
        return self.weight * self.interval


# ---------------------------------------------------------------------------------------- DiffAugment
# Zhao et al., "Differentiable Augmentation for Data-Efficient GAN Training" (2020): every image of the
# batch draws its own parameters; all ops are differentiable in the images and vectorised over the batch.

AUGMENTATIONS = ("color", "translation", "cutout")


def _uniform(x: Tensor, low: float, high: float, generator: torch.Generator | None) -> Tensor:
    """One U(low, high) number per image, shaped (B, 1, 1, 1) to broadcast."""
    device = generator.device if generator is not None else x.device
    u = torch.rand(x.shape[0], 1, 1, 1, generator=generator, device=device)
    return (low + (high - low) * u).to(device=x.device, dtype=x.dtype)


def _randint(low: int, high: int, n: int, x: Tensor, generator: torch.Generator | None) -> Tensor:
    """n integers uniform in [low, high] (inclusive), on x's device."""
    device = generator.device if generator is not None else x.device
    return torch.randint(low, high + 1, (n,), generator=generator, device=device).to(x.device)


def augment_color(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Brightness + U(-0.5, 0.5); saturation x U(0, 2) around each pixel's channel mean;
    contrast x U(0.5, 1.5) around the image mean."""
    x = x + _uniform(x, -0.5, 0.5, generator)
    pixel_mean = x.mean(dim=1, keepdim=True)
    x = (x - pixel_mean) * _uniform(x, 0.0, 2.0, generator) + pixel_mean
    image_mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - image_mean) * _uniform(x, 0.5, 1.5, generator) + image_mean


def augment_translation(x: Tensor, generator: torch.Generator | None = None, ratio: float = 0.125) -> Tensor:
    """Shift each image by an integer (dy, dx), |d| <= floor(size * ratio + 0.5); vacated pixels become 0."""
    b, c, h, w = x.shape
    max_dy, max_dx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = _randint(-max_dy, max_dy, b, x, generator)
    dx = _randint(-max_dx, max_dx, b, x, generator)
    # out[i, j] = x[i - dy, j - dx] where that source pixel exists, else 0.
    src_rows = torch.arange(h, device=x.device)[None, :] - dy[:, None]          # (B, H)
    src_cols = torch.arange(w, device=x.device)[None, :] - dx[:, None]          # (B, W)
    inside = ((src_rows >= 0) & (src_rows < h))[:, :, None] & ((src_cols >= 0) & (src_cols < w))[:, None, :]
    src = src_rows.clamp(0, h - 1)[:, :, None] * w + src_cols.clamp(0, w - 1)[:, None, :]  # (B, H, W)
    out = x.reshape(b, c, h * w).gather(2, src.reshape(b, 1, h * w).expand(b, c, h * w))
    return out.view(b, c, h, w) * inside[:, None].to(x.dtype)


def augment_cutout(x: Tensor, generator: torch.Generator | None = None, ratio: float = 0.5) -> Tensor:
    """Zero one square of side floor(size * ratio + 0.5) per image, centred at a uniformly random pixel
    (clipped where it crosses the border)."""
    b, _, h, w = x.shape
    size_h, size_w = int(h * ratio + 0.5), int(w * ratio + 0.5)
    top = _randint(0, h - 1, b, x, generator) - size_h // 2
    left = _randint(0, w - 1, b, x, generator) - size_w // 2
    rows = torch.arange(h, device=x.device)[None, :]
    cols = torch.arange(w, device=x.device)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + size_h)          # (B, H)
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + size_w)        # (B, W)
    keep = ~(in_rows[:, :, None] & in_cols[:, None, :])
    return x * keep[:, None].to(x.dtype)


_AUGMENT_OPS = {"color": augment_color, "translation": augment_translation, "cutout": augment_cutout}


def diff_augment(x: Tensor, policy: str | tuple[str, ...] = AUGMENTATIONS,
                 generator: torch.Generator | None = None) -> Tensor:
    """DiffAugment of a batch (B, C, H, W): the ops of `policy` ("color,translation,cutout" or a tuple) in order,
    each image with its own random parameters. Pass a `torch.Generator` for reproducible draws."""
    ops = tuple(p.strip() for p in policy.split(",") if p.strip()) if isinstance(policy, str) else tuple(policy)
    unknown = [op for op in ops if op not in _AUGMENT_OPS]
    if unknown:
        raise ValueError(f"unknown DiffAugment op(s) {unknown}; choose from {AUGMENTATIONS}")
    if x.ndim != 4:
        raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
    for op in ops:
        x = _AUGMENT_OPS[op](x, generator)
    return x


# ------------------------------------------------------------------------------------------------ bCR


def bcr_loss(real_logits: Tensor, real_aug_logits: Tensor, fake_logits: Tensor, fake_aug_logits: Tensor,
             weight: float = 10.0) -> Tensor:
    """Balanced consistency regularisation: weight * [MSE(D(x), D(T(x))) + MSE(D(G(z)), D(T(G(z))))].

    Added to the D loss only. Both logits of each pair carry gradient to D (as in Zhao et al. 2021).
    """
    return weight * (F.mse_loss(real_logits, real_aug_logits) + F.mse_loss(fake_logits, fake_aug_logits))


def bcr_penalty(discriminator: Callable[[Tensor], Tensor], real_images: Tensor, fake_images: Tensor,
                weight: float = 10.0, real_logits: Tensor | None = None, fake_logits: Tensor | None = None,
                policy: str | tuple[str, ...] = AUGMENTATIONS, generator: torch.Generator | None = None) -> Tensor:
    """bCR from the batches: augments detached copies of the images, runs D, and calls `bcr_loss`.

    Pass the logits D already produced for this D step (`real_logits`, `fake_logits`) to save two forwards.
    """
    real_images, fake_images = real_images.detach(), fake_images.detach()  # no gradient to G through bCR
    if real_logits is None:
        real_logits = discriminator(real_images)
    if fake_logits is None:
        fake_logits = discriminator(fake_images)
    real_aug_logits = discriminator(diff_augment(real_images, policy, generator))
    fake_aug_logits = discriminator(diff_augment(fake_images, policy, generator))
    return bcr_loss(real_logits, real_aug_logits, fake_logits, fake_aug_logits, weight)


# ---------------------------------------------------------------------------------------------- LeCam


class LeCam:
    """LeCam regularisation of the discriminator (Tseng et al., "Regularizing Generative Adversarial Networks
    under Limited Data", CVPR 2021), as their official release computes it:

        weight * ( mean relu(D(x) - a_fake)^2  +  mean relu(a_real - D(G(z)))^2 )

    a_real and a_fake are exponential moving averages (decay 0.99, zero-debiased) of D's mean logit on real
    and fake batches, updated with the current batch before the penalty, as the release does. It pulls the
    real logits down towards where fakes used to score, and fake logits up towards where reals used to score,
    which keeps D from running away on a small dataset. The paper's Eq. 3 writes the squares without the
    relu; the two agree whenever D scores reals above the fake anchor and fakes below the real anchor.

    Under torch.distributed the batch means are averaged over processes before entering the averages, so
    every process holds the same anchors (the release's MEAN-aggregated variables): `penalty` is then a
    collective, called by every process in each D step. Add the result to the D loss only. Save
    `state_dict()` with the checkpoint so that a resumed run continues with the same anchors.
    """

    def __init__(self, weight: float, decay: float = 0.99):
        if weight < 0 or not 0.0 <= decay < 1.0:
            raise ValueError(f"LeCam needs weight >= 0 and 0 <= decay < 1, got weight {weight} and decay {decay}")
        self.weight, self.decay = weight, decay
        self.real_average, self.fake_average, self.updates = 0.0, 0.0, 0  # biased EMAs and their count

    @property
    def anchors(self) -> tuple[float, float]:
        """(a_real, a_fake): the zero-debiased averages, i.e. EMA / (1 - decay^updates)."""
        if self.updates == 0:
            raise RuntimeError("LeCam anchors are defined after the first penalty() call")
        debias = 1.0 - self.decay ** self.updates
        return self.real_average / debias, self.fake_average / debias

    def update(self, real_logits: Tensor, fake_logits: Tensor) -> None:
        """Move the averages towards this step's mean logits (averaged over processes)."""
        means = distributed.reduce_scalars({"real": real_logits.detach().float().mean(),
                                            "fake": fake_logits.detach().float().mean()})
        self.real_average = self.decay * self.real_average + (1.0 - self.decay) * means["real"]
        self.fake_average = self.decay * self.fake_average + (1.0 - self.decay) * means["fake"]
        self.updates += 1

    def penalty(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        """Update the anchors with this batch, then return the weighted penalty (gradient to both logits)."""
        self.update(real_logits, fake_logits)
        real_anchor, fake_anchor = self.anchors
        return self.weight * (F.relu(real_logits.float() - fake_anchor).square().mean()
                              + F.relu(real_anchor - fake_logits.float()).square().mean())

    def state_dict(self) -> dict:
        return {"real_average": self.real_average, "fake_average": self.fake_average, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.real_average, self.fake_average = float(state["real_average"]), float(state["fake_average"])
        self.updates = int(state["updates"])


# ------------------------------------------------------------------------------------ reconstruction
# One reduction for the whole VQ-HiT objective (the paper's Eq. 5): every squared norm is a per-element mean.
#   pixel term       ||x - x_hat||^2      -> mean over the B*3*H*W pixel values
#   feature term     ||F(x) - F(x_hat)||^2 -> mean over all B*N_F feature values (five VGG taps together)
#   codebook/commit  ||sg[z] - e||^2 ...   -> mean over the B*h*w*D code values (the quantizer)
#   adversarial      -E[log D(x_hat)]      -> mean over the B images of one logit each
# Why means: with per-image sums the pixel term at 256^2 is 196,608 times larger, and the paper's
# lambda2 = 0.1 on the adversarial term (and beta = 0.25 on the commitment) would weigh ~1e-6 of the
# objective; the paper's other weights only mean something beside per-element means, which is also how the
# TF tokenizer codebases of the same group (ViT-VQGAN, MaskGIT) reduce, and what makes a weight independent
# of the resolution. lambda1 = 5e-5 then weighs the mean squared raw VGG activation difference against the
# mean squared pixel difference: were F the identity, the feature term would equal the pixel term
# (tests/test_losses.py derives the ratio of the two terms from these definitions).
# LPIPS is a per-image spatial mean already (about 0.1-0.5 for reconstructions, against a pixel MSE of about
# 0.01 on [-1, 1]): weight 1 beside this pixel mean is taming's balance (taming: pixel L1 mean + 1.0 * LPIPS).


def l2_reconstruction_loss(x: Tensor, x_hat: Tensor) -> Tensor:
    """||x - x_hat||^2 as a per-element mean (the reduction convention above)."""
    if x.shape != x_hat.shape:
        raise ValueError(f"x and x_hat must have the same shape, got {tuple(x.shape)} and {tuple(x_hat.shape)}")
    return (x - x_hat).square().mean()


# ---------------------------------------------------------------------------------------- perceptual

PERCEPTUAL_KINDS = ("lpips", "vgg_l2")
VGG_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")  # LPIPS-VGG's five taps


def load_vgg16_features(vgg_weights_path: str | None = None) -> dict[str, Tensor]:
    """The ImageNet VGG16 state dict of torchvision: from `vgg_weights_path` (a torchvision `vgg16`
    state dict, e.g. `vgg16-397923af.pth`) or, when None, downloaded through torchvision's cache."""
    if vgg_weights_path is not None:
        if not os.path.isfile(vgg_weights_path):
            raise _no_vgg_file(vgg_weights_path)
        state = torch.load(vgg_weights_path, map_location="cpu", weights_only=True)
    else:
        from torchvision.models import VGG16_Weights
        with explain_download_failure(*VGG_DOWNLOAD):
            state = VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
    return {k: v for k, v in state.items() if k.startswith("features.")}


# What the VGG16 download is, and how to do without it (`explain_download_failure`'s two arguments).
VGG_DOWNLOAD = ("torchvision's ImageNet VGG16 weights (vgg16-397923af.pth)",
                "PerceptualLoss(vgg_weights_path=...), or --vgg-weights PATH in training (or --perceptual none)")


def _no_vgg_file(path) -> NotFoundError:
    return NotFoundError(f"--vgg-weights {path}: no such file; pass a torchvision vgg16 state dict "
                         f"(e.g. vgg16-397923af.pth)")


@torch.no_grad()
def _copy_vgg_weights(module: nn.Module, state: dict[str, Tensor], key_of: Callable[[str], str]) -> None:
    """Copy torchvision VGG16 weights into `module`; `key_of` maps a parameter name to its "features.N.*" key."""
    for name, param in module.named_parameters():
        key = key_of(name)
        if key not in state or state[key].shape != param.shape:
            raise UsageError(f"the VGG16 weights lack {key!r} of shape {tuple(param.shape)}; pass a torchvision "
                             "vgg16 state dict (e.g. vgg16-397923af.pth)")
        param.copy_(state[key])


class VGG16Features(nn.Module):
    """torchvision's VGG16 convolutional trunk (up to relu5_3), returning LPIPS' five taps `VGG_LAYERS`.

    Built from torchvision's layer recipe without the 120M-parameter classifier; `features.N` keeps
    torchvision's names, so a torchvision vgg16 state dict loads as it is.
    """

    TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2 ... relu5_3 in torchvision's vgg16().features

    def __init__(self):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers
        self.features = make_layers(cfgs["D"])[: self.TAPS[-1] + 1]

    def forward(self, x: Tensor) -> list[Tensor]:
        taps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.TAPS:
                taps.append(x)
        return taps


class PerceptualLoss(nn.Module):
    """Perceptual distance between image batches in [-1, 1], averaged over the batch. Frozen, always eval.

    kind="lpips": LPIPS-VGG (`lpips.LPIPS(net="vgg")`), the perceptual loss of taming and modern tokenizers;
        use it with weight ~1. Its calibrated linear heads ship with the `lpips` package.
    kind="vgg_l2": the paper's raw-feature loss ||F(x) - F(x_hat)||^2 on the same backbone, F the five
        layers relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of torchvision's VGG16 (after LPIPS' input scaling)
        taken together, reduced like the pixel term: the mean over all B*N_F feature values (N_F = 8.0M per
        256^2 image, 52% of them in relu1_2). Use it with the paper's lambda1 = 5e-5, applied by the caller.

    pretrained: load ImageNet VGG16 weights, from `vgg_weights_path` if given, else via torchvision's
        download. pretrained=False keeps a random backbone (tests, offline smoke runs).
    """

    def __init__(self, kind: str = "lpips", pretrained: bool = True, vgg_weights_path: str | None = None):
        super().__init__()
        if kind not in PERCEPTUAL_KINDS:
            raise ValueError(f"unknown perceptual loss {kind!r}; choose one of {PERCEPTUAL_KINDS}")
        import lpips  # deferred: only training needs it

        self.kind = kind
        with warnings.catch_warnings():  # lpips calls torchvision's deprecated `pretrained=` argument
            warnings.simplefilter("ignore", UserWarning)
            if kind == "lpips":
                # pnet_rand: we load the backbone ourselves, so the download path and the local path are one.
                self.lpips = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
            else:
                self.scaling = lpips.ScalingLayer()  # [-1, 1] -> ImageNet-normalised input, as LPIPS
                self.vgg = VGG16Features()
        if pretrained:
            state = load_vgg16_features(vgg_weights_path)
            if kind == "lpips":  # lpips keeps torchvision's indices inside slice1..5: "slice2.5.weight"
                _copy_vgg_weights(self.lpips.net, state, lambda name: "features." + name.split(".", 1)[1])
            else:
                _copy_vgg_weights(self.vgg, state, lambda name: name)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "PerceptualLoss":
        return super().train(False)  # frozen network: no dropout, whatever the parent module's mode

    def forward(self, x: Tensor, x_hat: Tensor) -> Tensor:
        if x.shape != x_hat.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected two RGB batches (B, 3, H, W) of one shape, got {tuple(x.shape)} and "
                             f"{tuple(x_hat.shape)}")
        if self.kind == "lpips":
            return self.lpips(x, x_hat).mean()
        features, features_hat = self.vgg(self.scaling(x)), self.vgg(self.scaling(x_hat))
        squared = sum((f - f_hat).square().sum() for f, f_hat in zip(features, features_hat))
        return squared / sum(f.numel() for f in features)  # one mean over the five taps together


# ------------------------------------------------------------------------------- adversarial weight


def adaptive_adversarial_weight(rec_loss: Tensor, adv_loss: Tensor, last_layer_weight: Tensor,
                                max_weight: float = 1e4, eps: float = 1e-4) -> Tensor:
    """taming's adaptive weight ||grad_W rec_loss|| / (||grad_W adv_loss|| + eps), clamped to [0, max_weight]
    and detached; W is the decoder's last layer weight. Multiply by the adversarial weight (lambda2)."""
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer_weight, retain_graph=True)
    (adv_grad,) = torch.autograd.grad(adv_loss, last_layer_weight, retain_graph=True)
    return (rec_grad.norm() / (adv_grad.norm() + eps)).clamp(0.0, max_weight).detach()


def delayed_weight(step: int, start_step: int, weight: float) -> float:
    """`weight` from `start_step` on, 0 before: a delayed start for the adversarial term."""
    return weight if step >= start_step else 0.0
