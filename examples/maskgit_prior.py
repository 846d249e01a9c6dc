#!/usr/bin/env python3
"""A MaskGIT-style prior trained on VQ-HiT tokens: what a tokenizer is for.

    python scripts/encode.py --model runs/vqhit-demo/model --data builtin:photos --output-dir tokens/photos \\
        --format parquet
    python scripts/encode.py --model runs/vqhit-demo/model --data builtin:photos-heldout \\
        --output-dir tokens/photos-heldout --format parquet
    python examples/maskgit_prior.py --tokens tokens/photos --heldout-tokens tokens/photos-heldout

A bidirectional transformer learns to predict masked tokens of a grid (MaskGIT, Chang et al. 2022): each training
grid gets a mask ratio drawn from the cosine schedule, its masked tokens are replaced by a [MASK] token, and the
loss is the cross-entropy on them. Its attention knows positions by their 2D offsets alone, and its output layer
is the code embeddings, two choices that suit a few images: what holds in one place holds in another, and a code
like its neighbours' is one step away. Sampling starts from a fully masked grid and, over a few steps, keeps the
most confident of its parallel predictions and masks the rest again, fewer at each step along the same cosine
schedule. The samples go through the tokenizer's decoder to samples.png.

The tokens are read with `datasets` alone (a folder of scripts/encode.py --format parquet, or its Hub copy); the
manifest in their dataset card names the tokenizer, which is only loaded to draw the samples. The report puts the
held-out masked-token cross-entropy beside the unigram entropy of the codes: the difference is what the prior knows
beyond how often each code occurs.
"""
import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from datasets import load_dataset
from huggingface_hub import DatasetCard


def read_tokens(source: str, cache_dir=None) -> tuple[torch.Tensor, dict]:
    """The token grids (N, h, w) int64 of a Parquet token folder or Hub dataset, and the manifest on its card."""
    rows = load_dataset(source, split="train", cache_dir=cache_dir).with_format("torch", columns=["indices"])
    card = DatasetCard.load(Path(source) / "README.md" if Path(source).is_dir() else source, repo_type="dataset")
    return rows[:]["indices"].long(), card.data.to_dict()["vqhit"]


# ------------------------------------------------------------------------------------------------------------------
# The model: a plain pre-norm transformer encoder over the flattened grid, with a [MASK] token.


def relative_offsets(grid: tuple[int, int]) -> torch.Tensor:
    """(L, L) index of the 2D offset from position i to position j, in [0, (2h - 1) * (2w - 1))."""
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    dr = rows.flatten()[None, :] - rows.flatten()[:, None] + h - 1
    dc = cols.flatten()[None, :] - cols.flatten()[:, None] + w - 1
    return dr * (2 * w - 1) + dc


class Block(nn.Module):
    """Pre-norm self-attention and MLP. Where tokens are is told by a learned bias per head and 2D offset (one
    number says "look at the left neighbour"), not by absolute positions: what holds in one place of an image
    holds in another."""

    def __init__(self, dim: int, heads: int, grid: tuple[int, int], dropout: float):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.offset_bias = nn.Parameter(torch.zeros(heads, (2 * grid[0] - 1) * (2 * grid[1] - 1)))
        self.register_buffer("offsets", relative_offsets(grid), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.offset_bias[:, self.offsets]  # (heads, L, L); no causal mask: every token sees the whole grid
        x = x + self.drop(self.proj(F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2)
                                    .reshape(b, n, d)))
        return x + self.mlp(self.norm2(x))


class MaskGIT(nn.Module):
    def __init__(self, codebook_size: int, grid: tuple[int, int], dim: int, depth: int, heads: int,
                 dropout: float = 0.0):
        super().__init__()
        self.mask_id, self.grid = codebook_size, grid  # one more embedding than there are codes: [MASK]
        self.embed = nn.Embedding(codebook_size + 1, dim)
        nn.init.normal_(self.embed.weight, std=0.02)  # small: they are the output layer too
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, grid, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.bias = nn.Parameter(torch.zeros(codebook_size))

    def forward(self, tokens):  # (B, L) codes or mask_id -> (B, L, codebook_size) logits
        x = self.drop(self.embed(tokens))
        for block in self.blocks:
            x = block(x)
        # The output layer is the code embeddings (tied): predicting a neighbour's code is then easy to learn.
        return self.norm(x) @ self.embed.weight[:-1].T + self.bias


def mask_ratio(t: torch.Tensor) -> torch.Tensor:
    """MaskGIT's cosine schedule: the fraction of tokens masked at time t in [0, 1) (1 at t = 0)."""
    return torch.cos(t * math.pi / 2)


def random_mask(tokens: torch.Tensor, generator=None) -> torch.Tensor:
    """A boolean mask (B, L): for each grid ceil(ratio * L) positions, ratio drawn from the cosine schedule."""
    b, n = tokens.shape
    count = (mask_ratio(torch.rand(b, generator=generator)) * n).ceil().clamp(1, n)
    ranks = torch.rand(b, n, generator=generator).argsort(dim=1).argsort(dim=1)
    return ranks < count[:, None]


def masked_loss(model: MaskGIT, tokens: torch.Tensor, generator=None) -> torch.Tensor:
    mask = random_mask(tokens, generator)
    logits = model(tokens.masked_fill(mask, model.mask_id))
    return F.cross_entropy(logits[mask], tokens[mask])


@torch.no_grad()
def heldout_bits(model: MaskGIT, tokens: torch.Tensor, repeats: int = 8, batch_size: int = 64) -> float:
    """Masked-token cross-entropy in bits per token, over `repeats` fixed mask draws of every held-out grid."""
    model.eval()
    generator = torch.Generator().manual_seed(0)  # the same masks at every evaluation
    total, count = 0.0, 0
    for _ in range(repeats):
        for batch in tokens.split(batch_size):
            mask = random_mask(batch, generator)
            logits = model(batch.masked_fill(mask, model.mask_id))
            total += F.cross_entropy(logits[mask], batch[mask], reduction="sum").item()
            count += int(mask.sum())
    model.train()
    return total / count / math.log(2)


def unigram_bits(train: torch.Tensor, heldout: torch.Tensor, codebook_size: int) -> tuple[float, float]:
    """(entropy of the training codes' frequencies, cross-entropy of those frequencies on the held-out codes), in
    bits. The frequencies are add-one smoothed for the cross-entropy: a code unseen in training is not impossible."""
    counts = torch.bincount(train.flatten(), minlength=codebook_size).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log2()).sum().item()
    smoothed = (counts + 1) / (counts.sum() + codebook_size)
    return entropy, -smoothed.log2()[heldout.flatten()].mean().item()


@torch.no_grad()
def sample(model: MaskGIT, n: int, steps: int, temperature: float = 1.0, choice_temperature: float = 4.5,
           generator=None) -> torch.Tensor:
    """MaskGIT's iterative parallel decoding: (n, L) codes from a fully masked grid in `steps` steps."""
    model.eval()
    length = model.grid[0] * model.grid[1]
    tokens = torch.full((n, length), model.mask_id)
    for step in range(steps):
        unknown = tokens == model.mask_id
        probs = F.softmax(model(tokens) / temperature, dim=-1)
        drawn = torch.multinomial(probs.view(-1, probs.shape[-1]), 1, generator=generator).view(n, length)
        drawn = torch.where(unknown, drawn, tokens)
        confidence = probs.gather(-1, drawn[..., None])[..., 0].log()
        # Gumbel noise on the confidences, annealed to 0: early steps keep a more varied choice of positions.
        gumbel = -torch.log(-torch.log(torch.rand(n, length, generator=generator).clamp_min(1e-20)))
        confidence = confidence + choice_temperature * (1 - (step + 1) / steps) * gumbel
        confidence[~unknown] = float("inf")  # a token once kept stays
        remasked = int(mask_ratio(torch.tensor((step + 1) / steps)) * length)  # 0 after the last step
        lowest = confidence.argsort(dim=1)[:, :remasked]
        tokens = drawn.scatter(1, lowest, model.mask_id)
    model.train()
    return tokens


# ------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", required=True, help="Training tokens: a folder of scripts/encode.py --format parquet, "
                   "or a Hub dataset id")
    p.add_argument("--heldout-tokens", default=None, help="Held-out tokens of the same tokenizer (other images); "
                   "default: 10%% of --tokens' grids (optimistic when those overlap, as built-in photo tiles do)")
    p.add_argument("--tokenizer", default=None, help="The tokenizer that decodes the samples (default: the one the "
                   "card names)")
    p.add_argument("--out-dir", default="runs/maskgit-prior", help="Where samples.png and prior.json go")
    p.add_argument("--steps", type=int, default=300, help="Training steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="Grids per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW's peak learning rate (default: %(default)s)")
    p.add_argument("--dim", type=int, default=128, help="Transformer width (default: %(default)s)")
    p.add_argument("--depth", type=int, default=2, help="Transformer blocks (default: %(default)s)")
    p.add_argument("--heads", type=int, default=4, help="Attention heads (default: %(default)s)")
    p.add_argument("--dropout", type=float, default=0.1, help="(default: %(default)s)")
    p.add_argument("--eval-every", type=int, default=100, help="Steps between held-out figures (default: %(default)s)")
    p.add_argument("--samples", type=int, default=16, help="Images in samples.png; 0 draws none (default: "
                   "%(default)s)")
    p.add_argument("--sampling-steps", type=int, default=12, help="Parallel decoding steps (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None, help="datasets' cache (default: its own)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.dim % args.heads:
        raise SystemExit(f"--dim {args.dim} must be a multiple of --heads {args.heads}")
    torch.manual_seed(args.seed)
    train, manifest = read_tokens(args.tokens, args.cache_dir)
    if args.heldout_tokens is not None:
        heldout, other = read_tokens(args.heldout_tokens, args.cache_dir)
        if other["tokenizer_fingerprint"] != manifest["tokenizer_fingerprint"]:
            raise SystemExit(f"{args.heldout_tokens} was made by another tokenizer than {args.tokens}: its codes mean "
                             f"other things")
    else:
        order = torch.randperm(len(train))
        cut = max(1, len(train) // 10)
        heldout, train = train[order[:cut]], train[order[cut:]]
    codebook_size, (h, w) = manifest["codebook_size"], train.shape[1:]
    train, heldout = train.flatten(1), heldout.flatten(1)
    print(f"{len(train)} training grids and {len(heldout)} held-out grids of {h}x{w} tokens, {codebook_size} codes "
          f"(tokenizer {manifest['model']})")

    model = MaskGIT(codebook_size, (h, w), args.dim, args.depth, args.heads, args.dropout)
    print(f"prior: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, cosine decay
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / max(args.steps, 1), 1)))))
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = train[torch.randint(len(train), (args.batch_size,))]
        loss = masked_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        if step % args.eval_every == 0 or step == args.steps:
            print(f"step {step}: train loss {loss.item() / math.log(2):.3f} bits, held-out "
                  f"{heldout_bits(model, heldout):.3f} bits per masked token ({time.perf_counter() - start:.0f} s)",
                  flush=True)

    figures = {"heldout_bits": heldout_bits(model, heldout)}
    figures["unigram_entropy_bits"], figures["unigram_heldout_bits"] = unigram_bits(train, heldout, codebook_size)
    figures.update(train_grids=len(train), heldout_grids=len(heldout), steps=args.steps,
                   train_seconds=round(time.perf_counter() - start, 1))
    print(f"held-out masked-token cross-entropy: {figures['heldout_bits']:.3f} bits per token\n"
          f"unigram entropy of the codes: {figures['unigram_entropy_bits']:.3f} bits (the frequencies' cross-entropy "
          f"on the held-out codes: {figures['unigram_heldout_bits']:.3f} bits)\n"
          f"learned beyond code frequencies: {figures['unigram_heldout_bits'] - figures['heldout_bits']:.3f} bits "
          f"per token")

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prior.json").write_text(json.dumps(figures, indent=2) + "\n")
    samples = None
    if args.samples > 0:
        samples = sample(model, args.samples, args.sampling_steps, generator=torch.Generator().manual_seed(args.seed))
        samples = samples.view(-1, h, w)
        save_images(samples, args.tokenizer or manifest["model"], manifest, out / "samples.png")
        print(f"samples: {out / 'samples.png'}")
    return {**figures, "samples": samples}


def save_images(tokens: torch.Tensor, tokenizer: str, manifest: dict, path: Path) -> None:
    """Decode token grids with the tokenizer that made the training tokens, into one PNG grid."""
    from PIL import Image
    from torchvision.utils import make_grid

    from vqhit import VQHiT
    from vqhit.metrics import to_uint8
    from vqhit.tokens import tokenizer_fingerprint

    model = VQHiT.from_pretrained(tokenizer).eval()
    if tokenizer_fingerprint(model) != manifest["tokenizer_fingerprint"]:
        raise SystemExit(f"{tokenizer} is not the tokenizer that made these tokens (another encoder or codebook); "
                         f"pass the one that did with --tokenizer")
    with torch.no_grad():
        images = to_uint8(model.decode_indices(tokens))  # rounded, as scripts/decode.py writes them
    grid = make_grid(images, nrow=math.ceil(len(tokens) ** 0.5), padding=2, pad_value=255)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


if __name__ == "__main__":
    main()
