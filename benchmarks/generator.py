"""Generator presets: trainable parameters, forward FLOPs per image, inference images/s, and how the
per-image time grows from hit-b-256 to hit-b-1024 (16x the pixels; target: at most 20x the time).

    python benchmarks/generator.py                        # every preset, batch sizes 1 2 (CPU) / 1 8 32 (CUDA)
    python benchmarks/generator.py --presets hit-b-256 hit-b-1024 --batch-sizes 4

Inference = eval mode (BatchNorm running statistics) under no_grad. FLOPs are counted on the meta device
for a batch of 1 (no compute, so the 1024 preset counts as fast as the tiny one). "fold ms/call" is what the
inference path spends re-folding its weights on every call (timed alone, in the same rounds), beside the forward
it is part of.
"""
from __future__ import annotations

import torch

from common import base_parser, count_flops, fold_all, format_table, machine, setup, time_calls, write_json

from vqhit import HiTGenerator, list_presets
from vqhit.precision import autocast

RATIO_PAIR, RATIO_TARGET = ("hit-b-256", "hit-b-1024"), 20.0


def flops_per_image(name: str) -> int:
    with torch.device("meta"):
        G = HiTGenerator.from_preset(name).eval()
        z = torch.randn(1, G.config.latent_dim)
    with torch.no_grad():
        return count_flops(lambda: G(z))[0]


def main(argv=None) -> dict:
    parser = base_parser("generator", __doc__)
    parser.add_argument("--presets", nargs="+", default=list_presets("generator"), choices=list_presets("generator"))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the generators (the warm-up call compiles and is not timed)")
    args = parser.parse_args(argv)
    device = setup(args)
    batch_sizes = args.batch_sizes or ([1, 8, 32] if device.type == "cuda" else [1, 2])
    info = machine(device, args)
    print(f"{info['device_name']} | torch {info['torch']} | {args.precision} | {info['torch_threads']} threads")

    models, flops, calls, warmups, kernels = {}, {}, {}, {}, {}
    for name in args.presets:
        torch.manual_seed(0)
        models[name] = HiTGenerator.from_preset(name).to(device).eval()
        flops[name] = flops_per_image(name)
        compiled = torch.compile(models[name]) if args.compile else models[name]
        for batch in batch_sizes:
            z = torch.randn(batch, models[name].config.latent_dim, device=device)

            def forward(G=compiled, z=z):
                with torch.no_grad(), autocast(args.precision, device):
                    return G(z)

            def counted_forward(forward=forward, key=(name, batch)):  # names the attention kernel that ran
                kernels[key] = count_flops(forward)[1]

            calls[name, batch] = forward
            if not args.compile:  # compiled code is not seen by the counter: warm up (and compile) plainly
                warmups[name, batch] = counted_forward
                calls["fold", name, batch] = lambda G=models[name], batch=batch: fold_all(G.stages, batch)
    timings = time_calls(calls, device, args.repeats, args.min_repeat_s, warmups)
    folds = {key[1:]: timings.pop(key) for key in list(timings) if key[0] == "fold"}

    rows = []
    for (name, batch), t in timings.items():
        G = models[name]
        row = {"preset": name, "resolution": G.config.resolution, "params": G.num_parameters(),
               "gflops": flops[name] / 1e9, "batch": batch, "sdpa": ",".join(kernels.get((name, batch), [])), **t}
        if "seconds" in t:
            row.update(ms_per_image=1e3 * t["seconds"] / batch, images_per_s=batch / t["seconds"])
            if (name, batch) in folds:  # the inference path's re-folding, timed alone in the same rounds
                fold = folds[name, batch]
                row.update(fold_ms=1e3 * fold["median_seconds"],
                           fold_share=fold["median_seconds"] / t["median_seconds"], fold_timings=fold)
        rows.append(row)

    ratios = []
    small, large = RATIO_PAIR
    for batch in batch_sizes:
        by_name = {r["preset"]: r for r in rows if r["batch"] == batch}
        if "ms_per_image" in by_name.get(small, {}) and "ms_per_image" in by_name.get(large, {}):
            ratio = by_name[large]["ms_per_image"] / by_name[small]["ms_per_image"]
            flop_ratio = by_name[large]["gflops"] / by_name[small]["gflops"]
            ratios.append({"batch": batch, "time_ratio": ratio, "flop_ratio": flop_ratio, "pixel_ratio": 16.0,
                           "target": RATIO_TARGET, "met": ratio <= RATIO_TARGET})

    print()
    print(format_table(rows, [("preset", "preset"), ("res", "resolution"), ("params", "params"),
                              ("GFLOPs/img", "gflops"), ("batch", "batch"), ("ms/img", "ms_per_image"),
                              ("img/s", "images_per_s"), ("fold ms/call", "fold_ms"),
                              ("fold / forward (median)", "fold_share"), ("peak GB", "peak_gb"),
                              ("attention kernel", "sdpa"), ("error", "error")]))
    if ratios:
        print(f"\nper-image time {large} / {small} (16x the pixels; target <= {RATIO_TARGET:g}x):")
        print(format_table(ratios, [("batch", "batch"), ("time ratio", "time_ratio"), ("FLOP ratio", "flop_ratio"),
                                    ("met", "met")]))
    write_json(args.json, info, results=rows, ratio_1024_over_256=ratios)
    return {"results": rows, "ratios": ratios}


if __name__ == "__main__":
    main()
