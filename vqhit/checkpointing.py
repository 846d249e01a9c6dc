"""Checkpoints and the run's output folder: nothing a user did not ask to delete is ever deleted.

A run's folder holds `checkpoint-N/` folders (resumable state), `model/` (the exported EMA model), `samples/`,
`tensorboard/` and `train_config.yaml`. The rules:

- While a run writes the folder it holds an exclusive lock on `OUTPUT_DIR/.lock` (released by the kernel when the
  process dies, even by kill -9): a second run into the same folder stops at once, naming the first.
- A fresh run (no `--resume`) refuses a folder that holds another run's checkpoints or `model/`, unless
  `--overwrite` asks to delete them. A folder with no checkpoint and no model (a run killed before its first
  checkpoint) is not "used": a plain restart into it just works.
- Resuming from an older checkpoint than the newest keeps the newer ones: they are moved, untouched, into
  `superseded-<step>-<time>/` so that the resumed lineage is the only one left to prune and to `--resume latest`.
- A checkpoint is written into `.checkpoint-N.tmp/` and renamed when complete (`vqhit.files.replace_folder`): a
  kill at any instant leaves either the complete checkpoint or a `.tmp` folder that the next run removes. Every file is
  flushed to disk (fsync) before the rename and the folder after it, so a renamed checkpoint survives a node crash
  or power loss too, not only a killed process.
- `model/` first appears complete by one rename; later exports replace it file by file, each file written to a
  temporary name and renamed (`save_pretrained`): a kill at any instant leaves a loadable `model/` (the previous
  export or the new one; their configs are the same run's).
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
import warnings
from pathlib import Path

from .distributed import run_on_main
from .errors import UnavailableError, UsageError
from .files import give_default_mode, replace_folder
from .models.model_card import training_step
from .resume import (CHECKPOINT_PREFIX, STATE_FILE, checkpoint_damage, checkpoint_step, list_checkpoints,
                     read_state)
from .train_config import save_config

LOCK_FILE = ".lock"
# The temporary folders a run writes into its output folder (`save_checkpoint`, `export_model`, `replace_folder`).
RUN_TEMPORARIES = (f".{CHECKPOINT_PREFIX}*.tmp", ".model.tmp", f".{CHECKPOINT_PREFIX}*.replaced", ".model.replaced")
RUN_OUTPUTS = ("model", "samples", "tensorboard", "train_config.yaml", "logs.jsonl")  # what --overwrite deletes besides checkpoints


class OutputFolder:
    """The output folder of one run, locked for the run's lifetime by the main process."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock_fd = None

    def lock(self) -> None:
        """Take the folder's lock, or stop naming the run that holds it. A file system without locks (some Lustre
        and NFS mounts) gets a warning instead: the run goes on, unprotected from a second run into the folder."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 1000).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise _held_by_another_run(self.path, holder) from None
        except OSError as err:  # ENOLCK, EOPNOTSUPP, ENOSYS: no locks on this file system
            warnings.warn(_cannot_lock(self.path, err), stacklevel=2)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                 .encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            except OSError:  # never locked: a file system without locks (see `lock`)
                pass
            os.close(self._lock_fd)
            self._lock_fd = None

    def __del__(self):
        self.unlock()

    def prepare(self, resume_from: Path | None, overwrite: bool) -> list[str]:
        """Make the folder ready for a fresh run or a resume; returns what it did, as messages for the log."""
        done = []
        for name in RUN_TEMPORARIES:  # what a kill during a checkpoint write or an export left behind; nothing else
            for stale in self.path.glob(name):
                if stale.is_dir():
                    shutil.rmtree(stale)
        checkpoints = list_checkpoints(self.path)
        if resume_from is None:
            used = [p.name for p in checkpoints] + (["model/"] if (self.path / "model").exists() else [])
            if used and not overwrite:
                raise UsageError(f"{self.path} holds an earlier run ({', '.join(used)}): continue it with --resume "
                                 f"auto, choose another --output-dir, or pass --overwrite to delete it")
            if used:
                for p in checkpoints + [self.path / name for name in RUN_OUTPUTS]:
                    if p.is_dir():
                        shutil.rmtree(p)
                    elif p.exists():
                        p.unlink()
                done.append(f"--overwrite: deleted {', '.join(used)} of the earlier run in {self.path}")
            return done
        resume_step = read_state(resume_from)["step"]
        # The folder's checkpoints that are not of the lineage resumed: the newer ones of this folder when an older
        # one is resumed, every one (and the export) when the checkpoint comes from elsewhere (another folder, a
        # superseded-* one). Moved aside untouched, with the log as it was, so that pruning and the log see only
        # this lineage and nothing is lost.
        own = resume_from.resolve().parent == self.path.resolve()
        for p in [p for p in checkpoints if own and checkpoint_step(p) > resume_step]:
            why = checkpoint_damage(p)
            if why is not None:  # passed over by --resume auto|latest: kept for a look, out of the lineage
                aside = self.path / f"damaged-{p.name}-{time.strftime('%Y%m%d-%H%M%S')}"
                os.replace(p, aside)
                checkpoints.remove(p)
                done.append(f"{p.name} is damaged ({why}): moved to {aside.name}; resuming {resume_from.name}")
        other = [p for p in checkpoints if checkpoint_step(p) > resume_step or not own]
        if not own and (self.path / "model").exists():
            other.append(self.path / "model")
        if other:
            aside = self.path / f"superseded-{resume_step}-{time.strftime('%Y%m%d-%H%M%S')}"
            aside.mkdir()
            for p in other:
                os.replace(p, aside / p.name)
            log = self.path / "logs.jsonl"
            if log.is_file():
                (shutil.copy2 if own else os.replace)(log, aside / log.name)  # own: the resumed part goes on
            whose = "the newer" if own else f"another lineage's (not {resume_from.parent})"
            done.append(f"resuming from step {resume_step}: {whose} {', '.join(p.name for p in other)} were moved, "
                        f"untouched, to {aside}")
        return done

    def open(self, resume_from: Path | None, overwrite: bool) -> None:
        """Lock the folder and `prepare` it, printing what was done; unlocked again when that fails (main
        process). Sample grids go to its samples/ folder."""
        self.lock()
        try:
            messages = self.prepare(resume_from, overwrite)
            (self.path / "samples").mkdir(exist_ok=True)
        except BaseException:
            self.unlock()
            raise
        for message in messages:
            print(message, flush=True)

    def prune(self, keep: int) -> None:
        """Delete all but the newest `keep` checkpoints (all of this lineage: see `prepare`)."""
        for old in list_checkpoints(self.path)[:-keep]:
            shutil.rmtree(old)


def _held_by_another_run(path: Path, holder: str) -> UnavailableError:
    return UnavailableError(f"{path} is being written by another run ({holder}); wait for it to finish, "
                            f"or choose another --output-dir. If that run is dead (its node went down), the "
                            f"file server releases its lock after a while; delete {path / LOCK_FILE} "
                            f"to go on at once")


def _cannot_lock(path: Path, err: OSError) -> str:
    return (f"{path} cannot be locked ({err.strerror}): a second run started into the same --output-dir would not be "
            "stopped; mount the file system with locks (Lustre: -o flock) to be protected")


# -- writing and reading a checkpoint ----------------------------------------------------------------------------
def data_state_file(rank: int) -> str:
    """Each process's data position (its streams are its own), beside Accelerate's random_states_<rank>.pkl."""
    return f"data_state_{rank}.json"


def save_checkpoint(accelerator, output_dir: Path, step: int, *, ema_model, config, train_state: dict,
                    data_state: dict, folder: OutputFolder) -> Path:
    """Write `checkpoint-<step>/` collectively (every process calls this), then export the EMA model.

    Accelerate's state (models, optimisers, per-process RNG, registered objects), each process's data position,
    the EMA model as a save_pretrained folder, the run's config, and `train_state.json` last, in a `.tmp` folder
    renamed when complete (see the module docstring).
    """
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = output_dir / f".{CHECKPOINT_PREFIX}{step}.tmp"
    if accelerator.is_main_process:
        tmp.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()  # the folder exists before any process writes its part (e.g. its RNG state)
    accelerator.save_state(str(tmp))
    (tmp / data_state_file(accelerator.process_index)).write_text(json.dumps(data_state) + "\n")
    accelerator.wait_for_everyone()  # every part is written before the folder is renamed
    run_on_main(_complete_checkpoint, tmp, final, step, ema_model, config, train_state, folder, output_dir)
    return final


def _complete_checkpoint(tmp: Path, final: Path, step: int, ema_model, config, train_state: dict,
                         folder: OutputFolder, output_dir: Path) -> None:
    """The main process's part of a checkpoint: the EMA model, the config, the list of files, the rename; then
    pruning and the export. The other processes wait for it without a deadline (`run_on_main`)."""
    ema_model.save_pretrained(tmp / "ema", training_step=step)
    save_config(config, tmp / "train_config.yaml")
    give_default_mode(tmp)  # Accelerate writes its safetensors files private (0600); ours follow the umask
    # The files of every process, with their sizes: a resume names one that went missing or was cut short.
    files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    (tmp / STATE_FILE).write_text(json.dumps({**train_state, "files": files}, indent=2) + "\n")  # last: complete
    replace_folder(tmp, final)  # a kill before this leaves only a .tmp folder, never a half checkpoint
    folder.prune(config.keep_checkpoints)
    export_model(ema_model, output_dir, step)


def export_model(model, output_dir: Path, step: int) -> Path:
    """`model` (the weights of training step `step`) as `output_dir/model/`, a save_pretrained folder that is loadable
    at every instant: the first export appears complete by one rename; later ones replace each file by a rename
    (their configs are the same run's), and drop a model card's figures of earlier weights."""
    directory = output_dir / "model"
    if directory.is_dir() and training_step(directory) == step and model.holds_this_model(directory):
        return directory  # a finished run resumed: rewriting the same weights would drop the card's figures of them
    if directory.is_dir():
        model.save_pretrained(directory, training_step=step)
    else:
        tmp = output_dir / ".model.tmp"
        model.save_pretrained(tmp, training_step=step)
        replace_folder(tmp, directory)
    return directory


def load_checkpoint(accelerator, path: Path) -> tuple[dict, dict]:
    """Load a checkpoint into the prepared objects of `accelerator`; returns (train_state.json, this process's data
    position: the main process's when the checkpoint was written by another number of processes)."""
    from accelerate.utils import load  # Accelerate's own reader of its RNG files

    saved = read_state(path)
    rank = accelerator.process_index
    same_processes = saved["num_processes"] == accelerator.num_processes
    if same_processes:
        rng_file = path / f"random_states_{rank}.pkl"
        try:  # Accelerate only logs a failed RNG load and goes on with other randomness: check it first, as it reads
            load(rng_file)  # it (weights only, no pickled code)
        except Exception as e:  # noqa: BLE001
            raise _damaged_rng_state(path, rng_file, e) from None
    missing = [name for name in saved.get("files", {}) if not (path / name).is_file()]
    if missing:
        raise _incomplete_checkpoint(path, missing)
    try:
        accelerator.load_state(str(path))
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: name the checkpoint, not the library
        raise _damaged_checkpoint(path, e) from None
    data_file = path / data_state_file(rank if same_processes else 0)
    return saved, json.loads(data_file.read_text())


# -- why a checkpoint cannot be resumed: each names the checkpoint and an earlier one to resume instead -----------
def _damaged_rng_state(path: Path, rng_file: Path, err: Exception) -> UsageError:
    return UsageError(f"cannot resume exactly from {path}: {rng_file.name} is missing or damaged ({err}); "
                      f"resume from an earlier checkpoint (--resume {path.parent}/{CHECKPOINT_PREFIX}M)")


def _incomplete_checkpoint(path: Path, missing: list[str]) -> UsageError:
    return UsageError(f"cannot resume from {path}: it is incomplete, {', '.join(missing[:3])}"
                      f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''} missing; resume from an "
                      f"earlier checkpoint in {path.parent}")


def _damaged_checkpoint(path: Path, err: Exception) -> UsageError:
    return UsageError(f"cannot resume from {path}: a file in it is damaged or belongs to another model "
                      f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); resume from an "
                      f"earlier checkpoint in {path.parent}")
