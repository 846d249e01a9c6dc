"""The eval-mode inference path of the HiT stages (generator and VQ-HiT decoder): the function of `hit.py`'s
modules, computed through fewer and larger operations.

- Every eval-mode BatchNorm is a fixed per-channel affine map, so it is folded into the Linear after it
  (`fold_linear`), and a self-attention block's q, k, v run as one Linear.
- A high-resolution (MLP) stage is a per-pixel function of (pixel, Z), so on CPU it runs over chunks of pixels
  small enough that every intermediate (the 4C-wide MLP hidden layer above all) stays in cache. Run over the whole
  256x256 map, each of those intermediates is 64 MB, and the time goes into memory traffic and page faults rather
  than arithmetic. The memory's K and V are computed once per stage, for all chunks.
- The Linear after a pixel shuffle acts on each pixel alone too, so the next stage applies it chunk by chunk.

Never stale: nothing is kept between calls. Every call folds the weights afresh from the live parameters and
buffers, so no change to them, however it was made (an optimizer step, fused or not; a `.data` write;
`load_state_dict`; `to()`; an EMA update; new BatchNorm statistics), can be missed, and there is nothing to
invalidate. Folding rewrites the weights it folds, so a stage is folded only where that is cheaper than what it
saves: when its map has at least as many pixels as its MLP's hidden layer is wide (`folds`). A block then rewrites
about 5C^2 weights, fewer than the 2 x pixels x C activations its two norms would rewrite unfolded. Smaller maps
(the 512-wide 8x8 and 16x16 stages at small batch) run their own modules, whose output is the same function.

`applies` says when this path runs: eval mode everywhere, no autograd, not while torch.compile traces, every norm a
BatchNorm with running statistics (a LayerNorm normalises each token by its own statistics and cannot be folded).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attend
from .layers import SelfAttentionBlock, pixel_shuffle, upsample2x

# Floats of MLP hidden layer (rows x 4C) one chunk of pixels holds per thread, on CPU: 1 MiB, near a core's own
# cache rather than the shared last level, which other processes evict. On a quiet machine 0.5 to 4 MiB measured
# the same on one thread; under a load of 3 to 4, 1 MiB decoded 4-12% faster than 4 MiB (benchmarks/README.md).
# Far under glibc's 32 MiB mmap threshold too (larger buffers are page-faulted in afresh on every call).
CHUNK_FLOATS = 2**18


def applies(stages: nn.Module) -> bool:
    """Whether `stages` (a `HiTStages`) runs this path: see the module docstring. Training, and anything that
    needs gradients or is being traced by torch.compile, runs the plain modules."""
    if not stages.fast_inference or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    for m in stages.modules():
        if m.training or isinstance(m, nn.LayerNorm):
            return False
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is None:
            return False  # a BatchNorm without running statistics normalises by the batch's, even in eval mode
    return True


def folds(stage: nn.Module, pixels: int) -> bool:
    """Whether a stage whose map holds `pixels` pixels (over the batch) runs folded: see the module docstring."""
    return pixels >= stage.hidden_width


def forward(stages: nn.Module, x: torch.Tensor, memory: torch.Tensor | None) -> torch.Tensor:
    """`HiTStages.forward` on this path: first map (B, R0, R0, C0), memory (B, M, E) -> image (B, 3, R, R)."""
    img = x_proj = None
    for stage in stages.stages:
        x, x_proj, img = stage_forward(stage, x, memory, img, x_proj)
    return img.permute(0, 3, 1, 2)


def stage_forward(stage: nn.Module, x: torch.Tensor, memory: torch.Tensor | None, img: torch.Tensor | None,
                  x_proj: tuple | None = None):
    """One `HiTStage` on this path: folded afresh when `folds` says so, else through its own modules. Returns
    (features, the Linear still to apply to them or None, image): see `folded_stage`."""
    if folds(stage, x.shape[0] * x.shape[1] * x.shape[2]):
        return folded_stage(stage, x, memory, img, fold_stage(stage), x_proj)
    x, img = stage(F.linear(x, *x_proj) if x_proj is not None else x, memory, img)
    return x, None, img


# -- folding -----------------------------------------------------------------------------------------------------

def fold_linear(linears, norm: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of one Linear equal to Linear(norm(x)) for the `linears` side by side (their outputs
    concatenated), with `norm` an eval-mode BatchNorm: norm(x) = x * s + t, so W(x * s + t) + b =
    (W * s) x + (W t + b). A lone Linear without a norm is returned as it is (its live parameters)."""
    weight = torch.cat([lin.weight for lin in linears]) if len(linears) > 1 else linears[0].weight
    bias = torch.cat([lin.bias for lin in linears]) if len(linears) > 1 else linears[0].bias
    if norm is None:
        return weight, bias
    scale = torch.rsqrt(norm.running_var + norm.eps)
    shift = -norm.running_mean * scale
    if norm.affine:
        scale, shift = scale * norm.weight, shift * norm.weight + norm.bias
    return weight * scale, torch.addmv(bias, weight, shift)


def fold_mlp(block: nn.Module) -> dict:
    return {"fc1": fold_linear([block.fc1], block.norm), "fc2": fold_linear([block.fc2])}


def fold_stage(stage: nn.Module) -> dict:
    """Folded weights of one `HiTStage`, from its parameters and buffers as they are now."""
    blocks = []
    for block in stage.blocks:
        if isinstance(block, SelfAttentionBlock):
            a = block.attn
            blocks.append({"qkv": fold_linear([a.q, a.k, a.v], block.norm), "out": fold_linear([a.out]),
                           "mlp": fold_mlp(block.mlp)})
        else:
            blocks.append(fold_mlp(block))
    cross = None
    if stage.cross is not None:
        a = stage.cross.attn
        cross = {"q": fold_linear([a.q], stage.cross.norm), "out": fold_linear([a.out]),
                 "mlp": fold_mlp(stage.cross.mlp)}
    return {"cross": cross, "blocks": blocks,
            "to_rgb": fold_linear([stage.to_rgb[1]], stage.to_rgb[0]) if stage.to_rgb is not None else None,
            "upsample": fold_linear([stage.upsample]) if isinstance(stage.upsample, nn.Linear) else None}


# -- the folded forwards -----------------------------------------------------------------------------------------

def cache_rows(width: int, hidden: int, device: torch.device) -> int | None:
    """Rows per chunk for an MLP of `width` -> `hidden` -> `width` on CPU: each thread's share of the (rows, hidden)
    activation stays in its core's cache, but a chunk has at least 4 * width rows, because the weights (width x
    hidden) are read again for every chunk and must stay small beside it: at 16x16 (width 512) nothing is
    chunked, at 256x256 (width 64) chunks of 1024 pixels per thread run. None = no chunking (GPU, where one large
    kernel beats many small ones)."""
    if device.type != "cpu":
        return None
    return max(CHUNK_FLOATS * torch.get_num_threads() // hidden, 4 * width)


def mlp(x: torch.Tensor, f: dict) -> torch.Tensor:
    """x + FC2(GELU(FC1(Norm(x)))) with the norm folded into FC1; on CPU in chunks of rows that stay in cache."""
    def run(rows):
        hidden = F.linear(rows, *f["fc1"])
        torch.ops.aten.gelu_(hidden)  # in place: a second 4C-wide buffer per chunk can cost more than the GELU
        return rows + F.linear(hidden, *f["fc2"])

    weight = f["fc1"][0]
    rows = x.reshape(-1, x.shape[-1])
    chunk = cache_rows(weight.shape[1], weight.shape[0], x.device)
    if chunk is None or rows.shape[0] <= chunk:
        return run(x)
    return torch.cat([run(part) for part in rows.split(chunk)]).view(x.shape)


def self_attention(block: nn.Module, x: torch.Tensor, f: dict) -> torch.Tensor:
    """`SelfAttentionBlock` on a map (B, H, W, C): the norm folded into one fused q, k, v projection."""
    kv_width = block.attn.k.out_features
    q, k, v = F.linear(x, *f["qkv"]).split([x.shape[-1], kv_width, kv_width], dim=-1)
    x = x + F.linear(block.attn.mix(q, k, v), *f["out"])
    return mlp(x, f["mlp"])


def cross_attention(block: nn.Module, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, f: dict) -> torch.Tensor:
    """`CrossAttentionBlock` on tokens x (B, N, C) against the memory's K, V (B, M, kv width), computed once."""
    x = x + F.linear(attend(F.linear(x, *f["q"]), k, v, block.attn.num_heads), *f["out"])
    return mlp(x, f["mlp"])


def folded_stage(stage: nn.Module, x: torch.Tensor, memory: torch.Tensor | None, img: torch.Tensor | None, f: dict,
                 x_proj: tuple | None = None):
    """`HiTStage.forward` with folded weights `f` (from `fold_stage`): the same function.

    The Linear after the pixel shuffle acts on each pixel alone, so it is deferred to the next stage, which applies
    it chunk by chunk: `x_proj` is the previous stage's (weight, bias) still to apply to x (None: x is ready), and
    this stage returns (pixel-shuffled features, its own deferred Linear, image)."""
    b, h, w, _ = x.shape
    k = v = None
    if stage.cross is not None:  # the memory's K and V: once per stage and forward
        k, v = stage.cross.attn.k(memory), stage.cross.attn.v(memory)
    if stage.to_rgb is None:  # attention stage: self-attention mixes pixels, so the map is processed whole
        x = (F.linear(x, *x_proj) if x_proj is not None else x) + stage.pos_embed
        c = x.shape[-1]
        if stage.cross is not None:
            x = cross_attention(stage.cross, x.reshape(b, h * w, c), k, v, f["cross"]).view(b, h, w, c)
        for block, fb in zip(stage.blocks, f["blocks"]):
            x = self_attention(block, x, fb)
    else:
        x, rgb = pixelwise(stage, x.reshape(b, h * w, -1), k, v, f, x_proj)
        x, rgb = x.view(b, h, w, -1) if x is not None else None, rgb.view(b, h, w, 3)
        img = rgb if img is None else upsample2x(img) + rgb
    if stage.upsample is None:
        return x, None, img
    return pixel_shuffle(x), f["upsample"], img  # f["upsample"] is None for nn.Identity: x is ready


def pixelwise(stage: nn.Module, x: torch.Tensor, k, v, f: dict, x_proj: tuple | None):
    """An MLP stage on tokens x (B, N, C_in): (features (B, N, C), or None for the last stage; rgb (B, N, 3)).

    Every operation here acts on each pixel alone (BatchNorm is folded; the memory's K, V are fixed), so on CPU the
    pixels run in chunks whose 4C-wide hidden layer stays in cache, written out once at the end."""
    pos = stage.pos_embed.reshape(-1, stage.pos_embed.shape[-1])

    def run(xs, pos, k=None, v=None):
        xs = (F.linear(xs, *x_proj) if x_proj is not None else xs) + pos
        if stage.cross is not None:
            xs = cross_attention(stage.cross, xs, k, v, f["cross"])
        for fb in f["blocks"]:
            xs = mlp(xs, fb)
        return xs, F.linear(xs, *f["to_rgb"])

    chunk = cache_rows(pos.shape[-1], stage.hidden_width, x.device)
    if chunk is None or x.shape[1] <= chunk:
        x, rgb = run(x, pos, k, v)
        return (x if stage.upsample is not None else None), rgb
    out = rgb = None
    for i in range(x.shape[0]):
        image = slice(i, i + 1)
        for start in range(0, x.shape[1], chunk):
            rows = slice(start, start + chunk)
            xs, rgbs = run(x[image, rows], pos[rows], *([] if k is None else [k[image], v[image]]))
            if rgb is None:
                rgb = rgbs.new_empty(x.shape[0], x.shape[1], 3)
                out = xs.new_empty(x.shape[0], x.shape[1], xs.shape[-1]) if stage.upsample is not None else None
            rgb[image, rows] = rgbs
            if out is not None:
                out[image, rows] = xs
    return out, rgb
