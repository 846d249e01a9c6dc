"""Decode in onnxruntime beside PyTorch, for VQ-HiT's HiT decoder (`vqhit-b-f16-1024`) and taming-transformers'
VQGAN f16 decoder: the four timed in the same interleaved rounds, and the HiT/taming speed-up in each runtime
(target of the HiT decoder: >= 8x, median over median, as in tokenizer.py).

    python benchmarks/onnx_decode.py                 # CPU: batch 1 and 4, with 1 and 2 threads, 5 rounds each

The functions are those of tokenizer.py: token ids (B, 16, 16) -> images for VQ-HiT (PyTorch: `decode_indices`,
through its inference path; onnxruntime: the decoder.onnx that `vqhit.export` writes, i.e. code lookup + the plain
eval-mode modules, traced), code vectors (B, 256, 16, 16) -> images for taming's decoder (its module, and its graph
exported the same way). Before timing, each graph's output is compared with PyTorch's on the timed inputs (max abs
difference, in the JSON). onnxruntime runs on the CPU execution provider with the graph optimisations it applies
by default (ORT_ENABLE_ALL) and as many intra-op threads as torch has; its idle threads spin, as libgomp's do,
unless OMP_WAIT_POLICY=PASSIVE is set, which makes both runtimes' idle threads sleep (advisable on a shared CPU:
benchmarks/README.md).
Weights are random: speed does not depend on them.

Each thread count is one block of rounds (benchmarks/common.py: every function once per round, in turn, the
1-minute load average at the start of each round). Reported: median and minimum per image, and the speed-ups as
median over median.
"""
from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from common import base_parser, format_table, machine, setup, time_calls, write_json
from tokenizer import PRESET, SPEEDUP_TARGET, load_range, taming_decoder

from vqhit import VQHiT
from vqhit.export import export_graph, graphs, tracing

RUNTIMES = ("pytorch", "onnxruntime")


def export_decoders(model: VQHiT, taming: torch.nn.Module, folder: Path) -> dict:
    """{"hit": path, "taming": path} of the two decoders' ONNX graphs, written into `folder`."""
    module, example, input_name, output_name = graphs(model)["decoder.onnx"]
    with tracing(model):
        export_graph(module, example, folder / "hit.onnx", input_name, output_name)
    c = model.config
    with tracing(taming):
        export_graph(taming, torch.randn(2, c.code_dim, c.grid, c.grid), folder / "taming.onnx", "codes", "images")
    return {"hit": folder / "hit.onnx", "taming": folder / "taming.onnx"}


def session(path: Path, threads: int) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":  # idle threads sleep in both runtimes alike
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main(argv=None) -> dict:
    parser = base_parser("onnx_decode", __doc__)
    parser.set_defaults(repeats=5, device="cpu")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--thread-counts", nargs="+", type=int, default=[1, 2],
                        help="torch and onnxruntime intra-op threads, one block of rounds each")
    args = parser.parse_args(argv)
    device = setup(args)
    if device.type != "cpu" or args.precision != "fp32":
        parser.error("onnx_decode.py compares the runtimes on CPU in float32: --device cpu --precision fp32")

    torch.manual_seed(0)
    model = VQHiT.from_preset(PRESET).eval()
    taming = taming_decoder().eval()
    c = model.config
    with tempfile.TemporaryDirectory() as tmp:
        paths = export_decoders(model, taming, Path(tmp))
        graph_mb = {name: path.stat().st_size / 2**20 for name, path in paths.items()}
        sessions = {threads: {name: session(path, threads) for name, path in paths.items()}
                    for threads in args.thread_counts}

    rows, ratios, machines = [], [], {}
    for threads in args.thread_counts:
        torch.set_num_threads(threads)
        info = machines[threads] = machine(device, args)
        print(f"{info['device_name']} | torch {info['torch']} | onnxruntime {onnxruntime.__version__} | {threads} "
              f"threads | load {info['load_average_1m']}", flush=True)
        calls, differences = {}, {}
        for batch in args.batch_sizes:
            indices = torch.randint(0, c.codebook_size, (batch, c.grid, c.grid))
            codes = torch.randn(batch, c.code_dim, c.grid, c.grid)
            hit, tam = sessions[threads]["hit"], sessions[threads]["taming"]
            runs = {("hit", "pytorch"): lambda x=indices: model.decode_indices(x),
                    ("hit", "onnxruntime"): lambda x=indices.numpy(), s=hit: s.run(None, {"indices": x})[0],
                    ("taming", "pytorch"): lambda x=codes: taming(x),
                    ("taming", "onnxruntime"): lambda x=codes.numpy(), s=tam: s.run(None, {"codes": x})[0]}
            with torch.no_grad():
                for name in ("hit", "taming"):
                    differences[name, batch] = float(np.abs(runs[name, "onnxruntime"]()
                                                            - runs[name, "pytorch"]().numpy()).max())
            for (name, runtime), run in runs.items():
                def call(run=run):
                    with torch.no_grad():
                        return run()

                calls[name, runtime, batch] = call
        timings = time_calls(calls, device, args.repeats, args.min_repeat_s)

        for (name, runtime, batch), t in timings.items():
            rows.append({"threads": threads, "decoder": name, "runtime": runtime, "batch": batch,
                         "max_abs_difference": differences[name, batch], **t,
                         "ms_median": 1e3 * t["median_seconds"] / batch, "ms_min": 1e3 * t["seconds"] / batch,
                         "load": load_range(t["load_1m"])})
        for batch in args.batch_sizes:
            t = {(name, runtime): timings[name, runtime, batch] for name in ("hit", "taming") for runtime in RUNTIMES}

            def over(a, b):  # median over median, and the median of the per-round ratios
                return (t[a]["median_seconds"] / t[b]["median_seconds"],
                        statistics.median(x / y for x, y in zip(t[a]["all_seconds"], t[b]["all_seconds"])))

            row = {"threads": threads, "batch": batch, "rounds": args.repeats,
                   "load": load_range(t["hit", "pytorch"]["load_1m"]), "target": SPEEDUP_TARGET}
            for runtime in RUNTIMES:
                row[f"speedup_{runtime}"], row[f"speedup_{runtime}_rounds"] = over(("taming", runtime), ("hit", runtime))
                row[f"met_{runtime}"] = row[f"speedup_{runtime}"] >= SPEEDUP_TARGET
            for name in ("hit", "taming"):
                row[f"ort_gain_{name}"], row[f"ort_gain_{name}_rounds"] = over((name, "pytorch"), (name, "onnxruntime"))
            ratios.append(row)

    print()
    print(format_table(rows, [("threads", "threads"), ("decoder", "decoder"), ("runtime", "runtime"),
                              ("batch", "batch"), ("ms/img median", "ms_median"), ("ms/img min", "ms_min"),
                              ("max abs diff vs PyTorch", "max_abs_difference"), ("load 1m", "load")]))
    print(f"\nHiT decoder speed-up over taming's decoder in each runtime (target >= {SPEEDUP_TARGET:g}x), and what "
          f"onnxruntime gains over PyTorch for each decoder (PyTorch time / onnxruntime time); median over median, "
          f"(median of the round ratios):")
    print(format_table(ratios, [("threads", "threads"), ("batch", "batch"), ("rounds", "rounds"),
                                ("HiT/taming PyTorch", "speedup_pytorch"),
                                ("(rounds)", "speedup_pytorch_rounds"),
                                ("HiT/taming onnxruntime", "speedup_onnxruntime"),
                                ("(rounds) ", "speedup_onnxruntime_rounds"),
                                ("ORT gain HiT", "ort_gain_hit"), ("ORT gain taming", "ort_gain_taming"),
                                ("load 1m", "load")]))
    info = machines[args.thread_counts[0]]
    info.update(onnxruntime=onnxruntime.__version__, graph_mb=graph_mb)
    write_json(args.json, info, machines=list(machines.values()), preset=PRESET, results=rows, ratios=ratios)
    return {"results": rows, "ratios": ratios}


if __name__ == "__main__":
    main()
