"""The layers of the HiT stages, shared by the generator (`hit.py`), the VQ-HiT decoder (`vqhit.py`) and the
inference path (`inference.py`): normalisation, the MLP and attention blocks, the memory, pixel shuffling and
upsampling. All tensors are channels-last, (B, H, W, C) or (B, N, C)."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .attention import CrossAttention, MultiAxisAttention

NORMS = ("batch", "syncbatch", "layer")
# The release's Keras BatchNorm: momentum 0.99 (PyTorch counts the other way) and eps 1e-3.
BN_MOMENTUM, BN_EPS = 0.01, 1e-3


class ChannelBatchNorm(nn.BatchNorm1d):
    """BatchNorm of the last (channel) axis over every other axis (batch, tokens, pixels)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).view(x.shape)


class ChannelSyncBatchNorm(nn.SyncBatchNorm):
    """`ChannelBatchNorm` with statistics synchronised across processes (an option; off by default)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).view(x.shape)


def make_norm(kind: str, dim: int, momentum: float = BN_MOMENTUM) -> nn.Module:
    if kind == "batch":
        return ChannelBatchNorm(dim, eps=BN_EPS, momentum=momentum)
    if kind == "syncbatch":
        return ChannelSyncBatchNorm(dim, eps=BN_EPS, momentum=momentum)
    if kind == "layer":
        return nn.LayerNorm(dim, eps=BN_EPS)
    raise ValueError(f"unknown norm {kind!r}; choose one of {NORMS}")


def norm_factory(kind: str, momentum: float = BN_MOMENTUM):
    """A `norm_layer(dim)` callable for the blocks, from a config's norm name and BatchNorm momentum."""
    if kind not in NORMS:
        raise ValueError(f"unknown norm {kind!r}; choose one of {NORMS}")
    return partial(make_norm, kind, momentum=momentum)


class MLPBlock(nn.Module):
    """x + FC2(GELU(FC1(Norm(x)))): the high-resolution layer and the second half of every attention block.

    With `checkpoint` on, the 4C-wide hidden layer is not kept for backward but recomputed from Norm(x).
    The norm stays outside the checkpoint, so BatchNorm running statistics are updated once per forward.
    """

    def __init__(self, dim: int, norm_layer, mlp_ratio: int = 4, checkpoint: bool = False):
        super().__init__()
        self.norm = norm_layer(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)
        self.checkpoint = checkpoint

    def hidden(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(h)))  # exact (erf) GELU, as the release

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        if self.checkpoint and torch.is_grad_enabled():
            return x + torch.utils.checkpoint.checkpoint(self.hidden, h, use_reentrant=False)
        return x + self.hidden(h)


class SelfAttentionBlock(nn.Module):
    """Pre-norm multi-axis self-attention block on a map (B, H, W, C)."""

    def __init__(self, dim: int, num_heads: int, block_size: int, norm_layer, multi_query: bool,
                 mode: str, mlp_ratio: int):
        super().__init__()
        self.norm = norm_layer(dim)
        self.attn = MultiAxisAttention(dim, num_heads, block_size, multi_query=multi_query, mode=mode)
        self.mlp = MLPBlock(dim, norm_layer, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x + self.attn(self.norm(x)))


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention block: the pixels of a map (B, H, W, C) attend to the memory Z (B, M, E).

    Z is not normalised again here: it was normalised once, when it was made.
    """

    def __init__(self, dim: int, num_heads: int, memory_dim: int, norm_layer, multi_query: bool, mlp_ratio: int,
                 checkpoint_mlp: bool = False):
        super().__init__()
        self.norm = norm_layer(dim)
        self.attn = CrossAttention(dim, num_heads, kv_dim=memory_dim, multi_query=multi_query)
        self.mlp = MLPBlock(dim, norm_layer, mlp_ratio, checkpoint=checkpoint_mlp)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        x = x + self.attn(self.norm(x).reshape(b, h * w, c), memory).view(b, h, w, c)
        return self.mlp(x)


class Memory(nn.Module):
    """The memory Z every cross-attention block attends to: inputs projected to `num_tokens` tokens of width
    E, plus a learned positional table, normalised once.

    `tokens_per_input` tokens come out of each input vector: 16 from the one latent of the generator,
    1 from each code vector of the tokenizer's grid.
    """

    def __init__(self, in_dim: int, num_tokens: int, dim: int, norm_layer, tokens_per_input: int = 1):
        super().__init__()
        self.proj = nn.Linear(in_dim, tokens_per_input * dim)
        self.pos_embed = nn.Parameter(torch.zeros(num_tokens, dim))
        self.norm = norm_layer(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, in_dim) with T * tokens_per_input == num_tokens -> Z: (B, num_tokens, E)."""
        z = self.proj(x).reshape(x.shape[0], self.pos_embed.shape[0], -1)
        return self.norm(z + self.pos_embed)


def pixel_shuffle(x: torch.Tensor) -> torch.Tensor:
    """x2 pixel shuffle of a channels-last map, (B, H, W, 4C) -> (B, 2H, 2W, C), in nn.PixelShuffle's order."""
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, c // 4, 2, 2).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, 2 * h, 2 * w, c // 4)


def upsample2x(img: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour x2 upsampling of a channels-last image (B, H, W, 3)."""
    b, h, w, c = img.shape
    return img[:, :, None, :, None, :].expand(b, h, 2, w, 2, c).reshape(b, 2 * h, 2 * w, c)


def trunc_normal_init(module: nn.Module) -> None:
    """HiT's initialisation: Linear weights and positional tables ~ truncated normal(0.02, ±0.04), biases 0, norms 1/0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.SyncBatchNorm, nn.LayerNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for name, p in module.named_parameters():
        if name.endswith("pos_embed"):
            nn.init.trunc_normal_(p, std=0.02, a=-0.04, b=0.04)
