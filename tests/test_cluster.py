"""Surviving a cluster: one command line for every (re)start, stop signals, elastic restarts, a hung process,
streamed resumes that read nothing twice, another number of processes on resume.

The multi-process runs are real processes on gloo (CPU), started the way a cluster starts them: one process per rank
with RANK/WORLD_SIZE in its environment (Slurm's srun), or torchrun. Each compares what the processes end with, not
only exit codes.
"""
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from conftest import free_port
from vqhit.data import DataConfig, TrainingBatches, build_dataloader, build_dataset, from_hf_dataset
from vqhit.preemption import EXIT_PREEMPTED
from vqhit.resume import list_checkpoints

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "scripts" / "train_gan.py")
# hit-tiny on 8 built-in tiles, batch 2: a step takes well under a second on one thread.
ARGS = ["--num-workers", "0", "--max-images", "8", "--batch-size", "2", "--disc-max-channels", "32",
        "--log-every", "1", "--sample-every", "1000", "--seed", "3", "--checkpoint-every", "4",
        "--r1-interval", "2", "--ema-start", "0", "--resume", "auto"]


def env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", **extra}


def start(out: Path, steps: int, rank: int = 0, world: int = 1, port: int = 0) -> subprocess.Popen:
    """One process of a run, as srun starts it: the plain script, its rank in the environment."""
    extra = dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=str(port)) if world > 1 else {}
    return subprocess.Popen([sys.executable, SCRIPT, *ARGS, "--steps", str(steps), "--output-dir", str(out)],
                            env=env(**extra), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(out: Path, steps: int, world: int = 1, signal_at_step: int | None = None, signal_ranks=(0,),
        signals=(signal.SIGTERM,)) -> list[tuple[int, str]]:
    """Start every rank, optionally send `signals` to `signal_ranks` once `signal_at_step` is logged; returns each
    rank's (exit status, output)."""
    port = free_port()
    procs = [start(out, steps, rank, world, port) for rank in range(world)]
    if signal_at_step is not None:
        deadline = time.time() + 300
        while not logged_steps(out) or max(logged_steps(out)) < signal_at_step:
            assert time.time() < deadline and all(p.poll() is None for p in procs), "the run ended before the signal"
            time.sleep(0.05)
        for sig in signals:
            for rank in signal_ranks:
                procs[rank].send_signal(sig)
            time.sleep(0.2)
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        results.append((p.returncode, stdout + stderr))
    return results


def logged_steps(out: Path) -> list[int]:
    path = out / "logs.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:  # a line being written
            pass
    return steps


def assert_same_files(a: Path, b: Path) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    assert not [k for k in x if not torch.equal(x[k], y[k])], f"{a} and {b} differ"


def assert_same_run(straight: Path, other: Path, steps: int) -> None:
    assert_same_files(straight / "model" / "model.safetensors", other / "model" / "model.safetensors")  # EMA
    for part in ("model.safetensors", "model_1.safetensors"):  # generator and discriminator
        assert_same_files(straight / f"checkpoint-{steps}" / part, other / f"checkpoint-{steps}" / part)


# -- one command line for every start ------------------------------------------------------------------------------
def test_resume_auto_starts_fresh_then_continues_and_refuses_another_runs_folder(tmp_path):
    from vqhit.train_config import parse_config
    from vqhit.training import Trainer

    def config(out, steps, resume="auto"):
        return parse_config([*ARGS[:-2], "--resume", resume, "--steps", str(steps), "--output-dir", str(out),
                             "--checkpoint-every", "1"], "test", "gan")

    out = tmp_path / "run"
    with pytest.raises(ValueError, match="--resume latest: .*run does not exist"):
        config(out, 1, resume="latest")
    assert not out.exists()  # a refused start leaves nothing behind
    assert Trainer(config(out, 1), "gan").resume_path is None  # nothing to resume: a fresh start
    Trainer(config(out, 1), "gan").fit()
    resumed = Trainer(config(out, 2), "gan")
    assert resumed.resume_path == out / "checkpoint-1"
    resumed.fit()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    # a folder with another run's exported model but no checkpoint to resume is not silently reused
    other = tmp_path / "other"
    (other / "model").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds an earlier run"):
        Trainer(config(other, 1), "gan")


def test_checkpoints_by_wall_clock_time(tmp_path):
    from vqhit.train_config import config_from_dict
    from vqhit.training import Trainer

    values = dict(model="hit-tiny", num_workers=0, max_images=8, batch_size=2, disc_max_channels=32,
                  sample_every=1000, num_samples=2, steps=3, checkpoint_every=1000, output_dir=str(tmp_path / "run"))
    Trainer(config_from_dict({**values, "checkpoint_every_minutes": 1e-6}), "gan").fit()  # due after every step
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    Trainer(config_from_dict({**values, "output_dir": str(tmp_path / "other")}), "gan").fit()
    assert [p.name for p in list_checkpoints(tmp_path / "other")] == ["checkpoint-3"]  # the last step only


# -- stop signals ---------------------------------------------------------------------------------------------------
def test_sigterm_stops_with_a_checkpoint_and_the_same_command_continues_exactly(tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run(straight, 8)[0][0] == 0
    # two signals, the second while the first is being handled: nothing may break
    (status, output), = run(stopped, 8, signal_at_step=2, signals=(signal.SIGTERM, signal.SIGTERM))
    assert status == EXIT_PREEMPTED, output[-3000:]
    reached = int(list_checkpoints(stopped)[-1].name.split("-")[1])
    # the second arrives during the step, the checkpoint or the exit: acknowledged or ignored, never fatal (status 75)
    assert 2 <= reached < 8
    assert f"stopped at step {reached} of 8 by SIGTERM" in output and "--resume auto" in output
    assert run(stopped, 8)[0][0] == 0  # the same command line
    assert_same_run(straight, stopped, 8)
    assert sorted(logged_steps(stopped)) == list(range(1, 9))  # each step logged once


def signal_group(out: Path, sig: signal.Signals, at_step: int, *extra: str) -> tuple[int, str]:
    """Run the script (200 steps, 2 DataLoader workers) in a process group of its own, as a job or a terminal runs
    it; once `at_step` is logged send `sig` to the whole group, as Slurm, Ctrl-C and `kill -TERM -PGID` do. Returns
    the exit status and the output."""
    # SIGINT at its default, as in a terminal: a suite started as a shell's background job would pass it on ignored
    proc = subprocess.Popen([sys.executable, SCRIPT, *ARGS, "--num-workers", "2", "--steps", "200", "--output-dir",
                             str(out), *extra], env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 300
        while not logged_steps(out) or max(logged_steps(out)) < at_step:
            assert time.time() < deadline and proc.poll() is None, "the run ended before the signal"
            time.sleep(0.05)
        os.killpg(proc.pid, sig)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, output


def test_a_signal_to_the_whole_process_group_spares_the_data_workers(tmp_path):
    # The DataLoader's workers get the signal too: they must ignore it and serve batches until the training process
    # has written its checkpoint, and then end with it.
    out = tmp_path / "run"
    reached = 0
    # SIGUSR1 goes to the resumed run, whose loader starts inside an epoch (a loader of its own, built on resume)
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        status, output = signal_group(out, sig, reached + 2)
        assert status == EXIT_PREEMPTED, output[-3000:]
        assert "DataLoader worker" not in output
        previous, reached = reached, int(list_checkpoints(out)[-1].name.split("-")[1])
        assert previous + 2 <= reached < 200 and f"stopped at step {reached} of 200 by {sig.name}" in output
        assert not list(out.glob(".*.tmp"))  # the checkpoint was completed, not left half-written


def test_ctrl_c_says_which_checkpoint_to_resume_in_one_line(tmp_path):
    out = tmp_path / "run"
    status, output = signal_group(out, signal.SIGINT, 5)  # checkpoints every 4 steps
    assert status == 130 and "Traceback" not in output, output[-3000:]
    last = output.strip().splitlines()[-1]
    assert last.startswith("interrupted at step ") and f"latest checkpoint is {out / 'checkpoint-4'}" in last
    assert "--resume auto" in last and "since its step 4 is lost" in last
    # listed as a stop signal, SIGINT stops with a checkpoint as the others do
    status, output = signal_group(out, signal.SIGINT, 7, "--stop-signals", "SIGINT")
    assert status == EXIT_PREEMPTED and "by SIGINT" in output, output[-3000:]


def test_a_signal_to_one_of_two_processes_stops_both_at_one_step(tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert [status for status, _ in run(straight, 6, world=2)] == [0, 0]
    results = run(stopped, 6, world=2, signal_at_step=2, signal_ranks=(1,), signals=(signal.SIGUSR1,))
    assert [status for status, _ in results] == [EXIT_PREEMPTED] * 2, results[0][1][-3000:]
    assert "received SIGUSR1" in results[1][1] and "received" not in results[0][1]  # rank 1 alone got it
    checkpoints = list_checkpoints(stopped)
    assert len(checkpoints) == 1 and 2 <= int(checkpoints[0].name.split("-")[1]) < 6
    assert [status for status, _ in run(stopped, 6, world=2)] == [0, 0]
    assert_same_run(straight, stopped, 6)


def test_resuming_with_another_number_of_processes_continues_the_epoch_at_the_same_image(tmp_path):
    out = tmp_path / "run"

    def positions(step: int) -> list[tuple[int, int]]:
        """(epoch, images of its order taken) in each process's data position."""
        states = [json.loads(path.read_text()) for path in sorted((out / f"checkpoint-{step}").glob("data_state_*"))]
        return [(state["epoch"], state["images_in_epoch"]) for state in states]

    # 8 images, batch 2 per process: an epoch is 2 steps of 2 processes, 4 steps of 1
    assert [status for status, _ in run(out, 3, world=2)] == [0, 0]
    assert positions(3) == [(1, 4)] * 2
    (status, output), = run(out, 6, world=1)  # 2 -> 1: epoch 1's last 4 images, then 2 of epoch 2
    assert status == 0 and "processes 2 -> 1: the data continues in epoch 1 after the 4 images of its order" in output
    assert positions(6) == [(2, 2)]
    results = run(out, 8, world=2)  # 1 -> 2: epoch 2's 6 images left are 3 a process, one batch each; then epoch 3
    assert [status for status, _ in results] == [0, 0] and "continues in epoch 2 after the 2 images" in results[0][1]
    assert positions(8) == [(3, 4)] * 2


# -- what one node sees, and main-process work ----------------------------------------------------------------------
# Runs a script with one thing changed on one rank: a node whose directory listing is late (it sees no checkpoint),
# one that cannot read the main process's checkpoint either, or a main process whose export and held-out report are
# slow.
PATCHED = r"""
import os, runpy, sys, time
import vqhit.checkpointing as checkpointing, vqhit.heldout as heldout, vqhit.resume as resume
what, rank = sys.argv[1], int(os.environ.get("RANK", "0"))
if what in ("late-listing", "unreadable") and rank == 1:
    resume.list_checkpoints = lambda output_dir: []
if what == "unreadable" and rank == 1:
    resume.checkpoint_damage = lambda checkpoint: "not on this node"
if what == "slow-main" and rank == 0:
    def slow(fn):
        return lambda *args, **kwargs: (time.sleep(6), fn(*args, **kwargs))[1]
    checkpointing.export_model = slow(checkpointing.export_model)
    heldout.heldout_report = slow(heldout.heldout_report)
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_patched(what: str, script: str, args: list[str], world: int = 2) -> list[tuple[int, str]]:
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", PATCHED, what, script, *args],
                              env=env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(world)]
    return [(p.wait(timeout=600), p.stdout.read()) for p in procs]


def test_every_rank_resumes_the_main_process_checkpoint_or_all_stop_in_one_line(tmp_path):
    straight, late = tmp_path / "straight", tmp_path / "late"
    assert [status for status, _ in run(straight, 6, world=2)] == [0, 0]
    assert [status for status, _ in run(late, 4, world=2)] == [0, 0]
    args = [*ARGS, "--steps", "6", "--output-dir", str(late)]
    # rank 1's listing is late: it would start afresh, the main process resumes checkpoint-4; rank 1 sees it, follows
    results = run_patched("late-listing", SCRIPT, args)
    assert [status for status, _ in results] == [0, 0], results[0][1][-3000:]
    assert_same_run(straight, late, 6)
    # a node that cannot read the checkpoint (its own --output-dir): every process stops, one line says why
    results = run_patched("unreadable", SCRIPT, [*ARGS, "--steps", "8", "--output-dir", str(late)])
    assert [status for status, _ in results] == [2, 2]
    assert "error: process 1 cannot read" in results[0][1] and "every node shares" in results[0][1]
    assert "Traceback" not in results[0][1] + results[1][1]
    assert list_checkpoints(late)[-1].name == "checkpoint-6"  # nothing trained


def test_slow_main_process_work_does_not_trip_the_collective_timeout(tmp_path):
    # The main process's export and held-out report take longer than --collective-timeout: the other process waits
    # for them outside any collective.
    out = tmp_path / "run"
    args = ["--model", "vqhit-tiny", "--num-workers", "0", "--max-images", "8", "--batch-size", "2", "--steps", "2",
            "--sample-every", "1000", "--disc-max-channels", "32", "--perceptual", "none", "--collective-timeout", "3",
            "--heldout-data", "builtin:photos-heldout", "--output-dir", str(out)]
    results = run_patched("slow-main", str(ROOT / "scripts" / "train_vqhit.py"), args)
    assert [status for status, _ in results] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    assert "generalisation gap" in results[0][1] and (out / "model" / "model.safetensors").exists()


# -- elastic restarts and a hung process ----------------------------------------------------------------------------
DRIVER = r"""
import os, signal, sys, time
from vqhit.train_config import parse_config
from vqhit.training import Trainer
kill_step, kill_rank, sig = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" and os.environ["RANK"] == "1":
    time.sleep(3)  # the restarted rank 1 starts late: rank 0 must not take the address its predecessor left
trainer = Trainer(parse_config(sys.argv[4:], "test", "gan"), "gan")
step = trainer.train_step
def train_step(real):
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if first_attempt and trainer.state.step == kill_step and trainer.accelerator.process_index == kill_rank:
        if sig == "HANG":
            time.sleep(600)
        os.kill(os.getpid(), getattr(signal, sig))
    return step(real)
trainer.train_step = train_step
trainer.fit()
rank = trainer.accelerator.process_index
torch = __import__("torch")
torch.save(trainer.ema.model.state_dict(), os.path.join(trainer.config.output_dir, f"ema-rank{rank}.pt"))
"""


def torchrun(out: Path, steps: int, kill_step=-1, kill_rank=1, sig="SIGKILL", restarts=0, extra=(), timeout=600):
    # --standalone: a c10d rendezvous on a free local port, whose rounds keep each restart's addresses apart
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--max-restarts",
           str(restarts), "--no-python", sys.executable, "-c",
           DRIVER, str(kill_step), str(kill_rank), sig, *ARGS, "--steps", str(steps), "--output-dir", str(out),
           "--checkpoint-every", "2", *extra]
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_torchrun_restarts_a_killed_worker_from_the_newest_checkpoint(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert torchrun(straight, 5).returncode == 0
    # the EMA starts from step 0 (ema_start 0): it must be the same on both ranks
    ema = [torch.load(straight / f"ema-rank{r}.pt") for r in (0, 1)]
    assert all(torch.equal(ema[0][k], ema[1][k]) for k in ema[0])
    result = torchrun(killed, 5, kill_step=3, restarts=1, extra=("--collective-timeout", "60"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resuming" in result.stdout and "checkpoint-2" in result.stdout  # restarted from the newest checkpoint
    assert_same_run(straight, killed, 5)
    assert sorted(logged_steps(killed)) == [1, 2, 3, 4, 5]


# Two nodes on this machine: two torchrun agents meeting at a c10d rendezvous on localhost, one worker each. The
# driver kills rank 1 once (a marker file), whichever node and attempt holds it.
NODE_DRIVER = r"""
import os, signal, sys
from vqhit import cli
from vqhit.train_config import parse_config
from vqhit.training import Trainer
kill_step = int(sys.argv[1])
def main(argv):
    trainer = Trainer(parse_config(argv, "test", "gan"), "gan")
    step = trainer.train_step
    marker = os.path.join(trainer.config.output_dir, "killed-once")
    def train_step(real):
        if trainer.state.step == kill_step and trainer.accelerator.process_index == 1 and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return step(real)
    trainer.train_step = train_step
    trainer.fit()
cli.run(main, sys.argv[2:])
"""


def start_two_nodes(out: Path, steps: int, kill_step=-1, share_store=False, restarts=1,
                    checkpoint_every=2) -> list[subprocess.Popen]:
    port = free_port()
    extra = {} if share_store else {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # what docs/cluster.md exports
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend",
           "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes", "--max-restarts", str(restarts),
           "--no-python", sys.executable, "-c", NODE_DRIVER, str(kill_step), *ARGS, "--steps", str(steps),
           "--output-dir", str(out), "--checkpoint-every", str(checkpoint_every), "--collective-timeout", "60"]
    return [subprocess.Popen(cmd, env=env(**extra), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for _ in range(2)]


def finish(nodes: list[subprocess.Popen]) -> list[tuple[int, str]]:
    return [(node.wait(timeout=600), node.stdout.read()) for node in nodes]


def test_two_nodes_survive_a_killed_worker_bit_exact_and_refuse_a_shared_store(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert torchrun(straight, 5).returncode == 0  # two processes on one node: the reference
    results = finish(start_two_nodes(killed, 5, kill_step=3))
    assert [status for status, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    assert (killed / "killed-once").exists() and "resuming" in results[0][1] + results[1][1]
    assert_same_run(straight, killed, 5)
    assert sorted(logged_steps(killed)) == [1, 2, 3, 4, 5]
    # Without the exported variable, torchrun's one store for every attempt would fail the restart: the first start
    # is refused in one line, before anything is written.
    refused = finish(start_two_nodes(tmp_path / "refused", 5, share_store=True))
    assert all(status != 0 for status, _ in refused)
    assert "error: torchrun may restart this run on several nodes" in refused[0][1] + refused[1][1]
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in refused[0][1] + refused[1][1]
    assert not list_checkpoints(tmp_path / "refused")


def test_two_nodes_stopped_by_sigterm_continue_bit_exact_with_the_same_command(tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert torchrun(straight, 5, extra=("--checkpoint-every", "1000")).returncode == 0
    nodes = start_two_nodes(stopped, 5, checkpoint_every=1000)
    deadline = time.time() + 300
    while not logged_steps(stopped) or max(logged_steps(stopped)) < 2:
        assert time.time() < deadline and all(node.poll() is None for node in nodes), "the run ended before the signal"
        time.sleep(0.05)
    for node in nodes:  # the scheduler's SIGTERM to every node's launcher, which forwards it to its worker
        node.send_signal(signal.SIGTERM)
    results = finish(nodes)
    (checkpoint,) = list_checkpoints(stopped)  # one checkpoint, at the step reached, then the run stopped
    assert 2 <= int(checkpoint.name.split("-")[1]) < 5, results
    assert "stopped at step" in results[0][1] + results[1][1]
    assert [status for status, _ in finish(start_two_nodes(stopped, 5, checkpoint_every=1000))] == [0, 0]
    assert_same_run(straight, stopped, 5)
def test_under_torchrun_a_stop_signal_stops_the_run_instead_of_restarting_it(tmp_path):
    # A scheduler that signals the workers themselves (not torchrun): their exit status 75 would be a failure to
    # torchrun's agent, which would restart them (--max-restarts) to train on; they exit 0 instead.
    out = tmp_path / "run"
    result = torchrun(out, 8, kill_step=2, kill_rank=1, sig="SIGTERM", restarts=1, extra=("--checkpoint-every", "100"))
    assert result.returncode == 0, result.stderr[-3000:]
    (checkpoint,) = list_checkpoints(out)
    assert 2 <= int(checkpoint.name.split("-")[1]) < 8
    assert "exit status 0 under torchrun" in result.stdout and "resuming" not in result.stdout


def test_a_hung_process_does_not_hang_the_others(tmp_path):
    started = time.time()
    # rank 1 hangs for 10 minutes inside step 2 (no stop signals: torchrun's SIGTERM then ends it at once)
    result = torchrun(tmp_path / "run", 5, kill_step=2, kill_rank=1, sig="HANG",
                      extra=("--collective-timeout", "5", "--stop-signals", "none"), timeout=150)
    assert result.returncode != 0
    assert time.time() - started < 120
    assert "timed out" in result.stderr.lower() or "timeout" in result.stderr.lower(), result.stderr[-3000:]


# -- streams: resumes read nothing twice --------------------------------------------------------------------------
def streamed_batches(num_workers: int, buffer: int = 16) -> TrainingBatches:
    config = DataConfig(source="builtin:photos", resolution=8, streaming=True, shuffle_buffer=buffer)
    dataset = build_dataset(config, seed=1)
    return TrainingBatches(dataset, build_dataloader(dataset, 4, num_workers, shuffle=True, seed=1))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_streamed_resume_yields_the_same_batches_without_decoding_the_seen_ones(num_workers, monkeypatch):
    total = 60  # 201 tiles, batch 4: the epoch ends after ~50 batches
    batches = streamed_batches(num_workers)
    uninterrupted = [next(batches)["image"] for _ in range(total)]
    for stop in (3, 55):  # inside the first epoch (worker 1's turn next when 2 workers), inside the second
        first = streamed_batches(num_workers)
        seen = [next(first)["image"] for _ in range(stop)]
        state = json.loads(json.dumps(first.state_dict()))  # as saved in a checkpoint
        resumed = streamed_batches(num_workers)
        resumed.load_state_dict(state)
        decoded = []
        if num_workers == 0:  # decoding happens in this process: count it
            from vqhit.data import images  # the module whose rows call _decode
            real_decode = images._decode
            monkeypatch.setattr(images, "_decode", lambda value: decoded.append(1) or real_decode(value))
        rest = [next(resumed)["image"] for _ in range(total - stop)]
        monkeypatch.undo()
        assert all(torch.equal(a, b) for a, b in zip(uninterrupted, seen + rest)), f"resumed after {stop} differs"
        if num_workers == 0:
            # only what it yields (and the epoch's last, incomplete batch, dropped): nothing seen is decoded again
            assert 4 * (total - stop) <= len(decoded) < 4 * (total - stop + 1)


def test_a_streamed_run_resumes_bit_identical_from_its_checkpoint(tmp_path):
    from vqhit.train_config import config_from_dict, resolve_config
    from vqhit.training import Trainer

    def trainer(out, steps, **extra):
        values = dict(model="hit-tiny", streaming=True, num_workers=0, max_images=12, batch_size=2, steps=steps,
                      disc_max_channels=32, sample_every=1000, checkpoint_every=3, num_samples=2, seed=4,
                      output_dir=str(out), **extra)
        return Trainer(resolve_config(values, "gan") if values.get("resume") else config_from_dict(values), "gan")

    straight = trainer(tmp_path / "a", 8)  # 12 images, batch 2: the resume at step 3 is inside the first epoch
    straight.fit()
    trainer(tmp_path / "b", 3).fit()
    state = json.loads((tmp_path / "b" / "checkpoint-3" / "data_state_0.json").read_text())
    assert state["streams"] and state["epoch"] == 0
    resumed = trainer(tmp_path / "b", 8, resume="auto")
    resumed.fit()
    assert resumed.batches.epoch == straight.batches.epoch == 1
    assert_same_files(tmp_path / "a" / "model" / "model.safetensors", tmp_path / "b" / "model" / "model.safetensors")


def test_streams_resume_exactly_from_any_position_with_a_position_of_constant_size():
    # 3 shards for 2 streams (every stream reads every shard and keeps one row in 2), a buffer larger than a
    # stream's epoch, positions in the buffer's emptying and in later epochs
    import datasets
    import numpy as np

    rows = datasets.Dataset.from_dict({"x": [np.full((8, 8, 3), i, np.uint8) for i in range(21)]},
                                      features=datasets.Features({"x": datasets.Image()}))

    def batches() -> TrainingBatches:
        config = DataConfig(resolution=8, image_column="x", shuffle_buffer=16, open_shards=2)
        dataset = from_hf_dataset(rows.to_iterable_dataset(num_shards=3), config, seed=2)
        return TrainingBatches(dataset, build_dataloader(dataset, 3, 2, shuffle=True, seed=2))

    def draw(run: TrainingBatches, count: int) -> list[list[int]]:
        return [run_batch["index"].tolist() for run_batch in (next(run) for _ in range(count))]

    straight = batches()
    uninterrupted = draw(straight, 14)  # about 4 epochs of each stream's 10 or 11 rows
    straight.close()
    for stop in (1, 3, 4, 7, 12):
        first = batches()
        seen = draw(first, stop)
        state = json.loads(json.dumps(first.state_dict()))
        first.close()
        assert len(json.dumps(state)) < 700  # where it is, not what it read: as small at any position
        resumed = batches()
        assert resumed.load_state_dict(state) == []
        assert seen + draw(resumed, 14 - stop) == uninterrupted, f"resumed after {stop} batches differs"
        resumed.close()


def _first_on_each_machine(rank: int, init_file: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29500", ACCELERATE_USE_CPU="1")
    # a collective deadline shorter than the first process's work: the others must not wait in a collective
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=1))
    from vqhit.distributed import first_on_each_machine
    from vqhit.errors import UsageError

    prepared, result = Path(out) / "prepared", {}
    with first_on_each_machine():
        result["found_prepared"] = prepared.exists()  # what the machine's first process left in the shared cache
        if rank == 0:
            time.sleep(3)  # a slow download, past the deadline: the other process must still wait for it
            prepared.write_text("downloaded")
    try:
        with first_on_each_machine():
            result["entered"] = True
            if rank == 0:
                raise UsageError("--data nowhere: no such folder")
    except UsageError as err:
        result["error"] = str(err)
    dist.destroy_process_group()
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))


def test_the_data_is_prepared_by_each_machines_first_process_before_the_others(tmp_path):
    mp.spawn(_first_on_each_machine, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    first, other = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert first["found_prepared"] is False and other["found_prepared"] is True
    # the first process's mistake stops the other without it entering the block (instead of waiting forever)
    assert first == {"found_prepared": False, "entered": True, "error": "--data nowhere: no such folder"}
    assert "entered" not in other and other["error"].startswith("the first process of a machine stopped on the user's")
