"""Every named preset, as plain data. The paper presets have exactly the paper's parameter counts
(tests/test_generator.py and tests/test_vqhit.py check them).

Generator presets are keyword arguments of `HiTConfig`; tokenizer presets of `VQHiTConfig`. Build them with
`HiTConfig.from_preset(name, **overrides)` / `HiTGenerator.from_preset(...)` (and the VQHiT equivalents).
This module imports nothing, so the models can import it.
"""
from __future__ import annotations

GENERATOR_PRESETS = {
    # Paper Table 9's HiT-S (Table 4 prints 38.01M, which no configuration consistent with Table 9 gives).
    "hit-s-256": dict(resolution=256, latent_dim=512, widths=[512, 256, 128, 64, 32, 32], heads=[16, 8, 4, 4, 4, 4],
                      blocks=[2, 2, 1, 1, 1, 1], block_sizes=[4, 4, 8, 8, None, None]),          # 34,727,078
    "hit-b-256": dict(resolution=256, latent_dim=512, widths=[512, 512, 256, 128, 64, 64], heads=[16, 8, 4, 4, 4, 4],
                      blocks=[2, 2, 2, 2, 1, 1], block_sizes=[4, 4, 8, 8, None, None]),          # 46,217,670
    "hit-l-256": dict(resolution=256, latent_dim=512, widths=[1024, 512, 256, 128, 128, 128],
                      heads=[16, 8, 4, 4, 4, 4], blocks=[2, 2, 2, 2, 2, 2],
                      block_sizes=[4, 4, 8, 8, None, None]),                                     # 97,462,214
    "hit-b-1024": dict(resolution=1024, latent_dim=512, widths=[512, 512, 256, 128, 64, 64, 32, 32],
                       heads=[16, 8, 4, 4, 4, 4, 4, 4], blocks=[2, 2, 2, 2, 1, 1, 1, 1],
                       block_sizes=[4, 4, 8, 8, None, None, None, None]),                        # 88,216,300
    # The paper's ImageNet-128 model: HiT-L without the 256 stage, latent 256.
    "hit-l-128": dict(resolution=128, latent_dim=256, widths=[1024, 512, 256, 128, 128], heads=[16, 8, 4, 4, 4],
                      blocks=[2, 2, 2, 2, 2], block_sizes=[4, 4, 8, 8, None]),                   # 67,602,435
    # The official release's own 128 config (differs from the paper's ImageNet model).
    "hit-128-release": dict(resolution=128, latent_dim=256, widths=[512, 512, 256, 128, 128],
                            heads=[16, 8, 4, 4, 4], blocks=[2, 2, 2, 2, 2],
                            block_sizes=[4, 4, 8, 8, None]),                                     # 32,866,627
    # Small enough for CPU tests and demos: 32x32, two attention stages and one MLP stage. BatchNorm momentum
    # 0.1: with the release's 0.01 the running statistics of a few-hundred-step demo still sit near their
    # initial values, and eval-mode outputs come out flat.
    "hit-tiny": dict(resolution=32, bn_momentum=0.1, latent_dim=64, widths=[128, 64, 32], heads=[4, 4, 4], blocks=[1, 1, 1],
                     block_sizes=[4, 4, None]),
}

GENERATOR_PARAMS = {"hit-s-256": 34_727_078, "hit-b-256": 46_217_670, "hit-l-256": 97_462_214,
                    "hit-b-1024": 88_216_300, "hit-l-128": 67_602_435, "hit-128-release": 32_866_627}

TOKENIZER_PRESETS = {
    # Paper Appendix A.5: VQGAN f16 encoder, 1024 codes on a 16x16 grid, HiT-B decoder from 16x16.
    "vqhit-b-f16-1024": dict(
        resolution=256,
        encoder_channels=128, encoder_channel_mult=[1, 1, 2, 2, 4], encoder_res_blocks=2,
        encoder_attn_resolutions=[16], encoder_z_channels=256,
        codebook_size=1024, code_dim=256,
        decoder_widths=[512, 256, 128, 64, 64], decoder_heads=[8, 4, 4, 4, 4], decoder_blocks=[2, 2, 2, 1, 1],
        decoder_block_sizes=[4, 8, 8, None, None], decoder_memory_dim=512),                      # decoder 17,512,710
    # CPU tests and demos: 64x64 images, f8 -> an 8x8 grid of 256 codes. Cosine codes with dead-code restart:
    # with plain codes this small model collapses to a handful of codes within 100 steps.
    "vqhit-tiny": dict(
        resolution=64, l2_normalize=True, restart_dead_codes=True, dead_code_steps=20, bn_momentum=0.1,
        encoder_channels=32, encoder_channel_mult=[1, 2, 2, 4], encoder_res_blocks=1,
        encoder_attn_resolutions=[], encoder_z_channels=64,
        codebook_size=256, code_dim=32,
        decoder_widths=[128, 64, 32, 32], decoder_heads=[4, 4, 4, 4], decoder_blocks=[1, 1, 1, 1],
        decoder_block_sizes=[4, 4, None, None], decoder_memory_dim=128),
}

TOKENIZER_DECODER_PARAMS = {"vqhit-b-f16-1024": 17_512_710}
ENCODER_PARAMS = {"vqhit-b-f16-1024": 29_298_176}  # taming's Encoder alone, without quant_conv

# Decoder baselines (vqhit.models.decoders): the same encoder and codebook as a VQ-HiT preset, another decoder.
# Decoder counts include the conv decoder's post_quant_conv; FLOPs are per image (FlopCounterMode, 2 per MAC).
TOKENIZER_PRESETS.update({
    # The paper's baseline (Table 2, rFID 8.00): taming's VQGAN f16, i.e. its Decoder mirroring the encoder's
    # settings, behind post_quant_conv. 252.7 GFLOPs against the HiT decoder's 31.8.
    "vqgan-f16-1024": dict(TOKENIZER_PRESETS["vqhit-b-f16-1024"], decoder="conv"),      # decoder 42,515,587
    # The tiny pair beside vqhit-tiny (decoder 687,270 params, 0.333 GFLOPs), scaled like the paper's pair:
    # conv at 2.47x the HiT decoder's parameters (paper 2.43x), attention at the lowest level as taming's f16;
    # vit at 0.322 GFLOPs, 3% under the HiT decoder, as the paper-scale vit default (31.0 vs 31.8 GFLOPs).
    "vqgan-tiny": dict(TOKENIZER_PRESETS["vqhit-tiny"], decoder="conv", conv_decoder_channel_mult=[1, 2, 3, 4],
                       conv_decoder_res_blocks=0, conv_decoder_attn_resolutions=[8]),   # decoder 1,699,459
    "vqvit-tiny": dict(TOKENIZER_PRESETS["vqhit-tiny"], decoder="vit", vit_decoder_width=256,
                       vit_decoder_depth=3, vit_decoder_heads=4),                       # decoder 2,443,968
})
TOKENIZER_DECODER_PARAMS.update({"vqgan-f16-1024": 42_515_587, "vqgan-tiny": 1_699_459, "vqvit-tiny": 2_443_968})
# The no-argument tokenizer demo (its recipe is in recipes.py): vqhit-tiny's widths, but f4 instead of f8, i.e. a
# 16x16 grid of 1024 codes on 64x64 images (10 bits per 4x4 pixels, 8x the 8x8 grid's bits) and a 3-stage decoder
# 16 -> 32 -> 64. Unseen whole photographs reach 20 dB in about 1100 CPU steps; the 8x8 grid stops near 16 dB.
TOKENIZER_PRESETS["vqhit-demo"] = dict(
    TOKENIZER_PRESETS["vqhit-tiny"], encoder_channel_mult=[1, 2, 4], codebook_size=1024,
    decoder_widths=[128, 64, 32], decoder_heads=[4, 4, 4], decoder_blocks=[1, 1, 1],
    decoder_block_sizes=[4, 8, None])                                                      # 1,851,411 params


def list_presets(kind: str | None = None) -> list[str]:
    """Names of the presets: `kind` None for all, "generator" or "tokenizer" for one family."""
    if kind not in (None, "generator", "tokenizer"):
        raise ValueError(f"kind must be None, 'generator' or 'tokenizer', got {kind!r}")
    names = []
    if kind in (None, "generator"):
        names += list(GENERATOR_PRESETS)
    if kind in (None, "tokenizer"):
        names += list(TOKENIZER_PRESETS)
    return names

