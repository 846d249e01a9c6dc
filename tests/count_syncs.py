"""Run a training script with every host sync and collective counted per training step (a helper of
test_host_syncs.py, run as `python tests/count_syncs.py OUT.json scripts/train_gan.py ARGS...`, under torchrun too).

A host sync is what makes the CPU wait for a GPU: a tensor turned into a Python value (`item`, `bool`, `float`, `int`,
`tolist`, `numpy`). On this CPU they cost nothing, but they are the same calls, so counting them here counts a GPU's
waits. The collectives are torch.distributed's Python-level ones (DDP's gradient all-reduce runs inside its reducer
and is not counted). Counts are taken between the starts of consecutive optimiser steps (grad_accum 1), and written
per rank as {"syncs": [...], "collectives": [...]}, one entry per step.
"""
import json
import os
import runpy
import sys

import torch
import torch.distributed as dist

out, script, args = sys.argv[1], sys.argv[2], sys.argv[3:]
counts = {"syncs": 0, "collectives": 0}
per_step = {"syncs": [], "collectives": []}


def counting(kind, fn):
    def wrapper(*a, **k):
        counts[kind] += 1
        return fn(*a, **k)
    return wrapper


for name in ("item", "__bool__", "__float__", "__int__", "tolist", "numpy"):
    setattr(torch.Tensor, name, counting("syncs", getattr(torch.Tensor, name)))
for name in ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "all_gather_object",
             "broadcast_object_list", "barrier", "reduce_scatter", "gather", "scatter"):
    setattr(dist, name, counting("collectives", getattr(dist, name)))

from vqhit import training  # noqa: E402

train_step = training.Trainer.train_step
last = None


def counted_train_step(self, real):
    global last
    if last is not None:
        for kind in counts:
            per_step[kind].append(counts[kind] - last[kind])
    last = dict(counts)
    return train_step(self, real)


training.Trainer.train_step = counted_train_step
sys.argv = [script, *args]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    with open(f"{out}.{os.environ.get('RANK', '0')}", "w") as f:
        json.dump(per_step, f)
