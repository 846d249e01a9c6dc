"""Nothing lost under faults: resume settings, data position, damaged checkpoints, used folders, kill -9."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vqhit import HiTGenerator
from vqhit.resume import list_checkpoints
from vqhit.train_config import config_from_dict, parse_config, resolve_config
from vqhit.training import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(model="hit-tiny", num_workers=0, max_images=8, batch_size=2, disc_max_channels=32, log_every=1,
            sample_every=1000, checkpoint_every=1000, num_samples=4, seed=3, perceptual="none")


def trainer(run: Path, **overrides) -> Trainer:
    values = {**TINY, "output_dir": str(run), **overrides}
    return Trainer(resolve_config(values, "gan") if values.get("resume") else config_from_dict(values), "gan")


def weights(t: Trainer) -> dict:
    return {k: v.clone() for k, v in t.accelerator.unwrap_model(t.model).state_dict().items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


# -- resume and its settings ---------------------------------------------------------------------------
def test_resume_applies_the_command_lines_optimizer_settings(tmp_path):
    run = tmp_path / "run"
    trainer(run, steps=2, checkpoint_every=2, lr=2e-4).fit()
    # the command line of a resume: the saved config is the base, what is given wins
    config = parse_config(["--resume", str(run / "checkpoint-2"), "--lr", "1e-5", "--adam-betas", "0.5", "0.9",
                           "--steps", "3"], "test", "gan")
    assert (config.model, config.batch_size, config.lr, config.output_dir) == ("hit-tiny", 2, 1e-5, str(run))
    resumed = Trainer(config, "gan")
    seen = []
    original_step = resumed.opt_g.step

    def spy(*args, **kwargs):
        seen.append([(g["lr"], g["betas"]) for g in resumed.opt_g.param_groups])
        return original_step(*args, **kwargs)

    resumed.opt_g.step = spy
    resumed.fit()
    assert seen and all(groups == [(1e-5, (0.5, 0.9))] for groups in seen)  # step 3 ran with the new settings
    assert "lr: 1.0e-05" in (run / "checkpoint-3" / "train_config.yaml").read_text()


def make_folder(folder: Path, good: int, broken: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(good):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    for i in range(broken):
        (folder / f"broken{i}.png").write_bytes(b"not a png")
    return folder


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_resume_is_exact_when_unreadable_images_empty_whole_batches(tmp_path):
    # batch 1: each unreadable image is a whole batch skipped; the position must count it
    data = str(make_folder(tmp_path / "images", good=6, broken=6))
    common = dict(data=data, max_images=None, batch_size=1, checkpoint_every=3)
    straight = trainer(tmp_path / "a", steps=8, **common)
    straight.fit()
    first = trainer(tmp_path / "b", steps=3, **common)
    first.fit()
    assert first.dataset.num_skipped > 0  # the interruption comes after a skipped batch
    resumed = trainer(tmp_path / "b", steps=8, resume="latest", **common)
    resumed.fit()
    assert_same(weights(straight), weights(resumed))
    assert resumed.batches.micro_batches == straight.batches.micro_batches > 8  # skipped batches were drawn too


def test_processes_that_accelerate_takes_for_one_each_are_told_the_fix(tmp_path, monkeypatch):
    """torchrun's processes on a machine without GPUs, launched without ACCELERATE_USE_CPU=1: Accelerate sees one
    process in each, so every one took itself for the main process and they raced for the output folder."""
    from vqhit import distributed

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(ValueError, match="torch.distributed runs 2 processes but Accelerate sees 1; .*"
                                         "ACCELERATE_USE_CPU=1"):
        trainer(tmp_path / "run", steps=1)
    assert not (tmp_path / "run").exists()


def test_a_stop_signal_while_the_run_starts_stops_it_after_its_first_step(tmp_path, monkeypatch):
    """SIGTERM while a run reads its data or its checkpoint killed it (status 143, no message, not requeued)."""
    from vqhit import training

    build = training.Trainer._build

    def signalled_build(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # handled at once, in this (the main) thread
        return build(self, *args, **kwargs)

    def killed(signum, frame):  # SIGTERM's default, death, as an exception this test can see
        raise RuntimeError("killed by SIGTERM")

    monkeypatch.setattr(training.Trainer, "_build", signalled_build)
    previous = signal.signal(signal.SIGTERM, killed)
    try:
        with pytest.raises(SystemExit) as stopped:
            training.train(config_from_dict({**TINY, "output_dir": str(tmp_path / "run"), "steps": 5}), "gan")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped.value.code == 75 and "stopped at step 1 of 5 by SIGTERM" in str(stopped.value)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-1"]


def test_a_damaged_checkpoint_named_by_its_path_is_refused_naming_the_damage(tmp_path):
    run = tmp_path / "run"
    trainer(run, steps=2, checkpoint_every=1).fit()
    rng_file = run / "checkpoint-2" / "random_states_0.pkl"
    size = rng_file.stat().st_size
    rng_file.write_bytes(rng_file.read_bytes()[:20])  # cut short: found by its size, before anything is read
    with pytest.raises(ValueError, match=rf"--resume .*checkpoint-2: the checkpoint is damaged \(random_states_0.pkl "
                                         rf"has 20 bytes, {size} were written\); resume an earlier one"):
        trainer(run, steps=3, resume=str(run / "checkpoint-2"))
    rng_file.write_bytes(bytes(size))  # the right size, wrong bytes: found when read
    with pytest.raises(ValueError, match="random_states_0.pkl is missing or damaged.*checkpoint-"):
        trainer(run, steps=3, resume=str(run / "checkpoint-2")).fit()
    weights_file = run / "checkpoint-1" / "model.safetensors"
    weights_file.write_bytes(b"\xff" * weights_file.stat().st_size)  # a header that cannot be read
    with pytest.raises(ValueError, match="checkpoint-1: the checkpoint is damaged \(model.safetensors is not a "
                                         "readable safetensors file\)"):
        trainer(run, steps=3, resume=str(run / "checkpoint-1"))
    weights_file.unlink()  # named, rather than the file Accelerate would look for next (pytorch_model.bin)
    with pytest.raises(ValueError, match="checkpoint-1: the checkpoint is damaged \(model.safetensors is missing\)"):
        trainer(run, steps=3, resume=str(run / "checkpoint-1"))


def test_resume_auto_passes_over_damaged_checkpoints_to_the_newest_intact_one(tmp_path, capsys):
    straight, run = tmp_path / "straight", tmp_path / "run"
    trainer(straight, steps=4).fit()
    trainer(run, steps=4, checkpoint_every=2).fit()
    weights_file = run / "checkpoint-4" / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:len(weights_file.read_bytes()) // 2])  # a partial copy
    resumed = trainer(run, steps=4, checkpoint_every=2, resume="auto")
    assert resumed.resume_path == run / "checkpoint-2"
    assert "checkpoint-4 is damaged (model.safetensors has" in capsys.readouterr().out
    (aside,) = run.glob("damaged-checkpoint-4-*")  # kept for a look, out of the way of pruning and --resume
    assert (aside / "train_state.json").exists()
    resumed.fit()
    assert_same(load_file(str(run / "model" / "model.safetensors")),
                load_file(str(straight / "model" / "model.safetensors")))  # as if never damaged
    for checkpoint in list_checkpoints(run):  # every checkpoint damaged: refused, never started from scratch
        (checkpoint / "model_1.safetensors").unlink()
    with pytest.raises(ValueError, match="--resume auto: every checkpoint in .*run is damaged \(checkpoint-4: "
                                         "model_1.safetensors is missing; checkpoint-2: .*--overwrite"):
        trainer(run, steps=4, resume="auto")


def test_resume_with_another_architecture_names_both(tmp_path):
    run = tmp_path / "run"
    trainer(run, steps=1, checkpoint_every=1).fit()
    with pytest.raises(ValueError, match=r"cannot resume .*checkpoint-1: it was trained as --model hit-tiny.*"
                                         r"multi_query.*\(True, False\)"):
        trainer(run, steps=2, resume="latest", model_options={"multi_query": False})
    # the discriminator's architecture is refused the same way, naming the options, before the folder is touched
    with pytest.raises(ValueError, match=r"cannot resume .*checkpoint-1: this run asks for another discriminator "
                                         r"architecture \(--disc-channel-multiplier 1 -> 2, --disc-max-channels 32 "
                                         r"-> 16; .*Resume without changing --disc-channel-multiplier or "
                                         r"--disc-max-channels") as e:
        trainer(run, steps=2, resume="latest", disc_max_channels=16, disc_channel_multiplier=2)
    assert "damaged" not in str(e.value)
    # a runtime option may change on resume
    trainer(run, steps=2, resume="latest", model_options={"checkpoint_mlp": True}).fit()


def test_nan_advice_without_a_checkpoint_does_not_point_at_resume(tmp_path):
    t = trainer(tmp_path / "run", steps=2, checkpoint_every=10)
    generate = t.objective.generate
    t.objective.generate = lambda forward, real, step: (generate(forward, real, step)[0] * float("nan"), {})
    with pytest.raises(FloatingPointError, match="No checkpoint was written yet: start again with a lower --lr") as e:
        t.fit()
    assert "--resume" not in str(e.value)


def test_a_divergence_is_one_error_line_advising_a_finite_lower_lr(tmp_path):
    from vqhit.errors import UsageError
    t = trainer(tmp_path / "run", steps=3, checkpoint_every=10)
    t.config.lr = float("inf")  # as given on the command line (or a run whose lr is not a number)
    for optimizer in (t.opt_g, t.opt_d):
        optimizer.param_groups[0]["lr"] = float("inf")
    with pytest.raises(FloatingPointError, match=r"non-finite .*start again with a finite positive --lr "
                                                 r"\(e.g. --lr 1e-4 --overwrite\)") as e:
        t.fit()
    assert isinstance(e.value, UsageError)  # the scripts print it as one `error:` line, without a traceback
    assert "--lr inf" not in str(e.value)


def test_a_resume_that_fails_at_its_first_step_is_advised_an_earlier_checkpoint(tmp_path):
    run = tmp_path / "run"
    trainer(run, steps=3, checkpoint_every=1).fit()
    # checkpoint-3's weights give a non-finite loss at once (as after lr 1.0): resuming it with a lower lr fails again
    resumed = trainer(run, steps=5, checkpoint_every=1, resume="latest", lr=1e-5)
    generate = resumed.objective.generate
    resumed.objective.generate = lambda forward, real, step: (generate(forward, real, step)[0] * float("nan"), {})
    with pytest.raises(FloatingPointError, match="at step 3.*last good checkpoint, .*checkpoint-2, .*--resume "
                                                 ".*checkpoint-2 --lr") as e:
        resumed.fit()
    assert "checkpoint-3" not in str(e.value)


# -- output folders ------------------------------------------------------------------------------------
def test_a_used_folder_is_refused_unless_resumed_or_overwritten(tmp_path):
    run = tmp_path / "run"
    trainer(run, steps=2, checkpoint_every=1).fit()
    with pytest.raises(ValueError, match="holds an earlier run \\(checkpoint-1, checkpoint-2, model/\\).*--overwrite"):
        trainer(run, steps=1)
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-1", "checkpoint-2"]  # nothing deleted
    trainer(run, steps=1, checkpoint_every=1, overwrite=True).fit()
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-1"]


def test_a_folder_without_checkpoints_restarts_plainly(tmp_path):
    run = tmp_path / "run"
    (run / ".checkpoint-5.tmp").mkdir(parents=True)  # a run killed inside its first checkpoint write
    (run / "samples").mkdir()
    (run / "train_config.yaml").write_text("model: hit-tiny\n")
    with pytest.raises(ValueError, match=r"--resume latest: .*run holds no checkpoint-N folder yet \(the run stopped "
                       "before its first checkpoint\); start it again without --resume, or use --resume auto"):
        trainer(run, steps=1, resume="latest")  # latest means a checkpoint: the run's start is not silently redone
    trainer(run, steps=1, checkpoint_every=1).fit()
    assert not (run / ".checkpoint-5.tmp").exists() and (run / "checkpoint-1").is_dir()


def test_resuming_from_the_past_keeps_the_newer_checkpoints(tmp_path):
    run = tmp_path / "run"
    trainer(run, steps=3, checkpoint_every=1).fit()
    trainer(run, steps=3, checkpoint_every=1, resume=str(run / "checkpoint-1")).fit()
    aside = list(run.glob("superseded-1-*"))
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["checkpoint-2", "checkpoint-3",
                                                                             "logs.jsonl"]
    assert [json.loads(line)["step"] for line in (aside[0] / "logs.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]


def test_a_checkpoint_from_elsewhere_moves_the_folders_own_run_aside(tmp_path):
    """Resuming another folder's checkpoint into a used folder mixed the two runs: their checkpoints side by side
    (one replaced by the other's of the same step), pruning deleting the folder's own, one log for both."""
    src, run = tmp_path / "src", tmp_path / "run"
    trainer(src, steps=2, checkpoint_every=1, seed=1).fit()
    trainer(run, steps=3, checkpoint_every=1).fit()
    states = {p.name: (p / "train_state.json").read_text() for p in list_checkpoints(run)}
    log = (run / "logs.jsonl").read_text()
    trainer(run, steps=4, checkpoint_every=1, keep_checkpoints=1, resume=str(src / "checkpoint-2")).fit()
    aside = list(run.glob("superseded-2-*"))
    assert len(aside) == 1
    assert sorted(p.name for p in aside[0].iterdir()) == ["checkpoint-1", "checkpoint-2", "checkpoint-3",
                                                          "logs.jsonl", "model"]
    assert {p.name: (p / "train_state.json").read_text() for p in list_checkpoints(aside[0])} == states
    assert (aside[0] / "logs.jsonl").read_text() == log
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-4"]  # pruning kept to this lineage
    assert [json.loads(line)["step"] for line in (run / "logs.jsonl").read_text().splitlines()] == [3, 4]


def test_two_runs_cannot_write_one_folder(tmp_path):
    run = tmp_path / "run"
    first = trainer(run, steps=1)  # holds the lock from construction to the end of fit()
    with pytest.raises(RuntimeError, match=f"{run} is being written by another run \\(pid {os.getpid()}"):
        trainer(run, steps=1)
    first.fit()
    trainer(run, steps=2, resume="latest").fit()  # released: the folder can be used again


def test_steps_below_the_checkpoints_step_are_refused_before_anything_is_touched(tmp_path):
    run = tmp_path / "run"
    trainer(run, steps=3, checkpoint_every=3).fit()
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(ValueError, match=r"--steps 2 is below the step of .*checkpoint-3 \(3\): the run is already "
                                         r"past it. Give --steps 3 or more"):
        trainer(run, steps=2, resume="auto")
    assert sorted(p.name for p in run.iterdir()) == before


def test_a_resume_at_the_last_step_exports_the_model(tmp_path):
    run = tmp_path / "run"
    trainer(run, steps=2, checkpoint_every=2).fit()
    for f in (run / "model").iterdir():
        f.unlink()
    (run / "model").rmdir()
    trainer(run, steps=2, resume="latest").fit()
    HiTGenerator.from_pretrained(run / "model")


# -- kill -9 -------------------------------------------------------------------------------------------
# Each run is a subprocess that SIGKILLs itself at a named moment: just before a rename whose destination is a given
# path (a checkpoint folder's, a file of model/), or when a given step starts. Before dying it writes what it was
# doing, so the test checks that the kill happened where it says. The same command (--resume auto) then goes on,
# and the end is compared with an uninterrupted run.
DRIVER = r"""
import json, os, signal, sys
from pathlib import Path
from vqhit.train_config import parse_config
from vqhit.training import Trainer
marker, destination, count, kill_step = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
trainer = Trainer(parse_config(sys.argv[5:], "fault test", "gan"), "gan")

def die(**moment):
    Path(marker).write_text(json.dumps(moment))
    os.kill(os.getpid(), signal.SIGKILL)

real_replace, renames = os.replace, [0]
def replace(src, dst, *args, **kwargs):
    if str(dst) == destination:
        renames[0] += 1
        if renames[0] == count:
            die(src=str(src), dst=str(dst), complete=(Path(src) / "train_state.json").is_file(),
                step=trainer.state.step)
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
train_step = trainer.train_step
def step(real):
    if trainer.state.step == kill_step:
        die(step=kill_step)
    return train_step(real)
trainer.train_step = step
trainer.fit()
"""
ARGS = ["--model", "hit-tiny", "--num-workers", "0", "--max-images", "8", "--batch-size", "2",
        "--disc-max-channels", "32", "--log-every", "1", "--sample-every", "1000", "--seed", "3",
        "--steps", "6", "--checkpoint-every", "2", "--keep-checkpoints", "2", "--resume", "auto"]


def run_driver(out: Path, destination: str = "", count: int = 0, step: int = -1) -> tuple[int, dict | None]:
    """Run to the end, or to the kill; returns the exit status and, after a kill, the moment it happened."""
    marker = out.parent / "kill.json"
    marker.unlink(missing_ok=True)
    cmd = [sys.executable, "-c", DRIVER, str(marker), destination, str(count), str(step), *ARGS,
           "--output-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if result.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(result.stderr[-3000:])
    return result.returncode, json.loads(marker.read_text()) if marker.exists() else None


def check_loadable(out: Path) -> None:
    for checkpoint in list_checkpoints(out):
        json.loads((checkpoint / "train_state.json").read_text())
        load_file(str(checkpoint / "model.safetensors"))
        HiTGenerator.from_pretrained(checkpoint / "ema")
    if (out / "model").exists():
        HiTGenerator.from_pretrained(out / "model")


def test_kill_at_any_moment_then_resume_ends_as_an_uninterrupted_run(tmp_path):
    straight = tmp_path / "straight"
    assert run_driver(straight)[0] == 0
    out = tmp_path / "killed"
    model = str(out / "model")
    # (where, expected moment): each kill must fire exactly there
    kills = [(dict(destination=str(out / "checkpoint-2"), count=1),  # a complete .tmp folder, not yet renamed
              dict(src=str(out / ".checkpoint-2.tmp"), complete=True, step=2)),
             (dict(step=3),                                           # inside a training step
              dict(step=3)),
             (dict(destination=model + "/model.safetensors", count=1),  # replacing model/ file by file: the first
              dict(src=model + "/model.safetensors.tmp", step=4)),     # time model/ exists is the second export
             (dict(destination=model + "/config.json", count=1),        # between that export's two files
              dict(src=model + "/config.json.tmp", step=6))]
    for kill, expected in kills:
        status, moment = run_driver(out, **kill)
        assert status == -signal.SIGKILL and moment is not None, f"{kill}: no kill"
        assert {k: moment.get(k) for k in expected} == expected, f"{kill} fired at {moment}"
        check_loadable(out)
    assert run_driver(out) == (0, None)
    check_loadable(out)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4", "checkpoint-6"]
    assert_same(load_file(str(straight / "model" / "model.safetensors")),
                load_file(str(out / "model" / "model.safetensors")))
    assert_same(load_file(str(straight / "checkpoint-6" / "model_1.safetensors")),  # the discriminator
                load_file(str(out / "checkpoint-6" / "model_1.safetensors")))
    # after four kills, each step is logged once, in logs.jsonl and in TensorBoard
    steps = [json.loads(line)["step"] for line in (out / "logs.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss/generator")] == [1, 2, 3, 4, 5, 6]


def test_checkpoints_and_exports_are_flushed_to_disk_before_and_after_their_renames(tmp_path, monkeypatch):
    """Atomic against kill -9 is not enough: after a power loss a renamed file can come back empty unless its data
    was flushed before the rename, and the rename itself lost unless its folder was flushed after."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda src, dst: events.append(("rename", str(src), str(dst)))
                        or real_replace(src, dst))
    run = tmp_path / "run"
    trainer(run, steps=2, checkpoint_every=1).fit()
    renames = [(i, e) for i, e in enumerate(events) if e[0] == "rename"]
    assert renames
    for i, (_, src, dst) in renames:
        before = {e[1] for e in events[:i] if e[0] == "fsync"}
        after = {e[1] for e in events[i + 1:] if e[0] == "fsync"}
        if Path(dst).name in ("checkpoint-1", "checkpoint-2", "model"):  # a whole folder: every file in it
            files = [str(p).replace(dst, src, 1) for p in Path(dst).rglob("*") if p.is_file()]
            assert files and set(files) <= before, f"{dst}: {set(files) - before} not flushed before the rename"
        else:
            assert src in before, f"{src} not flushed before its rename"
        assert str(Path(dst).parent) in after, f"{Path(dst).parent} not flushed after renaming {dst}"


def test_an_output_folder_without_locks_warns_and_a_held_lock_says_how_to_clear_a_dead_one(tmp_path, monkeypatch):
    import errno
    import fcntl

    from vqhit.checkpointing import OutputFolder

    first = OutputFolder(tmp_path / "run")
    first.lock()
    with pytest.raises(ValueError, match=r"being written by another run \(pid \d+ on .*\).*If that run is dead.*"
                                         r"delete .*run/.lock to go on at once"):
        OutputFolder(tmp_path / "run").lock()
    first.unlock()

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)  # a Lustre mount without -o flock
    folder = OutputFolder(tmp_path / "lustre")
    with pytest.warns(UserWarning, match="cannot be locked \\(No locks available\\).*Lustre: -o flock"):
        folder.lock()
    folder.unlock()


def test_preparing_a_folder_removes_only_the_temporaries_a_run_writes(tmp_path):
    from vqhit.checkpointing import OutputFolder

    run = tmp_path / "run"
    for name in (".checkpoint-3.tmp", ".model.tmp", ".checkpoint-2.replaced", ".cache.tmp", ".my-notes.tmp"):
        (run / name).mkdir(parents=True)
    OutputFolder(run).prepare(None, overwrite=False)
    assert sorted(p.name for p in run.iterdir()) == [".cache.tmp", ".my-notes.tmp"]  # the user's are kept


def test_a_signal_during_a_checkpoint_write_stops_the_run_at_that_checkpoint(tmp_path, monkeypatch):
    from vqhit import training
    from vqhit.preemption import Preempted

    save = training.save_checkpoint

    def signalled_save(*args, **kwargs):  # the scheduler's SIGTERM arrives while the checkpoint is being written
        if kwargs.get("train_state", {}).get("step") == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return save(*args, **kwargs)

    monkeypatch.setattr(training, "save_checkpoint", signalled_save)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(Preempted, match="stopped at step 2 of 6"):
            trainer(tmp_path / "run", steps=6, checkpoint_every=2).fit()
    finally:
        signal.signal(signal.SIGTERM, previous)  # a stopped run leaves its stop signals ignored: this process lives on
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-2"]  # not one step more, not two


def test_the_divergence_advice_passes_over_checkpoints_reached_with_losses_out_of_bounds(tmp_path):
    from vqhit.step_flags import SANE_LOSS, divergence_message

    run = tmp_path / "run"
    t = trainer(run, steps=3, checkpoint_every=1)
    t.fit()
    states = {c.name: json.loads((c / "train_state.json").read_text()) for c in list_checkpoints(run)}
    assert all(0 < state["loss_peak"] < SANE_LOSS for state in states.values())  # each records its largest loss
    state_file = run / "checkpoint-2" / "train_state.json"  # as after --lr 1.0: losses near 1e16 before the NaN
    state_file.write_text(json.dumps({**states["checkpoint-2"], "loss_peak": 3e16}))
    message = divergence_message(["generator"], 3, run, t.config)
    assert "last good checkpoint, " + str(run / "checkpoint-1") in message and "checkpoint-2" not in message
    state_file = run / "checkpoint-1" / "train_state.json"
    state_file.write_text(json.dumps({**states["checkpoint-1"], "loss_peak": float("inf")}))
    assert "start again with a lower --lr" in divergence_message(["generator"], 3, run, t.config)


def test_a_repeated_stop_signal_while_the_stopped_run_exits_does_not_kill_it():
    # The scheduler's second SIGTERM can come after the checkpoint, while the process exits with status 75: it must
    # not turn that status into death by the signal (a job script would then not requeue).
    from vqhit.preemption import Preempted, StopSignals

    previous = signal.getsignal(signal.SIGUSR1)
    try:
        with pytest.raises(Preempted):
            with StopSignals([signal.SIGUSR1]):
                os.kill(os.getpid(), signal.SIGUSR1)
                raise Preempted("stopped")
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGUSR1)  # ignored: this test process lives on
        with StopSignals([signal.SIGUSR1]):  # a block that ends otherwise gives the previous handler back
            pass
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR1, previous)
    with StopSignals([signal.SIGUSR1]):
        pass
    assert signal.getsignal(signal.SIGUSR1) == previous
