"""MultiAxisAttention against a plain reference written from the paper's equations (Algorithm 2)."""
import math

import pytest
import torch

from vqhit.models.attention import MultiAxisAttention


def block_index(h, w, p):
    """index[g, t] = flat position (row * w + col) of token t of block g, built from the definition."""
    index = torch.empty((h // p) * (w // p), p * p, dtype=torch.long)
    for row in range(h):
        for col in range(w):
            g = (row // p) * (w // p) + (col // p)
            t = (row % p) * p + (col % p)
            index[g, t] = row * w + col
    return index


def reference_multi_axis(x, attn: MultiAxisAttention, p: int, multi_query: bool):
    """Blocked tensor, einsum, softmax: regional heads attend within a block (over t), dilated heads across
    blocks at the same offset (over g). Queries of heads [0, h/2) regional, [h/2, h) dilated."""
    b, h, w, c = x.shape
    heads, d = attn.num_heads, c // attn.num_heads
    index = block_index(h, w, p)                                # (G, P)
    xb = x.reshape(b, h * w, c)[:, index]                       # (B, G, P, C)
    q = (xb @ attn.q.weight.T + attn.q.bias).reshape(b, *index.shape, heads, d)
    kv_heads = 1 if multi_query else heads
    k = (xb @ attn.k.weight.T + attn.k.bias).reshape(b, *index.shape, kv_heads, d)
    v = (xb @ attn.v.weight.T + attn.v.bias).reshape(b, *index.shape, kv_heads, d)
    if multi_query:
        k, v = k.expand(-1, -1, -1, heads, -1), v.expand(-1, -1, -1, heads, -1)
    half = heads // 2
    qr, kr, vr = q[..., :half, :], k[..., :half, :], v[..., :half, :]
    qd, kd, vd = q[..., half:, :], k[..., half:, :], v[..., half:, :]
    # regional: logits[b, g, n, t, s] = q[b, g, t, n] . k[b, g, s, n]
    a = torch.softmax(torch.einsum("bgtnd,bgsnd->bgnts", qr, kr) / math.sqrt(d), dim=-1)
    yr = torch.einsum("bgnts,bgsnd->bgtnd", a, vr)
    # dilated: logits[b, t, n, g, f] = q[b, g, t, n] . k[b, f, t, n]
    a = torch.softmax(torch.einsum("bgtnd,bftnd->btngf", qd, kd) / math.sqrt(d), dim=-1)
    yd = torch.einsum("btngf,bftnd->bgtnd", a, vd)
    y = torch.cat([yr, yd], dim=3).reshape(b, *index.shape, c)
    out = torch.empty(b, h * w, c, dtype=x.dtype)
    out[:, index] = y
    return (out @ attn.out.weight.T + attn.out.bias).reshape(b, h, w, c)


@pytest.mark.parametrize("multi_query", [True, False])
@pytest.mark.parametrize("h,w,p,heads", [(8, 8, 4, 4), (16, 8, 4, 2), (12, 12, 3, 6)])
def test_matches_paper_reference(h, w, p, heads, multi_query):
    torch.manual_seed(0)
    attn = MultiAxisAttention(24, heads, p, multi_query=multi_query).double()
    for param in attn.parameters():  # non-trivial weights, so every term of the equations matters
        torch.nn.init.normal_(param, std=0.3)
    x = torch.randn(2, h, w, 24, dtype=torch.float64)
    torch.testing.assert_close(attn(x), reference_multi_axis(x, attn, p, multi_query), rtol=1e-10, atol=1e-10)


def test_gradient_locality_is_block_plus_dilated_grid():
    torch.manual_seed(0)
    h = w = 8
    p = 4
    attn = MultiAxisAttention(16, 4, p).double()
    x = torch.randn(1, h, w, 16, dtype=torch.float64, requires_grad=True)
    row, col = 5, 2
    attn(x)[0, row, col].sum().backward()
    touched = x.grad[0].abs().sum(-1) > 0
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    same_block = (rows // p == row // p) & (cols // p == col // p)
    same_offset = (rows % p == row % p) & (cols % p == col % p)
    assert torch.equal(touched, same_block | same_offset)


@pytest.mark.parametrize("mode,axis_mask", [
    ("regional", lambda r, c, R, C, p: (r // p == R // p) & (c // p == C // p)),
    ("dilated", lambda r, c, R, C, p: (r % p == R % p) & (c % p == C % p)),
    ("axial", lambda r, c, R, C, p: (r == R) | (c == C)),
    ("global", lambda r, c, R, C, p: torch.ones_like(r, dtype=torch.bool)),
])
def test_ablation_modes_have_their_receptive_field(mode, axis_mask):
    torch.manual_seed(0)
    attn = MultiAxisAttention(16, 4, 4, mode=mode).double()
    x = torch.randn(1, 8, 8, 16, dtype=torch.float64, requires_grad=True)
    attn(x)[0, 6, 1].sum().backward()
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    assert torch.equal(x.grad[0].abs().sum(-1) > 0, axis_mask(rows, cols, 6, 1, 4))


def test_multi_query_expands_one_kv_head():
    mqa, mha = MultiAxisAttention(32, 8, 4), MultiAxisAttention(32, 8, 4, multi_query=False)
    assert mqa.k.out_features == mqa.v.out_features == 4      # d = C / h
    assert mha.k.out_features == mha.v.out_features == 32


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="not divisible by 3 heads"):
        MultiAxisAttention(16, 3, 4)
    with pytest.raises(ValueError, match="must be even"):
        MultiAxisAttention(18, 3, 4)
    attn = MultiAxisAttention(16, 4, 3)
    with pytest.raises(ValueError, match="block size 3 does not divide the 8x8 map"):
        attn(torch.randn(1, 8, 8, 16))
    with pytest.raises(ValueError, match="channels-last map"):
        attn(torch.randn(1, 16, 8, 8))
    with pytest.raises(ValueError, match="unknown attention mode"):
        MultiAxisAttention(16, 4, 4, mode="window")
