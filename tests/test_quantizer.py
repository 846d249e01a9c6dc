"""VectorQuantizer: lookup, losses and their gradients, options, usage statistics (across processes: test_distributed)."""
import math

import pytest
import torch
import torch.nn.functional as F

from vqhit.models.quantizer import QuantizerOutput, VectorQuantizer


def brute_force_nearest(z_flat, codebook):
    """Nearest code by explicit (N, K, D) differences: the reference the matmul search must match."""
    return (z_flat[:, None, :] - codebook[None, :, :]).square().sum(-1).argmin(1)


def test_shapes_dtypes_and_taming_layout():
    vq = VectorQuantizer(codebook_size=16, code_dim=8)
    z = torch.randn(2, 3, 4, 8)
    out = vq(z)
    assert isinstance(out, QuantizerOutput)
    assert out.quantized.shape == (2, 3, 4, 8) and out.quantized.dtype == torch.float32
    assert out.indices.shape == (2, 3, 4) and out.indices.dtype == torch.int64
    assert out.loss.ndim == out.codebook_loss.ndim == out.commitment_loss.ndim == 0
    assert list(vq.state_dict()) == ["embedding.weight"]  # taming's key, no extra state
    assert vq.embedding.weight.shape == (16, 8)
    # The forward output is the chosen code, and lookup/encode agree with forward.
    torch.testing.assert_close(out.quantized, vq.embedding.weight[out.indices])
    assert torch.equal(vq.encode(z), out.indices)
    torch.testing.assert_close(vq.lookup(out.indices), out.quantized)


def test_nearest_code_matches_brute_force():
    torch.manual_seed(0)
    vq = VectorQuantizer(codebook_size=64, code_dim=5)
    vq.embedding.weight.data.normal_()
    z = torch.randn(3, 7, 6, 5)
    expected = brute_force_nearest(z.reshape(-1, 5), vq.embedding.weight).view(3, 7, 6)
    assert torch.equal(vq.encode(z), expected)


def test_straight_through_gradient_reaches_z():
    vq = VectorQuantizer(codebook_size=8, code_dim=4)
    z = torch.randn(2, 2, 2, 4, requires_grad=True)
    weights = torch.randn(2, 2, 2, 4)
    (vq(z).quantized * weights).sum().backward()
    torch.testing.assert_close(z.grad, weights)  # identity gradient through the lookup


def test_beta_multiplies_the_commitment_term_not_the_codebook_term():
    """d loss/dz = 2*beta*(z-e)/numel and d loss/de = 2*(e-z)/numel. taming's original (beta on the codebook
    term) gives 2*(z-e)/numel and 2*beta*(e-z)/numel instead, and fails both assertions."""
    beta = 0.25
    vq = VectorQuantizer(codebook_size=2, code_dim=3, beta=beta)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]]))
    # Two vectors near code 0, one near code 1 (so code 1's gradient has one term, code 0's two).
    z = torch.tensor([[[[0.9, 0.1, 0.0], [1.2, -0.1, 0.3], [-0.8, 0.2, 0.1]]]], requires_grad=True)
    out = vq(z)
    assert out.indices.tolist() == [[[0, 0, 1]]]
    out.loss.backward()
    e = vq.embedding.weight.detach()[out.indices]
    numel = z.numel()
    torch.testing.assert_close(z.grad, 2 * beta * (z.detach() - e) / numel)
    diff = 2 * (e - z.detach()) / numel                    # per position, summed into its code
    expected_code_grad = torch.stack([diff[0, 0, :2].sum(0), diff[0, 0, 2]])
    torch.testing.assert_close(vq.embedding.weight.grad, expected_code_grad)
    torch.testing.assert_close(out.loss, out.codebook_loss + beta * out.commitment_loss)
    torch.testing.assert_close(out.codebook_loss, F.mse_loss(e, z.detach()))


def test_l2_normalize_uses_unit_codes_and_cosine_search():
    torch.manual_seed(1)
    vq = VectorQuantizer(codebook_size=32, code_dim=6, l2_normalize=True)
    vq.embedding.weight.data.normal_().mul_(torch.rand(32, 1) * 5)  # codes of very different norms
    z = torch.randn(2, 4, 4, 6) * 3
    out = vq(z)
    torch.testing.assert_close(out.quantized.norm(dim=-1), torch.ones(2, 4, 4))
    # Nearest on the sphere == largest cosine similarity, whatever the raw norms.
    cosine = F.normalize(z, dim=-1) @ F.normalize(vq.embedding.weight, dim=-1).t()
    assert torch.equal(out.indices, cosine.argmax(-1))
    torch.testing.assert_close(vq.lookup(out.indices), out.quantized)


def test_lookup_dim_searches_in_the_low_dimensional_space():
    torch.manual_seed(2)
    vq = VectorQuantizer(codebook_size=32, code_dim=16, lookup_dim=4)
    assert vq.embedding.weight.shape == (32, 4)
    assert vq.in_proj.in_features == 16 and vq.in_proj.out_features == 4
    z = torch.randn(2, 3, 3, 16, requires_grad=True)
    out = vq(z)
    low = vq.in_proj(z.detach())
    expected = brute_force_nearest(low.reshape(-1, 4), vq.embedding.weight).view(2, 3, 3)
    assert torch.equal(out.indices, expected)
    assert out.quantized.shape == (2, 3, 3, 16)
    torch.testing.assert_close(out.quantized, vq.out_proj(vq.embedding.weight[out.indices]))
    torch.testing.assert_close(vq.lookup(out.indices), out.quantized)
    torch.testing.assert_close(out.commitment_loss, F.mse_loss(low, vq.embedding.weight[out.indices]))
    out.quantized.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0  # through out_proj, the straight-through and in_proj


def test_dead_code_restart_revives_unused_codes():
    torch.manual_seed(3)
    vq = VectorQuantizer(codebook_size=8, code_dim=2, restart_dead_codes=True, dead_code_steps=3,
                         restart_buffer_size=64)
    with torch.no_grad():  # code 0 sits on the data; codes 1..7 are far away and never chosen
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0.0]] + [[100.0 + i, 100.0] for i in range(7)]))
    vq.train()
    data = lambda: torch.randn(4, 4, 4, 2) * 0.1 + torch.tensor([1.0, 1.0])  # noqa: E731
    for _ in range(3):
        vq(data())
    assert vq.steps_since_used[1:].tolist() == [3] * 7 and vq.steps_since_used[0] == 0
    before = vq.embedding.weight.detach().clone()
    out = vq(data())  # the restart runs at the start of this training forward
    weight = vq.embedding.weight.detach()
    torch.testing.assert_close(weight[0], before[0])  # live code untouched
    assert (weight[1:] - torch.tensor([1.0, 1.0])).norm(dim=1).max() < 1.0  # dead codes moved onto the data
    assert len(set(out.indices.flatten().tolist())) > 1  # and now get chosen
    vq.eval()
    restarted = vq.embedding.weight.detach().clone()
    for _ in range(5):
        vq(torch.randn(1, 2, 2, 2) + 100)  # eval forwards neither advance the clocks nor restart
    assert torch.equal(vq.embedding.weight, restarted)


def test_usage_stats_and_reset():
    vq = VectorQuantizer(codebook_size=4, code_dim=1)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0], [10.0], [20.0], [30.0]]))
    assert vq.usage_stats() == {"usage": 0.0, "perplexity": 0.0, "codes_used": 0}
    vq.eval()  # eval forwards count too
    vq(torch.tensor([0.0, 0.1, 10.0, 9.9]).view(1, 2, 2, 1))  # codes 0, 0, 1, 1
    stats = vq.usage_stats()
    assert stats["codes_used"] == 2 and stats["usage"] == 0.5
    assert stats["perplexity"] == pytest.approx(2.0)  # two codes, equally likely
    vq.encode(torch.full((1, 1, 1, 1), 30.0))  # encode() has no side effects
    assert vq.usage_stats()["codes_used"] == 2
    vq.reset_usage()
    assert vq.usage_stats()["codes_used"] == 0


def test_bad_input_raises():
    vq = VectorQuantizer(codebook_size=4, code_dim=3)
    with pytest.raises(ValueError, match="channels-last"):
        vq(torch.randn(1, 3, 2, 2))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        vq.lookup(torch.tensor([[[4]]]))
    with pytest.raises(ValueError, match="integer"):
        vq.lookup(torch.zeros(1, 1, 1))


def test_frozen_codebook_never_restarts():
    """A frozen codebook (freeze_codebook, decoder-only fine-tuning) keeps its codes: token ids stay valid."""
    vq = VectorQuantizer(codebook_size=4, code_dim=2, restart_dead_codes=True, dead_code_steps=1, restart_buffer_size=8)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [50.0, 50.0], [60.0, 60.0], [70.0, 70.0]]))
    vq.embedding.weight.requires_grad_(False)
    before = vq.embedding.weight.detach().clone()
    vq.train()
    for _ in range(4):  # codes 1..3 are never chosen: unfrozen, they would be restarted at the 2nd forward
        vq(torch.randn(1, 2, 2, 2))
    assert torch.equal(vq.embedding.weight, before)


# --------------------------------------------------------------------------- entropy loss


def entropy_by_hand(z_flat, codebook, temperature):
    """mean_i H(p_i) - H(mean_i p_i), p_i = softmax(-||z_i - e||^2 / T), from explicit differences."""
    d = (z_flat[:, None, :] - codebook[None, :, :]).square().sum(-1)
    p = torch.softmax(-d / temperature, dim=1)
    per_token = -(p * p.log()).sum(1).mean()
    mean_p = p.mean(0)
    return per_token - (-(mean_p * mean_p.log()).sum())


def test_entropy_loss_value_and_weight():
    torch.manual_seed(4)
    vq = VectorQuantizer(codebook_size=6, code_dim=3, entropy_loss_weight=0.3, entropy_temperature=2.0)
    vq.embedding.weight.data.normal_()
    z = torch.randn(2, 2, 2, 3)
    out = vq(z)
    expected = entropy_by_hand(z.reshape(-1, 3), vq.embedding.weight.detach(), 2.0)
    torch.testing.assert_close(out.entropy_loss, expected)
    torch.testing.assert_close(out.loss, out.codebook_loss + 0.25 * out.commitment_loss + 0.3 * expected)
    assert VectorQuantizer(codebook_size=6, code_dim=3)(z).entropy_loss is None  # off: not even computed
    with pytest.raises(ValueError, match="entropy_temperature"):
        VectorQuantizer(codebook_size=6, code_dim=3, entropy_temperature=0.0)


def test_entropy_loss_prefers_confident_and_diverse_assignments():
    codebook = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    vq = VectorQuantizer(codebook_size=4, code_dim=2, entropy_loss_weight=1.0, entropy_temperature=0.01)
    vq.embedding.weight.data.copy_(codebook)
    diverse = vq(codebook.view(1, 2, 2, 2)).entropy_loss            # each token on its own code
    collapsed = vq(codebook[:1].expand(4, 2).reshape(1, 2, 2, 2)).entropy_loss  # every token on code 0
    unsure = vq(torch.full((1, 2, 2, 2), 0.5)).entropy_loss           # every token equidistant from all codes
    assert diverse.item() == pytest.approx(-math.log(4), abs=1e-4)   # certain tokens, uniform batch: the minimum
    assert collapsed.item() == pytest.approx(0.0, abs=1e-4)
    assert unsure.item() == pytest.approx(0.0, abs=1e-4)             # uniform batch, but each token unsure
    assert diverse < collapsed


def test_entropy_loss_gradient_reaches_encoder_and_codebook():
    torch.manual_seed(5)
    vq = VectorQuantizer(codebook_size=8, code_dim=4, l2_normalize=True, entropy_loss_weight=1.0,
                         entropy_temperature=0.5)
    z = torch.randn(2, 3, 3, 4, requires_grad=True)
    vq(z).entropy_loss.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert vq.embedding.weight.grad is not None and vq.embedding.weight.grad.abs().sum() > 0


def test_entropy_loss_through_vqhit_aux():
    from vqhit import VQHiT
    torch.manual_seed(6)
    model = VQHiT.from_preset("vqhit-tiny", entropy_loss_weight=0.5, entropy_temperature=1.0).train()
    images = torch.rand(2, 3, model.config.resolution, model.config.resolution) * 2 - 1
    _, aux = model(images)
    torch.testing.assert_close(aux["vq_loss"], aux["codebook_loss"] + model.config.beta * aux["commitment_loss"]
                               + 0.5 * aux["entropy_loss"])
    aux["entropy_loss"].backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0  # the encoder side learns from it
    assert "entropy_loss" not in VQHiT.from_preset("vqhit-tiny")(images)[1]  # off by default (the paper)
