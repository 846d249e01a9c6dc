"""The fast paths change speed and memory, never results: MLP checkpointing, bf16 autocast, torch.compile,
multi-query K/V held once, and the eval-mode inference path (folded BatchNorm, fused projections, pixel chunks)
with its cache of folded weights."""
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vqhit import HiTConfig, HiTGenerator, VQHiT
from vqhit.models import attention, hit
from vqhit.models.hit import HiTStage, MLPBlock


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


def kv_elements_per_forward(G, monkeypatch) -> int:
    """K and V elements that exist in the tensors handed to SDPA during one forward (an axis of stride 0, a
    broadcast, holds its data once): the memory attention really reads."""
    total = 0
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        nonlocal total
        for t in (k, v):
            total += math.prod(n for n, stride in zip(t.shape, t.stride()) if stride != 0)
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        G(torch.randn(2, G.config.latent_dim))
    monkeypatch.undo()
    return total


def one_head_kv_elements(config, batch: int) -> int:
    """K + V elements one forward needs with one K/V head of d = C/h per token, from the config alone: each
    cross-attention reads the memory's tokens once, each multi-axis block all of its map's tokens once per axis."""
    total, res = 0, 8
    for width, heads, blocks, block_size in zip(config.widths, config.heads, config.blocks, config.block_sizes):
        d = width // heads
        total += config.memory_tokens * d
        if block_size is not None:
            total += blocks * 2 * res * res * d  # regional and dilated axes
        res *= 2
    return 2 * batch * total


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_multi_query_attention_reads_one_kv_head(monkeypatch, mode):
    """Multi-query attention exists to hold one K/V head: the K and V handed to SDPA must hold one head's worth
    (d per token), in the fast inference path and in training. Copying K/V once per query head anywhere before
    SDPA multiplies the count (a stride-0 expand does not, and costs nothing)."""
    torch.manual_seed(0)
    G = HiTGenerator.from_preset("hit-tiny").train(mode == "train")
    assert kv_elements_per_forward(G, monkeypatch) == one_head_kv_elements(G.config, batch=2)


def test_attend_hands_the_projection_to_sdpa_without_a_copy(monkeypatch):
    seen = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention",
                        lambda q, k, v, *a, **kw: seen.append(k) or sdpa(q, k, v, *a, **kw))
    k = torch.randn(2, 5, 8)  # a projection's output: (B, M, d)
    attention.attend(torch.randn(2, 5, 32), k, k, 4)
    assert seen[0].untyped_storage().data_ptr() == k.untyped_storage().data_ptr()  # the same memory


# -- the eval-mode inference path (folded BatchNorm, fused projections, pixel chunks) ---------------------------

def nontrivial(model: nn.Module, seed: int = 0) -> nn.Module:
    """Weights far from their initialisation, so that a folding mistake shows in the output: BatchNorm running
    statistics and affine parameters away from 0 / 1, Linear weights of unit gain, visible positional tables."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                m.weight.copy_(1 + 0.3 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.num_features, generator=g))
            elif isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(m.in_features))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
        for name, p in model.named_parameters():
            if name.endswith("pos_embed"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model


def fast_and_plain(run, stages, grad: bool = False):
    """(output of the fast path, output of the plain modules, fast-path stage calls) of `run()`."""
    calls = []
    original = HiTStage.forward_folded

    def counting(self, *args):
        calls.append(self)
        return original(self, *args)

    with torch.set_grad_enabled(grad), pytest.MonkeyPatch.context() as patch:
        patch.setattr(HiTStage, "forward_folded", counting)
        fast = run()
        stages.fast_inference = False
        plain = run()
        stages.fast_inference = True
    return fast, plain, len(calls)


def assert_within_1e5(fast, plain):
    """The issue's bar: float32 fast path == plain path within 1e-5 of the output's scale."""
    assert plain.abs().max() > 0.5  # a non-trivial output, so the bar means something
    err = ((fast - plain).abs().max() / plain.abs().max()).item()
    assert err <= 1e-5, f"fast path departs from the plain path by {err:.3g} of the output's peak"


@pytest.mark.parametrize("chunk_rows", [None, 100])  # default chunks; 100 pixels, which divides no stage
@pytest.mark.parametrize("overrides", [{}, dict(multi_query=False), dict(attention_mode="axial"),
                                       dict(cross_attention=False)])
def test_fast_generator_equals_plain(monkeypatch, overrides, chunk_rows):
    if chunk_rows is not None:
        monkeypatch.setattr(hit, "cache_rows", lambda width, hidden, device: chunk_rows)
    torch.manual_seed(0)
    G = nontrivial(HiTGenerator.from_preset("hit-tiny", **overrides)).eval()
    z = torch.randn(3, G.config.latent_dim)
    fast, plain, calls = fast_and_plain(lambda: G(z), G.stages)
    assert calls == len(G.stages.stages)  # the fast path did run, every stage of it
    assert_within_1e5(fast, plain)


@pytest.mark.parametrize("chunk_rows", [None, 100])
def test_fast_decoder_equals_plain(monkeypatch, chunk_rows):
    if chunk_rows is not None:
        monkeypatch.setattr(hit, "cache_rows", lambda width, hidden, device: chunk_rows)
    torch.manual_seed(0)
    model = VQHiT.from_preset("vqhit-tiny")
    nontrivial(model.decoder).eval()
    indices = torch.randint(0, model.config.codebook_size, (2, model.config.grid, model.config.grid))
    fast, plain, calls = fast_and_plain(lambda: model.decode_indices(indices), model.decoder.stages)
    assert calls == len(model.decoder.stages.stages)
    assert_within_1e5(fast, plain)


def test_training_and_autograd_run_the_plain_modules():
    """The fast path is for eval mode without autograd only: training mode (batch statistics) and eval mode with
    gradients (e.g. a perceptual loss through a frozen generator) run today's modules."""
    torch.manual_seed(0)
    G = nontrivial(HiTGenerator.from_preset("hit-tiny"))
    z = torch.randn(2, G.config.latent_dim)
    for train, grad in [(True, False), (True, True), (False, True)]:
        G.train(train)
        _, _, calls = fast_and_plain(lambda: G(z), G.stages, grad=grad)
        assert calls == 0, (train, grad)
    G.eval()
    G(z).square().mean().backward()
    assert G.stages.stages[0].cross.attn.q.weight.grad.abs().sum() > 0
    L = HiTGenerator.from_preset("hit-tiny", norm="layer").eval()  # LayerNorm cannot be folded: plain modules
    fast, plain, calls = fast_and_plain(lambda: L(z), L.stages)
    assert calls == 0 and torch.equal(fast, plain)


def test_folded_weights_never_go_stale():
    """The folded weights are a cache of the parameters and BatchNorm statistics: every way of changing those
    (loading weights, a training step, an in-place update such as an EMA, one running statistic) must be seen by
    the next eval-mode call."""
    torch.manual_seed(0)
    G = nontrivial(HiTGenerator.from_preset("hit-tiny")).eval()
    z = torch.randn(2, G.config.latent_dim)
    outputs = []

    def fast_equals_plain():
        fast, plain, calls = fast_and_plain(lambda: G(z), G.stages)
        assert calls == len(G.stages.stages)
        assert_within_1e5(fast, plain)
        assert all((fast - before).abs().max() > 1e-3 for before in outputs)  # the weights did change
        outputs.append(fast)

    fast_equals_plain()                                              # folds and caches
    G.load_state_dict(nontrivial(HiTGenerator.from_preset("hit-tiny"), seed=1).state_dict())
    fast_equals_plain()                                              # new weights loaded in eval mode
    G.train()
    opt = torch.optim.SGD(G.parameters(), lr=0.1)
    G(torch.randn(4, G.config.latent_dim)).square().mean().backward()  # moves BatchNorm running statistics too
    opt.step()
    G.eval()
    fast_equals_plain()                                              # one training step
    other = nontrivial(HiTGenerator.from_preset("hit-tiny"), seed=2)
    with torch.no_grad():
        for p, q in zip(G.parameters(), other.parameters()):
            p.lerp_(q, 0.5)                                          # an EMA-style in-place update
    fast_equals_plain()
    with torch.no_grad():
        G.stages.stages[-1].to_rgb[0].running_mean.add_(1.0)         # one buffer of one BatchNorm
    fast_equals_plain()
