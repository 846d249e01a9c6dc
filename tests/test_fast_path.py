"""The fast paths change speed and memory, never results: MLP checkpointing, bf16 autocast, torch.compile,
multi-query K/V held once, and the eval-mode inference path (folded BatchNorm, fused projections, pixel chunks),
which must never serve weights the model no longer holds."""
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import nontrivial

from vqhit import HiTConfig, HiTGenerator, VQHiT
from vqhit.models import attention, inference
from vqhit.models.layers import MLPBlock


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


def compile_case(which: str):
    """(module, input) of a tiny preset for the compile tests: the generator, or the VQ-HiT decoder on codes."""
    torch.manual_seed(0)
    if which == "generator":
        G = HiTGenerator.from_preset("hit-tiny").eval()
        return G, torch.randn(2, G.config.latent_dim)
    model = VQHiT.from_preset("vqhit-tiny").eval()
    indices = torch.randint(0, model.config.codebook_size, (2, model.config.grid, model.config.grid))
    return model.decoder, model.quantize.lookup(indices)


@pytest.mark.parametrize("which", ["generator", "decoder"])
def test_model_compiles_without_graph_breaks(which):
    """fullgraph=True fails on any graph break; the "eager" backend traces with dynamo and skips codegen."""
    module, x = compile_case(which)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(module, fullgraph=True, backend="eager")(x)
        torch.testing.assert_close(out, module(x), rtol=0, atol=1e-5)


def missing_inductor_requirement():
    if not shutil.which(os.environ.get("CXX", "g++")) and not shutil.which("c++") and not shutil.which("clang++"):
        return "torch.compile's inductor backend needs a C++ compiler (g++, c++ or clang++) on PATH; none found"
    if not os.environ.get("VQHIT_SLOW_TESTS"):
        return ("slow: inductor's first compiles of hit-tiny and the vqhit-tiny decoder take minutes on a 2-core "
                "CPU (.ci/run runs them); set VQHIT_SLOW_TESTS=1 to run them")
    return None


@pytest.mark.skipif(missing_inductor_requirement() is not None, reason=str(missing_inductor_requirement()))
@pytest.mark.parametrize("which", ["generator", "decoder"])
def test_inductor_compiled_model_matches_eager(which):
    module, x = compile_case(which)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(module)(x), module(x), rtol=0, atol=1e-4)


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

def fold_everywhere(monkeypatch):
    """Every stage runs folded, whatever its size: the folded forwards are what is under test."""
    monkeypatch.setattr(inference, "folds", lambda stage, pixels: True)


def fast_and_plain(run, stages, grad: bool = False):
    """(output of the inference path, output of the plain modules, stages that ran folded) of `run()`."""
    calls = []
    original = inference.folded_stage

    def counting(stage, *args):
        calls.append(stage)
        return original(stage, *args)

    with torch.set_grad_enabled(grad), pytest.MonkeyPatch.context() as patch:
        patch.setattr(inference, "folded_stage", counting)
        fast = run()
        stages.fast_inference = False
        plain = run()
        stages.fast_inference = True
    return fast, plain, len(calls)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest deviation over the reference's peak, on a non-trivial reference (so that 1e-5 means something)."""
    assert ref.abs().max() > 0.5
    return ((out - ref).abs().max() / ref.abs().max()).item()


def assert_within_1e5(fast, plain):
    """float32 inference path == plain path within 1e-5 of the output's peak."""
    err = relative_error(fast, plain)
    assert err <= 1e-5, f"fast path departs from the plain path by {err:.3g} of the output's peak"


@pytest.mark.parametrize("chunk_rows", [None, 100])  # default chunks; 100 pixels, which divides no stage
@pytest.mark.parametrize("overrides", [{}, dict(multi_query=False), dict(attention_mode="axial"),
                                       dict(cross_attention=False)])
def test_fast_generator_equals_plain(monkeypatch, overrides, chunk_rows):
    fold_everywhere(monkeypatch)
    if chunk_rows is not None:
        monkeypatch.setattr(inference, "cache_rows", lambda width, hidden, device: chunk_rows)
    torch.manual_seed(0)
    G = nontrivial(HiTGenerator.from_preset("hit-tiny", **overrides)).eval()
    z = torch.randn(3, G.config.latent_dim)
    fast, plain, calls = fast_and_plain(lambda: G(z), G.stages)
    assert calls == len(G.stages.stages)  # the folded path did run, every stage of it
    assert_within_1e5(fast, plain)


@pytest.mark.parametrize("chunk_rows", [None, 100])
def test_fast_decoder_equals_plain(monkeypatch, chunk_rows):
    fold_everywhere(monkeypatch)
    if chunk_rows is not None:
        monkeypatch.setattr(inference, "cache_rows", lambda width, hidden, device: chunk_rows)
    torch.manual_seed(0)
    model = VQHiT.from_preset("vqhit-tiny")
    nontrivial(model.decoder).eval()
    indices = torch.randint(0, model.config.codebook_size, (2, model.config.grid, model.config.grid))
    fast, plain, calls = fast_and_plain(lambda: model.decode_indices(indices), model.decoder.stages)
    assert calls == len(model.decoder.stages.stages)
    assert_within_1e5(fast, plain)


def test_small_maps_run_their_own_modules():
    """A stage is folded only when its map has at least as many pixels as its MLP's hidden layer is wide, where
    re-folding on every call costs less than the norms it saves. hit-tiny's 8x8 stage (hidden 512) runs its own
    modules at batch 1 (64 pixels) and is folded at batch 8 (512); the 16x16 and 32x32 stages (hidden 256, 128)
    are folded at batch 1. Either mix computes the plain modules' function."""
    torch.manual_seed(0)
    G = nontrivial(HiTGenerator.from_preset("hit-tiny")).eval()
    for batch, folded in [(1, 2), (8, 3)]:
        z = torch.randn(batch, G.config.latent_dim)
        fast, plain, calls = fast_and_plain(lambda: G(z), G.stages)
        assert calls == folded, batch
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


# -- never stale: after any change to the weights, the next eval-mode output is the new weights' ------------------

def optimizer_steps(make_optimizer):
    """Three optimizer steps taken in eval mode (BatchNorm frozen, as when fine-tuning a decoder): autograd runs
    the plain modules, and the model is never switched to training mode and back."""
    def change(model, run, other):
        opt = make_optimizer([p for p in model.parameters() if p.requires_grad])
        for _ in range(3):
            with torch.enable_grad():
                run(model).square().mean().backward()
            opt.step()
            opt.zero_grad()
    return change


def copy_data(model, run, other):
    for p, q in zip(model.parameters(), other.parameters()):
        p.data.copy_(q.data)  # the classic in-place copy: .data has a version counter of its own


def shift_batchnorm_means(model, run, other):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            m.running_mean.data.add_(0.5)


def load_other_state(model, run, other):
    model.load_state_dict(other.state_dict())


def round_trip_bfloat16(model, run, other):
    dtype = next(model.parameters()).dtype
    model.to(torch.bfloat16).to(dtype)  # rounds every weight: new values, same dtype as before


def ema_update(model, run, other):
    """The training loop's EMA, with the model under test as its average: one lerp towards `other`."""
    from vqhit.ema import EMA

    ema = EMA(other, decay=0.5, start_step=0)
    ema.model = model
    ema.update(other, step=1)


WEIGHT_CHANGES = {
    "adam-fused": optimizer_steps(lambda params: torch.optim.Adam(params, lr=1e-2, fused=True)),
    "adam-foreach": optimizer_steps(lambda params: torch.optim.Adam(params, lr=1e-2, foreach=True)),
    "sgd-for-loop": optimizer_steps(lambda params: torch.optim.SGD(params, lr=1e-4, foreach=False)),
    "data-copy": copy_data,
    "batchnorm-data-add": shift_batchnorm_means,
    "load-state-dict": load_other_state,
    "to-bfloat16-and-back": round_trip_bfloat16,
    "ema-lerp": ema_update,
}


def generator_case():
    G = nontrivial(HiTGenerator.from_preset("hit-tiny")).eval()
    z = torch.randn(2, G.config.latent_dim)
    return G, lambda model: model(z), lambda: nontrivial(HiTGenerator.from_preset("hit-tiny"), seed=1)


def tokenizer_case():
    def make(seed):
        model = VQHiT.from_preset("vqhit-tiny")
        nontrivial(model.decoder, seed)
        return model.eval()

    model = make(0)
    indices = torch.randint(0, model.config.codebook_size, (2, model.config.grid, model.config.grid))
    # decode_indices with autograd allowed (it runs without), so that optimizer steps can train the decoder through it;
    # the codes are detached, as in decoder fine-tuning on a frozen codebook
    return model, lambda m: m.decode(m.get_codebook_entry(indices).detach()), lambda: make(1)


@pytest.mark.parametrize("change", WEIGHT_CHANGES.values(), ids=WEIGHT_CHANGES.keys())
@pytest.mark.parametrize("case", [generator_case, tokenizer_case], ids=["generator", "tokenizer-decode"])
def test_inference_path_never_serves_stale_weights(monkeypatch, case, change):
    """However the weights change, the next eval-mode output is that of a fresh model holding the same state dict
    (through its plain modules), within 1e-10 of its peak. The model stays in eval mode throughout, with an
    eval-mode output taken before the change, when a cache of folded weights would have been filled. In float64:
    stale weights are off by 0.5-1.4 of the peak, float32 rounding by up to ~1e-5 depending on the CPU's summation
    order (1.2e-5 after the fused Adam steps on an AVX-512 Xeon), so float64 separates the two whatever the CPU."""
    fold_everywhere(monkeypatch)
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        check_not_stale(case, change)
    finally:
        torch.set_default_dtype(default_dtype)


def check_not_stale(case, change):
    model, run, make_other = case()
    with torch.no_grad():
        before = run(model)
    change(model, run, make_other())
    assert not model.training
    fresh = type(model)(model.config)
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    stages = fresh.stages if isinstance(fresh, HiTGenerator) else fresh.decoder.stages
    stages.fast_inference = False
    with torch.no_grad():
        after, expected = run(model), run(fresh)
    assert relative_error(before, expected) > 1e-3  # the change did change the function
    assert after.dtype == torch.float64
    err = relative_error(after, expected)
    assert err <= 1e-10, f"the inference path departs from the current weights' output by {err:.3g} of its peak"
