"""Attention for HiT: multi-query projections, cross-attention and blocked multi-axis self-attention.

Every tensor here is channels-last: tokens (B, N, C) or maps (B, H, W, C). All attention goes through
`F.scaled_dot_product_attention` so fused kernels run on GPU; with multi-query attention the query heads
are folded into the query axis, so the single K/V head is neither copied nor expanded.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# How the heads of a self-attention layer split the map. "multi_axis" is the paper's; the others are
# its ablations (Table 5 / Table 10) plus "global" attention, used by the benchmarks as a baseline.
ATTENTION_MODES = ("multi_axis", "regional", "dilated", "axial", "global")


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Scaled dot-product attention over the last-but-one axis.

    q: (..., N, num_heads * d); k, v: (..., M, kv_heads * d) with kv_heads 1 (multi-query) or num_heads.
    Returns (..., N, num_heads * d), heads concatenated in order.
    """
    *batch, n, width = q.shape
    m, d = k.shape[-2], width // num_heads
    kv_heads = k.shape[-1] // d
    if kv_heads == 1:
        # Multi-query: every query row of every head meets the same K/V, so the heads fold into the query
        # axis, (B, N, h, d) -> (B, 1, N*h, d): a pure reshape, one larger matmul, no K/V expansion.
        out = F.scaled_dot_product_attention(q.reshape(-1, 1, n * num_heads, d), k.reshape(-1, 1, m, d),
                                             v.reshape(-1, 1, m, d))
        return out.reshape(*batch, n, width)
    q = q.reshape(-1, n, num_heads, d).transpose(1, 2)
    k = k.reshape(-1, m, kv_heads, d).transpose(1, 2)
    v = v.reshape(-1, m, kv_heads, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v)  # logits scaled by d^-1/2, softmax over keys
    return out.transpose(1, 2).reshape(*batch, n, width)


def check_heads(dim: int, num_heads: int, what: str = "attention") -> int:
    if num_heads < 1 or dim % num_heads:
        raise ValueError(f"{what}: width {dim} is not divisible by {num_heads} heads; "
                         f"choose a head count that divides the width")
    return dim // num_heads


class QKVProjection(nn.Module):
    """q = Linear(C -> C); k, v = Linear(C_kv -> d) (multi-query) or Linear(C_kv -> C) (multi-head)."""

    def __init__(self, dim: int, num_heads: int, kv_dim: int | None = None, multi_query: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = check_heads(dim, num_heads)
        kv_width = self.head_dim if multi_query else dim
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(kv_dim or dim, kv_width)
        self.v = nn.Linear(kv_dim or dim, kv_width)
        self.out = nn.Linear(dim, dim)


class CrossAttention(QKVProjection):
    """Every token of x (B, N, C) attends to the tokens of a memory (B, M, C_kv)."""

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.out(attend(self.q(x), self.k(memory), self.v(memory), self.num_heads))


def block_tokens(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, G, P, C): G = (H/p)(W/p) non-overlapping p x p blocks of P = p^2 tokens."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p, c)


def unblock_tokens(x: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    """Inverse of `block_tokens`."""
    b, c = x.shape[0], x.shape[-1]
    x = x.reshape(b, h // p, w // p, p, p, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def _axes(mode: str, h: int, w: int, p: int):
    """(group, ungroup) pairs for each axis a self-attention `mode` uses.

    `group` maps a channels-last map (B, H, W, C) to (B, groups, tokens, C) so that attention runs among
    the tokens of each group; `ungroup` maps the result back to (B, H, W, C).
    """
    regional = (lambda t: block_tokens(t, p), lambda y: unblock_tokens(y, h, w, p))
    dilated = (lambda t: block_tokens(t, p).transpose(1, 2), lambda y: unblock_tokens(y.transpose(1, 2), h, w, p))
    rows = (lambda t: t, lambda y: y)
    columns = (lambda t: t.transpose(1, 2), lambda y: y.transpose(1, 2))
    whole = (lambda t: t.reshape(t.shape[0], 1, h * w, t.shape[-1]), lambda y: y.reshape(y.shape[0], h, w, -1))
    return {"multi_axis": [regional, dilated], "regional": [regional], "dilated": [dilated],
            "axial": [rows, columns], "global": [whole]}[mode]


class MultiAxisAttention(QKVProjection):
    """Blocked multi-axis self-attention (HiT, Algorithm 2) on a channels-last map (B, H, W, C).

    The map is cut into p x p blocks. The first half of the query heads attends *regionally* (to the
    P = p^2 tokens of its own block), the second half along the *dilated* axis (to the G tokens at the
    same offset in every block). Both halves share K and V. Cost O(N (P + G)) instead of O(N^2).

    `mode` selects the paper's ablations: "regional" / "dilated" (all heads on one axis), "axial"
    (unblocked: half the heads along rows, half along columns) and "global" (every token to every token).
    """

    def __init__(self, dim: int, num_heads: int, block_size: int, multi_query: bool = True,
                 mode: str = "multi_axis"):
        if mode not in ATTENTION_MODES:
            raise ValueError(f"unknown attention mode {mode!r}; choose one of {ATTENTION_MODES}")
        check_heads(dim, num_heads, "multi-axis attention")
        n_axes = len(_axes(mode, 1, 1, 1))
        if num_heads % n_axes:
            raise ValueError(f"{mode} attention splits the heads into {n_axes} equal groups, so the head "
                             f"count must be even; got {num_heads}")
        if block_size < 1:
            raise ValueError(f"block size must be a positive integer, got {block_size}")
        super().__init__(dim, num_heads, multi_query=multi_query)
        self.block_size = block_size
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = self.q.in_features
        if x.dim() != 4 or x.shape[-1] != dim:
            raise ValueError(f"MultiAxisAttention expects a channels-last map (B, H, W, {dim}), "
                             f"got shape {tuple(x.shape)}")
        return self.out(self.mix(self.q(x), self.k(x), self.v(x)))

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The attention itself, between the projections: q (B, H, W, C), k, v (B, H, W, kv width) -> (B, H, W, C)
        with the heads concatenated, regional first. The eval-mode inference path (`vqhit.models.inference`)
        calls it with q, k, v from one fused projection, so both paths share this definition."""
        _, h, w, _ = q.shape
        p = self.block_size
        if self.mode in ("multi_axis", "regional", "dilated") and (h % p or w % p):
            raise ValueError(f"block size {p} does not divide the {h}x{w} map; choose a block size that "
                             f"divides both sides")
        axes = _axes(self.mode, h, w, p)
        heads = self.num_heads // len(axes)
        # Query heads are split among the axes (regional first); multi-query K/V are shared by all of
        # them, multi-head K/V are split the same way as the queries.
        qs = q.chunk(len(axes), dim=-1)
        shared = k.shape[-1] == self.head_dim
        ks = [k] * len(axes) if shared else k.chunk(len(axes), dim=-1)
        vs = [v] * len(axes) if shared else v.chunk(len(axes), dim=-1)
        y = [ungroup(attend(group(q_), group(k_), group(v_), heads))
             for (group, ungroup), q_, k_, v_ in zip(axes, qs, ks, vs)]
        return torch.cat(y, dim=-1)
