"""How the time per image grows with resolution, 128 -> 256 -> 512 -> 1024 (4x the pixels per step).

Every model follows the HiT-B stage recipe of `hit-b-1024`, cut after the stage that reaches the resolution
(the 256 cut is exactly `hit-b-256`). Three attention layouts of the same widths, heads and blocks:

  hit          the paper's: multi-axis blocked attention in the 8..64 stages, MLP stages above;
  global-low   `attention_mode="global"`: the same stages, but every token attends to every token;
  global-all   global self-attention blocks in every stage but the last (which must carry the to-RGB head):
               a plain transformer generator, O(N^2) in the pixels of the stage before the last.

FLOPs are counted on the meta device for every row. A row whose FLOPs exceed `--max-gflops` is not timed
(it would take minutes per image on a CPU); its FLOPs and the memory a materialised N x N attention matrix
would need are reported instead (fused SDPA kernels avoid that memory, not the N^2 compute).

    python benchmarks/scaling.py
    python benchmarks/scaling.py --device cuda --batch-size 8 --max-gflops 1e5
"""
from __future__ import annotations

import torch

from common import base_parser, count_flops, format_table, machine, setup, time_calls, write_json

from vqhit import HiTConfig, HiTGenerator
from vqhit.presets import GENERATOR_PRESETS
from vqhit.precision import autocast

RECIPE = GENERATOR_PRESETS["hit-b-1024"]
VARIANTS = ("hit", "global-low", "global-all")


def config(variant: str, resolution: int) -> HiTConfig:
    n = (resolution // 8).bit_length()  # stages from 8x8: 128 -> 5, 1024 -> 8
    block_sizes = RECIPE["block_sizes"][:n]
    if variant == "global-all":
        block_sizes = [8] * (n - 1) + [None]  # any block size: global attention does not block the map
    return HiTConfig(resolution=resolution, latent_dim=RECIPE["latent_dim"], widths=RECIPE["widths"][:n],
                     heads=RECIPE["heads"][:n], blocks=RECIPE["blocks"][:n], block_sizes=block_sizes,
                     attention_mode="multi_axis" if variant == "hit" else "global")


def largest_global_attention(cfg: HiTConfig) -> tuple[int, int]:
    """(tokens N, heads) of the largest self-attention whose every token sees every other (0 for hit)."""
    if cfg.attention_mode != "global":
        return 0, 0
    last = max(i for i, p in enumerate(cfg.block_sizes) if p is not None)
    return (8 * 2**last) ** 2, cfg.heads[last]


def flops_per_image(cfg: HiTConfig) -> int:
    with torch.device("meta"), torch.no_grad():
        G = HiTGenerator(cfg).eval()
        z = torch.randn(1, cfg.latent_dim)
        return count_flops(lambda: G(z))[0]


def main(argv=None) -> dict:
    parser = base_parser("scaling", __doc__)
    parser.add_argument("--resolutions", nargs="+", type=int, default=[128, 256, 512, 1024],
                        choices=[128, 256, 512, 1024], help="the recipe has MLP stages from 128 on")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--batch-size", type=int, default=None, help="default 1 on CPU, 4 on CUDA")
    parser.add_argument("--max-gflops", type=float, default=None,
                        help="skip timing above this many GFLOPs per image (default 150 on CPU, 20000 on CUDA)")
    args = parser.parse_args(argv)
    device = setup(args)
    batch = args.batch_size or (4 if device.type == "cuda" else 1)
    max_gflops = args.max_gflops or (2e4 if device.type == "cuda" else 150.0)
    info = machine(device, args)
    print(f"{info['device_name']} | torch {info['torch']} | {args.precision} | {info['torch_threads']} threads")

    rows, calls = [], {}
    for variant in args.variants:
        for r in sorted(args.resolutions):
            cfg = config(variant, r)
            gflops = flops_per_image(cfg) / 1e9
            tokens, heads = largest_global_attention(cfg)
            rows.append({"variant": variant, "resolution": r, "batch": batch, "gflops": gflops,
                         "global_tokens": tokens or None,
                         # a materialised fp32 N x N attention matrix, per image, for the largest global layer
                         "nxn_attention_gb": tokens**2 * heads * 4 / 2**30 if tokens else None})
            if gflops > max_gflops:
                rows[-1]["note"] = f"not run: {gflops / 1e3:.3g} TFLOPs/image > --max-gflops {max_gflops:g}"
                continue
            torch.manual_seed(0)
            G = HiTGenerator(cfg).to(device).eval()
            z = torch.randn(batch, cfg.latent_dim, device=device)

            def forward(G=G, z=z):
                with torch.no_grad(), autocast(args.precision, device):
                    return G(z)

            calls[variant, r] = forward
    timings = time_calls(calls, device, args.repeats, args.min_repeat_s)

    for row in rows:
        t = timings.get((row["variant"], row["resolution"]), {})
        row.update(t)
        if "seconds" in t:
            row["ms_per_image"] = 1e3 * t["seconds"] / batch
        base = next(b for b in rows if b["variant"] == row["variant"])  # the lowest resolution
        row["pixel_ratio"] = (row["resolution"] / base["resolution"]) ** 2
        row["flop_ratio"] = row["gflops"] / base["gflops"]
        if "ms_per_image" in row and "ms_per_image" in base:
            row["time_ratio"] = row["ms_per_image"] / base["ms_per_image"]

    print(f"\nper image, batch {batch}; ratios against the same variant at {min(args.resolutions)}:")
    print(format_table(rows, [("variant", "variant"), ("res", "resolution"), ("GFLOPs/img", "gflops"),
                              ("ms/img", "ms_per_image"), ("pixels x", "pixel_ratio"), ("FLOPs x", "flop_ratio"),
                              ("time x", "time_ratio"), ("global N", "global_tokens"),
                              ("N x N fp32 GB", "nxn_attention_gb"), ("peak GB", "peak_gb"), ("note", "note"),
                              ("error", "error")]))
    write_json(args.json, info, batch_size=batch, max_gflops=max_gflops, results=rows)
    return {"results": rows}


if __name__ == "__main__":
    main()
