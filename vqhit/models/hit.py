"""The HiT generator (Zhao et al., NeurIPS 2021) and the stage stack it shares with the VQ-HiT decoder.

Shape of the network: a first feature map and a memory Z of tokens enter a list of stages,
each doubling the resolution. Every stage adds a positional table, cross-attends to Z, then runs either
multi-axis blocked self-attention blocks (low resolution) or per-pixel MLP layers (high resolution).
High-resolution stages emit RGB, summed over stages with nearest upsampling. No tanh.

All tensors inside are channels-last, (B, H, W, C) or (B, N, C): every Linear acts on the last axis.

In eval mode without autograd, `HiTStages` runs the same function through the inference path of
`vqhit.models.inference` (folded BatchNorm, fused projections, pixel chunks); training runs these modules.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..presets import GENERATOR_PRESETS
from . import inference
from .attention import ATTENTION_MODES, check_heads
from .layers import (BN_MOMENTUM, NORMS, CrossAttentionBlock, Memory, MLPBlock, SelfAttentionBlock, norm_factory,
                     pixel_shuffle, trunc_normal_init, upsample2x)
from .pretrained import ConfigMixin, PretrainedMixin

class HiTStage(nn.Module):
    """One HiT stage at resolution R: positional table, cross-attention to Z, then either multi-axis
    self-attention blocks (`block_size` set) or MLP layers with a to-RGB head (`block_size` None), and,
    unless it is the last stage, pixel shuffle x2 plus a Linear to the next stage's width.

    `checkpoint_mlp` recomputes the MLP hidden layers of an MLP stage in backward instead of storing them:
    at high resolution those 4C-wide activations dominate training memory."""

    def __init__(self, resolution: int, dim: int, num_heads: int, num_blocks: int, block_size: int | None,
                 memory_dim: int, next_dim: int | None, *, norm_layer, multi_query: bool, attention_mode: str,
                 cross_attention: bool, mlp_ratio: int, checkpoint_mlp: bool = False):
        super().__init__()
        check_heads(dim, num_heads, f"stage {resolution}x{resolution}")
        self.resolution = resolution
        self.hidden_width = mlp_ratio * dim  # the widest activation: the inference path's chunks and folding
        self.pos_embed = nn.Parameter(torch.zeros(resolution, resolution, dim))
        checkpoint_mlp = checkpoint_mlp and block_size is None  # attention stages are low-resolution
        self.cross = (CrossAttentionBlock(dim, num_heads, memory_dim, norm_layer, multi_query, mlp_ratio,
                                          checkpoint_mlp) if cross_attention else None)
        if block_size is None:
            self.blocks = nn.Sequential(*[MLPBlock(dim, norm_layer, mlp_ratio, checkpoint_mlp)
                                          for _ in range(num_blocks)])
            self.to_rgb = nn.Sequential(norm_layer(dim), nn.Linear(dim, 3))
        else:
            if attention_mode in ("multi_axis", "regional", "dilated") and resolution % block_size:
                raise ValueError(f"block size {block_size} does not divide the {resolution}x{resolution} map "
                                 f"of stage {resolution}x{resolution}; choose a divisor of {resolution}")
            self.blocks = nn.Sequential(*[
                SelfAttentionBlock(dim, num_heads, block_size, norm_layer, multi_query, attention_mode, mlp_ratio)
                for _ in range(num_blocks)])
            self.to_rgb = None
        self.upsample = None
        if next_dim is not None:
            if dim % 4:
                raise ValueError(f"stage {resolution}x{resolution}: pixel shuffle needs a width divisible by 4, "
                                 f"got {dim}")
            self.upsample = nn.Identity() if dim // 4 == next_dim else nn.Linear(dim // 4, next_dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None, img: torch.Tensor | None):
        x = x + self.pos_embed
        if self.cross is not None:
            x = self.cross(x, memory)
        x = self.blocks(x)
        if self.to_rgb is not None:
            rgb = self.to_rgb(x)
            img = rgb if img is None else upsample2x(img) + rgb
        if self.upsample is not None:
            x = self.upsample(pixel_shuffle(x))
        return x, img


class HiTStages(nn.Module):
    """The stage list shared by the HiT generator and the VQ-HiT decoder.

    Takes the first feature map (B, R0, R0, C0) and the memory Z (B, M, E) and returns the image
    (B, 3, R0 * 2^(S-1), ...) as an NCHW tensor (channels-last in memory).

    In eval mode without autograd it runs the inference path of `vqhit.models.inference`, the same function
    through fewer operations; set `fast_inference = False` to run these modules instead.
    """

    def __init__(self, start_resolution: int, widths, heads, blocks, block_sizes, memory_dim: int, *,
                 norm_layer=None, multi_query: bool = True, attention_mode: str = "multi_axis",
                 cross_attention: bool = True, mlp_ratio: int = 4, checkpoint_mlp: bool = False):
        super().__init__()
        n = len(widths)
        if not (len(heads) == len(blocks) == len(block_sizes) == n) or n == 0:
            raise ValueError(f"widths, heads, blocks and block_sizes must list one entry per stage; got "
                             f"{len(widths)}, {len(heads)}, {len(blocks)}, {len(block_sizes)}")
        if block_sizes[-1] is not None:
            raise ValueError("the last stage must be a high-resolution MLP stage (block size None): it carries "
                             "the to-RGB head that produces the image")
        norm_layer = norm_layer or norm_factory("batch")
        first_mlp = list(block_sizes).index(None)
        if any(s is not None for s in block_sizes[first_mlp:]):
            raise ValueError(f"attention stages must come before the MLP stages; got block sizes {list(block_sizes)}")
        self.stages = nn.ModuleList(
            HiTStage(start_resolution * 2 ** i, widths[i], heads[i], blocks[i], block_sizes[i], memory_dim,
                     widths[i + 1] if i + 1 < n else None, norm_layer=norm_layer, multi_query=multi_query,
                     attention_mode=attention_mode, cross_attention=cross_attention, mlp_ratio=mlp_ratio,
                     checkpoint_mlp=checkpoint_mlp)
            for i in range(n))
        self.fast_inference = True  # False: eval mode runs these modules too, not the inference path

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None) -> torch.Tensor:
        if inference.applies(self):
            return inference.forward(self, x, memory)
        img = None
        for stage in self.stages:
            x, img = stage(x, memory, img)
        return img.permute(0, 3, 1, 2)


@dataclass
class HiTConfig(ConfigMixin):
    """A HiT generator. One entry per stage in `widths`, `heads`, `blocks`, `block_sizes`; a block size of
    None marks a high-resolution MLP stage. The first stage is 8x8 and each stage doubles it.

    Runtime keys (RUNTIME_KEYS) change neither the parameters nor the eval-mode function: loading weights
    compares only the other, architecture keys (and `norm` "syncbatch" counts as "batch")."""

    PRESETS = GENERATOR_PRESETS
    RUNTIME_KEYS = frozenset({"preset", "checkpoint_mlp", "bn_momentum"})

    preset: str | None = None        # the preset name this config came from, if any (kept in checkpoints)
    resolution: int = 256
    latent_dim: int = 512
    widths: list = field(default_factory=lambda: [512, 512, 256, 128, 64, 64])
    heads: list = field(default_factory=lambda: [16, 8, 4, 4, 4, 4])
    blocks: list = field(default_factory=lambda: [2, 2, 2, 2, 1, 1])
    block_sizes: list = field(default_factory=lambda: [4, 4, 8, 8, None, None])
    memory_tokens: int = 16          # tokens of the latent memory Z
    memory_dim: int | None = None    # width E of Z; None = widths[0] (the paper's choice)
    # Options beyond the paper's configuration, all off by default:
    multi_query: bool = True         # False = multi-head K/V
    norm: str = "batch"              # "batch" (paper), "syncbatch", "layer"
    bn_momentum: float = BN_MOMENTUM  # the release's 0.01; short runs need more (running stats lag behind)
    attention_mode: str = "multi_axis"  # ablations: "regional", "dilated", "axial", "global"
    cross_attention: bool = True     # False = the "no cross-attention" ablation
    mlp_ratio: int = 4
    checkpoint_mlp: bool = False     # recompute MLP-stage hidden layers in backward: less memory, more compute

    def __post_init__(self):
        self.check_types()
        self.validate()

    @property
    def start_resolution(self) -> int:
        return 8

    def validate(self) -> None:
        r, s = self.resolution, self.start_resolution
        if r < s or r & (r - 1) or r % s:
            raise ValueError(f"resolution {r} is not of the form {s}·2^k (e.g. 128, 256, 1024)")
        expected = (r // s).bit_length()
        if len(self.widths) != expected:
            raise ValueError(f"resolution {r} needs {expected} stages from {s}x{s} (each doubles), but "
                             f"{len(self.widths)} widths were given; add or remove stages")
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; choose one of {NORMS}")
        if self.attention_mode not in ATTENTION_MODES:
            raise ValueError(f"unknown attention mode {self.attention_mode!r}; choose one of {ATTENTION_MODES}")
        for name in ("latent_dim", "memory_tokens", "memory_dim", "mlp_ratio"):
            self.check_range(name, 1)
        self.check_range("bn_momentum", 0, 1)


class HiTGenerator(PretrainedMixin, nn.Module):
    """z ~ N(0, I) of shape (B, latent_dim) -> image (B, 3, R, R), unbounded (clamp to [-1, 1] to show)."""

    model_type, config_class = "hit-generator", HiTConfig

    def __init__(self, config: HiTConfig | None = None, **overrides):
        super().__init__()
        self.config = config = self.make_config(config, **overrides)
        c0, e = config.widths[0], config.memory_dim or config.widths[0]
        s = config.start_resolution
        self.to_map = nn.Linear(config.latent_dim, s * s * c0)
        norm_layer = norm_factory(config.norm, config.bn_momentum)
        self.memory = (Memory(config.latent_dim, config.memory_tokens, e, norm_layer,
                              tokens_per_input=config.memory_tokens) if config.cross_attention else None)
        self.stages = HiTStages(s, config.widths, config.heads, config.blocks, config.block_sizes, e,
                                norm_layer=norm_layer, multi_query=config.multi_query,
                                attention_mode=config.attention_mode, cross_attention=config.cross_attention,
                                mlp_ratio=config.mlp_ratio, checkpoint_mlp=config.checkpoint_mlp)
        trunc_normal_init(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.config.latent_dim:
            raise ValueError(f"expected latents of shape (B, {self.config.latent_dim}), got {tuple(z.shape)}")
        if not z.is_floating_point():
            raise ValueError(f"expected floating-point latents (e.g. torch.randn), got dtype {z.dtype}")
        z = z.to(self.to_map.weight.dtype)  # latents are data: float64 ones drive a float32 model, float32 a bf16 one
        if z.shape[0] == 0:  # the stages' reshapes cannot infer a size from no elements
            return z.new_empty((0, 3, self.config.resolution, self.config.resolution))
        s = self.config.start_resolution
        x = self.to_map(z).view(z.shape[0], s, s, -1)  # row-major (h, w, c), as the release reshapes
        memory = self.memory(z[:, None]) if self.memory is not None else None  # once, shared by all stages
        return self.stages(x, memory)

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
