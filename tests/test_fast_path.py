"""The fast path changes speed and memory, never results: MLP checkpointing, bf16 autocast, torch.compile,
and the multi-query K/V expansion inside `attend`."""
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from vqhit import HiTConfig, HiTGenerator
from vqhit.models import attention
from vqhit.models.hit import MLPBlock


def twin_generators():
    """hit-tiny with and without `checkpoint_mlp`, same weights, both in training mode (BatchNorm batch stats)."""
    torch.manual_seed(0)
    plain = HiTGenerator(HiTConfig.from_preset("hit-tiny")).train()
    ckpt = HiTGenerator(HiTConfig.from_preset("hit-tiny", checkpoint_mlp=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    return plain, ckpt


def saved_bytes(fn):
    """Bytes autograd keeps for backward while `fn()` runs: what activation checkpointing exists to cut."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def test_checkpoint_mlp_only_wraps_the_mlp_stages():
    _, G = twin_generators()
    for stage in G.stages.stages:
        flags = {m.checkpoint for m in stage.modules() if isinstance(m, MLPBlock)}
        assert flags == {stage.to_rgb is not None}  # MLP stages carry the to-RGB head


def test_checkpoint_mlp_is_exact_and_saves_memory():
    plain, ckpt = twin_generators()
    b = 2
    z = torch.randn(b, plain.config.latent_dim)
    weight = torch.randn(b, 3, 32, 32)  # a loss whose gradient differs per pixel
    out_plain, bytes_plain = saved_bytes(lambda: plain(z))
    out_ckpt, bytes_ckpt = saved_bytes(lambda: ckpt(z))
    (out_plain * weight).sum().backward()
    (out_ckpt * weight).sum().backward()

    torch.testing.assert_close(out_ckpt, out_plain, rtol=0, atol=0)
    grads_plain, grads_ckpt = dict(plain.named_parameters()), dict(ckpt.named_parameters())
    for name, p in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name].grad, p.grad, rtol=0, atol=1e-7, msg=lambda m: f"{name}: {m}")
    # BatchNorm ran once per forward in both (the norm is outside the checkpoint): same running stats, same count.
    buffers_ckpt = dict(ckpt.named_buffers())
    for name, b in plain.named_buffers():
        torch.testing.assert_close(buffers_ckpt[name], b, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    assert int(buffers_ckpt["stages.stages.2.blocks.0.norm.num_batches_tracked"]) == 1
    # The 32x32 MLP stage has two MLPs (cross block's and one layer); neither keeps its FC1 and GELU outputs,
    # each (B, 32, 32, 4C = 128) fp32, for backward any more.
    assert bytes_plain - bytes_ckpt >= 2 * 2 * (b * 32 * 32 * 128 * 4)


def test_bf16_autocast_matches_fp32():
    torch.manual_seed(0)
    G = HiTGenerator.from_preset("hit-tiny").eval()
    z = torch.randn(4, G.config.latent_dim)
    with torch.no_grad():
        ref = G(z)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = G(z)
    assert low.dtype == torch.bfloat16  # autocast really ran the Linears in bf16
    rel = (low.float() - ref).abs().max() / ref.std()
    assert rel < 5e-2, f"bf16 output departs from fp32 by {rel:.3g} of the output std"


def test_model_compiles_without_graph_breaks():
    """fullgraph=True fails on any graph break; the "eager" backend traces with dynamo and skips codegen."""
    torch.manual_seed(0)
    G = HiTGenerator.from_preset("hit-tiny").eval()
    z = torch.randn(2, G.config.latent_dim)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(G, fullgraph=True, backend="eager")(z)
        torch.testing.assert_close(out, G(z), rtol=0, atol=1e-5)


def missing_inductor_requirement():
    if not shutil.which(os.environ.get("CXX", "g++")) and not shutil.which("c++") and not shutil.which("clang++"):
        return "torch.compile's inductor backend needs a C++ compiler (g++, c++ or clang++) on PATH; none found"
    if not os.environ.get("VQHIT_SLOW_TESTS"):
        return ("slow: inductor's first compile of hit-tiny takes about 2 minutes on a 2-core CPU; "
                "set VQHIT_SLOW_TESTS=1 to run it")
    return None


@pytest.mark.skipif(missing_inductor_requirement() is not None, reason=str(missing_inductor_requirement()))
def test_inductor_compiled_generator_matches_eager():
    torch.manual_seed(0)
    G = HiTGenerator.from_preset("hit-tiny").eval()
    z = torch.randn(2, G.config.latent_dim)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(G)(z), G(z), rtol=0, atol=1e-4)


def test_multi_query_attend_equals_explicitly_repeated_kv():
    torch.manual_seed(0)
    heads, d = 4, 8
    q = torch.randn(2, 3, 10, heads * d)    # (..., N, h*d) with two batch axes, as blocked attention has
    k, v = torch.randn(2, 3, 7, d), torch.randn(2, 3, 7, d)  # one K/V head
    shared = attention.attend(q, k, v, heads)
    copied = attention.attend(q, k.repeat(1, 1, 1, heads), v.repeat(1, 1, 1, heads), heads)  # multi-head path
    torch.testing.assert_close(shared, copied, rtol=0, atol=1e-6)


def test_multi_query_kv_reach_sdpa_without_copies(monkeypatch):
    """Inside the whole generator, every K and V handed to SDPA holds one head's worth of data: the h query
    heads see it through a stride-0 head axis (or as a single head), so sharing K/V costs no copy."""
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((k, v))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    torch.manual_seed(0)
    G = HiTGenerator.from_preset("hit-tiny").eval()
    with torch.no_grad():
        G(torch.randn(1, G.config.latent_dim))
    one_head = lambda t: t.shape[1] == 1 or t.stride(1) == 0  # noqa: E731
    assert len(seen) == 7  # 3 cross-attention blocks + 2 self-attention blocks x 2 axes
    assert all(one_head(k) and one_head(v) for k, v in seen), [(k.shape, k.stride()) for k, _ in seen]

    seen.clear()
    k = torch.randn(2, 5, 8)  # a projection's output: (B, M, d)
    attention.attend(torch.randn(2, 5, 32), k, k, 4)
    assert seen[0][0].untyped_storage().data_ptr() == k.untyped_storage().data_ptr()  # the same memory
