"""VQ-HiT (HiT paper, Appendix A.5): the VQGAN encoder, a codebook, and a HiT decoder from the token grid.

    images (B,3,R,R) -> VQGANEncoder -> quant_conv (1x1) -> VectorQuantizer -> HiTDecoder -> images

The attribute names `encoder`, `quant_conv` and `quantize.embedding` are taming's, so the encoder half of a
taming VQGAN checkpoint loads key for key (`load_taming_checkpoint`) and its token ids stay valid.

`VQHiTConfig.decoder` swaps HiTDecoder for a baseline of vqhit.models.decoders ("conv": taming's VQGAN decoder,
whose checkpoint half then loads too; "vit": a plain transformer), for the comparison the paper's Table 2 makes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UsageError
from ..metrics import INPUT_RANGE_LIMIT
from ..presets import TOKENIZER_PRESETS
from .decoders import ConvDecoder, ViTDecoder
from .encoder import VQGANEncoder
from .hit import HiTStages
from .layers import BN_MOMENTUM, NORMS, Memory, norm_factory, trunc_normal_init
from .pretrained import ConfigMixin, PretrainedMixin
from .quantizer import VectorQuantizer, check_options as check_quantizer_options

DECODERS = ("hit", "conv", "vit")


class HiTDecoder(nn.Module):
    """Code vectors on a grid (B, h, w, D) -> images (B, 3, R, R), through the HiT stage stack.

    The grid enters the stage list at its own resolution: Linear(D -> C0) per token is the first feature map,
    and Linear(D -> E) per token + positional table + norm is the memory Z the cross-attention reads.
    """

    def __init__(self, code_dim: int, grid: int, widths, heads, blocks, block_sizes, memory_dim: int = 512, *,
                 norm_layer=None, multi_query: bool = True, attention_mode: str = "multi_axis",
                 cross_attention: bool = True, mlp_ratio: int = 4, checkpoint_mlp: bool = False):
        super().__init__()
        norm_layer = norm_layer or norm_factory("batch")
        self.resolution = grid * 2 ** (len(widths) - 1)
        self.to_map = nn.Linear(code_dim, widths[0])
        self.memory = Memory(code_dim, grid * grid, memory_dim, norm_layer) if cross_attention else None
        self.stages = HiTStages(grid, widths, heads, blocks, block_sizes, memory_dim, norm_layer=norm_layer,
                                multi_query=multi_query, attention_mode=attention_mode,
                                cross_attention=cross_attention, mlp_ratio=mlp_ratio, checkpoint_mlp=checkpoint_mlp)
        trunc_normal_init(self)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        b, h, w, d = codes.shape
        if b == 0:  # the stages' reshapes cannot infer a size from no elements; an empty batch decodes to one
            return codes.new_empty((0, 3, self.resolution, self.resolution))
        memory = self.memory(codes.reshape(b, h * w, d)) if self.memory is not None else None
        return self.stages(self.to_map(codes), memory)


@dataclass
class VQHiTConfig(ConfigMixin):
    """A VQ-HiT tokenizer. Runtime keys (RUNTIME_KEYS) change neither the parameters nor the eval-mode function
    (freezing, checkpointing, BatchNorm momentum, the quantizer's training-time behaviour): loading weights
    compares only the other, architecture keys, and `norm` "syncbatch" counts as "batch"."""

    PRESETS = TOKENIZER_PRESETS
    RUNTIME_KEYS = frozenset({"preset", "checkpoint_mlp", "bn_momentum", "freeze_encoder", "freeze_codebook",
                              "restart_dead_codes", "dead_code_steps", "beta", "entropy_loss_weight",
                              "entropy_temperature"})

    preset: str | None = None
    resolution: int = 256
    # Encoder: taming's VQGAN Encoder (f = 2^(len(encoder_channel_mult) - 1)).
    encoder_channels: int = 128
    encoder_channel_mult: list = field(default_factory=lambda: [1, 1, 2, 2, 4])
    encoder_res_blocks: int = 2
    encoder_attn_resolutions: list = field(default_factory=lambda: [16])
    encoder_z_channels: int = 256
    # Codebook.
    codebook_size: int = 1024
    code_dim: int = 256
    beta: float = 0.25                 # commitment weight, on the encoder side
    l2_normalize: bool = False         # cosine codes
    lookup_dim: int | None = None      # low-dimensional lookup (e.g. 8 or 32)
    restart_dead_codes: bool = False   # re-seed unused codes from recent encoder outputs
    dead_code_steps: int = 500         # training forwards a code may go unused before it is re-seeded
    entropy_loss_weight: float = 0.0   # codebook entropy loss (MAGVIT / LlamaGen) in vq_loss; 0 = off (the paper)
    entropy_temperature: float = 0.01  # its soft-assignment temperature (suits l2_normalize / lookup_dim codes)
    # Decoder: "hit" (the paper's HiT stages from the token grid), or a baseline of vqhit.models.decoders:
    # "conv" (taming's VQGAN decoder) or "vit" (a plain transformer). Only the chosen kind's keys are used.
    decoder: str = "hit"
    decoder_widths: list = field(default_factory=lambda: [512, 256, 128, 64, 64])
    decoder_heads: list = field(default_factory=lambda: [8, 4, 4, 4, 4])
    decoder_blocks: list = field(default_factory=lambda: [2, 2, 2, 1, 1])
    decoder_block_sizes: list = field(default_factory=lambda: [4, 8, 8, None, None])
    decoder_memory_dim: int = 512
    # decoder="conv": None = the encoder's value, as in taming's configs (one ddconfig for both halves).
    conv_decoder_channels: int | None = None
    conv_decoder_channel_mult: list | None = None
    conv_decoder_res_blocks: int | None = None      # taming's decoder runs this + 1 ResnetBlocks per level
    conv_decoder_attn_resolutions: list | None = None
    # decoder="vit": defaults sized to the paper HiT decoder's 31.8 GFLOPs at 16x16 -> 256x256 (31.0 GFLOPs).
    vit_decoder_width: int = 768
    vit_decoder_depth: int = 8
    vit_decoder_heads: int = 12
    multi_query: bool = True
    norm: str = "batch"
    bn_momentum: float = BN_MOMENTUM
    attention_mode: str = "multi_axis"
    cross_attention: bool = True
    mlp_ratio: int = 4
    checkpoint_mlp: bool = False       # recompute the MLP stages' hidden layers in backward (less memory)
    # Training a decoder on an existing tokenizer's codes (see load_taming_checkpoint).
    freeze_encoder: bool = False
    freeze_codebook: bool = False

    def __post_init__(self):
        self.check_types()
        f = 2 ** (len(self.encoder_channel_mult) - 1)
        if self.resolution % f:
            raise ValueError(f"resolution {self.resolution} is not divisible by the encoder's downsampling "
                             f"factor {f}")
        grid = self.resolution // f
        if self.decoder not in DECODERS:
            raise ValueError(f"unknown decoder {self.decoder!r}; choose one of {DECODERS}")
        mult = self.conv_decoder_channel_mult
        if self.decoder == "conv" and mult is not None and len(mult) != len(self.encoder_channel_mult):
            raise _conv_decoder_levels(mult, len(self.encoder_channel_mult), f)
        reach = grid * 2 ** (len(self.decoder_widths) - 1)
        if self.decoder == "hit" and reach != self.resolution:
            raise _decoder_stages_miss_resolution(len(self.decoder_widths), grid, reach, self.resolution)
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; choose one of {NORMS}")
        check_quantizer_options(self.codebook_size, self.code_dim, self.beta, self.lookup_dim,
                                self.restart_dead_codes, self.dead_code_steps,
                                entropy_loss_weight=self.entropy_loss_weight,
                                entropy_temperature=self.entropy_temperature)
        for name in ("mlp_ratio", "decoder_memory_dim"):
            self.check_range(name, 1)
        self.check_range("bn_momentum", 0, 1)

    @property
    def grid(self) -> int:
        return self.resolution // 2 ** (len(self.encoder_channel_mult) - 1)


def _conv_decoder_levels(mult: list, levels: int, factor: int) -> ValueError:
    return ValueError(f"conv_decoder_channel_mult {mult} has {len(mult)} levels but the encoder has "
                      f"{levels}: the decoder must upsample by the encoder's factor "
                      f"{factor}; give it {levels} entries")


def _decoder_stages_miss_resolution(stages: int, grid: int, reach: int, resolution: int) -> ValueError:
    return ValueError(f"the decoder's {stages} stages take the {grid}x{grid} grid to "
                      f"{reach}x{reach}, not {resolution}x{resolution}; use "
                      f"{(resolution // grid).bit_length()} decoder stages")


class VQHiT(PretrainedMixin, nn.Module):
    """The VQ-HiT tokenizer. Images are NCHW in [-1, 1]; indices are (B, h, w) int64 in [0, codebook_size)."""

    model_type, config_class = "vqhit", VQHiTConfig
    # The quantizer's dead-code restart state exists only with restart_dead_codes (a runtime key).
    optional_state_prefixes = ("quantize.",)

    def __init__(self, config: VQHiTConfig | None = None, **overrides):
        super().__init__()
        self.config = c = self.make_config(config, **overrides)
        self.encoder = VQGANEncoder(c.resolution, c.encoder_channels, c.encoder_channel_mult, c.encoder_res_blocks,
                                    c.encoder_attn_resolutions, c.encoder_z_channels)
        self.quant_conv = nn.Conv2d(c.encoder_z_channels, c.code_dim, 1)
        self.quantize = VectorQuantizer(c.codebook_size, c.code_dim, beta=c.beta, l2_normalize=c.l2_normalize,
                                        lookup_dim=c.lookup_dim, restart_dead_codes=c.restart_dead_codes,
                                        dead_code_steps=c.dead_code_steps, entropy_loss_weight=c.entropy_loss_weight,
                                        entropy_temperature=c.entropy_temperature)
        self.decoder = self._build_decoder(c)
        self.set_frozen(encoder=c.freeze_encoder, codebook=c.freeze_codebook)

    @staticmethod
    def _build_decoder(c: VQHiTConfig) -> nn.Module:
        """The decoder kind `c.decoder` names; all take codes (B, h, w, D) and return images (B, 3, R, R)."""
        if c.decoder == "conv":
            def enc(value, default):  # unset conv keys mirror the encoder, as taming's shared ddconfig does
                return default if value is None else value
            return ConvDecoder(c.code_dim, c.resolution, enc(c.conv_decoder_channels, c.encoder_channels),
                               enc(c.conv_decoder_channel_mult, c.encoder_channel_mult),
                               enc(c.conv_decoder_res_blocks, c.encoder_res_blocks),
                               enc(c.conv_decoder_attn_resolutions, c.encoder_attn_resolutions), c.encoder_z_channels)
        if c.decoder == "vit":
            return ViTDecoder(c.code_dim, c.grid, c.resolution, c.vit_decoder_width, c.vit_decoder_depth,
                              c.vit_decoder_heads, c.mlp_ratio)
        return HiTDecoder(c.code_dim, c.grid, c.decoder_widths, c.decoder_heads, c.decoder_blocks,
                          c.decoder_block_sizes, c.decoder_memory_dim,
                          norm_layer=norm_factory(c.norm, c.bn_momentum),
                          multi_query=c.multi_query, attention_mode=c.attention_mode,
                          cross_attention=c.cross_attention, mlp_ratio=c.mlp_ratio,
                          checkpoint_mlp=c.checkpoint_mlp)

    def set_frozen(self, encoder: bool, codebook: bool) -> None:
        """Freeze the encoder (+ quant_conv) and/or the codebook, e.g. to train the decoder on fixed codes."""
        for p in [*self.encoder.parameters(), *self.quant_conv.parameters()]:
            p.requires_grad_(not encoder)
        for p in self.quantize.parameters():
            p.requires_grad_(not codebook)

    # -- checks -----------------------------------------------------------------------------------------
    def _check_images(self, images: torch.Tensor, values: bool = True) -> None:
        r = self.config.resolution
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2:] != (r, r):
            raise ValueError(f"expected images of shape (B, 3, {r}, {r}) for preset {self.config.preset!r}, got "
                             f"{tuple(images.shape)}; resize or crop to {r}x{r} RGB")
        if not images.is_floating_point():
            raise ValueError(f"expected float images in [-1, 1], got dtype {images.dtype}; use x / 127.5 - 1")
        if not values:
            return
        peak = images.detach().abs().max().item() if images.numel() else 0.0  # one sync; max propagates NaN
        if math.isnan(peak):
            raise ValueError("images contain NaN values; check the data pipeline (a failed decode, a division by "
                             "zero) before encoding")
        if peak > INPUT_RANGE_LIMIT:
            raise ValueError(f"image values reach {peak:.3g}, far outside [-1, 1]; scale uint8 images with "
                             f"x / 127.5 - 1")

    def _check_indices(self, indices: torch.Tensor) -> None:
        g, n = self.config.grid, self.config.codebook_size
        if indices.dim() != 3 or indices.shape[1:] != (g, g):
            raise ValueError(f"expected indices of shape (B, {g}, {g}), got {tuple(indices.shape)}")
        if indices.is_floating_point() or indices.dtype == torch.bool:
            raise ValueError(f"indices must be an integer tensor, got dtype {indices.dtype}")
        # Compared as Python ints: on uint8 indices `max() >= 256` would wrap around.
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n):
            raise ValueError(f"indices must lie in [0, {n}), got values in [{int(indices.min())}, "
                             f"{int(indices.max())}]")

    # -- public API ---------------------------------------------------------------------------------------
    def encode_latents(self, images: torch.Tensor, check_range: bool = True) -> torch.Tensor:
        """Continuous encoder output before quantization, channels-last (B, h, w, code_dim). `check_range=False`
        skips the check that values lie near [-1, 1], a host sync (the training loop checks its batches itself)."""
        self._check_images(images, values=check_range)
        images = images.to(self.quant_conv.weight.dtype)  # images are data: float64 ones feed a float32 model, etc.
        if not torch.is_grad_enabled() and not self.encoder.training:
            # Inference: channels-last images make every convolution of the encoder run in oneDNN's NHWC layout,
            # without a layout conversion per layer (~15% faster on CPU, benchmarks/README.md). The function is the
            # same up to float rounding; training keeps the default layout.
            images = images.contiguous(memory_format=torch.channels_last)
        return self.quant_conv(self.encoder(images)).permute(0, 2, 3, 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, R, R) in [-1, 1] -> token indices (B, h, w) int64. Inference: runs without autograd."""
        return self.quantize.encode(self.encode_latents(images))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Quantized code vectors (B, code_dim, h, w) (taming's layout) -> images (B, 3, R, R). Differentiable
        (autograd as the caller has it): `decode(get_codebook_entry(indices))` is decode_indices with gradients."""
        d, g = self.config.code_dim, self.config.grid
        if latents.dim() != 4 or tuple(latents.shape[1:]) != (d, g, g):
            raise ValueError(f"expected code vectors of shape (B, {d}, {g}, {g}) (taming's layout, as "
                             f"get_codebook_entry returns them), got {tuple(latents.shape)}")
        return self.decoder(latents.permute(0, 2, 3, 1))

    @torch.no_grad()
    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Token indices (B, h, w) -> images (B, 3, R, R), unbounded (clamp to [-1, 1] to show). Inference: runs
        without autograd (for gradients into the decoder, use `decode(get_codebook_entry(indices))`)."""
        self._check_indices(indices)
        return self.decoder(self.quantize.lookup(indices.long()))

    def get_codebook_entry(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors for indices (B, h, w) -> (B, code_dim, h, w), taming's layout."""
        self._check_indices(indices)
        return self.quantize.lookup(indices.long()).permute(0, 3, 1, 2)

    def forward(self, images: torch.Tensor, check_range: bool = True):
        """Training forward: (reconstruction, aux) with aux holding the VQ losses and the indices (`check_range`: see
        `encode_latents`)."""
        q = self.quantize(self.encode_latents(images, check_range))
        reconstruction = self.decoder(q.quantized)
        aux = {"vq_loss": q.loss, "codebook_loss": q.codebook_loss, "commitment_loss": q.commitment_loss,
               "indices": q.indices}
        if q.entropy_loss is not None:  # unweighted; vq_loss holds entropy_loss_weight * entropy_loss
            aux["entropy_loss"] = q.entropy_loss
        return reconstruction, aux

    def last_decoder_layer(self) -> torch.Tensor:
        """Weight of the decoder's last layer (HiT: the last to-RGB Linear; conv: conv_out; vit: the patch head):
        where the adaptive adversarial weight measures gradients."""
        if isinstance(self.decoder, HiTDecoder):
            return self.decoder.stages.stages[-1].to_rgb[-1].weight
        return self.decoder.last_layer

    def num_parameters(self, module: nn.Module | None = None) -> int:
        # `is None`, not `or`: the truth value of a module is its length, which a compiled module refuses.
        return sum(p.numel() for p in (self if module is None else module).parameters())

    def load_taming_checkpoint(self, path, weights_only: bool = True) -> None:
        """Import encoder, quant_conv and codebook from a taming VQGAN checkpoint (Lightning `.ckpt` with a
        "state_dict", or a plain state dict); with decoder="conv" also taming's decoder and post_quant_conv, so a
        released VQGAN is evaluated in vqhit's harness as it is. Any other decoder is left as it is.

        Lightning checkpoints may pickle objects beyond tensors; `weights_only=False` allows them, only for files
        you trust.
        """
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=weights_only)
        except Exception as err:  # pickle.UnpicklingError and friends
            raise _unreadable_taming_checkpoint(path, weights_only, err) from err
        if not isinstance(ckpt, dict):
            raise _not_a_checkpoint_dict(path, ckpt)
        state = ckpt.get("state_dict", ckpt)
        if not isinstance(state, dict):
            raise _state_dict_not_a_dict(path, state)
        prefixes = ("encoder.", "quant_conv.", "quantize.embedding.")
        if self.config.decoder == "conv":
            prefixes += ("decoder.",)
        # our key -> taming's key: taming keeps post_quant_conv beside its decoder, ConvDecoder inside.
        wanted = {k: k.replace("decoder.post_quant_conv.", "post_quant_conv.")
                  for k in self.state_dict() if k.startswith(prefixes)}
        ours = self.state_dict()
        missing = sorted(t for t in wanted.values() if t not in state)
        if missing:
            raise _not_taming_for_this_decoder(path, self.config.decoder, missing)
        wrong = [f"{t}: {tuple(state[t].shape)} vs {tuple(ours[k].shape)}" for k, t in wanted.items()
                 if state[t].shape != ours[k].shape]
        if wrong:
            raise UsageError(f"{path} has another shape than preset {self.config.preset!r}: {wrong[:5]}")
        self.load_state_dict({k: state[t] for k, t in wanted.items()}, strict=False)


# -- the errors of load_taming_checkpoint: each names the file and the fix ----------------------------------------
def _unreadable_taming_checkpoint(path, weights_only: bool, err: Exception) -> UsageError:
    return UsageError(f"could not read {path} with weights_only={weights_only} ({err}); if you trust the "
                      f"file, pass weights_only=False")


def _not_a_checkpoint_dict(path, ckpt) -> UsageError:
    return UsageError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict: pass a taming VQGAN "
                      f"checkpoint (a Lightning .ckpt, or a saved state dict)")


def _state_dict_not_a_dict(path, state) -> UsageError:
    return UsageError(f"{path}: its 'state_dict' is a {type(state).__name__}, not a dict of tensors: pass a "
                      f"taming VQGAN checkpoint")


def _not_taming_for_this_decoder(path, decoder: str, missing: list) -> UsageError:
    return UsageError(f"{path} is not a taming VQGAN checkpoint for this model "
                      f"(decoder={decoder!r}): missing keys {missing[:5]}")
