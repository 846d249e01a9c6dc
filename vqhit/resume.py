"""Which checkpoint a run resumes: `--resume auto|latest|PATH` resolved to a checkpoint folder, intact ones
preferred, checked against what the run asks for (the same architecture, a --steps it has not passed), and the
choice agreed by every process (the main process's). Below `checkpointing` (which writes checkpoints) and
`train_config` (which resolves the resume once, when the run's configuration is made), so that both can ask."""
from __future__ import annotations

import json
from pathlib import Path

from .cli import naming_model_options
from .distributed import all_gather_objects, rank
from .errors import UsageError

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "train_state.json"  # written last into a checkpoint: what a resume reads first


def checkpoint_step(path: Path) -> int | None:
    name = Path(path).name
    suffix = name[len(CHECKPOINT_PREFIX):]
    return int(suffix) if name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """The complete checkpoints of a run folder, oldest first."""
    found = [p for p in Path(output_dir).glob(CHECKPOINT_PREFIX + "*") if checkpoint_step(p) is not None and p.is_dir()]
    return sorted(found, key=checkpoint_step)


def read_state(checkpoint: Path) -> dict:
    path = Path(checkpoint) / STATE_FILE
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("no integer 'step'")
        return state
    except FileNotFoundError:
        raise UsageError(f"{checkpoint} is not a checkpoint written by this trainer (no {STATE_FILE}); pass a "
                         f"{CHECKPOINT_PREFIX}N folder or --resume latest") from None
    except ValueError as e:
        raise UsageError(f"{path} is damaged ({e}); resume from an earlier {CHECKPOINT_PREFIX}N folder") from None


RESUME_CHOICES = ("auto", "latest")  # besides a checkpoint folder's path


def checkpoint_damage(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed, found cheaply (no tensor is read), or None when it looks intact: its
    train_state.json is readable, every file it lists is there with the size it was written with, and every
    safetensors file's header is readable and ends where the file ends (what a truncated copy or a flaky mount
    breaks)."""
    try:
        state = read_state(checkpoint)
    except UsageError as err:
        return str(err).split(";")[0]
    sizes = state.get("files", {})
    for name, size in sizes.items():
        path = Path(checkpoint) / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
        if name.endswith(".safetensors") and not _safetensors_intact(path):
            return f"{name} is not a readable safetensors file"
    return None


def _safetensors_intact(path: Path) -> bool:
    """The 8-byte header length, the JSON header, and the data the header promises, all within the file."""
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if length > path.stat().st_size:
                return False
            header = json.loads(f.read(length))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return 8 + length + end == path.stat().st_size
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False


def resolve_resume(resume: str | None, output_dir: Path) -> Path | None:
    """The checkpoint folder that `--resume auto|latest|PATH` names (None for a fresh run).

    `auto` is the one command line for a first start and every restart (a job script, a requeue, an elastic
    restart): the newest intact checkpoint of `output_dir` when there is one, else a fresh start. `auto` and
    `latest` pass over damaged checkpoints (`checkpoint_damage`) to the newest intact one (the run's folder
    preparation moves the damaged ones aside); a folder whose checkpoints are all damaged is refused, never started
    afresh. A checkpoint named by its path must be intact.
    """
    if resume is None:
        return None
    output_dir = Path(output_dir)
    if resume in RESUME_CHOICES:
        found = list_checkpoints(output_dir) if output_dir.is_dir() else []
        damage = {}
        for checkpoint in reversed(found):
            damage[checkpoint] = checkpoint_damage(checkpoint)
            if damage[checkpoint] is None:
                return checkpoint
        if found:
            raise _all_damaged(resume, output_dir, damage)
        if resume == "auto":
            return None
        raise _nothing_latest(output_dir)
    path = Path(resume)
    if not path.is_dir():
        raise UsageError(f"--resume {resume}: no such folder; pass a {CHECKPOINT_PREFIX}N folder, 'auto' or 'latest'")
    read_state(path)  # a clear error for a folder that is not a checkpoint
    damage = checkpoint_damage(path)
    if damage:
        raise _damaged(resume, path, damage)
    return path


def _all_damaged(resume: str, output_dir: Path, damage: dict) -> UsageError:
    return UsageError(f"--resume {resume}: every checkpoint in {output_dir} is damaged ("
                      + "; ".join(f"{p.name}: {why}" for p, why in damage.items()) + "); nothing can be resumed. "
                      "Restore one from a copy, or start again with --overwrite")


def _nothing_latest(output_dir: Path) -> UsageError:
    if not output_dir.is_dir():
        return UsageError(f"--resume latest: {output_dir} does not exist; give the --output-dir of the run to "
                          f"continue, or --resume auto to start fresh when there is nothing to continue")
    return UsageError(f"--resume latest: {output_dir} holds no {CHECKPOINT_PREFIX}N folder yet (the run stopped "
                      f"before its first checkpoint); start it again without --resume, or use --resume auto")


def _damaged(resume: str, path: Path, damage: str) -> UsageError:
    return UsageError(f"--resume {resume}: the checkpoint is damaged ({damage}); resume an earlier one "
                      f"(--resume {path.parent}/{CHECKPOINT_PREFIX}M), or --resume auto for the newest intact one")


def agree_on_resume(own: Path | None) -> Path | None:
    """The checkpoint that every process resumes: the main process's choice (`own` is this process's). A process
    that resolved another one resumes the main process's when it sees it intact (a directory listing that this node
    saw late); when it does not, every process stops with one line: the output folder is not shared alike."""
    choices = all_gather_objects(None if own is None else str(own))
    chosen = None if choices[0] is None else Path(choices[0])
    problem = None
    if choices[rank()] != choices[0]:
        if chosen is None:
            problem = f"process {rank()} sees {own}, which the main process does not see"
        elif not chosen.is_dir() or checkpoint_damage(chosen) is not None:
            problem = f"process {rank()} cannot read {chosen}, which the main process resumes"
    problems = [p for p in all_gather_objects(problem) if p]
    if problems:
        raise UsageError(f"{problems[0]}: --output-dir must be on a file system that every node shares (and sees "
                         "alike); give every process the same folder")
    return chosen


DISCRIMINATOR_OPTIONS = ("disc_channel_multiplier", "disc_max_channels")  # its architecture, beside the resolution


def check_resumable(checkpoint: Path, saved: dict, config, task: str) -> None:
    """Refuse, in one sentence, to resume `checkpoint` (whose train_config.yaml holds `saved`) with another preset,
    architecture option or discriminator architecture than `config`'s, or with a --steps the run is already past
    (equal is fine: the run is finished, and a resume only makes sure its model is exported)."""
    from .models import model_class

    config_class = model_class(task).config_class
    try:
        theirs = config_class.from_preset(saved["model"], **(saved.get("model_options") or {}))
    except Exception as e:  # noqa: BLE001 - the saved config itself no longer builds
        raise UsageError(f"{checkpoint}/train_config.yaml does not describe a model this version builds ({e})") \
            from None
    with naming_model_options(config.model, config.model_options):
        ours = config_class.from_preset(config.model, **config.model_options)
    diff = ours.architecture_differences(theirs)
    if diff:
        raise _other_architecture(checkpoint, saved, diff)
    disc = {f"--{key.replace('_', '-')}": (saved[key], getattr(config, key)) for key in DISCRIMINATOR_OPTIONS
            if key in saved and saved[key] != getattr(config, key)}
    if disc:
        raise _other_discriminator(checkpoint, disc)
    step = read_state(checkpoint)["step"]
    if config.steps < step:
        raise _steps_passed(checkpoint, step, config.steps)


def _other_architecture(checkpoint: Path, saved: dict, diff: dict) -> UsageError:
    return UsageError(
        f"cannot resume {checkpoint}: it was trained as --model {saved['model']} with model options "
        f"{saved.get('model_options') or {}}, this run asks for a different architecture; differing keys "
        f"(checkpoint, this run): {diff}. Resume without changing the model, or start a new run "
        f"(--init-from {checkpoint.parent / 'model'} keeps the weights)")


def _other_discriminator(checkpoint: Path, changed: dict) -> UsageError:
    changes = ", ".join(f"{option} {theirs} -> {ours}" for option, (theirs, ours) in changed.items())
    return UsageError(
        f"cannot resume {checkpoint}: this run asks for another discriminator architecture ({changes}; checkpoint "
        f"-> this run). Resume without changing {' or '.join(changed)}, or start a new run (--init-from "
        f"{checkpoint.parent / 'model'} keeps the generator's weights)")


def _steps_passed(checkpoint: Path, step: int, steps: int) -> UsageError:
    return UsageError(f"--steps {steps} is below the step of {checkpoint} ({step}): the run is already past it. "
                      f"Give --steps {step} or more to continue it, or resume a checkpoint at or before step {steps} "
                      f"(--resume {checkpoint.parent}/{CHECKPOINT_PREFIX}M)")


def interrupted_message(output_dir: Path, step: int, steps: int) -> str:
    """What to do after a Ctrl-C that wrote no checkpoint: which checkpoint resumes, and what is lost."""
    found = list_checkpoints(output_dir)  # complete ones only: one being written is a .tmp folder
    where = (f"the latest checkpoint is {found[-1]}: the same command with --resume auto continues from it, and "
             f"the training since its step {checkpoint_step(found[-1])} is lost" if found else
             "no checkpoint was written yet: the training so far is lost")
    return f"interrupted at step {step} of {steps}; {where}"
