"""What every script in scripts/ shares: its parser, its option types, and how it ends on a user's mistake.

    def main(argv=None):
        args = cli.ArgumentParser(description=__doc__).parse_args(argv)
        ...

    if __name__ == "__main__":
        cli.run(main)

The scripts that read a saved model and a dataset (encode, decode, eval_rfid, eval_gan) take their common options
from the `add_*_options` functions below, and build the model and the dataset from them with `load_model` and
`eval_dataset_from_args`: an option they share is written once, here.

`run` calls `main`. A `UsageError` (`vqhit.errors`: raised where the library checks what the user chose, and by
`ArgumentParser` for a malformed command line) prints one line, `error: <message>`, from the first process only,
and exits with status 2. Ctrl-C (KeyboardInterrupt) prints its message, or `interrupted`, and exits with status 130.
Any other exception is a bug and propagates with its traceback.

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

from .errors import OwnDataError, UsageError
from .preemption import EXIT_INTERRUPTED, Preempted

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


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_num_workers() -> int:
    """DataLoader workers per process a script starts by default: up to 4, leaving one of the cores this process
    may use to the main process (1 worker on 2 cores, none on 1)."""
    return min(4, max(0, usable_cores() - 1))


# -- the options of the scripts that read a saved model and a dataset ----------------------------------------
def add_model_option(parser: argparse.ArgumentParser, what: str, example: str, note: str = "") -> None:
    """--model: `what` ("The tokenizer", ...) as a save_pretrained folder or a Hub repository id."""
    parser.add_argument("--model", required=True, help=f"{what}: a save_pretrained folder (use a training run's EMA "
                        f"export, e.g. {example}) or a Hugging Face Hub repository id{note}")


def load_model(model_class, args: argparse.Namespace):
    """The `--model` of `args` as a `model_class` (in eval mode); a mistake names --model."""
    with naming("--model", args.model):
        return model_class.from_pretrained(args.model)


def add_dataset_options(parser: argparse.ArgumentParser, what: str, transform: str, *, required: bool = True,
                        data_note: str = "") -> None:
    """--data, --split, --image-column, --transform, --min-size, --bad-images: which images, read how
    (`eval_dataset_from_args` builds the dataset from them)."""
    from .data import BAD_IMAGES, DETERMINISTIC_TRANSFORMS  # here: most importers of this module never read a dataset

    parser.add_argument("--data", required=required, default=None, help=f"{what}: a local image folder (sub-folders "
                        f"become labels), a Hugging Face Hub dataset id, or 'builtin:photos'{data_note}")
    parser.add_argument("--split", default="train", help="Dataset split: e.g. 'validation' for Hub ImageNet; a plain "
                        "image folder's only split is 'train' (default: %(default)s)")
    parser.add_argument("--image-column", default="image", help="Image column of a Hub dataset (default: "
                        "%(default)s)")
    parser.add_argument("--transform", default=transform, choices=DETERMINISTIC_TRANSFORMS, help="Deterministic "
                        "preprocessing to the model's resolution, never flipped: center_crop (short side, bicubic), "
                        "adm_center_crop (ADM's evaluation protocol), imagenet_gan_eval, or resize (the whole image: "
                        "for square datasets such as FFHQ) (default: %(default)s)")
    parser.add_argument("--min-size", type=int_at_least(0), default=0, help="Treat images whose short side is below "
                        "N pixels as bad images (see --bad-images); 0 keeps every image, upsampling those smaller "
                        "than the resolution as ADM's protocol does (default: %(default)s)")
    parser.add_argument("--bad-images", default="skip", choices=BAD_IMAGES, help="Unreadable images (and "
                        "those below --min-size): skip them (the script's output counts them) or stop (default: "
                        "%(default)s)")


def eval_dataset_from_args(args: argparse.Namespace, resolution: int, *, max_images: int | None,
                           label_column: str | None = None):
    """The dataset that `add_dataset_options`' options describe, at `resolution` (`vqhit.data.eval_dataset`)."""
    from .data import eval_dataset

    return eval_dataset(args.data, resolution, transform=args.transform, split=args.split,
                        image_column=args.image_column, label_column=label_column, max_images=max_images,
                        bad_images=args.bad_images, min_size=args.min_size)


def add_run_options(parser: argparse.ArgumentParser, *, batch_size: int, batch_of: str, workers: bool = True,
                    precision_note: str | None = None) -> None:
    """--batch-size (of `batch_of`: "images", ...), --num-workers, --precision (when `precision_note` is given:
    what it applies to and what stays fp32), --no-progress."""
    from .precision import PRECISIONS

    parser.add_argument("--batch-size", type=int_at_least(1), default=batch_size, help=f"{batch_of.capitalize()} "
                        f"per forward pass, per process (default: %(default)s)")
    if workers:
        parser.add_argument("--num-workers", type=int_at_least(0), default=default_num_workers(), help="DataLoader "
                            "worker processes per process (default: %(default)s here: up to 4, one fewer than the "
                            "cores)")
    if precision_note is not None:
        parser.add_argument("--precision", default=None, choices=PRECISIONS, help=f"fp32, or bf16 autocast "
                            f"{precision_note} (default: fp32, or bf16 when launched with accelerate's mixed "
                            "precision bf16)")
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar")


def with_launcher_settings(args: argparse.Namespace, script: str) -> argparse.Namespace:
    """`args` with --precision settled against what `accelerate launch` asks for (`vqhit.launcher`): the launcher's
    bf16 becomes --precision bf16 where the script offers it, and is refused where it does not."""
    from . import launcher

    precision = launcher.script_precision(getattr(args, "precision", None), script)
    if hasattr(args, "precision"):
        args.precision = precision
    elif precision != "fp32":
        raise UsageError(f"the launcher asks for mixed precision {precision}, and {script} runs in fp32 only; launch "
                         "it with --mixed_precision no")
    return args


def add_inception_weights_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--inception-weights", default=None, help="Local file of torch-fidelity's FID Inception "
                        "weights (weights-inception-2015-12-05-6726825d.pth) for offline use; default: downloaded once")


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


@contextmanager
def naming_model_options(model: str, options: dict) -> Iterator[None]:
    """A ValueError raised while a preset's config or modules are built with --model-option values (an unknown key,
    a wrong type, an impossible architecture, a zero codebook size) is the user's: name them. Without options the
    preset itself failed: a bug, which keeps its traceback."""
    try:
        yield
    except ValueError as err:
        if not options:
            raise
        given = " ".join(f"{k}={v}" for k, v in options.items())
        raise UsageError(f"--model {model} --model-option {given}: {err}") from None


def _message(err: UsageError) -> str:
    """The error's message on one line. An error raised in a DataLoader worker comes back wrapped, with the
    worker's traceback in its message; the original message is its last line."""
    text = str(err)
    if "\nOriginal Traceback" in text:
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split())


def run(main, argv: list[str] | None = None):
    """Run a script's `main(argv)`: a UsageError ends the script with one line and status 2; a bug keeps its
    traceback. Returns what `main` returns.

    However it ends, this process's part of a process group ends before the interpreter does
    (`vqhit.distributed.leave_process_group`); the exit status is set once the error and the frames it holds (a
    trainer's DDP models, which hold the group too) are released, so that the group really ends."""
    from .distributed import leave_process_group  # here: torch is imported once a script runs, not for --help

    with leave_process_group(), warnings.catch_warnings():  # the warning settings below end with `main`
        warnings.showwarning = _show_warning
        # A warning is worth one printing: torch's DataLoader, for one, repeats its worker-count warning from
        # another line when iteration starts.
        warnings.filterwarnings("once", category=UserWarning)
        try:
            return main(argv)
        except UsageError as err:
            rank = _rank()
            if rank == 0:  # every process meets the same mistake; one line is enough
                print(f"error: {_message(err)}", file=sys.stderr, flush=True)
            elif isinstance(err, OwnDataError):  # ... except one in this process's own share of the data
                print(f"error (process {rank}): {_message(err)}", file=sys.stderr, flush=True)
            status = 2
        except KeyboardInterrupt as err:  # Ctrl-C: the user knows why it stopped; say what is left, not where it was
            if _rank() == 0:
                print(str(err) or "interrupted", file=sys.stderr, flush=True)
            status = EXIT_INTERRUPTED
        except Preempted as stopped:  # stopped by a signal, with a checkpoint: said already
            status = stopped.code
    sys.exit(status)
