"""Discriminator: exact parameter counts, blur kernel, shapes, init, input checks."""
import math

import pytest
import torch
import torch.nn.functional as F

from vqhit.models.discriminator import BlurDown2, Discriminator, DiscriminatorBlock, discriminator_channels


def count(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("resolution, multiplier, expected", [
    (128, 1, 23_880_833), (256, 2, 28_862_593), (1024, 2, 29_008_673), (256, 1, 23_998_017)])
def test_exact_parameter_counts(resolution, multiplier, expected):
    with torch.device("meta"):  # no memory, no init cost
        model = Discriminator(resolution, channel_multiplier=multiplier)
    assert count(model) == expected


def test_channel_table_and_block_layout():
    assert [discriminator_channels(r, 2) for r in (4, 8, 16, 32, 64, 128, 256, 512, 1024)] == \
        [512, 512, 512, 512, 512, 256, 128, 64, 32]
    with torch.device("meta"):
        model = Discriminator(256, channel_multiplier=2)
    assert len(model.blocks) == 6  # 256 -> 4 in six halvings
    assert model.from_rgb.out_channels == 128
    assert [(b.conv1.in_channels, b.conv2.out_channels) for b in model.blocks] == \
        [(128, 256), (256, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
    assert model.blocks[0].skip.bias is None and model.blocks[0].skip.kernel_size == (1, 1)
    assert model.head_fc.in_features == 512 * 4 * 4 and model.head_out.out_features == 1


def test_blur_down_is_the_fixed_binomial_kernel():
    blur = BlurDown2(2)
    assert not list(blur.parameters())  # a buffer, not a parameter
    x = torch.randn(1, 2, 8, 8)
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
    kernel = (taps[:, None] * taps[None, :] / 64).expand(2, 1, 4, 4)
    expected = F.conv2d(F.pad(x, (1, 1, 1, 1)), kernel, stride=2, groups=2)
    torch.testing.assert_close(blur(x), expected)
    assert blur(x).shape == (1, 2, 4, 4)
    # Each channel is filtered on its own, and a constant image stays constant away from the zero padding.
    ones = torch.ones(1, 2, 8, 8)
    torch.testing.assert_close(blur(ones)[..., 1:-1, 1:-1], torch.ones(1, 2, 2, 2))


def lrelu(x):
    return torch.where(x >= 0, x, 0.2 * x)


def blur_down(x):
    """BlurDown2 written out: depthwise [1,3,3,1]x[1,3,3,1]/64, zero padding 1, stride 2."""
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=x.dtype)
    kernel = (taps[:, None] * taps[None, :] / 64).expand(x.shape[1], 1, 4, 4)
    return F.conv2d(F.pad(x, (1, 1, 1, 1)), kernel, stride=2, groups=x.shape[1])


def test_residual_block_follows_the_spec_equations():
    """main = lrelu(Conv3x3(BlurDown2(lrelu(Conv3x3(x))))), skip = Conv1x1(BlurDown2(x)) without bias,
    out = (main + skip) / sqrt(2); written with functional ops and the block's weights only."""
    torch.manual_seed(0)
    block = DiscriminatorBlock(4, 6).double()
    for p in block.parameters():  # non-zero biases too, so a dropped or misplaced bias shows
        torch.nn.init.normal_(p)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    main = lrelu(F.conv2d(x, block.conv1.weight, block.conv1.bias, padding=1))
    main = lrelu(F.conv2d(blur_down(main), block.conv2.weight, block.conv2.bias, padding=1))
    assert block.skip.bias is None and block.skip.weight.shape == (6, 4, 1, 1)
    skip = F.conv2d(blur_down(x), block.skip.weight)
    out = block(x)
    assert out.shape == (2, 6, 4, 4)
    torch.testing.assert_close(out, (main + skip) / math.sqrt(2))


def test_forward_shape_init_and_gradient():
    torch.manual_seed(0)
    model = Discriminator(8)  # smallest size: one block, fast on CPU
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            fan_in = module.weight[0].numel()
            fan_out = module.weight.shape[0] * module.weight[0, 0].numel()
            bound = math.sqrt(6 / (fan_in + fan_out))  # xavier-uniform bound
            assert module.weight.abs().max() <= bound and module.weight.abs().max() > 0.5 * bound
            if module.bias is not None:
                assert torch.count_nonzero(module.bias) == 0
    x = torch.randn(3, 3, 8, 8, requires_grad=True)
    logits = model(x)
    assert logits.shape == (3,)
    logits.sum().backward()
    assert x.grad.abs().sum() > 0
    # Images are scored independently (no batch coupling without minibatch-stddev).
    torch.testing.assert_close(model(x[:1]), logits[:1])


def test_small_resolutions_for_tiny_presets():
    with torch.device("meta"):
        for resolution in (32, 64):
            model = Discriminator(resolution)
            assert len(model.blocks) == int(math.log2(resolution)) - 2
            assert model.from_rgb.out_channels == discriminator_channels(resolution)
            assert model(torch.empty(2, 3, resolution, resolution)).shape == (2,)


def test_minibatch_stddev_option():
    torch.manual_seed(0)
    plain = Discriminator(8)
    with_std = Discriminator(8, minibatch_stddev=True)
    assert count(with_std) - count(plain) == 512 * 9  # one extra input channel of the head conv
    x = torch.randn(6, 3, 8, 8)  # 6 is not a multiple of 4: groups shrink to gcd(4, 6) = 2
    assert with_std(x).shape == (6,)
    # StyleGAN groups strided images: with groups of 2 out of 6, image 0 shares its group with image 3 only.
    in_group, other_group = x.clone(), x.clone()
    in_group[3] += 5
    other_group[1] += 5
    assert not torch.allclose(with_std(in_group)[0], with_std(x)[0])
    torch.testing.assert_close(with_std(other_group)[0], with_std(x)[0])


def test_bad_input_raises():
    model = Discriminator(8)
    with pytest.raises(ValueError, match="resolution"):
        model(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="resolution"):
        model(torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="power of two"):
        Discriminator(96)
    with pytest.raises(ValueError, match="power of two"):
        Discriminator(2048)


def test_max_channels_caps_every_width_for_tiny_presets():
    capped = Discriminator(32, max_channels=64)
    widths = {m.out_channels for m in capped.modules() if isinstance(m, torch.nn.Conv2d)}
    assert max(widths) == 64 and capped.head_fc.in_features == 64 * 16
    assert capped(torch.randn(2, 3, 32, 32)).shape == (2,)
    # the default cap (512) is the paper's table: the count is unchanged
    with torch.device("meta"):
        assert sum(p.numel() for p in Discriminator(128, max_channels=512).parameters()) == 23_880_833
