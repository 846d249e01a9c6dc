"""VQ-HiT: exact counts, encode/decode round trip, input checks, save/load, taming checkpoint import."""
import pytest
import torch

from vqhit import HiTGenerator, VQHiT, list_presets
from vqhit.presets import ENCODER_PARAMS, TOKENIZER_DECODER_PARAMS


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_paper_preset_counts_are_exact():
    with torch.device("meta"):
        model = VQHiT.from_preset("vqhit-b-f16-1024")
    assert count(model.decoder) == TOKENIZER_DECODER_PARAMS["vqhit-b-f16-1024"] == 17_512_710
    assert count(model.encoder) == ENCODER_PARAMS["vqhit-b-f16-1024"] == 29_298_176
    assert count(model.quant_conv) == 256 * 256 + 256
    assert model.quantize.embedding.weight.shape == (1024, 256)


def test_num_parameters_counts_the_module_it_is_given(tiny):
    # A compiled module has no truth value, and an empty one is falsy: neither may fall back to the whole model.
    assert tiny.num_parameters(torch.compile(tiny.decoder)) == count(tiny.decoder)
    assert tiny.num_parameters(torch.nn.Sequential()) == 0
    assert tiny.num_parameters() == count(tiny)


def test_paper_preset_round_trips_256_images_through_16x16_tokens():
    torch.manual_seed(0)
    model = VQHiT.from_preset("vqhit-b-f16-1024").eval()
    images = torch.rand(1, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        indices = model.encode(images)
        assert indices.shape == (1, 16, 16) and indices.dtype == torch.int64
        assert 0 <= indices.min() and indices.max() < 1024
        reconstruction = model.decode_indices(indices)
    assert reconstruction.shape == (1, 3, 256, 256) and torch.isfinite(reconstruction).all()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return VQHiT.from_preset("vqhit-tiny")


def test_tiny_encode_decode_paths_agree(tiny):
    tiny.eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        idx = tiny.encode(x)
        assert idx.shape == (2, 8, 8)
        from_indices = tiny.decode_indices(idx)
        from_latents = tiny.decode(tiny.get_codebook_entry(idx))
        reconstruction, aux = tiny(x)
    torch.testing.assert_close(from_indices, from_latents)
    torch.testing.assert_close(reconstruction, from_indices, rtol=1e-5, atol=1e-5)  # forward = decode(encode)
    assert torch.equal(aux["indices"], idx)


def test_inference_calls_build_no_autograd_graph(tiny):
    """encode and decode_indices are inference: with autograd on (the default) and parameters that require grad,
    their results carry no history; decode(get_codebook_entry(...)) stays differentiable for those who want it."""
    for mode in (tiny.eval, tiny.train):
        mode()
        assert torch.is_grad_enabled() and all(p.requires_grad for p in tiny.parameters())
        idx = tiny.encode(torch.rand(2, 3, 64, 64) * 2 - 1)
        images = tiny.decode_indices(idx)
        for result in (idx, images):
            assert result.grad_fn is None and not result.requires_grad
    assert tiny.decode(tiny.get_codebook_entry(idx)).requires_grad


def test_training_forward_returns_losses_and_gradients_reach_encoder(tiny):
    tiny.train()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    reconstruction, aux = tiny(x)
    assert {"vq_loss", "codebook_loss", "commitment_loss", "indices"} <= set(aux)
    ((reconstruction - x) ** 2).mean().backward()  # the straight-through estimator carries it to the encoder
    assert tiny.encoder.conv_in.weight.grad.abs().sum() > 0
    tiny.zero_grad()


@pytest.mark.parametrize("options", [{}, {"lookup_dim": 8}])
def test_training_forward_runs_in_the_models_low_precision_dtype(options):
    # The search stays fp32 inside the quantizer; the codes it hands on are in the model's dtype.
    torch.manual_seed(0)
    model = VQHiT.from_preset("vqhit-tiny", **options).to(torch.bfloat16).train()
    x = (torch.rand(2, 3, 64, 64) * 2 - 1).to(torch.bfloat16)
    reconstruction, aux = model(x)
    assert reconstruction.dtype == torch.bfloat16 and torch.isfinite(reconstruction).all()
    assert torch.isfinite(aux["vq_loss"])
    reconstruction.float().square().mean().backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0


def test_freeze_options():
    model = VQHiT.from_preset("vqhit-tiny", freeze_encoder=True, freeze_codebook=True)
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert not any(p.requires_grad for p in model.quantize.parameters())
    assert all(p.requires_grad for p in model.decoder.parameters())


def test_inputs_are_checked(tiny):
    with pytest.raises(ValueError, match=r"shape \(B, 3, 64, 64\)"):
        tiny.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"shape \(B, 3, 64, 64\)"):
        tiny.encode(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match="far outside"):
        tiny.encode(torch.full((1, 3, 64, 64), 255.0))
    with pytest.raises(ValueError, match=r"in \[0, 256\)"):
        tiny.decode_indices(torch.full((1, 8, 8), 256))
    with pytest.raises(ValueError, match=r"shape \(B, 8, 8\)"):
        tiny.decode_indices(torch.zeros(1, 16, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        tiny.decode_indices(torch.zeros(1, 8, 8))


def test_nan_images_are_refused(tiny):
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    x[0, 1, 5, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        tiny.encode(x)
    with pytest.raises(ValueError, match="NaN"):
        tiny(x)
    x[0, 1, 5, 7] = float("inf")
    with pytest.raises(ValueError, match="far outside"):
        tiny(x)


def test_images_of_another_float_dtype_are_converted_to_the_models(tiny):
    tiny.eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.equal(tiny.encode(x.double()), tiny.encode(x))
    low = VQHiT.from_preset("vqhit-tiny").to(torch.bfloat16).eval()
    assert torch.equal(low.encode(x), low.encode(x.bfloat16()))


def test_uint8_indices_decode_like_int64(tiny):
    """load_tokens returns uint8 for a 256-code book: 255 must not wrap around in the range check."""
    tiny.eval()
    idx = torch.randint(0, 256, (2, 8, 8))
    idx[0, 0, 0] = 255
    with torch.no_grad():
        torch.testing.assert_close(tiny.decode_indices(idx.to(torch.uint8)), tiny.decode_indices(idx))


@pytest.mark.parametrize("decoder", ["hit", "conv"])
def test_an_empty_batch_decodes_to_an_empty_image_batch(decoder):
    model = VQHiT.from_preset("vqhit-tiny", decoder=decoder).eval()
    assert model.encode(torch.zeros(0, 3, 64, 64)).shape == (0, 8, 8)
    images = model.decode_indices(torch.zeros(0, 8, 8, dtype=torch.long))
    assert images.shape == (0, 3, 64, 64) and images.dtype == torch.float32
    assert model.decode(torch.zeros(0, 32, 8, 8)).shape == (0, 3, 64, 64)
    generator = HiTGenerator.from_preset("hit-tiny").eval()
    assert generator(torch.randn(0, 64)).shape == (0, 3, 32, 32)


def test_decode_says_what_shape_it_expects(tiny):
    with pytest.raises(ValueError, match=r"expected code vectors of shape \(B, 32, 8, 8\).*got \(1, 16, 8, 8\)"):
        tiny.decode(torch.zeros(1, 16, 8, 8))
    with pytest.raises(ValueError, match=r"expected code vectors of shape \(B, 32, 8, 8\).*got \(1, 32, 4, 4\)"):
        tiny.decode(torch.zeros(1, 32, 4, 4))
    with pytest.raises(ValueError, match=r"expected code vectors of shape \(B, 32, 8, 8\).*got \(1, 8, 8, 32\)"):
        tiny.decode(torch.zeros(1, 8, 8, 32))  # channels-last by mistake


def train_codebook(freeze_codebook: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The codebook before and after three training steps with dead-code restart due every step."""
    torch.manual_seed(0)
    model = VQHiT.from_preset("vqhit-tiny", freeze_codebook=freeze_codebook, dead_code_steps=1).train()
    before = model.quantize.embedding.weight.detach().clone()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        reconstruction, aux = model(torch.rand(2, 3, 64, 64) * 2 - 1)
        (reconstruction.square().mean() + aux["vq_loss"]).backward()
        optimizer.step()
        optimizer.zero_grad()
    return before, model.quantize.embedding.weight.detach()


def test_frozen_codebook_is_never_changed_by_training():
    """freeze_codebook: neither a gradient step nor a dead-code restart may move a code (token ids stay valid)."""
    before, after = train_codebook(freeze_codebook=True)
    assert torch.equal(after, before)
    before, after = train_codebook(freeze_codebook=False)  # the same loop does move an unfrozen book
    assert (after != before).any(dim=1).sum() > 128


def test_bad_config_is_explained():
    with pytest.raises(ValueError, match="take the 8x8 grid to 32x32, not 64x64"):
        VQHiT.from_preset("vqhit-tiny", decoder_widths=[128, 64, 32], decoder_heads=[4, 4, 4],
                          decoder_blocks=[1, 1, 1], decoder_block_sizes=[4, None, None])


def test_save_and_load_give_identical_outputs(tmp_path, tiny):
    tiny.train()
    tiny(torch.rand(4, 3, 64, 64) * 2 - 1)  # move BatchNorm statistics: they are saved too
    tiny.eval().save_pretrained(tmp_path / "tok")
    loaded = VQHiT.from_pretrained(tmp_path / "tok").eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(tiny.encode(x), loaded.encode(x))
        assert torch.equal(tiny(x)[0], loaded(x)[0])
    other = VQHiT.from_preset("vqhit-tiny", codebook_size=128)
    with pytest.raises(ValueError, match="another configuration"):
        other.load_weights(tmp_path / "tok")
    from vqhit import HiTGenerator
    with pytest.raises(ValueError, match="holds a 'vqhit' checkpoint"):
        HiTGenerator.from_pretrained(tmp_path / "tok")


def test_load_taming_checkpoint(tmp_path, tiny):
    """A Lightning-style checkpoint in taming's key layout: encoder, quant_conv and codebook come across,
    taming's decoder and loss weights are ignored, and token ids match taming's own lookup."""
    torch.manual_seed(1)
    donor = VQHiT.from_preset("vqhit-tiny", l2_normalize=False, restart_dead_codes=False)
    state = {k: v.clone() for k, v in donor.state_dict().items()
             if k.startswith(("encoder.", "quant_conv.", "quantize.embedding."))}
    state["decoder.conv_in.weight"] = torch.zeros(3)      # taming's conv decoder: not ours, ignored
    state["post_quant_conv.weight"] = torch.zeros(3)
    state["loss.discriminator.main.0.weight"] = torch.zeros(3)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "global_step": 10}, path)

    model = VQHiT.from_preset("vqhit-tiny", l2_normalize=False, restart_dead_codes=False, freeze_encoder=True)
    decoder_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    model.load_taming_checkpoint(path)
    for k, v in state.items():
        if k in model.state_dict():
            assert torch.equal(model.state_dict()[k], v)
    assert all(torch.equal(decoder_before[k], v) for k, v in model.decoder.state_dict().items())
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        z = donor.quant_conv(donor.encoder(x)).permute(0, 2, 3, 1)
        taming_ids = torch.cdist(z.reshape(-1, z.shape[-1]), state["quantize.embedding.weight"]).argmin(1)
        assert torch.equal(model.encode(x).flatten(), taming_ids)

    del state["quant_conv.weight"]
    torch.save({"state_dict": state}, path)
    with pytest.raises(ValueError, match="missing keys.*quant_conv.weight"):
        model.load_taming_checkpoint(path)


def test_presets_are_listed():
    assert {"vqhit-b-f16-1024", "vqhit-tiny"} <= set(list_presets("tokenizer"))
    assert "hit-b-256" not in list_presets("tokenizer")
