"""The HiT release's "StyleGAN discriminator": a ResNet of blurred-downsampling residual blocks.

    fromRGB:   Conv3x3(3 -> ch[R]) + LeakyReLU(0.2)
    r = R ... 8:   main = Conv3x3(in -> in), lrelu, BlurDown2, Conv3x3(in -> out), lrelu
                   skip = BlurDown2, Conv1x1(in -> out, no bias)
                   out  = (main + skip) / sqrt(2)
    head at 4x4:   Conv3x3(512 -> 512), lrelu, flatten, Linear(8192 -> 512), lrelu, Linear(512 -> 1)

No minibatch-stddev and no equalized learning rate in the paper configuration; minibatch-stddev is an
off-by-default option (it adds one input channel to the head convolution, so it changes the count).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MIN_RESOLUTION, MAX_RESOLUTION = 8, 1024


def discriminator_channels(resolution: int, channel_multiplier: int = 1, max_channels: int = 512) -> int:
    """Channels of the feature map at `resolution`: 512 up to 32x32, then halving (times the multiplier),
    capped at `max_channels`."""
    table = {64: 256, 128: 128, 256: 64, 512: 32, 1024: 16}
    return min(table[resolution] * channel_multiplier if resolution in table else 512, max_channels)


class BlurDown2(nn.Module):
    """Depthwise [1,3,3,1] x [1,3,3,1] / 64 blur with stride 2, padding 1: halves the size, anti-aliased.

    The kernel is a fixed buffer, not a parameter.
    """

    def __init__(self, channels: int):
        super().__init__()
        taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
        kernel = torch.outer(taps, taps) / 64.0
        self.register_buffer("kernel", kernel.expand(channels, 1, 4, 4).clone(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.kernel.to(x.dtype), stride=2, padding=1, groups=x.shape[1])


class DiscriminatorBlock(nn.Module):
    """Residual block that halves the resolution: (main + skip) / sqrt(2)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.blur = BlurDown2(in_channels)
        self.conv2 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        main = F.leaky_relu(self.conv1(x), 0.2)
        main = F.leaky_relu(self.conv2(self.blur(main)), 0.2)
        skip = self.skip(self.blur(x))
        return (main + skip) * (1.0 / math.sqrt(2.0))


class MinibatchStddev(nn.Module):
    """StyleGAN's minibatch standard deviation: one extra channel holding the mean feature std in a group.

    Groups have min(group_size, B) images, shrunk to a divisor of B (gcd) so any batch size works.
    """

    def __init__(self, group_size: int = 4):
        super().__init__()
        self.group_size = group_size

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        g = math.gcd(self.group_size, b)
        y = x.reshape(g, b // g, c, h, w)
        y = (y.var(dim=0, unbiased=False) + 1e-8).sqrt()      # (B/g, C, H, W): std over each group
        y = y.mean(dim=(1, 2, 3)).view(1, b // g, 1, 1, 1)     # one number per group
        y = y.expand(g, b // g, 1, h, w).reshape(b, 1, h, w)
        return torch.cat([x, y], dim=1)


class Discriminator(nn.Module):
    """Images (B, in_channels, R, R) -> real/fake logits (B,).

    Args:
        resolution: input size R, a power of two in [8, 1024] (8..64 are for tiny CPU presets).
        channel_multiplier: m in the channel table (1 for ImageNet, 2 for faces in the paper).
        in_channels: image channels.
        minibatch_stddev: add StyleGAN's minibatch-stddev channel before the head (off in the paper).
        max_channels: cap on every width, the head's included (512 = the paper). Not in the paper: the tiny
            CPU presets use 64, since the 512-wide table alone costs 21M parameters at 32x32.
    """

    def __init__(self, resolution: int, channel_multiplier: int = 1, in_channels: int = 3,
                 minibatch_stddev: bool = False, max_channels: int = 512):
        super().__init__()
        if not (MIN_RESOLUTION <= resolution <= MAX_RESOLUTION and resolution & (resolution - 1) == 0):
            raise ValueError(f"resolution must be a power of two in [{MIN_RESOLUTION}, {MAX_RESOLUTION}], "
                             f"got {resolution}")
        if channel_multiplier < 1 or in_channels < 1 or max_channels < 1:
            raise ValueError(f"channel_multiplier and in_channels must be positive, got {channel_multiplier} "
                             f"and {in_channels}")
        self.resolution, self.in_channels = resolution, in_channels
        ch = lambda r: discriminator_channels(r, channel_multiplier, max_channels)  # noqa: E731

        self.from_rgb = nn.Conv2d(in_channels, ch(resolution), 3, padding=1)
        self.blocks = nn.ModuleList()
        r = resolution
        while r > 4:
            self.blocks.append(DiscriminatorBlock(ch(r), ch(r // 2)))
            r //= 2
        self.stddev = MinibatchStddev() if minibatch_stddev else None
        head_in = ch(4) + (1 if minibatch_stddev else 0)
        top = ch(4)
        self.head_conv = nn.Conv2d(head_in, top, 3, padding=1)
        self.head_fc = nn.Linear(top * 4 * 4, top)
        self.head_out = nn.Linear(top, 1)

        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        expected = (self.in_channels, self.resolution, self.resolution)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected images of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}; "
                             "resize the images or build Discriminator(resolution=...) for their size")
        x = F.leaky_relu(self.from_rgb(x), 0.2)
        for block in self.blocks:
            x = block(x)
        if self.stddev is not None:
            x = self.stddev(x)
        x = F.leaky_relu(self.head_conv(x), 0.2)
        x = F.leaky_relu(self.head_fc(x.flatten(1)), 0.2)
        return self.head_out(x).squeeze(1)
