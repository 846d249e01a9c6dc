"""VQ-HiT (`vqhit-b-f16-1024`): encode and decode images/s, beside taming-transformers' convolutional VQGAN
decoder for the same 16x16 grid of 256-wide codes, in the same run. Target: our HiT decoder >= 5x faster.

    python benchmarks/tokenizer.py                     # batch 1 on CPU, 1 16 64 on CUDA
    python benchmarks/tokenizer.py --profile           # + the top operators of both decoders

Encode = images (B, 3, 256, 256) -> token ids (B, 16, 16): taming's encoder, quant_conv, nearest code.
Decode = token ids -> images for VQ-HiT (`decode_indices`: code lookup + HiT decoder); code vectors
(B, 256, 16, 16) -> images for taming's decoder. Weights are random: speed does not depend on them.
"""
from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile

from common import (autocast, base_parser, count_flops, format_table, machine, setup, synchronize, time_calls,
                    write_json)

from vqhit import VQHiT

PRESET, SPEEDUP_TARGET = "vqhit-b-f16-1024", 5.0


def taming_decoder():
    """taming-transformers' VQGAN f16 decoder (the one paired with a 1024-code 16x16 tokenizer): 42,449,795
    parameters."""
    from taming.modules.diffusionmodules.model import Decoder
    return Decoder(ch=128, out_ch=3, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=[16], dropout=0.0,
                   resamp_with_conv=True, in_channels=3, resolution=256, z_channels=256, double_z=False)


def flops_per_image() -> dict:
    """Forward FLOPs of a batch of 1, counted on the meta device."""
    with torch.device("meta"):
        model, taming = VQHiT.from_preset(PRESET), taming_decoder()
        c = model.config
        runs = {"encode": lambda: model.quant_conv(model.encoder(torch.randn(1, 3, c.resolution, c.resolution))),
                "vqhit_decode": lambda: model.decoder(torch.randn(1, c.grid, c.grid, c.code_dim)),
                "taming_decode": lambda: taming(torch.randn(1, c.code_dim, c.grid, c.grid))}
        with torch.no_grad():
            flops = {name: count_flops(run)[0] for name, run in runs.items()}
    # The nearest-code search (which turns autocast off, so cannot run on meta): one (h*w, D) x (D, K) matmul.
    flops["encode"] += 2 * c.grid**2 * c.code_dim * c.codebook_size
    return flops


def stage_seconds(decoder, codes: torch.Tensor, precision: str, repeats: int = 3) -> dict:
    """Seconds spent in each part of each HiT decoder stage (min over repeats), timed with forward hooks."""
    times, parts = {}, []
    for stage in decoder.stages.stages:
        for part in ("cross", "blocks", "to_rgb", "upsample"):
            if getattr(stage, part) is not None:
                parts.append((f"{stage.resolution}x{stage.resolution} {part}", getattr(stage, part)))
    handles = []
    for label, module in parts:
        def start(module, args, label=label):
            synchronize(codes.device)
            times.setdefault(label, []).append(-time.perf_counter())

        def stop(module, args, output, label=label):
            synchronize(codes.device)
            times[label][-1] += time.perf_counter()

        handles += [module.register_forward_pre_hook(start), module.register_forward_hook(stop)]
    try:
        with torch.no_grad(), autocast(codes.device, precision):
            for _ in range(repeats):
                decoder(codes)
    finally:
        for handle in handles:
            handle.remove()
    return {label: min(ts) for label, ts in times.items()}


def top_ops(fn, rows: int = 12) -> str:
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
                 ) as prof:
        fn()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def main(argv=None) -> dict:
    parser = base_parser("tokenizer", __doc__)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None)
    parser.add_argument("--profile", action="store_true", help="print the top operators of both decoders")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile encoder and both decoders (the warm-up compiles and is not timed)")
    args = parser.parse_args(argv)
    device = setup(args)
    batch_sizes = args.batch_sizes or ([1, 16, 64] if device.type == "cuda" else [1])
    info = machine(device, args)
    print(f"{info['device_name']} | torch {info['torch']} | {args.precision} | {info['torch_threads']} threads")

    torch.manual_seed(0)
    model = VQHiT.from_preset(PRESET).to(device).eval()
    taming = taming_decoder().to(device).eval()
    if args.compile:  # the quantizer's lookups stay eager; they are a sliver of the time
        model.encoder, model.decoder, taming = (torch.compile(m) for m in (model.encoder, model.decoder, taming))
    params = {"encode": model.num_parameters(model.encoder) + model.num_parameters(model.quant_conv),
              "vqhit_decode": model.num_parameters(model.decoder), "taming_decode": model.num_parameters(taming)}
    flops = flops_per_image()
    g, r, d = model.config.grid, model.config.resolution, model.config.code_dim

    calls = {}
    for batch in batch_sizes:
        images = torch.rand(batch, 3, r, r, device=device) * 2 - 1
        indices = torch.randint(0, model.config.codebook_size, (batch, g, g), device=device)
        codes = torch.randn(batch, d, g, g, device=device)
        runs = {"encode": lambda x=images: model.encode(x), "vqhit_decode": lambda x=indices: model.decode_indices(x),
                "taming_decode": lambda x=codes: taming(x)}
        for name, run in runs.items():
            def call(run=run):
                with torch.no_grad(), autocast(device, args.precision):
                    return run()

            calls[name, batch] = call
    timings = time_calls(calls, device, args.repeats, args.min_repeat_s)

    rows, speedups = [], []
    for (name, batch), t in timings.items():
        row = {"model": name, "batch": batch, "params": params[name], "gflops": flops[name] / 1e9, **t}
        if "seconds" in t:
            row.update(ms_per_image=1e3 * t["seconds"] / batch, images_per_s=batch / t["seconds"])
        rows.append(row)
    for batch in batch_sizes:
        ours, theirs = timings["vqhit_decode", batch], timings["taming_decode", batch]
        if "seconds" in ours and "seconds" in theirs:
            speedup = theirs["seconds"] / ours["seconds"]
            speedups.append({"batch": batch, "speedup": speedup,
                             "flop_ratio": flops["taming_decode"] / flops["vqhit_decode"],
                             "target": SPEEDUP_TARGET, "met": speedup >= SPEEDUP_TARGET})
    profiles, stages = {}, []
    if args.profile:
        profiles = {name: top_ops(calls[name, batch_sizes[0]]) for name in ("vqhit_decode", "taming_decode")}
        indices = torch.randint(0, model.config.codebook_size, (batch_sizes[0], g, g), device=device)
        codes = model.quantize.lookup(indices)
        eager_decoder = getattr(model.decoder, "_orig_mod", model.decoder)  # hooks need the eager module
        seconds = stage_seconds(eager_decoder, codes, args.precision)
        total = sum(seconds.values())
        stages = [{"part": label, "ms": 1e3 * s, "percent": 100 * s / total} for label, s in seconds.items()]

    print()
    print(format_table(rows, [("model", "model"), ("batch", "batch"), ("params", "params"),
                              ("GFLOPs/img", "gflops"), ("ms/img", "ms_per_image"), ("img/s", "images_per_s"),
                              ("peak GB", "peak_gb"), ("error", "error")]))
    print(f"\nHiT decoder speed-up over taming's decoder (target >= {SPEEDUP_TARGET:g}x):")
    print(format_table(speedups, [("batch", "batch"), ("speed-up", "speedup"), ("FLOP ratio", "flop_ratio"),
                                  ("met", "met")]))
    for name, table in profiles.items():
        print(f"\ntop operators, {name}, batch {batch_sizes[0]}:\n{table}")
    if stages:
        print(f"\nHiT decoder time by stage, batch {batch_sizes[0]}:")
        print(format_table(stages, [("part", "part"), ("ms", "ms"), ("% of decoder", "percent")]))
    write_json(args.json, info, preset=PRESET, results=rows, decoder_speedup=speedups, profiles=profiles,
               decoder_stages=stages)
    return {"results": rows, "speedups": speedups}


if __name__ == "__main__":
    main()
