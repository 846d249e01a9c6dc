"""The two baseline decoders VQ-HiT is compared against, on the same token grid as the HiT decoder.

    "conv": taming's VQGAN `Decoder` (Esser et al.) behind taming's 1x1 `post_quant_conv` — the paper's
            baseline (Table 2, rFID 8.00 against VQ-HiT's 6.37). With the f16 settings it is exactly taming's
            f16 decoder, so a released taming VQGAN loads into it key for key.
    "vit":  a plain transformer on the token grid (global self-attention, pre-norm LayerNorm blocks, learned
            positions, a linear patch-to-pixels head): the decoder design of ViT-VQGAN, MaskGIT-era and later
            tokenizers. Sized to about the HiT decoder's FLOPs, so the comparison is at equal arithmetic.

Both take quantized codes channels-last, (B, h, w, D), like `HiTDecoder`, and return images (B, 3, R, R),
unbounded (no tanh, as HiT). `last_layer` is the weight the adaptive adversarial weight measures gradients at.
"""
from __future__ import annotations

import contextlib
import io

import torch
import torch.nn.functional as F
from taming.modules.diffusionmodules.model import Decoder as TamingDecoder
from torch import nn

from .layers import trunc_normal_init


class ConvDecoder(TamingDecoder):
    """taming's `post_quant_conv` (code_dim -> z_channels, 1x1) then taming's `Decoder`.

    The parameter names are taming's (`conv_in`, `mid`, `up`, `norm_out`, `conv_out`), so `decoder.*` of a
    taming checkpoint loads directly; taming keeps `post_quant_conv` beside the decoder, we keep it inside
    (`decoder.post_quant_conv`), which `VQHiT.load_taming_checkpoint` maps.
    """

    def __init__(self, code_dim: int, resolution: int, channels: int, channel_mult, num_res_blocks: int,
                 attn_resolutions, z_channels: int):
        bad = [channels * m for m in channel_mult if (channels * m) % 32]
        if bad:  # taming's Normalize is GroupNorm(32 groups)
            raise ValueError(f"conv decoder widths {bad} are not multiples of 32 (taming's GroupNorm has 32 "
                             f"groups); choose conv_decoder_channels and conv_decoder_channel_mult so that "
                             f"channels x mult is a multiple of 32")
        with contextlib.redirect_stdout(io.StringIO()):  # taming prints "Working with z of shape ..." on build
            super().__init__(ch=channels, out_ch=3, ch_mult=tuple(channel_mult), num_res_blocks=num_res_blocks,
                             attn_resolutions=list(attn_resolutions), dropout=0.0, resamp_with_conv=True,
                             in_channels=3, resolution=resolution, z_channels=z_channels)
        self.post_quant_conv = nn.Conv2d(code_dim, z_channels, 1)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return super().forward(self.post_quant_conv(codes.permute(0, 3, 1, 2)))

    @property
    def last_layer(self) -> torch.Tensor:
        return self.conv_out.weight  # taming's VQModel.get_last_layer


class ViTBlock(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), x + MLP(LN(x)); global multi-head self-attention."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.num_heads, c // self.num_heads).unbind(2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + self.proj(out.transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViTDecoder(nn.Module):
    """Codes (B, h, w, D) -> Linear(D -> C) + learned positions -> `depth` ViT blocks over all h*w tokens ->
    LayerNorm -> Linear(C -> p*p*3) per token, unpatchified to (B, 3, h*p, w*p) with p = resolution / grid."""

    def __init__(self, code_dim: int, grid: int, resolution: int, width: int, depth: int, num_heads: int,
                 mlp_ratio: int = 4):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"vit_decoder_width {width} is not divisible by vit_decoder_heads {num_heads}")
        self.patch = resolution // grid
        self.embed = nn.Linear(code_dim, width)
        self.pos_embed = nn.Parameter(torch.empty(1, grid * grid, width))
        self.blocks = nn.ModuleList(ViTBlock(width, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 3 * self.patch ** 2)
        trunc_normal_init(self)  # the same init as the HiT decoder: only the architecture differs

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        b, h, w, d = codes.shape
        x = self.embed(codes.reshape(b, h * w, d)) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        p = self.patch
        x = self.head(self.norm(x)).reshape(b, h, w, 3, p, p)
        return x.permute(0, 3, 1, 4, 2, 5).reshape(b, 3, h * p, w * p)

    @property
    def last_layer(self) -> torch.Tensor:
        return self.head.weight
