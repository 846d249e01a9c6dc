"""What every benchmark script shares: device and precision flags, a timer, FLOP counting, the machine
record, a plain-text table and the JSON file.

Timing protocol (`time_calls`): every function runs once as a warm-up (which also measures its peak
memory and how many calls a timed repeat needs to last `--min-repeat-s`), then `--repeats` rounds time each
function once in turn. Interleaving spreads the load of other processes over all the functions alike, so
ratios between them are steadier than the times. Each result keeps every repeat, the 1-minute load average
at the start of each round, the minimum (`seconds`: other processes only ever add time) and the median
(`median_seconds`: what a user sees on a machine like this one).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from vqhit.precision import PRECISIONS

RESULTS = Path(__file__).resolve().parent / "results"
SDPA_OPS = ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the option help, the module docstring as written."""


def base_parser(name: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    parser.set_defaults(benchmark=name)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N")
    parser.add_argument("--precision", choices=("auto", *PRECISIONS), default="auto",
                        help="bf16 = autocast to bfloat16 (R1 stays fp32); auto = bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the minimum is reported")
    parser.add_argument("--min-repeat-s", type=float, default=None,
                        help="shortest timed repeat in seconds (default 1.0 on CUDA, 0 on CPU: one call)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--json", default=None,
                        help=f"where to write the results (default benchmarks/results/{name}-DEVICE.json)")
    return parser


def setup(args) -> torch.device:
    """Resolve the flags that depend on the device; returns the device."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch.cuda.is_available() is False; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.precision == "auto":
        args.precision = "bf16" if device.type == "cuda" else "fp32"
    if args.min_repeat_s is None:
        args.min_repeat_s = 1.0 if device.type == "cuda" else 0.0
    if args.json is None:
        args.json = str(RESULTS / f"{args.benchmark}-{device.type}.json")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # what fp32 training on Ampere+ would use
        torch.backends.cudnn.allow_tf32 = True
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float | None:
    """Peak memory allocated by tensors since the last reset (CUDA); None on CPU, which keeps no such count."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


def _seconds(fn, device: torch.device, calls: int = 1) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def time_calls(calls: dict, device: torch.device, repeats: int, min_repeat_s: float,
               warmups: dict | None = None) -> dict:
    """{name: fn} -> {name: result}: seconds per call of each `fn()` (min over repeats), in interleaved rounds.

    The warm-up of `name` calls `warmups[name]()` when given (e.g. `fn` under a FLOP counter, to count and
    warm up at once). A function that runs out of GPU memory in its warm-up gets {"error": "out of memory"}.
    """
    results, timed = {}, {}
    for name, fn in calls.items():
        reset_peak_memory(device)
        try:
            warmup = _seconds((warmups or {}).get(name, fn), device)
        except torch.cuda.OutOfMemoryError:
            results[name] = {"error": "out of memory"}
            torch.cuda.empty_cache()
            continue
        results[name] = {"warmup_seconds": warmup, "peak_gb": peak_memory_gb(device), "all_seconds": [],
                         "load_1m": [], "calls_per_repeat": max(1, math.ceil(min_repeat_s / max(warmup, 1e-6)))}
        timed[name] = fn
        print(f"  warm-up {name}: {warmup:.3g} s", flush=True)
    for _ in range(repeats):
        load = load_average()
        for name, fn in timed.items():
            results[name]["all_seconds"].append(_seconds(fn, device, results[name]["calls_per_repeat"]))
            results[name]["load_1m"].append(load)
    for name in timed:
        results[name]["seconds"] = min(results[name]["all_seconds"])
        results[name]["median_seconds"] = statistics.median(results[name]["all_seconds"])
    return results


def fold_all(stages: torch.nn.Module, batch: int) -> None:
    """What one call of the inference path spends on folding, alone: `fold_stage` of every stage it folds at this
    batch size (vqhit.models.inference re-folds on every call, so that it never serves stale weights)."""
    from vqhit.models import inference

    with torch.no_grad():
        for stage in stages.stages:
            if inference.folds(stage, batch * stage.resolution**2):
                inference.fold_stage(stage)


def load_average() -> float | None:
    """The 1-minute load average: how many processes wanted a CPU, to read beside a CPU timing."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


class _NoModuleTracking:
    """Stands in for FlopCounterMode's module tracker: every FLOP counts in "Global" only."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None


def count_flops(fn) -> tuple[int, list[str]]:
    """FLOPs of `fn()` as FlopCounterMode counts them (2 per multiply-add of matmuls, convolutions and
    attention; elementwise work is not counted), and the attention kernels it called.

    Run it on the meta device to count without computing: shapes are all the counter needs.
    """
    counter = FlopCounterMode(display=False)
    if hasattr(counter, "mod_tracker"):
        # Its per-module attribution (unused here) hooks the modules' tensors in a way that autograd.grad refuses,
        # so a training step with R1's gradient penalty could not be counted; the totals do not need it.
        counter.mod_tracker = _NoModuleTracking()
    with counter:
        fn()
    ops = counter.get_flop_counts().get("Global", {})
    kernels = sorted({str(op).replace("aten.", "") for op in ops if any(s in str(op) for s in SDPA_OPS)})
    return counter.get_total_flops(), kernels


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def machine(device: torch.device, args) -> dict:
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": load_average(),
        # How idle OpenMP threads wait (libgomp reads it when torch loads): on a loaded CPU, PASSIVE stops spinning
        # threads from taking the core their partner needs, which decides multi-threaded timings there.
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "precision": args.precision,
        "compile": getattr(args, "compile", False),
        "repeats": args.repeats,
        "min_repeat_s": args.min_repeat_s,
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    return info


def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """rows of dicts -> an aligned markdown table; `columns` is (header, key) pairs; None prints as '-', and a
    column that is None in every row (peak GPU memory on CPU, errors that did not happen) is left out."""
    columns = [(header, key) for header, key in columns if any(row.get(key) is not None for row in rows)]
    def cell(value):
        if value is None:
            return "-"
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    table = [[header for header, _ in columns]] + [[cell(row.get(key)) for _, key in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in table]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def write_json(path: str, machine_info: dict, **results) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"machine": machine_info, **results}, indent=2) + "\n")
    print(f"\nwrote {path}")
