"""VQ-HiT (`vqhit-b-f16-1024`): encode and decode speed beside taming-transformers' convolutional VQGAN decoder
for the same 16x16 grid of 256-wide codes, timed in the same interleaved rounds. Target: our HiT decoder >= 8x
faster than taming's, as the ratio of the median times.

    python benchmarks/tokenizer.py                  # CPU: batch 1 and 4, with 1 and 2 threads, 5 rounds each
    python benchmarks/tokenizer.py --plain          # + the plain decoder (no inference path) and plain encoder
    python benchmarks/tokenizer.py --profile        # + top operators of both decoders, time per HiT stage, and
                                                    #   the HiT decoder's floor (its matmuls, attention, GELU alone)

Encode = images (B, 3, 256, 256) -> token ids (B, 16, 16): taming's encoder, quant_conv, nearest code; it is timed
beside taming's encoder network alone, as taming runs it (the same network; target: encode no slower).
Decode = token ids -> images for VQ-HiT (`decode_indices`: code lookup + HiT decoder); code vectors
(B, 256, 16, 16) -> images for taming's decoder. Models are in eval mode under no_grad, so VQ-HiT runs its
inference path (folded BatchNorm, fused projections, pixel chunks; `--plain` times it without, beside), which
folds its weights afresh on every call: that folding is also timed alone ("fold ms/call"), in the same rounds.
Weights are random: speed does not depend on them.

Each thread count is one block of rounds: every function runs once per round, in turn, and the 1-minute load
average is recorded at the start of each round. Reported: median and minimum per image, the load range, and
the speed-up as median over median (the figure that counts), minimum over minimum, and the median of the
per-round ratios.
"""
from __future__ import annotations

import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from common import (base_parser, count_flops, fold_all, format_table, machine, setup, synchronize,
                    time_calls, write_json)

from vqhit import VQHiT
from vqhit.models import inference
from vqhit.precision import autocast

PRESET, SPEEDUP_TARGET = "vqhit-b-f16-1024", 8.0


def taming_decoder():
    """taming-transformers' VQGAN f16 decoder (the one paired with a 1024-code 16x16 tokenizer): 42,449,795
    parameters."""
    from taming.modules.diffusionmodules.model import Decoder
    return Decoder(ch=128, out_ch=3, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=[16], dropout=0.0,
                   resamp_with_conv=True, in_channels=3, resolution=256, z_channels=256, double_z=False)


def taming_encoder():
    """taming-transformers' VQGAN f16 encoder network, as taming builds and runs it (NCHW images): the network
    VQ-HiT's encoder is, without quant_conv and the nearest-code search that `encode` adds."""
    from taming.modules.diffusionmodules.model import Encoder
    return Encoder(ch=128, out_ch=3, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=[16], dropout=0.0,
                   resamp_with_conv=True, in_channels=3, resolution=256, z_channels=256, double_z=False)


def flops_per_image() -> dict:
    """Forward FLOPs of a batch of 1, counted on the meta device."""
    with torch.device("meta"):
        model, taming, taming_enc = VQHiT.from_preset(PRESET), taming_decoder(), taming_encoder()
        c = model.config
        runs = {"encode": lambda: model.quant_conv(model.encoder(torch.randn(1, 3, c.resolution, c.resolution))),
                "taming_encode": lambda: taming_enc(torch.randn(1, 3, c.resolution, c.resolution)),
                "vqhit_decode": lambda: model.decoder(torch.randn(1, c.grid, c.grid, c.code_dim)),
                "taming_decode": lambda: taming(torch.randn(1, c.code_dim, c.grid, c.grid))}
        with torch.no_grad():
            flops = {name: count_flops(run)[0] for name, run in runs.items()}
    # The nearest-code search (which turns autocast off, so cannot run on meta): one (h*w, D) x (D, K) matmul.
    flops["encode"] += 2 * c.grid**2 * c.code_dim * c.codebook_size
    flops["encode_plain"], flops["vqhit_decode_plain"] = flops["encode"], flops["vqhit_decode"]
    return flops


def plain_decoder(model: VQHiT):
    """`decode_indices` through the plain modules: the inference path switched off for the call."""
    def run(indices):
        stages = model.decoder.stages
        stages.fast_inference = False
        try:
            return model.decode_indices(indices)
        finally:
            stages.fast_inference = True
    return run


def plain_encoder(model: VQHiT):
    """`encode` with the images in the default (NCHW-contiguous) layout instead of channels-last."""
    return lambda images: model.quantize.encode(model.quant_conv(model.encoder(images)).permute(0, 2, 3, 1))


def stage_seconds(model: VQHiT, indices: torch.Tensor, precision: str, repeats: int = 3) -> list[dict]:
    """Seconds per HiT decoder stage (min over repeats), through the plain modules and the inference path (its
    folding included)."""
    decoder, device = model.decoder, indices.device
    best = {}
    with torch.no_grad(), autocast(precision, device):
        codes = model.quantize.lookup(indices)
        b, h, w, d = codes.shape
        for fast in (False, True) * repeats:
            memory, x, img, x_proj = decoder.memory(codes.reshape(b, h * w, d)), decoder.to_map(codes), None, None
            for stage in decoder.stages.stages:
                synchronize(device)
                start = time.perf_counter()
                if fast:  # the Linear after a pixel shuffle may be applied in the next stage
                    x, x_proj, img = inference.stage_forward(stage, x, memory, img, x_proj)
                else:
                    x, img = stage(x, memory, img)
                synchronize(device)
                key = (f"{stage.resolution}x{stage.resolution}", fast)
                best[key] = min(best.get(key, float("inf")), time.perf_counter() - start)
    rows = []
    for (label, fast), seconds in best.items():
        if not fast:
            rows.append({"stage": label, "plain_ms": 1e3 * seconds, "fast_ms": 1e3 * best[label, True],
                         "speedup": seconds / best[label, True]})
    return rows


# The operators that do a HiT decoder's arithmetic: its Linears, its attention and its GELU. Their profiled self
# time is the decoder's floor on this machine with PyTorch's kernels: what it would take if copies, residual adds,
# reshapes and Python took no time at all.
KERNEL_OPS = ("addmm", "mm", "bmm", "baddbmm", "gelu", "gelu_")


def is_kernel(name: str) -> bool:
    op = name.split("::")[-1]
    return op in KERNEL_OPS or "scaled_dot_product" in op


def top_ops(fn, rows: int = 12) -> tuple[str, float | None]:
    """The profile of one call: (table of its top operators, seconds in `KERNEL_OPS` on CPU, else None)."""
    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
    events = prof.key_averages()
    kernel_seconds = None if cuda else 1e-6 * sum(e.self_cpu_time_total for e in events if is_kernel(e.key))
    return events.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=rows), \
        kernel_seconds


def main(argv=None) -> dict:
    parser = base_parser("tokenizer", __doc__)
    parser.set_defaults(repeats=5)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None,
                        help="default: 1 4 on CPU, 1 16 64 on CUDA")
    parser.add_argument("--thread-counts", nargs="+", type=int, default=None,
                        help="torch threads, one block of rounds each (CPU; default 1 2, or --threads)")
    parser.add_argument("--plain", action="store_true",
                        help="also time the plain decoder (inference path off) and the NCHW-layout encoder")
    parser.add_argument("--profile", action="store_true",
                        help="print the top operators of both decoders, the time per HiT stage (plain and fast) and the HiT "
                             "decoder's floor: the self time of its matmuls, attention and GELU alone, and the "
                             "speed-up over taming's decoder if nothing else took time (CPU)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile encoder and both decoders (the warm-up compiles and is not timed)")
    args = parser.parse_args(argv)
    device = setup(args)
    cpu = device.type == "cpu"
    batch_sizes = args.batch_sizes or ([1, 4] if cpu else [1, 16, 64])
    thread_counts = args.thread_counts or ([args.threads] if args.threads or not cpu else [1, 2])

    torch.manual_seed(0)
    model = VQHiT.from_preset(PRESET).to(device).eval()
    taming, taming_enc = taming_decoder().to(device).eval(), taming_encoder().to(device).eval()
    if args.compile:  # the quantizer's lookups stay eager; they are a sliver of the time
        model.encoder, model.decoder, taming, taming_enc = (torch.compile(m) for m in (model.encoder, model.decoder,
                                                                                        taming, taming_enc))
    params = {"encode": model.num_parameters(model.encoder) + model.num_parameters(model.quant_conv),
              "taming_encode": model.num_parameters(taming_enc),
              "vqhit_decode": model.num_parameters(model.decoder), "taming_decode": model.num_parameters(taming)}
    params["encode_plain"], params["vqhit_decode_plain"] = params["encode"], params["vqhit_decode"]
    flops = flops_per_image()
    g, r, d = model.config.grid, model.config.resolution, model.config.code_dim

    rows, speedups, encodes, profiles, stages, machines, floors = [], [], [], {}, {}, {}, []
    for threads in thread_counts:
        if threads:
            torch.set_num_threads(threads)
        info = machine(device, args)
        machines[threads] = info
        print(f"{info['device_name']} | torch {info['torch']} | {args.precision} | {info['torch_threads']} threads | "
              f"load {info['load_average_1m']}", flush=True)
        calls = {}
        for batch in batch_sizes:
            images = torch.rand(batch, 3, r, r, device=device) * 2 - 1
            indices = torch.randint(0, model.config.codebook_size, (batch, g, g), device=device)
            codes = torch.randn(batch, d, g, g, device=device)
            runs = {"encode": lambda x=images: model.encode(x), "taming_encode": lambda x=images: taming_enc(x),
                    "vqhit_decode": lambda x=indices: model.decode_indices(x),
                    "taming_decode": lambda x=codes: taming(x)}
            if args.plain and not args.compile:
                runs["encode_plain"] = lambda x=images, run=plain_encoder(model): run(x)
                runs["vqhit_decode_plain"] = lambda x=indices, run=plain_decoder(model): run(x)
            for name, run in runs.items():
                def call(run=run):
                    with torch.no_grad(), autocast(args.precision, device):
                        return run()

                calls[name, batch] = call
            if not args.compile:  # the inference path's re-folding on every call, timed alone
                calls["vqhit_fold", batch] = lambda batch=batch: fold_all(model.decoder.stages, batch)
        timings = time_calls(calls, device, args.repeats, args.min_repeat_s)
        folds = {key[1]: timings.pop(key) for key in list(timings) if key[0] == "vqhit_fold"}

        for (name, batch), t in timings.items():
            row = {"threads": info["torch_threads"], "model": name, "batch": batch, "params": params[name],
                   "gflops": flops[name] / 1e9, **t}
            if "seconds" in t:
                row.update(ms_median=1e3 * t["median_seconds"] / batch, ms_min=1e3 * t["seconds"] / batch,
                           images_per_s=batch / t["median_seconds"], load=load_range(t["load_1m"]))
            rows.append(row)
        for batch in batch_sizes:
            ours, theirs = timings["vqhit_decode", batch], timings["taming_decode", batch]
            if "seconds" in ours and "seconds" in theirs:
                speedup = theirs["median_seconds"] / ours["median_seconds"]
                speedups.append({
                    "threads": info["torch_threads"], "batch": batch, "rounds": len(ours["all_seconds"]),
                    "hit_ms": 1e3 * ours["median_seconds"] / batch, "taming_ms": 1e3 * theirs["median_seconds"] / batch,
                    "speedup": speedup, "speedup_min": theirs["seconds"] / ours["seconds"],
                    "speedup_rounds": statistics.median(a / b for a, b in zip(theirs["all_seconds"],
                                                                               ours["all_seconds"])),
                    "flop_ratio": flops["taming_decode"] / flops["vqhit_decode"], "load": load_range(ours["load_1m"]),
                    "target": SPEEDUP_TARGET, "met": speedup >= SPEEDUP_TARGET})
                if batch in folds:
                    speedups[-1].update(fold_ms=1e3 * folds[batch]["median_seconds"],
                                        fold_share=folds[batch]["median_seconds"] / ours["median_seconds"],
                                        fold_timings=folds[batch])
        for batch in batch_sizes:
            ours, theirs = timings["encode", batch], timings["taming_encode", batch]
            if "seconds" in ours and "seconds" in theirs:
                encodes.append({"threads": info["torch_threads"], "batch": batch,
                                "encode_ms": 1e3 * ours["median_seconds"] / batch,
                                "taming_ms": 1e3 * theirs["median_seconds"] / batch,
                                "ratio": ours["median_seconds"] / theirs["median_seconds"],
                                "ratio_rounds": statistics.median(a / b for a, b in zip(ours["all_seconds"],
                                                                                         theirs["all_seconds"])),
                                "load": load_range(ours["load_1m"])})
        if args.profile and not args.compile:
            hit_table, kernel_seconds = top_ops(calls["vqhit_decode", batch_sizes[0]])
            profiles[threads] = {"vqhit_decode": hit_table,
                                 "taming_decode": top_ops(calls["taming_decode", batch_sizes[0]])[0]}
            if kernel_seconds is not None:
                taming_seconds = timings["taming_decode", batch_sizes[0]]["median_seconds"]
                floors.append({"threads": info["torch_threads"], "batch": batch_sizes[0],
                               "kernel_ms": 1e3 * kernel_seconds / batch_sizes[0],
                               "hit_ms": 1e3 * timings["vqhit_decode", batch_sizes[0]]["median_seconds"] / batch_sizes[0],
                               "taming_ms": 1e3 * taming_seconds / batch_sizes[0],
                               "floor_speedup": taming_seconds / kernel_seconds})
            indices = torch.randint(0, model.config.codebook_size, (batch_sizes[0], g, g), device=device)
            stages[threads] = stage_seconds(model, indices, args.precision)

    print()
    print(format_table(rows, [("threads", "threads"), ("model", "model"), ("batch", "batch"), ("params", "params"),
                              ("GFLOPs/img", "gflops"), ("ms/img median", "ms_median"), ("ms/img min", "ms_min"),
                              ("img/s", "images_per_s"), ("load 1m", "load"), ("peak GB", "peak_gb"),
                              ("error", "error")]))
    print(f"\nHiT decoder speed-up over taming's decoder (target >= {SPEEDUP_TARGET:g}x, median over median):")
    print(format_table(speedups, [("threads", "threads"), ("batch", "batch"), ("rounds", "rounds"),
                                  ("HiT ms/img", "hit_ms"), ("taming ms/img", "taming_ms"),
                                  ("speed-up (median)", "speedup"), ("speed-up (min)", "speedup_min"),
                                  ("median of round ratios", "speedup_rounds"), ("FLOP ratio", "flop_ratio"),
                                  ("fold ms/call", "fold_ms"), ("fold / decode", "fold_share"),
                                  ("load 1m", "load"), ("met", "met")]))
    print("\nencode (taming's encoder network + quant_conv + nearest code, channels-last) over taming's encoder network "
          "(NCHW), time per image, median over median:")
    print(format_table(encodes, [("threads", "threads"), ("batch", "batch"), ("encode ms/img", "encode_ms"),
                                 ("taming encoder ms/img", "taming_ms"), ("ratio", "ratio"),
                                 ("median of round ratios", "ratio_rounds"), ("load 1m", "load")]))
    for threads, tables in profiles.items():
        for name, table in tables.items():
            print(f"\ntop operators, {name}, batch {batch_sizes[0]}, {threads} threads:\n{table}")
    if floors:
        print("\nHiT decoder floor: the profiled self time of its matmuls, attention and GELU alone, and the speed-up "
              "over taming's median if nothing else took time:")
        print(format_table(floors, [("threads", "threads"), ("batch", "batch"), ("kernels ms/img", "kernel_ms"),
                                    ("HiT ms/img", "hit_ms"), ("taming ms/img", "taming_ms"),
                                    ("speed-up at the floor", "floor_speedup")]))
    for threads, table in stages.items():
        print(f"\nHiT decoder time by stage, batch {batch_sizes[0]}, {threads} threads (min of 3):")
        print(format_table(table, [("stage", "stage"), ("plain ms", "plain_ms"), ("fast ms", "fast_ms"),
                                   ("speed-up", "speedup")]))
    write_json(args.json, machines[thread_counts[0]], machines=list(machines.values()), preset=PRESET, results=rows,
               decoder_speedup=speedups, encode_vs_taming=encodes, profiles=profiles, decoder_stages=stages,
               decoder_floor=floors)
    return {"results": rows, "speedups": speedups, "encodes": encodes}


def load_range(loads: list) -> str | None:
    loads = [x for x in loads if x is not None]
    return f"{min(loads):.1f}-{max(loads):.1f}" if loads else None


if __name__ == "__main__":
    main()
