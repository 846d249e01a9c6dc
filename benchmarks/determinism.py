"""What bit-reproducible training costs: the codebook lookup's gradient, and `--deterministic`.

Lookup (`--lookup-sizes`): the quantizer's gather of the chosen codes, forward and backward (the codebook's gradient is
the upstream gradient added into the rows the tokens chose), in the ways it can be written:

    index         codebook[indices]                    backward: index_put_ with accumulate (CPU: atomic adds
                                                       from every thread once the gradient has 32k elements)
    embedding     F.embedding(indices, codebook)       backward: each thread owns a range of codes and adds
                                                       their tokens' gradients in token order (what vqhit uses)
    index_select  codebook.index_select(0, indices)    backward: index_add_
    sorted        codebook[indices], backward by index_add_ over the tokens sorted by code (a custom Function)
    one_hot       one_hot(indices) @ codebook          backward: a (K, N) x (N, D) matmul

Sizes: the tokenizer demo's (1024 codes of 32 dims, a 16x16 grid, batch 8: 2,048 tokens) and the paper preset's
(vqhit-b-f16-1024: 1024 codes of 256 dims, 16x16 grid, 32 images per GPU: 8,192 tokens). Each variant is checked
before it is timed: `deterministic` says whether 20 backward passes at this thread count gave the same gradient bits,
`same_as_serial` whether its gradient has the bits of the one-thread index_put_ (the scatter-add in token order that
`codebook[indices]` computes on one thread, and that vqhit computed before it used F.embedding).

Step (`--step`): the tokenizer demo's `Trainer.train_step` (vqhit-demo, its recipe, batch 8), plain and under
`vqhit.reproducibility.use_deterministic_algorithms()` (what `--deterministic` turns on), in interleaved rounds: the
CPU cost of the option. On a GPU (--device cuda) the same comparison measures the GPU cost of deterministic kernels
(cuDNN's deterministic convolutions, deterministic scatter-adds); cuBLAS's reproducible workspace is set for both
variants, since it must be chosen before CUDA starts.

    python benchmarks/determinism.py --thread-counts 1 2 --repeats 15      # CPU: lookup at both sizes, demo step
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the training scripts set it, before torch loads OpenMP
# cuBLAS's reproducible workspace must be chosen before CUDA starts, so both variants of the step run with it (on a GPU the
# measured cost of --deterministic leaves this setting's out; on CPU it does nothing).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import base_parser, format_table, load_average, machine, setup, time_calls, write_json

SIZES = {"demo": dict(codes=1024, dim=32, tokens=8 * 16 * 16), "paper": dict(codes=1024, dim=256, tokens=32 * 16 * 16)}


class _SortedLookup(torch.autograd.Function):
    """codebook[indices] whose backward adds the tokens' gradients code by code, in sorted order, with index_add_."""

    @staticmethod
    def forward(ctx, codebook, indices):
        ctx.save_for_backward(indices)
        ctx.codes = codebook.shape[0]
        return codebook[indices]

    @staticmethod
    def backward(ctx, grad):
        indices, = ctx.saved_tensors
        order = indices.argsort(stable=True)
        out = grad.new_zeros(ctx.codes, grad.shape[1])
        return out.index_add_(0, indices[order], grad[order]), None


LOOKUPS = {
    "index": lambda codebook, indices: codebook[indices],
    "embedding": lambda codebook, indices: F.embedding(indices, codebook),
    "index_select": lambda codebook, indices: codebook.index_select(0, indices),
    "sorted": lambda codebook, indices: _SortedLookup.apply(codebook, indices),
    "one_hot": lambda codebook, indices: F.one_hot(indices, codebook.shape[0]).to(codebook.dtype) @ codebook,
}


def lookup_inputs(size: str, device: torch.device):
    s = SIZES[size]
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(s["codes"], s["dim"], generator=g).to(device).requires_grad_(True)
    indices = torch.randint(0, s["codes"], (s["tokens"],), generator=g).to(device)
    upstream = torch.randn(s["tokens"], s["dim"], generator=g).to(device)
    return codebook, indices, upstream


def lookup_gradient(name: str, codebook, indices, upstream) -> torch.Tensor:
    codebook.grad = None
    LOOKUPS[name](codebook, indices).backward(upstream)
    return codebook.grad


def serial_gradient(codebook, indices, upstream) -> torch.Tensor:
    """The scatter-add in token order: index_put_'s backward on one CPU thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return lookup_gradient("index", codebook.detach().cpu().requires_grad_(True), indices.cpu(), upstream.cpu())
    finally:
        torch.set_num_threads(threads)


def bench_lookups(sizes: list[str], device: torch.device, repeats: int, min_repeat_s: float) -> list[dict]:
    rows = []
    for size in sizes:
        codebook, indices, upstream = lookup_inputs(size, device)
        serial = serial_gradient(codebook, indices, upstream)
        checks = {}
        for name in LOOKUPS:
            first = lookup_gradient(name, codebook, indices, upstream)
            same = all(torch.equal(first, lookup_gradient(name, codebook, indices, upstream)) for _ in range(19))
            checks[name] = {"deterministic": same, "same_as_serial": torch.equal(first.cpu(), serial)}
        print(f"lookup {size} ({torch.get_num_threads()} threads):", flush=True)
        timings = time_calls({name: (lambda name=name: lookup_gradient(name, codebook, indices, upstream))
                              for name in LOOKUPS}, device, repeats, min_repeat_s)
        for name, result in timings.items():
            rows.append({"size": size, **SIZES[size], "threads": torch.get_num_threads(), "lookup": name,
                         **checks[name], "median_ms": 1e3 * result["median_seconds"], "min_ms": 1e3 * result["seconds"],
                         "load_1m": statistics.median(result["load_1m"]) if result["load_1m"][0] is not None
                         else None, "all_seconds": result["all_seconds"]})
    return rows


def bench_step(device: torch.device, repeats: int, min_repeat_s: float) -> dict:
    """The demo's tokenizer step, plain and with deterministic algorithms, in interleaved rounds."""
    from vqhit.reproducibility import use_deterministic_algorithms
    from vqhit.train_config import resolve_config
    from vqhit.training import Trainer

    with tempfile.TemporaryDirectory() as output_dir:
        config = resolve_config({"model": "vqhit-demo", "num_workers": 0, "max_images": 8, "num_samples": 8,
                                 "heldout_data": None, "cpu_threads": 0, "output_dir": output_dir}, "vqhit")
        trainer = Trainer(config, "vqhit")
        model = trainer.accelerator.unwrap_model(trainer.model)
        r = model.config.resolution
        real = torch.rand(config.batch_size, 3, r, r, generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1

        cudnn = torch.backends.cudnn
        plain = (cudnn.deterministic, cudnn.benchmark)

        def deterministic(fill: bool = True):
            use_deterministic_algorithms()
            torch.utils.deterministic.fill_uninitialized_memory = fill
            try:
                trainer.train_step(real)
            finally:  # the plain step's rounds run with the plain settings
                torch.use_deterministic_algorithms(False)
                torch.utils.deterministic.fill_uninitialized_memory = True
                cudnn.deterministic, cudnn.benchmark = plain

        print(f"demo step ({torch.get_num_threads()} threads):", flush=True)
        timings = time_calls({"default": lambda: trainer.train_step(real), "deterministic": deterministic,
                              "deterministic, no fill": lambda: deterministic(fill=False)}, device, repeats,
                             min_repeat_s)
        trainer.folder.unlock()
    rounds = zip(timings["deterministic"]["all_seconds"], timings["default"]["all_seconds"])
    return {"threads": torch.get_num_threads(), "batch_size": config.batch_size, "timings": timings,
            "cost": statistics.median(d / p for d, p in rounds) - 1}  # the median of the rounds' ratios


def main(argv=None) -> dict:
    parser = base_parser("determinism", __doc__)
    parser.add_argument("--lookup-sizes", nargs="*", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--thread-counts", nargs="+", type=int, default=[1, 2],
                        help="CPU thread counts to run everything at (ignored on CUDA)")
    parser.add_argument("--step", action=argparse.BooleanOptionalAction, default=True, help="time the demo's step too")
    parser.add_argument("--step-repeats", type=int, default=7, help="interleaved rounds of the demo's step")
    parser.set_defaults(repeats=15, min_repeat_s=0.05)
    args = parser.parse_args(argv)
    device = setup(args)
    load_before = load_average()
    lookups, steps = [], []
    for threads in args.thread_counts if device.type == "cpu" else [None]:
        if threads:
            torch.set_num_threads(threads)
        lookups += bench_lookups(args.lookup_sizes, device, args.repeats, args.min_repeat_s)
        if args.step:
            steps.append(bench_step(device, args.step_repeats, 0.0))
    if lookups:
        print("\nCodebook lookup, forward + backward (median of the interleaved rounds):")
        print(format_table(lookups, [("size", "size"), ("threads", "threads"), ("lookup", "lookup"),
                                     ("deterministic", "deterministic"), ("same bits as serial", "same_as_serial"),
                                     ("median ms", "median_ms"), ("min ms", "min_ms"), ("load", "load_1m")]))
    if steps:
        print("\nThe demo's tokenizer step, plain and with --deterministic (median s; 'without the fill': deterministic "
              "algorithms without filling new tensors):")
        rows = [{"threads": s["threads"], "load": statistics.median(s["timings"]["default"]["load_1m"]),
                 **{name: t["median_seconds"] for name, t in s["timings"].items()},
                 "cost": f"{100 * s['cost']:+.1f}%"} for s in steps]
        print(format_table(rows, [("threads", "threads"), ("default s", "default"), ("deterministic s", "deterministic"),
                                  ("cost (median of round ratios)", "cost"),
                                  ("without the fill s", "deterministic, no fill"),
                                  ("load", "load")]))
    info = machine(device, args)
    info["load_average_1m_after"] = load_average()
    info["load_average_1m_before"] = load_before
    write_json(args.json, info, lookups=lookups, steps=steps)
    return {"lookups": lookups, "steps": steps}


if __name__ == "__main__":
    main()
