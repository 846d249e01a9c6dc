"""Stopping a run cleanly when a cluster asks it to: preemption signals and checkpoints by wall-clock time.

Schedulers announce a kill with a signal some seconds ahead: Slurm (`--signal=USR1@300`, and SIGTERM on
preemption), Kubernetes and cloud spot instances (SIGTERM). `StopSignals` turns the first such signal into a
flag; the training loop reads the flags of every process once a step (one collective) and, as soon as any
process has one, every process finishes the step, one checkpoint is written collectively at the step reached,
and the run exits with `EXIT_PREEMPTED`. The same command line with `--resume auto` then continues it.

Signals after the first one are acknowledged and ignored, so a second SIGTERM during the checkpoint cannot
interrupt it (only SIGKILL can, and a checkpoint is written to a temporary folder renamed when complete).

A signal sent to the whole process group (Slurm, `kill -TERM -PGID`) also reaches the DataLoader's worker processes:
they ignore the stop signals (`ignore_in_workers`), so that only the training process reacts and the workers keep
serving batches until it has written its checkpoint. A worker still ends with its parent (torch's watchdog).

Ctrl-C (SIGINT, unless it is listed as a stop signal) stops at once, without a checkpoint: the training loop turns its
KeyboardInterrupt into an `Interrupted` that names the checkpoint to resume, and the scripts exit with status 130.
"""
from __future__ import annotations

import functools
import os
import signal
import sys
import threading

from .errors import UsageError

EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130: the shell's status for a process ended by Ctrl-C
EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: stopped early on purpose; run the same command again to continue


def under_torchrun() -> bool:
    """Whether torchrun's agent started this process: it takes any exit status but 0 for a failure."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def stop_exit_status() -> int:
    """The exit status of a run stopped by a signal: `EXIT_PREEMPTED`, except under torchrun, whose agent would take
    it for a failure and restart the workers (up to --max-restarts), so that the run trained on instead of stopping:
    there the stop exits 0, and the run's newest checkpoint tells whether it is finished."""
    return 0 if under_torchrun() else EXIT_PREEMPTED


def preempted_advice() -> str:
    """The end of the line that says a stop signal stopped the run: how to continue it, and with which status the
    process exits."""
    status = stop_exit_status()
    why = " under torchrun, which would restart workers that exit otherwise" if status != EXIT_PREEMPTED else ""
    return f"Run the same command with --resume auto to continue (exit status {status}{why})"
DEFAULT_STOP_SIGNALS = "SIGTERM,SIGUSR1"


class Preempted(SystemExit):
    """Raised (on every process) after the checkpoint that a stop signal asked for: the process exits with
    `stop_exit_status()` and prints no traceback. Catch it to keep a Python session alive (the
    stop signals then stay ignored, as for a process about to exit: restore them with `signal.signal`)."""

    def __init__(self, message: str):
        super().__init__(stop_exit_status())
        self.message = message

    def __str__(self) -> str:
        return self.message


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training: a KeyboardInterrupt whose message says what was lost and which checkpoint to resume."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def parse_signals(names: str | None) -> list[signal.Signals]:
    """'SIGTERM,SIGUSR1' (or 'TERM,USR1') as signals; '' or 'none' for none."""
    if names is None or names.strip().lower() in ("", "none"):
        return []
    found = []
    for name in names.split(","):
        name = name.strip().upper()
        if not name:
            raise UsageError(f"--stop-signals {names}: an empty name between commas; give a comma-separated list "
                             f"such as {DEFAULT_STOP_SIGNALS}, or none")
        name = name if name.startswith("SIG") else "SIG" + name
        sig = getattr(signal, name, None)
        if not isinstance(sig, signal.Signals) or sig in (signal.SIGKILL, signal.SIGSTOP):
            raise UsageError(f"--stop-signals: {name} is not a signal a process can catch; give a comma-separated "
                             f"list such as {DEFAULT_STOP_SIGNALS}, or none")
        found.append(sig)
    return found


# What a stop signal does (first, and on a repeat) while training, and after the last step's checkpoint, when only the
# export and the held-out report are left: both short, so they finish (rather than the process being killed without
# its report) and the run ends as it would have.
WHILE_TRAINING = ("finishing this step, then writing a checkpoint and exiting",
                  "still writing the checkpoint")
WHILE_FINISHING = ("training is complete and checkpointed; finishing the export and the held-out report first",
                   "still finishing the export and the held-out report")


class StopSignals:
    """While active (a `with` block), the first of `signals` sets `received` instead of killing the process; `doing`
    says what happens next (`WHILE_TRAINING` or `WHILE_FINISHING`)."""

    def __init__(self, signals: list[signal.Signals], doing: tuple[str, str] = WHILE_TRAINING):
        self.signals = signals
        self.doing, self.still_doing = doing
        self.received: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            print(f"received {name}: {self.doing}", file=sys.stderr, flush=True)
        else:
            print(f"received {name} again: {self.still_doing}", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # Python only lets the main thread set handlers
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # A run stopped by a signal is exiting with its status: a repeat of the scheduler's signal during the exit
        # (the workers' shutdown, the interpreter's) must not turn that status into death by the signal, so the stop
        # signals stay ignored. Otherwise the previous handlers come back.
        stopping = isinstance(exc, Preempted)
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if stopping else previous)
        self._previous.clear()


def _ignore_signals(signals: tuple[int, ...], worker_id: int) -> None:
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)


def ignore_in_workers(signals: list[signal.Signals]):
    """A DataLoader `worker_init_fn` that makes its workers ignore `signals` (the run's stop signals): a signal to the
    whole process group then stops the training process cleanly instead of killing its workers (whose death fails the
    step and the checkpoint write). None when there is nothing to ignore. Picklable, for spawned workers too."""
    return functools.partial(_ignore_signals, tuple(int(s) for s in signals)) if signals else None
