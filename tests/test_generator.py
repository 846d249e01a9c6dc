"""The HiT generator: exact parameter counts, shapes, live cross-attention, BatchNorm modes, bad configs."""
import pytest
import torch

from vqhit import HiTConfig, HiTGenerator, list_presets
from vqhit.presets import GENERATOR_PARAMS


@pytest.mark.parametrize("name", sorted(GENERATOR_PARAMS))
def test_preset_parameter_counts_are_exact(name):
    with torch.device("meta"):  # no memory, no init cost: the count is structural
        G = HiTGenerator.from_preset(name)
    assert G.num_parameters() == GENERATOR_PARAMS[name]


def test_hit_b_256_per_stage_breakdown():
    """Where HiT-B's parameters go, stage by stage; a miscounted stage shows up here by name."""
    with torch.device("meta"):
        G = HiTGenerator.from_preset("hit-b-256")
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(G.to_map) + count(G.memory) == 21_021_696
    expected = [8_078_528, 8_242_304, 2_376_448, 1_071_488, 1_141_283, 4_285_923]
    assert [count(s) for s in G.stages.stages] == expected


@pytest.mark.parametrize("name", list_presets("generator"))
def test_every_preset_maps_batch_of_two_to_images(name):
    # The same forward code on the meta device: shapes propagate with no compute (full-size forwards of the
    # 1024 preset take a minute on a CI CPU; the benchmarks run them for real).
    with torch.device("meta"):
        G = HiTGenerator.from_preset(name)
        out = G(torch.randn(2, G.config.latent_dim))
    r = G.config.resolution
    assert out.shape == (2, 3, r, r)


@pytest.mark.parametrize("name", ["hit-tiny", "hit-128-release"])
def test_small_presets_generate_finite_images(name):
    torch.manual_seed(0)
    G = HiTGenerator.from_preset(name).eval()
    with torch.no_grad():
        out = G(torch.randn(2, G.config.latent_dim))
    assert out.shape == (2, 3, G.config.resolution, G.config.resolution)
    assert torch.isfinite(out).all() and out.std() > 0


def test_changing_memory_changes_every_stage():
    """Cross-attention is live at every stage, the MLP-only high-resolution stages included."""
    torch.manual_seed(0)
    G = HiTGenerator.from_preset("hit-tiny").double().eval()
    z = torch.randn(2, G.config.latent_dim, dtype=torch.float64)
    x = G.to_map(z).view(2, 8, 8, -1)
    memory = G.memory(z[:, None])

    def stage_outputs(mem):
        outs, h = [], x
        img = None
        for stage in G.stages.stages:
            h, img = stage(h, mem, img)
            outs.append(h if img is None else torch.cat([h.flatten(1), img.flatten(1)], 1))
        return outs

    other = memory + 0.5 * torch.randn_like(memory)
    for i, (a, b) in enumerate(zip(stage_outputs(memory), stage_outputs(other))):
        assert (a - b).abs().max() > 1e-6, f"stage {i} ignores the memory Z"


def test_batchnorm_train_uses_batch_statistics_eval_running_ones():
    torch.manual_seed(0)
    G = HiTGenerator.from_preset("hit-tiny")
    z = torch.randn(4, G.config.latent_dim)
    bn = G.stages.stages[0].cross.norm
    before = bn.running_mean.clone()
    G.train()
    with torch.no_grad():
        alone, batched = G(z[:1].repeat(2, 1))[0], G(z)[0]
    assert not torch.allclose(alone, batched, atol=1e-5)  # a sample's output depends on its batch
    assert not torch.equal(before, bn.running_mean)       # running statistics moved
    G.eval()
    after = bn.running_mean.clone()
    with torch.no_grad():
        alone, batched = G(z[:1].repeat(2, 1))[0], G(z)[0]
    torch.testing.assert_close(alone, batched, rtol=1e-4, atol=1e-5)
    assert torch.equal(after, bn.running_mean)


def test_batchnorm_uses_release_settings():
    with torch.device("meta"):
        bn = HiTGenerator.from_preset("hit-b-256").stages.stages[0].cross.norm
    assert bn.momentum == 0.01 and bn.eps == 1e-3  # Keras momentum 0.99, eps 1e-3
    with torch.device("meta"):
        assert HiTGenerator.from_preset("hit-tiny").stages.stages[0].cross.norm.momentum == 0.1


def test_initialisation_is_truncated_normal():
    G = HiTGenerator.from_preset("hit-tiny")
    w = G.to_map.weight
    assert w.abs().max() <= 0.04 and 0.015 < w.std() < 0.025
    assert (G.to_map.bias == 0).all()
    pos = G.stages.stages[0].pos_embed
    assert pos.abs().max() <= 0.04 and pos.std() > 0.01


def test_no_tanh_output_is_unbounded():
    torch.manual_seed(0)
    G = HiTGenerator.from_preset("hit-tiny").eval()
    with torch.no_grad():
        for p in G.stages.stages[-1].to_rgb.parameters():
            p.mul_(50)
        out = G(torch.randn(2, G.config.latent_dim))
    assert out.abs().max() > 1.0


@pytest.mark.parametrize("overrides", [
    dict(multi_query=False), dict(norm="layer"), dict(norm="syncbatch"), dict(attention_mode="regional"),
    dict(attention_mode="dilated"), dict(attention_mode="axial"), dict(cross_attention=False)])
def test_options_build_and_run(overrides):
    torch.manual_seed(0)
    base = HiTGenerator.from_preset("hit-tiny")
    G = HiTGenerator.from_preset("hit-tiny", **overrides)
    out = G(torch.randn(2, 64))
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    out.mean().backward()  # every option trains: gradients reach the first projection
    assert G.to_map.weight.grad.abs().sum() > 0
    if overrides == dict(multi_query=False):  # K/V widen from d to C in every attention layer
        assert G.num_parameters() > base.num_parameters()
    if overrides == dict(cross_attention=False):
        assert G.memory is None and all(s.cross is None for s in G.stages.stages)


def test_config_round_trips_through_json():
    config = HiTConfig.from_preset("hit-b-256", attention_mode="axial")
    assert HiTConfig.from_json(config.to_json()) == config
    with torch.device("meta"):
        assert HiTGenerator(HiTConfig.from_json(config.to_json())).config == config


def test_save_and_load_pretrained(tmp_path):
    torch.manual_seed(0)
    G = HiTGenerator.from_preset("hit-tiny")
    G.train()(torch.randn(4, 64))  # move BN running stats away from their init: they must be saved too
    G.eval().save_pretrained(tmp_path / "g")
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    H = HiTGenerator.from_pretrained(tmp_path / "g").eval()
    z = torch.randn(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(G(z), H(z), rtol=0, atol=0)
    other = HiTGenerator.from_preset("hit-tiny", widths=[128, 64, 64])
    with pytest.raises(ValueError, match="another configuration"):
        other.load_weights(tmp_path / "g")


@pytest.mark.parametrize("overrides,message", [
    (dict(resolution=96), "not of the form 8·2"),
    (dict(resolution=64), "needs 4 stages"),
    (dict(heads=[3, 4, 4]), "not divisible by 3 heads"),
    (dict(widths=[120, 64, 32], heads=[3, 4, 4]), "must be even"),
    (dict(block_sizes=[3, 4, None]), "block size 3 does not divide the 8x8 map"),
    (dict(block_sizes=[4, 4, 4]), "last stage must be a high-resolution MLP stage"),
    (dict(norm="group"), "unknown norm"),
])
def test_bad_configs_raise_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        HiTGenerator.from_preset("hit-tiny", **overrides)


def test_wrong_latent_width_is_an_error():
    G = HiTGenerator.from_preset("hit-tiny")
    with pytest.raises(ValueError, match=r"latents of shape \(B, 64\)"):
        G(torch.randn(2, 128))


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="hit-b-256"):
        HiTGenerator.from_preset("hit-xl-256")


def test_latents_of_another_float_dtype_are_converted_and_integer_ones_refused():
    torch.manual_seed(0)
    G = HiTGenerator.from_preset("hit-tiny").eval()
    z = torch.randn(2, G.config.latent_dim)
    with torch.no_grad():
        assert torch.equal(G(z.double()), G(z))
        assert G.to(torch.bfloat16)(z).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="floating-point latents"):
        G(z.long())
