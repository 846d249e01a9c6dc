"""What every script in scripts/ shares: its parser, its option types, and how it ends on a user's mistake.

    def main(argv=None):
        args = cli.ArgumentParser(description=__doc__).parse_args(argv)
        ...

    if __name__ == "__main__":
        cli.run(main)

`run` calls `main`. A `UsageError` (`vqhit.errors`: raised where the library checks what the user chose, and by
`ArgumentParser` for a malformed command line) prints one line, `error: <message>`, from the first process only,
and exits with status 2. Any other exception is a bug and propagates with its traceback.

Under `accelerate launch`, the launcher adds a traceback of its own (CalledProcessError) whenever the script exits
non-zero; its `-q` (`--quiet`) flag leaves that out for one-process launches, which is why the README's commands
carry it. Multi-process launches (torchrun, `--multi_gpu`) always add the launcher's failure summary.

Warnings raised by vqhit's own code print as one line too, `warning: <message>`, and no warning prints twice.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UsageError

_PROJECT = Path(__file__).resolve().parent.parent  # vqhit/ and scripts/


class ArgumentParser(argparse.ArgumentParser):
    """argparse, whose errors (an unknown option, a missing or malformed value) are UsageErrors: one line
    naming the option, instead of argparse's usage block."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def int_at_least(low: int):
    """An argparse type: a whole number >= low, or an error naming the option ("argument --batch-size: must be
    at least 1, got 0")."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    parse.__name__ = f"int >= {low}"  # argparse names the type in some messages
    return parse


def default_num_workers() -> int:
    """DataLoader workers per process a script starts by default: up to 4, leaving one of the cores this process
    may use to the main process (1 worker on 2 cores, none on 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(4, max(0, cores - 1))


def _rank() -> int:
    """This process's rank among those a launcher started (0 when alone), without needing torch.distributed to
    be initialised: a mistake is usually found before it is."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for name in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):  # torchrun / accelerate, Intel MPI, Open MPI
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    """vqhit's warnings as `warning: <message>`; other libraries' keep their usual form (with their location)."""
    if Path(filename).resolve().is_relative_to(_PROJECT) or category.__module__.startswith("vqhit"):
        print(f"warning: {message}", file=file or sys.stderr, flush=True)
    else:
        _default(message, category, filename, lineno, file, line)


@contextmanager
def naming(option: str, value) -> Iterator[None]:
    """UsageErrors raised inside name the option they are about, unless they already do:
    `--model runs/x/model: no such folder: ...`."""
    try:
        yield
    except UsageError as err:
        if option in str(err):
            raise
        raise type(err)(f"{option} {value}: {err}") from None


def _message(err: UsageError) -> str:
    """The error's message on one line. An error raised in a DataLoader worker comes back wrapped, with the
    worker's traceback in its message; the original message is its last line."""
    text = str(err)
    if "\nOriginal Traceback" in text:
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split())


def run(main, argv: list[str] | None = None):
    """Run a script's `main(argv)`: a UsageError ends the script with one line and status 2; a bug keeps its
    traceback. Returns what `main` returns."""
    with warnings.catch_warnings():  # the warning settings below end with `main`
        warnings.showwarning = _show_warning
        # A warning is worth one printing: torch's DataLoader, for one, repeats its worker-count warning from
        # another line when iteration starts.
        warnings.filterwarnings("once", category=UserWarning)
        try:
            return main(argv)
        except UsageError as err:
            if _rank() == 0:  # every process meets the same mistake; one line is enough
                print(f"error: {_message(err)}", file=sys.stderr, flush=True)
            sys.exit(2)
