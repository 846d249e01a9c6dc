"""The HiT generator (Zhao et al., NeurIPS 2021) and the stage stack it shares with the VQ-HiT decoder.

Shape of the network (SPEC §1): a first feature map and a memory Z of tokens enter a list of stages,
each doubling the resolution. Every stage adds a positional table, cross-attends to Z, then runs either
multi-axis blocked self-attention blocks (low resolution) or per-pixel MLP layers (high resolution).
High-resolution stages emit RGB, summed over stages with nearest upsampling. No tanh.

All tensors inside are channels-last, (B, H, W, C) or (B, N, C): every Linear acts on the last axis.

Inference path. In eval mode without autograd, `HiTStages` runs the same function through fewer, larger
operations (`forward_folded` of each module; `HiTStages.fast_inference` switches it off):
- every BatchNorm is then a fixed per-channel affine map, so it is folded into the Linear that follows it,
  and a self-attention block's q, k, v become one Linear;
- the memory's K and V are computed once per stage;
- a high-resolution stage is a per-pixel function of (pixel, Z), so on CPU it runs over chunks of pixels
  small enough that every intermediate (the 4C-wide MLP hidden layer above all) stays in cache. Run over
  the whole 256x256 map, each of those intermediates is 64 MB, and the time goes into memory traffic and
  page faults rather than arithmetic.
The folded weights are cached and re-folded whenever a parameter or buffer changes (checked through
autograd's version counters), so loading weights or training a step never leaves them stale.
Training runs the plain modules only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..presets import GENERATOR_PRESETS
from .attention import ATTENTION_MODES, CrossAttention, MultiAxisAttention, attend, check_heads
from .pretrained import ConfigMixin, PretrainedMixin

NORMS = ("batch", "syncbatch", "layer")
# The release's Keras BatchNorm: momentum 0.99 (PyTorch counts the other way) and eps 1e-3.
BN_MOMENTUM, BN_EPS = 0.01, 1e-3
# Inference path on CPU: floats of MLP hidden layer (rows x 4C) one chunk of pixels holds per thread. 4 MiB stays
# in the last-level cache and under glibc's 32 MiB mmap threshold (larger buffers are page-faulted in afresh on
# every call); 0.5 to 4 MiB measured the same on one thread, and fewer chunks mean fewer OpenMP barriers.
CHUNK_FLOATS = 2**20


class ChannelBatchNorm(nn.BatchNorm1d):
    """BatchNorm of the last (channel) axis over every other axis (batch, tokens, pixels)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).view(x.shape)


class ChannelSyncBatchNorm(nn.SyncBatchNorm):
    """`ChannelBatchNorm` with statistics synchronised across processes (an option; off by default)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).view(x.shape)


def make_norm(kind: str, dim: int, momentum: float = BN_MOMENTUM) -> nn.Module:
    if kind == "batch":
        return ChannelBatchNorm(dim, eps=BN_EPS, momentum=momentum)
    if kind == "syncbatch":
        return ChannelSyncBatchNorm(dim, eps=BN_EPS, momentum=momentum)
    if kind == "layer":
        return nn.LayerNorm(dim, eps=BN_EPS)
    raise ValueError(f"unknown norm {kind!r}; choose one of {NORMS}")


def norm_factory(kind: str, momentum: float = BN_MOMENTUM):
    """A `norm_layer(dim)` callable for the blocks, from a config's norm name and BatchNorm momentum."""
    if kind not in NORMS:
        raise ValueError(f"unknown norm {kind!r}; choose one of {NORMS}")
    return partial(make_norm, kind, momentum=momentum)


class FoldError(Exception):
    """A module that the inference path cannot fold (e.g. LayerNorm); the plain path runs instead."""


def fold_linear(linears, norm: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of one Linear equal to Linear(norm(x)) for the `linears` side by side (their outputs
    concatenated), with `norm` an eval-mode BatchNorm: norm(x) = x * s + t, so W(x * s + t) + b =
    (W * s) x + (W t + b). A lone Linear without a norm is returned as it is (its live parameters)."""
    weight = torch.cat([lin.weight for lin in linears]) if len(linears) > 1 else linears[0].weight
    bias = torch.cat([lin.bias for lin in linears]) if len(linears) > 1 else linears[0].bias
    if norm is None:
        return weight, bias
    if not isinstance(norm, nn.modules.batchnorm._NormBase) or norm.running_mean is None:
        raise FoldError(f"{type(norm).__name__} normalises each token by its own statistics; only an eval-mode "
                        f"BatchNorm is a fixed affine map that folds into a Linear")
    scale = torch.rsqrt(norm.running_var + norm.eps)
    shift = -norm.running_mean * scale
    if norm.affine:
        scale, shift = scale * norm.weight, shift * norm.weight + norm.bias
    return weight * scale, torch.addmv(bias, weight, shift)


def cache_rows(width: int, hidden: int, device: torch.device) -> int | None:
    """Rows per chunk for an MLP of `width` -> `hidden` -> `width` on CPU: each thread's share of the (rows, hidden)
    activation stays in its core's cache, but a chunk has at least 4 * width rows, because the weights (width x
    hidden) are read again for every chunk and must stay small beside it: at 16x16 (width 512) nothing is
    chunked, at 256x256 (width 64) chunks of 1024 pixels run. None = no chunking (GPU, where one large kernel
    beats many small ones)."""
    if device.type != "cpu":
        return None
    return max(CHUNK_FLOATS * torch.get_num_threads() // hidden, 4 * width)


class MLPBlock(nn.Module):
    """x + FC2(GELU(FC1(Norm(x)))): the high-resolution layer and the second half of every attention block.

    With `checkpoint` on, the 4C-wide hidden layer is not kept for backward but recomputed from Norm(x).
    The norm stays outside the checkpoint, so BatchNorm running statistics are updated once per forward.
    """

    def __init__(self, dim: int, norm_layer, mlp_ratio: int = 4, checkpoint: bool = False):
        super().__init__()
        self.norm = norm_layer(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)
        self.checkpoint = checkpoint

    def hidden(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(h)))  # exact (erf) GELU, as the release

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        if self.checkpoint and torch.is_grad_enabled():
            return x + torch.utils.checkpoint.checkpoint(self.hidden, h, use_reentrant=False)
        return x + self.hidden(h)

    def fold(self) -> dict:
        return {"fc1": fold_linear([self.fc1], self.norm), "fc2": fold_linear([self.fc2])}

    def forward_folded(self, x: torch.Tensor, f: dict) -> torch.Tensor:
        """The eval-mode forward with the norm folded into FC1; on CPU in chunks of rows that stay in cache."""
        def mlp(rows):
            hidden = F.linear(rows, *f["fc1"])
            torch.ops.aten.gelu_(hidden)  # in place: a second 4C-wide buffer per chunk can cost more than the GELU
            return rows + F.linear(hidden, *f["fc2"])

        rows = x.reshape(-1, x.shape[-1])
        chunk = cache_rows(self.fc1.in_features, self.fc1.out_features, x.device)
        if chunk is None or rows.shape[0] <= chunk:
            return mlp(x)
        return torch.cat([mlp(part) for part in rows.split(chunk)]).view(x.shape)


class SelfAttentionBlock(nn.Module):
    """Pre-norm multi-axis self-attention block on a map (B, H, W, C)."""

    def __init__(self, dim: int, num_heads: int, block_size: int, norm_layer, multi_query: bool,
                 mode: str, mlp_ratio: int):
        super().__init__()
        self.norm = norm_layer(dim)
        self.attn = MultiAxisAttention(dim, num_heads, block_size, multi_query=multi_query, mode=mode)
        self.mlp = MLPBlock(dim, norm_layer, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x + self.attn(self.norm(x)))

    def fold(self) -> dict:
        a = self.attn
        return {"qkv": fold_linear([a.q, a.k, a.v], self.norm), "out": fold_linear([a.out]), "mlp": self.mlp.fold()}

    def forward_folded(self, x: torch.Tensor, f: dict) -> torch.Tensor:
        """The eval-mode forward: the norm folded into one fused q, k, v projection."""
        kv_width = self.attn.k.out_features
        q, k, v = F.linear(x, *f["qkv"]).split([x.shape[-1], kv_width, kv_width], dim=-1)
        x = x + F.linear(self.attn.mix(q, k, v), *f["out"])
        return self.mlp.forward_folded(x, f["mlp"])


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention block: the pixels of a map (B, H, W, C) attend to the memory Z (B, M, E).

    Z is not normalised again here: it was normalised once, when it was made.
    """

    def __init__(self, dim: int, num_heads: int, memory_dim: int, norm_layer, multi_query: bool, mlp_ratio: int,
                 checkpoint_mlp: bool = False):
        super().__init__()
        self.norm = norm_layer(dim)
        self.attn = CrossAttention(dim, num_heads, kv_dim=memory_dim, multi_query=multi_query)
        self.mlp = MLPBlock(dim, norm_layer, mlp_ratio, checkpoint=checkpoint_mlp)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        x = x + self.attn(self.norm(x).reshape(b, h * w, c), memory).view(b, h, w, c)
        return self.mlp(x)

    def fold(self) -> dict:
        a = self.attn
        return {"q": fold_linear([a.q], self.norm), "kv": fold_linear([a.k, a.v]), "out": fold_linear([a.out]),
                "mlp": self.mlp.fold()}

    def memory_kv(self, memory: torch.Tensor, f: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the memory (B, M, E), from one fused projection: computed once per stage and forward."""
        return F.linear(memory, *f["kv"]).chunk(2, dim=-1)

    def forward_folded(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, f: dict) -> torch.Tensor:
        """The eval-mode forward on tokens x (B, N, C) against the memory's K, V (B, M, kv width)."""
        x = x + F.linear(attend(F.linear(x, *f["q"]), k, v, self.attn.num_heads), *f["out"])
        return self.mlp.forward_folded(x, f["mlp"])


class Memory(nn.Module):
    """The memory Z every cross-attention block attends to: inputs projected to `num_tokens` tokens of width
    E, plus a learned positional table, normalised once (SPEC §1.1, §2.3).

    `tokens_per_input` tokens come out of each input vector: 16 from the one latent of the generator,
    1 from each code vector of the tokenizer's grid.
    """

    def __init__(self, in_dim: int, num_tokens: int, dim: int, norm_layer, tokens_per_input: int = 1):
        super().__init__()
        self.proj = nn.Linear(in_dim, tokens_per_input * dim)
        self.pos_embed = nn.Parameter(torch.zeros(num_tokens, dim))
        self.norm = norm_layer(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, in_dim) with T * tokens_per_input == num_tokens -> Z: (B, num_tokens, E)."""
        z = self.proj(x).reshape(x.shape[0], self.pos_embed.shape[0], -1)
        return self.norm(z + self.pos_embed)


def pixel_shuffle(x: torch.Tensor) -> torch.Tensor:
    """x2 pixel shuffle of a channels-last map, (B, H, W, 4C) -> (B, 2H, 2W, C), in nn.PixelShuffle's order."""
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, c // 4, 2, 2).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, 2 * h, 2 * w, c // 4)


def upsample2x(img: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour x2 upsampling of a channels-last image (B, H, W, 3)."""
    b, h, w, c = img.shape
    return img[:, :, None, :, None, :].expand(b, h, 2, w, 2, c).reshape(b, 2 * h, 2 * w, c)


def trunc_normal_init(module: nn.Module) -> None:
    """SPEC §1.3: Linear weights and positional tables ~ truncated normal(0.02, ±0.04), biases 0, norms 1/0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.SyncBatchNorm, nn.LayerNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for name, p in module.named_parameters():
        if name.endswith("pos_embed"):
            nn.init.trunc_normal_(p, std=0.02, a=-0.04, b=0.04)


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
        self.hidden_width = mlp_ratio * dim  # the widest activation of the stage, which sets its chunk size
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

    def fold(self) -> dict:
        return {"cross": self.cross.fold() if self.cross is not None else None,
                "blocks": [block.fold() for block in self.blocks],
                "to_rgb": fold_linear([self.to_rgb[1]], self.to_rgb[0]) if self.to_rgb is not None else None,
                "upsample": fold_linear([self.upsample]) if isinstance(self.upsample, nn.Linear) else None}

    def forward_folded(self, x: torch.Tensor, memory: torch.Tensor | None, img: torch.Tensor | None, f: dict,
                       x_proj: tuple | None = None):
        """The eval-mode forward with folded weights `f` (from `fold`): the same function as `forward`.

        The Linear after the pixel shuffle acts on each pixel alone, so it is deferred to the next stage, which
        applies it chunk by chunk: `x_proj` is the previous stage's (weight, bias) still to apply to x (None: x is
        ready), and this stage returns (pixel-shuffled features, its own deferred Linear, image)."""
        b, h, w, _ = x.shape
        k = v = None
        if self.cross is not None:
            k, v = self.cross.memory_kv(memory, f["cross"])
        if self.to_rgb is None:  # attention stage: self-attention mixes pixels, so the map is processed whole
            x = (F.linear(x, *x_proj) if x_proj is not None else x) + self.pos_embed
            c = x.shape[-1]
            if self.cross is not None:
                x = self.cross.forward_folded(x.reshape(b, h * w, c), k, v, f["cross"]).view(b, h, w, c)
            for block, fb in zip(self.blocks, f["blocks"]):
                x = block.forward_folded(x, fb)
        else:
            x, rgb = self.pixelwise(x.reshape(b, h * w, -1), k, v, f, x_proj)
            x, rgb = x.view(b, h, w, -1) if x is not None else None, rgb.view(b, h, w, 3)
            img = rgb if img is None else upsample2x(img) + rgb
        if self.upsample is None:
            return x, None, img
        x = pixel_shuffle(x)
        if f["upsample"] is None:  # nn.Identity: the shuffled map is the next stage's input
            return x, None, img
        return x, f["upsample"], img

    def pixelwise(self, x: torch.Tensor, k, v, f: dict, x_proj: tuple | None):
        """An MLP stage on tokens x (B, N, C_in): (features (B, N, C), or None for the last stage; rgb (B, N, 3)).

        Every operation here acts on each pixel alone (BatchNorm is folded; the memory's K, V are fixed), so on
        CPU the pixels run in chunks whose 4C-wide hidden layer stays in cache, written out once at the end."""
        pos = self.pos_embed.reshape(-1, self.pos_embed.shape[-1])

        def run(xs, pos, k=None, v=None):
            xs = (F.linear(xs, *x_proj) if x_proj is not None else xs) + pos
            if self.cross is not None:
                xs = self.cross.forward_folded(xs, k, v, f["cross"])
            for block, fb in zip(self.blocks, f["blocks"]):
                xs = block.forward_folded(xs, fb)
            return xs, F.linear(xs, *f["to_rgb"])

        chunk = cache_rows(pos.shape[-1], self.hidden_width, x.device)
        if chunk is None or x.shape[1] <= chunk:
            x, rgb = run(x, pos, k, v)
            return (x if self.upsample is not None else None), rgb
        out = rgb = None
        for i in range(x.shape[0]):
            image = slice(i, i + 1)
            for start in range(0, x.shape[1], chunk):
                rows = slice(start, start + chunk)
                xs, rgbs = run(x[image, rows], pos[rows], *([] if k is None else [k[image], v[image]]))
                if rgb is None:
                    rgb = rgbs.new_empty(x.shape[0], x.shape[1], 3)
                    out = xs.new_empty(x.shape[0], x.shape[1], xs.shape[-1]) if self.upsample is not None else None
                rgb[image, rows] = rgbs
                if out is not None:
                    out[image, rows] = xs
        return out, rgb


class HiTStages(nn.Module):
    """The stage list shared by the HiT generator and the VQ-HiT decoder.

    Takes the first feature map (B, R0, R0, C0) and the memory Z (B, M, E) and returns the image
    (B, 3, R0 * 2^(S-1), ...) as an NCHW tensor (channels-last in memory).

    In eval mode without autograd it runs the folded inference path (see the module docstring); set
    `fast_inference = False` to run the plain modules instead.
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
        self.fast_inference = True
        self._folded = None  # (weights version, folded weights per stage), or None: see `folded`

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None) -> torch.Tensor:
        folded = self.folded() if self.use_fast_path() else None
        img = x_proj = None
        for i, stage in enumerate(self.stages):
            if folded is None:
                x, img = stage(x, memory, img)
            else:
                x, x_proj, img = stage.forward_folded(x, memory, img, folded[i], x_proj)
        return img.permute(0, 3, 1, 2)

    def use_fast_path(self) -> bool:
        """Eval mode everywhere and no autograd: then the folded path computes the same function. Training
        (and anything that needs gradients, or torch.compile's tracing) runs the plain modules."""
        return (self.fast_inference and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and not any(m.training for m in self.modules()))

    def weights_version(self) -> tuple | None:
        """Identifies the current weights: every parameter's and buffer's storage and version counter. Autograd
        bumps the counter on each in-place write (optimizer steps, `load_state_dict`, EMA updates, BatchNorm
        running statistics), and a replaced tensor has new storage. None if it cannot be known (tensors made
        under `torch.inference_mode` have no counter): then the weights are folded on every call."""
        tensors = [*self.parameters(), *self.buffers()]
        if any(t.is_inference() for t in tensors):
            return None
        return tuple((t.data_ptr(), t._version) for t in tensors)

    def folded(self) -> list[dict] | None:
        """Folded weights of every stage, re-folded whenever `weights_version` changes; None when a module cannot
        be folded (LayerNorm), and then the plain path runs."""
        version = self.weights_version()
        if self._folded is None or version is None or self._folded[0] != version:
            try:
                with torch.no_grad():
                    folded = [stage.fold() for stage in self.stages]
            except FoldError:
                folded = None
            self._folded = (version, folded)
        return self._folded[1]

    def train(self, mode: bool = True):
        self._folded = None  # do not keep a copy of the weights while training
        return super().train(mode)


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
        s = self.config.start_resolution
        x = self.to_map(z).view(z.shape[0], s, s, -1)  # row-major (h, w, c), as the release reshapes
        memory = self.memory(z[:, None]) if self.memory is not None else None  # once, shared by all stages
        return self.stages(x, memory)

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
