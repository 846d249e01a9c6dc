"""Losses: GAN losses, R1 and its lazy schedule, DiffAugment and bCR, reconstruction,
perceptual losses (random backbones, offline), adaptive adversarial weight, LeCam.
LeCam across processes: tests/test_distributed.py."""
import copy
import math

import pytest
import torch
from torch import nn

from vqhit.losses import (LeCam, R1Schedule, PerceptualLoss, adaptive_adversarial_weight, augment_color, augment_cutout,
                          augment_translation, bcr_loss, bcr_penalty, d_logistic_loss, delayed_weight, diff_augment,
                          g_nonsaturating_loss, l2_reconstruction_loss, r1_penalty)


class LinearD(nn.Module):
    """D(x) = sum(w * x) + bias: its input gradient is w for every image."""

    def __init__(self, shape):
        super().__init__()
        self.w = nn.Parameter(torch.randn(shape))
        self.bias = nn.Parameter(torch.tensor(0.3))

    def forward(self, x):
        return (x * self.w).flatten(1).sum(1) + self.bias


class QuadraticD(nn.Module):
    """D(x) = sum(a * x^2): input gradient 2 a x, so R1 = weight * mean_i sum (2 a x_i)^2."""

    def __init__(self, shape):
        super().__init__()
        self.a = nn.Parameter(torch.rand(shape))

    def forward(self, x):
        return (self.a * x.square()).flatten(1).sum(1)


# ------------------------------------------------------------------------------------------- GAN


def test_gan_losses_match_their_log_sigmoid_forms():
    real, fake = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([-3.0, 0.2, 1.0])
    expected_d = -torch.log(torch.sigmoid(real)).mean() - torch.log(1 - torch.sigmoid(fake)).mean()
    torch.testing.assert_close(d_logistic_loss(real, fake), expected_d)
    torch.testing.assert_close(g_nonsaturating_loss(fake), -torch.log(torch.sigmoid(fake)).mean())


# -------------------------------------------------------------------------------------------- R1


def test_r1_equals_closed_form_for_a_linear_discriminator():
    torch.manual_seed(0)
    d = LinearD((3, 4, 4))
    x = torch.randn(5, 3, 4, 4)
    penalty = r1_penalty(d, x, weight=10.0)
    torch.testing.assert_close(penalty, 10.0 * d.w.detach().square().sum())


def test_r1_trains_the_discriminator_and_returns_logits():
    torch.manual_seed(0)
    d = QuadraticD((2, 3, 3))
    x = torch.randn(4, 2, 3, 3)
    penalty, logits = r1_penalty(d, x, weight=2.0, return_logits=True)
    a = d.a.detach()
    torch.testing.assert_close(penalty, 2.0 * (2 * a * x).square().flatten(1).sum(1).mean())
    torch.testing.assert_close(logits, d(x))
    penalty.backward()  # create_graph=True: the penalty has a gradient w.r.t. D's parameters
    torch.testing.assert_close(d.a.grad, 2.0 * (8 * a * x.square()).mean(0))


def test_r1_runs_in_fp32_under_autocast():
    seen = []

    class Probe(LinearD):
        def forward(self, x):
            out = super().forward(x @ torch.eye(x.shape[-1]))  # a matmul autocast would run in bf16
            seen.append(out.dtype)
            return out

    d = Probe((1, 2, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        penalty = r1_penalty(d, torch.randn(2, 1, 2, 2).bfloat16())
    assert seen == [torch.float32] and penalty.dtype == torch.float32


def test_lazy_r1_schedule():
    schedule = R1Schedule(weight=10.0, interval=4)
    assert [s for s in range(10) if schedule.due(s)] == [0, 4, 8]
    assert schedule.scaled_weight == 40.0
    every_step = R1Schedule(weight=10.0)
    assert all(every_step.due(s) for s in range(5)) and every_step.scaled_weight == 10.0
    assert not any(R1Schedule(weight=0.0).due(s) for s in range(3))
    with pytest.raises(ValueError, match="interval"):
        R1Schedule(10.0, interval=0)


# ------------------------------------------------------------------------------------ DiffAugment


def test_diff_augment_keeps_shape_is_reproducible_and_differs_per_image():
    x = torch.rand(6, 3, 16, 16) * 2 - 1
    out1 = diff_augment(x, generator=torch.Generator().manual_seed(0))
    out2 = diff_augment(x, "color,translation,cutout", generator=torch.Generator().manual_seed(0))
    out3 = diff_augment(x, generator=torch.Generator().manual_seed(1))
    assert out1.shape == x.shape
    assert torch.equal(out1, out2)
    assert not torch.equal(out1, out3)
    # The same image repeated gets a different augmentation in every slot.
    same = x[:1].expand(6, -1, -1, -1)
    augmented = diff_augment(same, generator=torch.Generator().manual_seed(2))
    assert all(not torch.equal(augmented[i], augmented[j]) for i in range(6) for j in range(i))


def test_color_ranges():
    torch.manual_seed(0)
    x = torch.rand(256, 3, 4, 4)
    brightness_only = augment_color(x, torch.Generator().manual_seed(3)) - x
    # Brightness is one shift per image in (-0.5, 0.5); saturation/contrast keep the image mean,
    # so mean(out) - mean(x) is exactly the brightness shift.
    shift = brightness_only.mean(dim=(1, 2, 3))
    assert shift.abs().max() < 0.5 and shift.min() < -0.3 and shift.max() > 0.3
    gray = torch.rand(8, 1, 4, 4).expand(8, 3, 4, 4)  # saturation has no effect on gray images
    out = augment_color(gray, torch.Generator().manual_seed(4))
    torch.testing.assert_close(out[:, 0], out[:, 1])
    torch.testing.assert_close(out[:, 0], out[:, 2])


def test_translation_is_an_integer_shift_with_zero_fill():
    size = 16
    max_shift = math.floor(size / 8 + 0.5)  # 2
    x = torch.arange(1, size * size + 1, dtype=torch.float32).view(1, 1, size, size).repeat(64, 2, 1, 1)
    out = augment_translation(x, torch.Generator().manual_seed(0))
    shifts = []
    for i in range(x.shape[0]):  # test-side brute force: which shift reproduces image i?
        matches = []
        for dy in range(-max_shift, max_shift + 1):
            for dx in range(-max_shift, max_shift + 1):
                shifted = torch.zeros(size + 2 * max_shift, size + 2 * max_shift)
                shifted[max_shift + dy:max_shift + dy + size, max_shift + dx:max_shift + dx + size] = x[i, 0]
                expected = shifted[max_shift:max_shift + size, max_shift:max_shift + size]
                if torch.equal(out[i, 0], expected) and torch.equal(out[i, 1], expected):
                    matches.append((dy, dx))
        assert len(matches) == 1
        dy, dx = matches[0]
        zeros = int((out[i, 0] == 0).sum())
        assert zeros == size * size - (size - abs(dy)) * (size - abs(dx))
        shifts.append(matches[0])
    assert len(set(shifts)) > 10  # per-image shifts spread over the (2*2+1)^2 = 25 possibilities
    assert {abs(dy) for dy, _ in shifts} == {0, 1, 2}


def test_cutout_zeros_one_clipped_square():
    size = 16
    side = math.floor(size / 2 + 0.5)  # 8
    x = torch.ones(64, 3, size, size)
    out = augment_cutout(x, torch.Generator().manual_seed(0))
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])  # same mask for all channels
    full_squares = 0
    for mask in out[:, 0] == 0:
        rows, cols = mask.any(1).nonzero().squeeze(1), mask.any(0).nonzero().squeeze(1)
        height, width = len(rows), len(cols)
        assert 0 < height <= side and 0 < width <= side
        assert int(mask.sum()) == height * width  # a filled rectangle: one square, clipped at the border
        assert rows[-1] - rows[0] + 1 == height and cols[-1] - cols[0] + 1 == width
        touches_border = rows[0] == 0 or rows[-1] == size - 1 or cols[0] == 0 or cols[-1] == size - 1
        if not touches_border:
            assert height == width == side
        full_squares += int(height == width == side)
    assert full_squares > 0


def test_diff_augment_is_differentiable_and_checks_its_input():
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    diff_augment(x, generator=torch.Generator().manual_seed(0)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unknown DiffAugment"):
        diff_augment(x, "color,flip")


# ------------------------------------------------------------------------------------------- bCR


def test_bcr_loss_and_penalty():
    real, real_aug = torch.tensor([1.0, 2.0]), torch.tensor([1.5, 1.0])
    fake, fake_aug = torch.tensor([0.0, -1.0]), torch.tensor([0.0, 1.0])
    expected = 10 * (((0.25 + 1.0) / 2) + ((0 + 4.0) / 2))
    torch.testing.assert_close(bcr_loss(real, real_aug, fake, fake_aug), torch.tensor(expected))

    torch.manual_seed(0)
    d = LinearD((3, 8, 8))
    reals = torch.rand(4, 3, 8, 8)
    fakes = torch.rand(4, 3, 8, 8, requires_grad=True)  # stands for G's output
    loss = bcr_penalty(d, reals, fakes, weight=10.0, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # same draws, same order: reals then fakes
    expected = bcr_loss(d(reals), d(diff_augment(reals, generator=g)), d(fakes.detach()),
                        d(diff_augment(fakes.detach(), generator=g)), 10.0)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert fakes.grad is None  # images are detached: bCR trains D only
    assert d.w.grad is not None and d.w.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ reconstruction


def test_l2_reconstruction_loss_is_a_per_element_mean():
    x, x_hat = torch.zeros(2, 3, 2, 2), torch.ones(2, 3, 2, 2)
    x_hat[1] = 3.0
    torch.testing.assert_close(l2_reconstruction_loss(x, x_hat), torch.tensor((1.0 + 9.0) / 2))
    # Independent of the resolution: the same per-pixel error at 4x the pixels gives the same loss.
    big = torch.nn.functional.interpolate(x_hat, scale_factor=2.0)
    torch.testing.assert_close(l2_reconstruction_loss(torch.zeros_like(big), big), torch.tensor(5.0))
    with pytest.raises(ValueError, match="same shape"):
        l2_reconstruction_loss(x, x_hat[:1])


# ------------------------------------------------------------------------------------ perceptual


VGG_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's vgg16().features


@pytest.fixture(scope="module")
def vgg_reference(tmp_path_factory):
    """A random torchvision VGG16 trunk, and its state dict saved as a local weights file."""
    from torchvision.models.vgg import cfgs, make_layers
    torch.manual_seed(0)
    features = make_layers(cfgs["D"]).eval()
    path = tmp_path_factory.mktemp("vgg") / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return features, str(path)


@pytest.fixture(scope="module")
def perceptual_losses(vgg_reference):
    _, path = vgg_reference
    return {kind: PerceptualLoss(kind, vgg_weights_path=path) for kind in ("lpips", "vgg_l2")}


@pytest.mark.parametrize("kind", ["lpips", "vgg_l2"])
def test_perceptual_loss_is_frozen_and_behaves_like_a_distance(kind, perceptual_losses):
    torch.manual_seed(0)
    loss_fn = perceptual_losses[kind]
    assert all(not p.requires_grad for p in loss_fn.parameters())
    nn.Sequential(loss_fn).train()  # a parent's .train() must not switch it out of eval (dropout in LPIPS)
    assert not any(m.training for m in loss_fn.modules())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    x_hat = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    assert loss_fn(x, x).item() == pytest.approx(0.0, abs=1e-6)
    near = loss_fn(x, (x + 0.05 * torch.randn_like(x)))
    far = loss_fn(x, x_hat)
    assert far.ndim == 0 and far > near > 0
    far.backward()
    assert x_hat.grad is not None and x_hat.grad.abs().sum() > 0


def test_weights_file_loads_into_both_backbones(vgg_reference, perceptual_losses):
    features, _ = vgg_reference
    torch.testing.assert_close(perceptual_losses["vgg_l2"].vgg.features[14].weight, features[14].weight)
    lpips_slice5 = perceptual_losses["lpips"].lpips.net.slice5
    torch.testing.assert_close(getattr(lpips_slice5, "28").bias, features[28].bias)


def test_vgg_l2_is_the_raw_feature_distance_at_the_five_lpips_layers(vgg_reference, perceptual_losses):
    features, _ = vgg_reference
    loss_fn = perceptual_losses["vgg_l2"]
    torch.manual_seed(1)
    x, x_hat = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)  # LPIPS' input scaling
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(img):
        out, h = [], (img - shift) / scale
        for i, layer in enumerate(features[:VGG_TAPS[-1] + 1]):
            h = layer(h)
            if i in VGG_TAPS:
                out.append(h.clone())
        return out

    with torch.no_grad():
        a, b = taps(x), taps(x_hat)
        # ||F(x) - F(x_hat)||^2 over the five taps concatenated, divided by their element count.
        expected = sum((f - g).square().sum() for f, g in zip(a, b)) / sum(f.numel() for f in a)
        torch.testing.assert_close(loss_fn(x, x_hat), expected, rtol=1e-4, atol=1e-6)


class Taps(nn.Module):
    """Known 'features' in place of VGG: the loss's reduction can then be checked by hand."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, img):
        return self.fn(img)


def test_pixel_and_feature_terms_share_one_reduction(perceptual_losses):
    """Eq. 5's two squared norms under one convention: were F the identity, ||F(x) - F(x_hat)||^2 would be
    the pixel term itself, so lambda1 weighs feature differences exactly as the pixel term weighs pixel ones.
    A per-image sum beside a per-element mean would give a ratio of C*H*W instead of 1."""
    loss_fn = copy.deepcopy(perceptual_losses["vgg_l2"])
    loss_fn.scaling, loss_fn.vgg = nn.Identity(), Taps(lambda img: [img])  # F = identity, one "tap"
    torch.manual_seed(2)
    x, x_hat = torch.rand(3, 3, 16, 16) * 2 - 1, torch.rand(3, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(loss_fn(x, x_hat) / l2_reconstruction_loss(x, x_hat), torch.tensor(1.0))
    # Two taps with n1 and n2 values per image: the ratio is the mean over the n1 + n2 values.
    loss_fn.vgg = Taps(lambda img: [img, 2 * img[:, :1]])  # tap 2: channel 0 doubled (4x its squared difference)
    d = (x - x_hat).square()
    expected = (d.sum() + 4 * d[:, :1].sum()) / (d.numel() + d[:, :1].numel())
    torch.testing.assert_close(loss_fn(x, x_hat), expected)
def test_random_backbone_without_weights_file():
    torch.manual_seed(0)
    first = PerceptualLoss("vgg_l2", pretrained=False)
    torch.manual_seed(1)
    second = PerceptualLoss("vgg_l2", pretrained=False)  # no download attempted, a fresh random trunk
    assert not torch.equal(first.vgg.features[0].weight, second.vgg.features[0].weight)


def test_perceptual_bad_arguments(perceptual_losses, tmp_path):
    with pytest.raises(ValueError, match="unknown perceptual"):
        PerceptualLoss("alex", pretrained=False)
    with pytest.raises(ValueError, match="one shape"):
        perceptual_losses["vgg_l2"](torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 16, 16))
    torch.save({"features.0.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="vgg16 state dict"):
        PerceptualLoss("vgg_l2", vgg_weights_path=str(tmp_path / "wrong.pth"))


# ------------------------------------------------------------------------- adversarial weight


def test_adaptive_adversarial_weight_is_the_grad_norm_ratio():
    torch.manual_seed(0)
    last = nn.Parameter(torch.randn(4, 3))
    h = torch.randn(5, 3)
    out = h @ last.t()
    rec_loss = out.square().mean()
    adv_loss = -out.mean() * 0.01
    (rec_grad,) = torch.autograd.grad(rec_loss, last, retain_graph=True)
    (adv_grad,) = torch.autograd.grad(adv_loss, last, retain_graph=True)
    weight = adaptive_adversarial_weight(rec_loss, adv_loss, last)
    torch.testing.assert_close(weight, rec_grad.norm() / (adv_grad.norm() + 1e-4))
    assert not weight.requires_grad
    assert adaptive_adversarial_weight(rec_loss, adv_loss * 1e-12, last, max_weight=7.0) == 7.0
    assert delayed_weight(99, 100, 0.1) == 0.0 and delayed_weight(100, 100, 0.1) == 0.1


# ------------------------------------------------------------------------------------------- LeCam


def test_lecam_penalty_follows_its_formula():
    """weight * (mean relu(D(x) - a_fake)^2 + mean relu(a_real - D(G(z)))^2), anchors = zero-debiased EMAs of
    the mean logits, updated with the current batch first (the official release)."""
    decay, weight = 0.9, 0.5
    lecam = LeCam(weight, decay)
    history = [(torch.tensor([2.0, 0.0]), torch.tensor([-1.0, -3.0])),
               (torch.tensor([3.0, 1.0]), torch.tensor([0.5, -0.5])),
               (torch.tensor([-4.0, 4.0]), torch.tensor([1.0, -2.5]))]
    real_ema = fake_ema = 0.0
    for t, (real, fake) in enumerate(history, start=1):
        penalty = lecam.penalty(real, fake)
        real_ema = decay * real_ema + (1 - decay) * real.mean().item()
        fake_ema = decay * fake_ema + (1 - decay) * fake.mean().item()
        a_real, a_fake = real_ema / (1 - decay ** t), fake_ema / (1 - decay ** t)
        expected = weight * (torch.relu(real - a_fake).square().mean() + torch.relu(a_real - fake).square().mean())
        torch.testing.assert_close(penalty, expected)
        assert lecam.anchors == pytest.approx((a_real, a_fake))
    assert lecam.anchors[0] != pytest.approx(history[-1][0].mean().item())  # a moving average, not the last batch
    # First step: the debiased anchors are exactly that batch's means.
    first = LeCam(1.0, 0.99)
    first.penalty(torch.tensor([1.0, 3.0]), torch.tensor([-2.0]))
    assert first.anchors == pytest.approx((2.0, -2.0))


def test_lecam_gradient_reaches_both_logits_and_state_round_trips():
    lecam = LeCam(1.0, 0.99)
    lecam.penalty(torch.tensor([0.0]), torch.tensor([0.0]))
    real = torch.tensor([1.0, 2.0], requires_grad=True)  # above the fake anchor: pulled down
    fake = torch.tensor([-1.0, -2.0], requires_grad=True)  # below the real anchor: pulled up
    lecam.penalty(real, fake).backward()
    assert (real.grad > 0).all() and (fake.grad < 0).all()

    resumed = LeCam(1.0, 0.99)
    resumed.load_state_dict(lecam.state_dict())
    x, y = torch.tensor([0.3, 1.7]), torch.tensor([-0.2])
    torch.testing.assert_close(resumed.penalty(x, y), lecam.penalty(x, y))
    with pytest.raises(ValueError, match="decay"):
        LeCam(1.0, decay=1.0)
    with pytest.raises(RuntimeError, match="first penalty"):
        LeCam(1.0).anchors
