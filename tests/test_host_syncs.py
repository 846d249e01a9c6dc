"""A training step keeps a GPU busy: at most one host sync and one small collective (besides DDP's gradient
all-reduce) on a step that neither logs, samples nor checkpoints, for both scripts, in one process and in two.

Counted on CPU by `count_syncs.py`: the calls that would make the CPU wait for a GPU are the same calls here.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
# 16 images, batch 2: 8 batches an epoch, so no epoch starts inside the counted steps (a new epoch draws its order
# from a CPU generator, in the main process: no device sync, but counted here).
QUIET = ["--num-workers", "1", "--max-images", "16", "--batch-size", "2", "--steps", "7", "--log-every", "1000",
         "--sample-every", "1000", "--checkpoint-every", "1000", "--disc-max-channels", "32"]
TASKS = {"gan": ["--model", "hit-tiny"],
         # the paper's quantizer: dead-code restarts (an option) add their own collectives and syncs
         "vqhit": ["--model", "vqhit-tiny", "--perceptual", "none", "--model-option", "restart_dead_codes=false",
                   "--heldout-data", "none"]}


def count(tmp_path: Path, task: str, processes: int) -> list[dict]:
    out = tmp_path / f"{task}-{processes}"
    command = [sys.executable, str(ROOT / "tests" / "count_syncs.py"), str(out) + ".json",
               str(ROOT / "scripts" / f"train_{task}.py"), *QUIET, *TASKS[task], "--output-dir", str(out)]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", str(free_port()), *command[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = [json.loads(Path(f"{out}.json.{rank}").read_text()) for rank in range(processes)]
    # steps 2..6 (the first step's lazy set-up and the last step's log, samples and checkpoint left out)
    return [{kind: values[1:-1] for kind, values in rank.items()} for rank in counts]


@pytest.mark.parametrize("task", ["gan", "vqhit"])
def test_a_quiet_step_syncs_the_host_once(tmp_path, task):
    (counts,) = count(tmp_path, task, 1)
    assert counts["syncs"] and max(counts["syncs"]) <= 1, counts


@pytest.mark.parametrize("task", ["gan", "vqhit"])
def test_two_processes_add_one_small_collective_a_step(tmp_path, task):
    for rank in count(tmp_path, task, 2):
        assert rank["syncs"] and max(rank["syncs"]) <= 1, rank
        assert max(rank["collectives"]) <= 1, rank
