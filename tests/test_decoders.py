"""Decoder variants of VQHiT (config key `decoder`): "hit" (the paper's), "conv" (taming's VQGAN decoder), "vit".

Exact counts at the paper scale, the tiny pair's scaling, shapes, the adaptive-weight layer, save/load, the
taming import of the conv decoder, and the command-line path `--model-option decoder=...`.
"""
import contextlib
import io

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vqhit import VQHiT
from vqhit.models.decoders import ConvDecoder, ViTDecoder
from vqhit.models.vqhit import HiTDecoder
from vqhit.presets import TOKENIZER_DECODER_PARAMS
from vqhit.train_config import parse_config
from vqhit.training import build_model

TINY = {"hit": "vqhit-tiny", "conv": "vqgan-tiny", "vit": "vqvit-tiny"}
KINDS = {"hit": HiTDecoder, "conv": ConvDecoder, "vit": ViTDecoder}


def count(module):
    return sum(p.numel() for p in module.parameters())


def decoder_gflops(model) -> float:
    c = model.config
    with FlopCounterMode(display=False) as counter:
        model.decoder(torch.zeros(1, c.grid, c.grid, c.code_dim, device="meta"))
    return counter.get_total_flops() / 1e9


def test_paper_conv_decoder_is_tamings_f16_decoder_exactly():
    with torch.device("meta"):
        vqgan = VQHiT.from_preset("vqgan-f16-1024")
        vqhit = VQHiT.from_preset("vqhit-b-f16-1024")
    assert isinstance(vqgan.decoder, ConvDecoder)
    assert count(vqgan.decoder) == TOKENIZER_DECODER_PARAMS["vqgan-f16-1024"] == 42_515_587
    # taming's Decoder alone is 42,449,795; post_quant_conv (256 -> 256, 1x1) adds 65,792.
    assert count(vqgan.decoder) - count(vqgan.decoder.post_quant_conv) == 42_449_795
    assert count(vqgan.decoder.post_quant_conv) == 256 * 256 + 256
    # Same encoder, quant_conv and codebook as the paper's VQ-HiT: only the decoder differs.
    assert count(vqgan) - count(vqgan.decoder) == count(vqhit) - count(vqhit.decoder)


def test_tiny_pair_is_scaled_like_the_papers_pair():
    with torch.device("meta"):
        models = {kind: VQHiT.from_preset(name) for kind, name in TINY.items()}
    for kind, model in models.items():
        assert isinstance(model.decoder, KINDS[kind])
    assert count(models["conv"].decoder) == TOKENIZER_DECODER_PARAMS["vqgan-tiny"] == 1_699_459
    assert count(models["vit"].decoder) == TOKENIZER_DECODER_PARAMS["vqvit-tiny"] == 2_443_968
    ratio = count(models["conv"].decoder) / count(models["hit"].decoder)
    assert 2.2 < ratio < 2.7, ratio  # the paper's pair: 42.5M / 17.5M = 2.43x
    flops_ratio = decoder_gflops(models["vit"]) / decoder_gflops(models["hit"])
    assert 0.9 < flops_ratio < 1.1, flops_ratio  # vit at about the HiT decoder's arithmetic


def test_paper_vit_default_is_sized_to_the_hit_decoders_flops():
    with torch.device("meta"):
        vit = VQHiT.from_preset("vqhit-b-f16-1024", decoder="vit")
        hit = VQHiT.from_preset("vqhit-b-f16-1024")
    assert 0.9 < decoder_gflops(vit) / decoder_gflops(hit) < 1.1


@pytest.mark.parametrize("kind", ["hit", "conv", "vit"])
def test_shapes_and_the_adaptive_weight_layer(kind):
    torch.manual_seed(0)
    model = VQHiT.from_preset(TINY[kind]).train()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    reconstruction, aux = model(x)
    assert reconstruction.shape == x.shape and aux["indices"].shape == (2, 8, 8)
    last = model.last_decoder_layer()
    assert any(last is p for p in model.decoder.parameters())
    grad, = torch.autograd.grad(((reconstruction - x) ** 2).mean(), last)
    assert grad.abs().sum() > 0  # the layer the adversarial weight measures at really feeds the output
    with torch.no_grad():
        assert model.eval().decode_indices(aux["indices"]).shape == x.shape


@pytest.mark.parametrize("kind", ["conv", "vit"])
def test_save_and_load_round_trip(tmp_path, kind):
    torch.manual_seed(0)
    model = VQHiT.from_preset(TINY[kind]).eval()
    model.save_pretrained(tmp_path / kind)
    loaded = VQHiT.from_pretrained(tmp_path / kind).eval()
    assert loaded.config.decoder == kind and isinstance(loaded.decoder, KINDS[kind])
    idx = torch.randint(0, model.config.codebook_size, (1, 8, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode_indices(idx), model.decode_indices(idx), rtol=0, atol=0)
    with pytest.raises(ValueError, match="decoder"):  # weights of another decoder kind are refused by name
        VQHiT.from_preset("vqhit-tiny").load_weights(tmp_path / kind)


def _taming_state(model_config) -> dict:
    """A taming VQModel's state dict built from taming's own modules (not from ours), for the tiny settings."""
    from taming.modules.diffusionmodules.model import Decoder, Encoder
    c = model_config
    dd = dict(ch=c.encoder_channels, out_ch=3, ch_mult=tuple(c.conv_decoder_channel_mult),
              num_res_blocks=c.conv_decoder_res_blocks, attn_resolutions=c.conv_decoder_attn_resolutions,
              dropout=0.0, in_channels=3, resolution=c.resolution, z_channels=c.encoder_z_channels)
    ed = dict(dd, ch_mult=tuple(c.encoder_channel_mult), num_res_blocks=c.encoder_res_blocks,
              attn_resolutions=c.encoder_attn_resolutions, double_z=False)
    with contextlib.redirect_stdout(io.StringIO()):
        parts = {"encoder": Encoder(**ed), "decoder": Decoder(**dd),
                 "quant_conv": torch.nn.Conv2d(c.encoder_z_channels, c.code_dim, 1),
                 "post_quant_conv": torch.nn.Conv2d(c.code_dim, c.encoder_z_channels, 1)}
    state = {f"{name}.{k}": v for name, m in parts.items() for k, v in m.state_dict().items()}
    state["quantize.embedding.weight"] = torch.randn(c.codebook_size, c.code_dim)
    state["loss.discriminator.main.0.weight"] = torch.zeros(3)  # taming's loss weights: ignored
    return state, parts


def test_load_taming_checkpoint_imports_the_conv_decoder(tmp_path):
    torch.manual_seed(0)
    model = VQHiT.from_preset("vqgan-tiny", l2_normalize=False).eval()  # taming's codes are plain, not cosine
    state, taming = _taming_state(model.config)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "global_step": 7}, path)  # Lightning's layout
    model.load_taming_checkpoint(path)
    idx = torch.randint(0, model.config.codebook_size, (1, 8, 8))
    with torch.no_grad():
        codes = state["quantize.embedding.weight"][idx].permute(0, 3, 1, 2)
        expected = taming["decoder"].eval()(taming["post_quant_conv"](codes))  # taming's VQModel.decode
        torch.testing.assert_close(model.decode_indices(idx), expected)
    # A HiT decoder is left as it is: taming's decoder keys are not its own.
    hit = VQHiT.from_preset("vqhit-tiny")
    before = {k: v.clone() for k, v in hit.decoder.state_dict().items()}
    hit.load_taming_checkpoint(path)
    assert all(torch.equal(v, hit.decoder.state_dict()[k]) for k, v in before.items())
    # A checkpoint without a decoder (encoder-only export) cannot fill a conv decoder: the error says which keys.
    torch.save({k: v for k, v in state.items() if not k.startswith("decoder.")}, tmp_path / "enc.ckpt")
    with pytest.raises(ValueError, match=r"decoder='conv'.*decoder\."):
        model.load_taming_checkpoint(tmp_path / "enc.ckpt")


@pytest.mark.parametrize("kind", ["conv", "vit"])
def test_command_line_model_option_picks_the_decoder(kind):
    config = parse_config(["--model", "vqhit-tiny", "--model-option", f"decoder={kind}"], "test", task="vqhit")
    model = build_model(config, "vqhit")  # what train_vqhit.py trains
    assert isinstance(model.decoder, KINDS[kind])


def test_bad_decoder_settings_are_clear_errors():
    with pytest.raises(ValueError, match=r"unknown decoder 'unet'.*'hit', 'conv', 'vit'"):
        VQHiT.from_preset("vqhit-tiny", decoder="unet")
    with pytest.raises(ValueError, match="has 3 levels but the encoder has 4"):
        VQHiT.from_preset("vqhit-tiny", decoder="conv", conv_decoder_channel_mult=[1, 2, 4])
    with pytest.raises(ValueError, match="multiples of 32"):
        VQHiT.from_preset("vqhit-tiny", decoder="conv", conv_decoder_channels=24)
    with pytest.raises(ValueError, match="not divisible by vit_decoder_heads"):
        VQHiT.from_preset("vqhit-tiny", decoder="vit", vit_decoder_width=100, vit_decoder_heads=3)


def test_vit_patches_land_where_their_tokens_are():
    """Without blocks each token decodes alone: changing token (row 1, col 2) changes only that 4x4 patch."""
    torch.manual_seed(0)
    decoder = ViTDecoder(code_dim=8, grid=4, resolution=16, width=16, depth=0, num_heads=2).eval()
    codes = torch.randn(1, 4, 4, 8)
    changed = codes.clone()
    changed[0, 1, 2] += 1.0
    with torch.no_grad():
        moved = (decoder(changed) - decoder(codes)).abs().sum(1)[0] > 0  # (16, 16) pixels that changed
    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[4:8, 8:12] = True
    assert torch.equal(moved, expected)
