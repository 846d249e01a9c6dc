"""A rehearsal of both training scripts' loop as 2 CPU processes (torchrun, gloo): cross-rank state, not exit codes.

Each run passes an R1 step and a bCR step (GAN) or an R1 step and dead-code restarts (tokenizer), checkpoints,
and is resumed. The test asserts what users rely on under DDP:
  - parameters, BatchNorm statistics, codebook, EMA and optimiser state are identical on every rank;
  - logged losses are the mean of what the ranks computed, logged codebook usage is the usage of the union of
    both ranks' indices;
  - a run interrupted at its checkpoint and resumed ends bit-identical to an uninterrupted one.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]

# Runs in each of the 2 processes: the library's Trainer with recorders around what the test checks.
DRIVER = r"""
import json, sys, torch
from vqhit.train_config import config_from_dict, resolve_config
from vqhit.training import Trainer
task, out, steps, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "resume"
config = dict(model="hit-tiny" if task == "gan" else "vqhit-tiny", output_dir=out, steps=steps, num_workers=0,
              max_images=16, batch_size=2, disc_max_channels=32, log_every=2, sample_every=1000, checkpoint_every=3,
              num_samples=2, seed=5, perceptual="none", r1_weight=1.0, adv_start=1, ema_start=2, ema_decay=0.9,
              resume="latest" if resume else None)
config.update(dict(bcr_weight=1.0) if task == "gan" else dict(model_options={"dead_code_steps": 2}))
t = Trainer((resolve_config(config, task) if resume else config_from_dict(config)), task)
rank = t.accelerator.process_index
model = t.accelerator.unwrap_model(t.model)
record = {"logs": {}, "indices": {}, "restarts": 0}
train_step = t.train_step
def recorded_step(real):
    logs = train_step(real)
    record["logs"][t.state.step + 1] = {k: float(v) for k, v in logs.items()}
    return logs
t.train_step = recorded_step
if task == "vqhit":
    q = model.quantize
    q.register_forward_hook(lambda m, i, o: record["indices"].setdefault(t.state.step + 1, []).extend(
        o.indices.flatten().tolist()) if m.training else None)
    restart = q._restart_dead_codes
    def counted_restart():
        record["restarts"] += int((q.steps_since_used >= q.dead_code_steps).sum())
        restart()
    q._restart_dead_codes = counted_restart
t.fit()
state = {"model": model.state_dict(), "D": t.accelerator.unwrap_model(t.D).state_dict(),
         "ema": t.ema.model.state_dict(), "opt_g": t.opt_g.state_dict()["state"], "opt_d": t.opt_d.state_dict()["state"]}
torch.save(state, f"{out}/rank{rank}-{sys.argv[4]}.pt")
json.dump(record, open(f"{out}/rank{rank}-{sys.argv[4]}.json", "w"))
"""


def torchrun(task: str, out: Path, steps: int, mode: str) -> None:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "--no-python", sys.executable, "-c", DRIVER,
           task, str(out), str(steps), mode]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]


def flat(state: dict) -> dict:
    """name -> tensor for nested state dicts (optimiser states hold dicts of tensors per parameter)."""
    out = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in flat(value).items()})
        elif isinstance(value, torch.Tensor):
            out[str(key)] = value
    return out


def assert_identical(a: dict, b: dict, what: str) -> None:
    a, b = flat(a), flat(b)
    assert a.keys() == b.keys(), what
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{what}: {different[:5]} differ"


@pytest.mark.parametrize("task", ["gan", "vqhit"])
def test_two_process_rehearsal(tmp_path, task):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    torchrun(task, straight, 6, "first")
    torchrun(task, interrupted, 3, "first")
    torchrun(task, interrupted, 6, "resume")

    ranks = [torch.load(straight / f"rank{r}-first.pt") for r in (0, 1)]
    for part in ("model", "D", "ema", "opt_g", "opt_d"):  # every rank holds the same state
        assert_identical(ranks[0][part], ranks[1][part], f"{part} on rank 0 vs rank 1")
    resumed = torch.load(interrupted / "rank0-resume.pt")
    for part in ("model", "D", "ema", "opt_g", "opt_d"):  # resumed == uninterrupted
        assert_identical(ranks[0][part], resumed[part], f"{part} resumed vs uninterrupted")

    records = [json.loads((straight / f"rank{r}-first.json").read_text()) for r in (0, 1)]
    logged = {row["step"]: row for row in map(json.loads, (straight / "logs.jsonl").read_text().splitlines())}
    assert sorted(logged) == [2, 4, 6]
    for step, row in logged.items():
        per_rank = [records[r]["logs"][str(step)] for r in (0, 1)]
        assert "loss/r1" in row and "loss/discriminator" in row  # R1 and D steps ran
        if task == "gan":
            assert "loss/bcr" in row
        for key in ("loss/generator", "loss/discriminator"):  # the mean of what the ranks computed
            assert row[key] == pytest.approx((per_rank[0][key] + per_rank[1][key]) / 2, rel=1e-6)
        assert per_rank[0]["loss/generator"] != per_rank[1]["loss/generator"]  # the ranks saw different data
    if task == "vqhit":
        codebook_size = 256
        for step in logged:  # usage over the logging window (the 2 steps up to `step`), over both ranks
            window = [i for r in (0, 1) for s in (step - 1, step) for i in records[r]["indices"][str(s)]]
            rank0_only = {i for s in (step - 1, step) for i in records[0]["indices"][str(s)]}
            assert logged[step]["codebook/usage"] == pytest.approx(len(set(window)) / codebook_size)
            assert len(set(window)) > len(rank0_only)  # so the check above tells the union from rank 0 alone
        assert records[0]["restarts"] > 0 and records[0]["restarts"] == records[1]["restarts"]
        codebook = "quantize.embedding.weight"
        assert_identical({codebook: ranks[0]["model"][codebook]}, {codebook: ranks[1]["model"][codebook]},
                         "codebook")
