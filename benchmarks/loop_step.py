"""A whole step of the training loop, as `Trainer.fit` runs it, in this checkout and in another one.

`train_step.py` times `Trainer.train_step` alone; this times everything a step does between two micro-batches:
the data, the step, the end-of-step flags, collectives and EMA, with logging, sampling and checkpoints out of the
way (`--log-every` etc. beyond the run). Each round runs one short training in a subprocess per checkout, the
checkouts taking turns, and records the time between the starts of consecutive steps after the first two; a
checkout's figure is the median over rounds of each round's median step.

    python benchmarks/loop_step.py --compare-with /path/to/other/checkout --rounds 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
TASKS = {"gan": ("train_gan.py", ["--model", "hit-tiny", "--disc-max-channels", "32"]),
         "vqhit": ("train_vqhit.py", ["--model", "vqhit-demo", "--perceptual", "none", "--heldout-data", "none"])}

# Runs inside the subprocess: times the starts of consecutive train_step calls (grad_accum 1), then the script.
TIMER = r"""
import json, runpy, sys, time
from vqhit import training
starts, step = [], training.Trainer.train_step
def timed(self, real):
    starts.append(time.perf_counter())
    return step(self, real)
training.Trainer.train_step = timed
out, sys.argv = sys.argv[1], sys.argv[2:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    json.dump([b - a for a, b in zip(starts, starts[1:])][2:], open(out, "w"))
"""


def one_run(checkout: Path, task: str, steps: int, batch: int, threads: int) -> float:
    script, args = TASKS[task]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "steps.json"
        env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": str(threads)}
        subprocess.run([sys.executable, "-c", TIMER, str(out), str(checkout / "scripts" / script), *args,
                        "--steps", str(steps), "--batch-size", str(batch), "--num-workers", "1", "--max-images", "64",
                        "--log-every", "100000", "--sample-every", "100000", "--checkpoint-every", "100000",
                        "--cpu-threads", str(threads), "--output-dir", str(Path(tmp) / "run")],
                       env=env, cwd=checkout, check=True, capture_output=True)
        return statistics.median(json.loads(out.read_text()))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare-with", type=Path, required=True, help="another checkout of vqhit (its root folder)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--rounds", type=int, default=5, help="rounds; each runs every checkout once (default 5)")
    parser.add_argument("--steps", type=int, default=12, help="steps of each short run (default 12)")
    parser.add_argument("--batch-size", type=int, default=8, help="default 8")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--json", type=Path, default=None, help="where to write the results")
    args = parser.parse_args(argv)
    checkouts = {"this": HERE, "other": args.compare_with.resolve()}
    results = {}
    for task in args.tasks:
        times = {name: [] for name in checkouts}
        loads = []
        for _ in range(args.rounds):
            loads.append(os.getloadavg()[0])
            for name, checkout in checkouts.items():
                times[name].append(one_run(checkout, task, args.steps, args.batch_size, args.threads))
        results[task] = {name: {"median_s": statistics.median(t), "rounds": t} for name, t in times.items()}
        results[task]["ratio_other_to_this"] = statistics.median(o / t for o, t in zip(times["other"], times["this"]))
        results[task]["load_average"] = loads
        print(f"{task}: this {results[task]['this']['median_s'] * 1e3:.1f} ms/step, other "
              f"{results[task]['other']['median_s'] * 1e3:.1f} ms/step (other / this, median of rounds: "
              f"{results[task]['ratio_other_to_this']:.3f}; load {min(loads):.1f}-{max(loads):.1f})", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **results}, indent=2))
    return results


if __name__ == "__main__":
    main()
