"""Training configuration: one flat dataclass, read from YAML, every key overridable on the command line.

    python scripts/train_gan.py --config configs/ffhq256_gan.yaml --lr 2e-5 --model-option norm=syncbatch

Where the values come from, lowest first (`resolve_config`):
  1. the dataclass defaults below: the settings the paper's recipes share;
  2. the recipe of the chosen preset (`vqhit.recipes.RECIPES`: the paper's for paper presets, the CPU demo's for
     the tiny ones; the default model is the demo's) — or, when resuming, the configuration saved in the
     checkpoint instead of 1-2;
  3. the YAML file of `--config`;
  4. the command line.
So any flag changes one setting of the recipe its model implies: `--steps 1500` alone is the demo with more steps.

Each field's `help` is what `--help` prints. An unknown key or a value of the wrong type, in the YAML file or on
the command line, is an error that names the key. Numbers parse as numbers however they are written (YAML 1.1
reads `1e-4` as a string; it is converted for a float key).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import tempfile
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .cli import ArgumentParser
from .config_values import convert_value
from .data import check_source
from .data.config import BAD_IMAGES, NOT_FROM_TRAINING, TRAINING_NAMES, TRANSFORMS
from .data.config import LIMITS as DATA_LIMITS
from .errors import NotFoundError, UsageError
from .files import check_output_folder
from . import launcher
from .resume import check_resumable, resolve_resume
from .precision import PRECISIONS, normalize as normalize_precision
from .preemption import DEFAULT_STOP_SIGNALS, parse_signals
from .presets import GENERATOR_PRESETS, TOKENIZER_PRESETS
from .recipes import DEFAULT_MODEL, RECIPES, recipe_kind

TASKS = ("gan", "vqhit")
SCRIPT = {"gan": "train_gan.py", "vqhit": "train_vqhit.py"}


def opt(default, help: str, choices=None, task: str | None = None):
    """A config key; `task` set: the key means something to that task's script only, the other does not offer it."""
    return field(default=default, metadata={"help": help, "choices": choices, "task": task})


def opt_factory(factory, help: str):
    return field(default_factory=factory, metadata={"help": help})


# Defaults that follow another choice: key -> (the key it follows, its value for each choice). Left unset, such a
# key gets the value of its choice; it is saved unset, so a resume that changes the choice gets the new value.
DERIVED_DEFAULTS = {"perceptual_weight": ("perceptual", {"vgg_l2": 5e-5, "lpips": 1.0, "none": 0.0})}


@dataclass
class TrainConfig:
    # -- model ------------------------------------------------------------------------------------------
    model: str = opt("hit-tiny", "Model preset (see vqhit.list_presets()): a hit-* generator for train_gan.py, "
                     "a vqhit-*/vqgan-* tokenizer for train_vqhit.py. Its recipe sets the defaults of the other keys: "
                     "the paper's for paper presets, the CPU demo's for tiny ones")
    model_options: dict = opt_factory(dict, "Overrides of the preset's config, e.g. {norm: syncbatch}; on the "
                                      "command line --model-option KEY=VALUE (repeatable, VALUE parsed as YAML)")
    init_from: str | None = opt(None, "Start from a save_pretrained folder (or Hub id) of the same architecture; "
                                "runtime model options (freeze_*, checkpoint_mlp, syncbatch) may differ")
    taming_checkpoint: str | None = opt(None, "Import encoder, quant_conv and codebook from a "
                                        "taming VQGAN .ckpt (combine with model option freeze_encoder/freeze_codebook)",
                                        task="vqhit")
    disc_channel_multiplier: int = opt(1, "Discriminator channel multiplier m: 1 for ImageNet, 2 for faces")
    disc_max_channels: int = opt(512, "Cap on the discriminator's widths; 512 is the paper's table, the tiny CPU "
                                 "demos use 64")
    # -- data -------------------------------------------------------------------------------------------
    data: str = opt("builtin:photos", "Training images: 'builtin:photos' (scikit-image's sample photos, offline), "
                    "a local image folder, or a Hugging Face Hub dataset id")
    data_split: str = opt("train", "Dataset split")
    image_column: str = opt("image", "Image column of a Hub dataset")
    label_column: str | None = opt(None, "Optional label column of a Hub dataset (kept in batches, unused by training)")
    streaming: bool = opt(False, "Stream a Hub dataset instead of downloading it whole")
    shuffle_buffer: int = opt(1000, "Streaming: rows in each stream's shuffle buffer (one stream per process and "
                              "DataLoader worker); a resume reads about N x ln(N) rows of each stream again")
    open_shards: int = opt(4, "Streaming: shards each stream reads at once, a row from each in turn (mixes shards "
                           "that each hold few classes); a resume reads each open shard again up to where it was")
    transform: str = opt("random_crop", "Training transform",  # imagenet_gan_eval: imagenet_gan's evaluation crop
                         [t for t in TRANSFORMS if t != "imagenet_gan_eval"])
    flip: bool = opt(True, "Random horizontal flips")
    min_crop_area: float = opt(1.0, "random_crop: each crop covers a random fraction, uniform in [N, 1], of the area "
                               "of the short side's square, so the model sees several scales; 1 = the whole short "
                               "side")
    bad_images: str = opt("skip", "Unreadable images: skip them (counted, warned with the file name) or raise",
                          list(BAD_IMAGES))
    min_size: int = opt(0, "Images whose short side is below N are bad images (skipped or raised); 0 = keep every "
                        "image, upsampling small ones as ADM's crop does (one warning, then counted)")
    max_images: int | None = opt(None, "Use only the first N images (quick runs)")
    num_workers: int = opt(4, "DataLoader worker processes per training process")
    data_timeout: float = opt(300.0, "Seconds to wait for a batch from the DataLoader workers before the run stops "
                              "with an error saying the data stalled (a hung network or file system read); 0 = wait "
                              "forever. Without workers (--num-workers 0) reads are not timed")
    heldout_data: str | None = opt(None, "Images never trained on, reconstructed at the end of "
                                   "training (PSNR, SSIM, codebook usage printed, grid saved in samples/); e.g. "
                                   "'builtin:photos-heldout'", task="vqhit")
    # -- optimisation -----------------------------------------------------------------------------------
    batch_size: int = opt(32, "Images per process per micro-batch (global batch = this x processes x grad_accum; "
                          "the paper's is 256, 32 at 1024x1024)")
    grad_accum: int = opt(1, "Gradient accumulation steps per optimiser step")
    steps: int = opt(500_000, "Optimiser steps to train for (a resume may raise it)")
    lr: float = opt(1e-4, "Learning rate of the generator/autoencoder and the discriminator (the same for both); a "
                    "resume applies the value given here")
    adam_betas: list = opt_factory(lambda: [0.0, 0.99], "Adam betas (two numbers) for both networks; a resume "
                                   "applies the values given here")
    r1_weight: float = opt(10.0, "R1 weight as the paper writes it: r1_weight * E||grad D(x)||^2 "
                           "(StyleGAN's gamma = 2 x this); 0 disables R1")
    r1_interval: int = opt(1, "Apply R1 every k steps with weight x k (lazy regularisation); 1 = every step")
    bcr_weight: float = opt(0.0, "Balanced consistency regularisation weight (paper: 10 on faces, with the lr "
                            "halved; the face recipes' lr already is); 0 disables bCR")
    lecam_weight: float = opt(0.0, "LeCam regularisation of the discriminator (Tseng et al. 2021; not in the paper; "
                              "0 disables it)")
    lecam_decay: float = opt(0.99, "EMA decay of LeCam's anchors (the running means of D's real and fake logits)")
    ema_decay: float = opt(0.999, "EMA decay of the generator/decoder (parameters and BatchNorm statistics)")
    ema_start: int = opt(10, "Step at which the EMA starts averaging (before it, it copies)")
    precision: str = opt("fp32", "Precision of the networks: 'fp32', or 'bf16' autocast (R1 stays in fp32); see "
                         "vqhit.precision", list(PRECISIONS))
    compile: bool = opt(False, "torch.compile the generator/decoder (never the discriminator: R1 needs double "
                        "backward)")
    seed: int = opt(0, "Random seed (latents are seeded per process)")
    cpu_threads: int = opt(0, "Threads per process when training on CPU: 0 = as launched (accelerate launch "
                           "starts one, or OMP_NUM_THREADS), -1 = every core this process may use, shared among "
                           "this machine's processes, N = N")
    deterministic: bool = opt(False, "Deterministic kernels (PyTorch's deterministic algorithms, cuDNN's deterministic "
                              "convolutions, CUBLAS_WORKSPACE_CONFIG=:4096:8), so that on a GPU the same command gives "
                              "the same weights twice and a resumed run those of an uninterrupted one; slower, and an "
                              "operation without a deterministic kernel stops the run naming it. CPU runs are "
                              "bit-exact without it")
    # -- tokenizer losses (train_vqhit.py only: train_gan.py does not offer them) ------------------------
    perceptual: str = opt("vgg_l2", "Perceptual loss: 'vgg_l2' (the paper's raw VGG16 features), 'lpips' "
                          "(LPIPS-VGG, the modern choice) or 'none'", ["lpips", "vgg_l2", "none"], task="vqhit")
    perceptual_weight: float | None = opt(None, "Weight of the perceptual loss; default: follows --perceptual, the "
                                          "paper's 5e-5 for vgg_l2, 1.0 for lpips, 0 for none (the scales are "
                                          "explained in vqhit/losses.py: every squared norm is a per-element mean)",
                                          task="vqhit")
    perceptual_pretrained: bool = opt(True, "Use ImageNet-pretrained VGG (downloaded when online, or from "
                                      "--vgg-weights); false = random VGG (tests, offline demos)", task="vqhit")
    vgg_weights: str | None = opt(None, "Local torchvision vgg16 state dict, for offline machines", task="vqhit")
    adv_weight: float = opt(0.1, "Weight of the adversarial term of the tokenizer (the paper's lambda2 = 0.1)",
                            task="vqhit")
    adv_start: int = opt(0, "Step at which the tokenizer's adversarial term (and D training) starts", task="vqhit")
    adaptive_adv_weight: bool = opt(False, "Scale the adversarial term by taming's gradient-norm ratio at the "
                                    "decoder's last layer", task="vqhit")
    # -- output -----------------------------------------------------------------------------------------
    output_dir: str | None = opt(None, "Where checkpoints, samples, TensorBoard logs and the exported model go "
                                 "(default: runs/MODEL)")
    overwrite: bool = opt(False, "Start a fresh run in an output folder that holds an earlier run's checkpoints or "
                          "model/, deleting them (without it such a folder is refused)")
    log_every: int = opt(100, "Log scalars to TensorBoard every N steps")
    sample_every: int = opt(2000, "Save a PNG grid of samples / reconstructions every N steps")
    checkpoint_every: int = opt(5000, "Save a resumable checkpoint (and export the EMA model) every N steps")
    keep_checkpoints: int = opt(3, "Keep the last K checkpoints")
    resume: str | None = opt(None, "'auto': continue from the newest checkpoint in --output-dir when there is one, "
                             "else start fresh (one command line for the first start and every restart); 'latest': "
                             "the newest checkpoint, which must exist; or a checkpoint folder. The checkpoint's "
                             "saved config is the base, and what the command line gives wins")
    stop_signals: str = opt(DEFAULT_STOP_SIGNALS, "Signals that stop the run cleanly (comma-separated, or 'none'): "
                            "every process finishes its step, one checkpoint is written at the step reached, and "
                            "the process exits with status 75; rerun the same command with --resume auto")
    checkpoint_every_minutes: float = opt(0.0, "Also write a checkpoint every N minutes of wall-clock time "
                                          "(decided by all processes together); 0 = only every --checkpoint-every "
                                          "steps")
    collective_timeout: float = opt(600.0, "Seconds a process waits for the others in a collective (a gradient "
                                    "all-reduce, a barrier) before it fails: when a process dies or hangs, the "
                                    "others exit after this long instead of waiting forever")
    num_samples: int = opt(16, "Images in each sample / reconstruction grid")

    def __post_init__(self):
        if self.precision == "fp16":
            raise UsageError("--precision fp16 is not supported: R1's double backward overflows fp16's range and a "
                             "grad scaler does not cover it; use --precision bf16 (or fp32)")
        self.precision = normalize_precision(self.precision)  # a saved config may say 'no'
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise UsageError(f"{flag(f.name)}: {getattr(self, f.name)!r} is not one of {', '.join(choices)}")
        for name, (valid, rule) in LIMITS.items():
            value = getattr(self, name)
            if value is not None and not valid(value):  # None: unset (max_images: all; a derived weight: later)
                raise UsageError(f"{flag(name)} {rule}, got {value}")
        try:
            betas = [convert_value(b, float) for b in self.adam_betas]
        except TypeError:
            betas = []
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise UsageError(f"--adam-betas must be two numbers in [0, 1), e.g. --adam-betas 0.0 0.99; got "
                             f"{self.adam_betas!r}")
        self.adam_betas = betas
        parse_signals(self.stop_signals)
        if self.output_dir is None:
            self.output_dir = f"runs/{self.model}"
        self.resume_checkpoint = None  # the checkpoint folder that --resume names, found by `resolve_config`
        self.derived_keys = tuple(key for key in DERIVED_DEFAULTS if getattr(self, key) is None)
        for key in self.derived_keys:
            choice, values = DERIVED_DEFAULTS[key]
            setattr(self, key, values[getattr(self, choice)])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _at_least(low: int):
    return (lambda v: v >= low), f"must be at least {low}"


def _in(low: float, high: float, open_high: bool = False):
    return ((lambda v: low <= v < high) if open_high else (lambda v: low <= v <= high),
            f"must be in [{low}, {high}{')' if open_high else ']'}")


_WEIGHT = (lambda v: math.isfinite(v) and v >= 0), "must be a finite number >= 0 (0 disables the term)"

# The valid values of the numeric keys: (test, what the error says). Checked when a TrainConfig is made, so a value
# the networks, the optimiser or the data would refuse (or silently misuse) is refused before anything is built,
# naming its option, whether it came from the command line, a --config file or a checkpoint's saved config.
LIMITS = {
    **{name: _at_least(1) for name in ("batch_size", "grad_accum", "steps", "r1_interval", "log_every",
                                       "sample_every", "checkpoint_every", "keep_checkpoints", "num_samples",
                                       "disc_channel_multiplier", "disc_max_channels")},
    **{name: _at_least(0) for name in ("num_workers", "ema_start", "adv_start")},
    # the data settings' rules are the data's own (vqhit.data.config), under the training config's names
    **{TRAINING_NAMES.get(name, name): rule for name, rule in DATA_LIMITS.items() if name not in NOT_FROM_TRAINING},
    "cpu_threads": _at_least(-1),
    "seed": _in(0, 2**32 - 1),  # numpy's seeds
    "lr": ((lambda v: math.isfinite(v) and v > 0), "must be a finite number > 0"),
    "ema_decay": _in(0, 1),
    "lecam_decay": _in(0, 1, open_high=True),
    **{name: _WEIGHT for name in ("r1_weight", "bcr_weight", "lecam_weight", "adv_weight", "perceptual_weight")},
    "checkpoint_every_minutes": ((lambda v: v >= 0), "must be >= 0"),
    "collective_timeout": ((lambda v: 0 < v < math.inf), "must be a finite number of seconds > 0"),
    "data_timeout": ((lambda v: 0 <= v < math.inf), "must be a finite number of seconds >= 0 (0 waits forever)"),
}


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def flag(key: str) -> str:
    """The command-line option of a config key: what error messages name (batch_size -> --batch-size)."""
    return "--model-option" if key == "model_options" else "--" + key.replace("_", "-")


def _field_type(f: dataclasses.Field):
    """The plain type of a field: int, float, str, bool, list or dict (Optional[...] unwrapped)."""
    t = typing.get_type_hints(TrainConfig)[f.name]
    args = [a for a in typing.get_args(t) if a is not type(None)]
    if args:
        t = args[0]
    return typing.get_origin(t) or t


def _coerce(name: str, value, f: dataclasses.Field):
    """The value as the field's type ('1e-4' for a float key is the number), or an error naming the key."""
    t = _field_type(f)
    if value is None and t is dict:  # `model_options:` left empty in a YAML file: no options
        return {}
    if value is None and (f.default is None or t is list):
        return value
    try:
        return convert_value(value, t)  # the one conversion the model configs use too
    except TypeError:
        raise UsageError(f"{flag(name)} must be of type {t.__name__}, got {value!r} ({type(value).__name__})") \
            from None


def config_from_dict(values: dict, source: str = "config") -> TrainConfig:
    """The config of a fresh run from its values as given (no recipe, no checkpoint: `resolve_config` adds both)."""
    if values.get("resume"):
        raise ValueError("a resumed run's config comes from resolve_config, which finds and checks its checkpoint")
    return _make_config(values, source)


def _make_config(values: dict, source: str) -> TrainConfig:
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise UsageError(f"unknown key(s) {unknown} in {source}; see --help for the known keys")
    return TrainConfig(**{k: _coerce(k, v, FIELDS[k]) for k, v in values.items()})


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"--config {path} is a folder; give the path of a YAML file (e.g. one of configs/)")
    if not path.is_file():
        raise NotFoundError(f"--config {path}: no such file")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise UsageError(f"{path} must hold a mapping of config keys to values")
    return values


def _cli_type(t: type, optional: bool):
    """Parse a command-line value as the field's type ('none' for an optional field); YAML for dicts."""
    def parse(text: str):
        if optional and text.lower() in ("none", "null"):
            return None
        return t(text) if t in (int, float, str) else yaml.safe_load(text)
    parse.__name__ = t.__name__  # argparse names the type in its "invalid value" message
    return parse


def task_defaults(task: str, model: str | None = None) -> dict:
    """The defaults a run of `task` starts from: the common paper settings and the recipe of its preset."""
    model = model or DEFAULT_MODEL[task]
    return {**{k: _default(f) for k, f in FIELDS.items()}, "model": model, **RECIPES.get(model, {})}


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def build_parser(description: str, task: str) -> argparse.ArgumentParser:
    """An argparse parser with one --option per TrainConfig field; --help shows the defaults that apply."""
    epilog = (f"Defaults shown are those of --model {DEFAULT_MODEL[task]}, the CPU demo. Another --model starts from "
              f"its own recipe (the paper's for paper presets: vqhit.recipes), --config FILE overrides it and the "
              f"command line overrides the file.")
    parser = ArgumentParser(description=description, epilog=epilog,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of config keys (see configs/); command-line options win")
    defaults = task_defaults(task)
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("task") not in (None, task):
            continue  # not offered: argparse refuses it as an unrecognized argument
        t = _field_type(f)
        flag = "--" + f.name.replace("_", "-")
        choices = f.metadata.get("choices")
        allowed = f"; one of {', '.join(choices)}" if choices else ""
        # a help text that states its default itself (None: derived when the run starts) is not given a second one
        default = "" if "(default:" in f.metadata["help"] else f" (default: {defaults[f.name]!r}{allowed})"
        kwargs = dict(dest=f.name, default=argparse.SUPPRESS, help=f"{f.metadata['help']}{default}")
        if f.name == "model_options":
            parser.add_argument("--model-option", action="append", metavar="KEY=VALUE", **kwargs)
        elif t is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif t is list:
            parser.add_argument(flag, nargs="+", type=yaml.safe_load, metavar="X", **kwargs)
        else:
            parse = normalize_precision if f.name == "precision" else _cli_type(t, optional=f.default is None)
            parser.add_argument(flag, type=parse, metavar=t.__name__.upper(), choices=choices, **kwargs)
    return parser


def _model_options(items: list[str], base: dict) -> dict:
    merged = dict(base or {})
    for item in items:
        if "=" not in item:
            raise UsageError(f"--model-option expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        merged[key.strip()] = yaml.safe_load(value)
    return merged


def saved_config(checkpoint: Path) -> dict:
    """The config a checkpoint was written with (its train_config.yaml)."""
    path = Path(checkpoint) / "train_config.yaml"
    if not path.is_file():
        raise UsageError(f"{checkpoint} has no train_config.yaml: not a checkpoint written by this trainer")
    return load_yaml(path)


def parse_config(argv: list[str] | None, description: str, task: str) -> TrainConfig:
    """The config of a run of `task` from its command line (see the module docstring for the precedence)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    argv = list(argv or [])
    parser = build_parser(description, task)
    args = vars(parser.parse_args(argv))
    config_file = args.pop("config", None)
    file_values = load_yaml(config_file) if config_file else {}
    foreign = [k for k in file_values if k in FIELDS and FIELDS[k].metadata.get("task") not in (None, task)]
    if foreign:  # the script would ignore them
        raise UsageError(f"--config {config_file} sets {', '.join(foreign)}, which only scripts/"
                         f"{SCRIPT[FIELDS[foreign[0]].metadata['task']]} uses; remove it from the file")
    options = args.pop("model_options", None)
    given = launcher.merge({**file_values, **args})  # the launcher's settings count as given options
    if options:
        given["model_options"] = _model_options(options, given.get("model_options"))
    config = resolve_config(given, task, source=str(config_file or "the command line"))
    check_paths(config, task)
    return config


def check_paths(config: TrainConfig, task: str) -> None:
    """Check the folders the run will write and read late, before anything is built: the output folder can be
    made (nothing is left behind by the check), and the held-out images, read only after training, exist."""
    check_output_dir(config.output_dir)
    if task == "vqhit" and config.heldout_data:
        check_source(config.heldout_data, "--heldout-data")


def check_output_dir(output_dir: str) -> None:
    """An error naming --output-dir unless it is a folder, or a folder can be created there: its deepest existing
    folder takes a new sub-folder (made under a unique name and removed, so processes checking at once agree)."""
    if not output_dir:
        raise UsageError("--output-dir is empty; give the folder to write the run to (default: runs/MODEL)")
    path = check_output_folder(Path(output_dir).expanduser())  # neither a file nor under one
    existing = next(p for p in (path, *path.parents) if p.exists())
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".vqhit-check-", dir=existing))
    except OSError as err:
        raise UsageError(f"--output-dir {output_dir}: cannot create a folder in {existing} ({err.strerror}); choose "
                         f"another --output-dir") from None


def resolve_config(given: dict, task: str, source: str = "config") -> TrainConfig:
    """Defaults (or, when resuming, the checkpoint's saved config) < `given` (file values, then command line).

    The one place a run's `--resume` is resolved: the checkpoint it names (`vqhit.resume.resolve_resume`) is read
    and checked against what the run asks for here, and carried as `config.resume_checkpoint` (None: a fresh start)
    to the trainer."""
    unknown = sorted(set(given) - set(FIELDS))
    if unknown:
        raise UsageError(f"unknown key(s) {unknown} in {source}; see --help for the known keys")
    if "model_options" in given:  # checked before a resume merges them with the saved ones
        given = {**given, "model_options": _coerce("model_options", given["model_options"], FIELDS["model_options"])}
    resume = given.get("resume")
    checkpoint = None
    if resume:
        output_dir = given.get("output_dir") or f"runs/{given.get('model') or DEFAULT_MODEL[task]}"
        checkpoint = resolve_resume(resume, Path(output_dir))  # None: --resume auto with nothing to resume
    if checkpoint is not None:
        saved = saved_config(checkpoint)
        _check_task(saved, checkpoint, task)
        base = {k: v for k, v in saved.items() if k not in START_ACTIONS}
        base["output_dir"] = given.get("output_dir") or str(checkpoint.parent)
        if "model_options" in given:  # options given on resume add to the saved ones
            given = {**given, "model_options": {**(base.get("model_options") or {}), **given["model_options"]}}
        # start-of-run actions are not repeated, so a job script's one command line serves every restart
        given = {k: v for k, v in given.items() if k not in START_ACTIONS}
        _warn_kept_weights(base, given, checkpoint)
        _warn_changed_data(base, given, checkpoint)
    else:
        base = task_defaults(task, given.get("model"))
    values = {**base, **given}
    if resume:
        values["resume"] = resume
    config = _make_config(values, source)
    check_preset(config.model, task)
    if checkpoint is not None:
        check_resumable(checkpoint, saved, config, task)
    config.resume_checkpoint = checkpoint
    return config


START_ACTIONS = ("overwrite", "init_from", "taming_checkpoint")  # what a resume does not do again


def check_preset(model: str, task: str) -> None:
    """Refuse a --model that is not a preset of `task`'s script, suggesting the closest name."""
    presets = GENERATOR_PRESETS if task == "gan" else TOKENIZER_PRESETS
    if model not in presets:
        close = difflib.get_close_matches(model, presets, n=1)
        raise UsageError(f"--model {model}: {SCRIPT[task]} trains "
                         f"{'generator (hit-*)' if task == 'gan' else 'tokenizer'} presets"
                         f"{f'; did you mean {close[0]}?' if close else ''} Choose one of {', '.join(presets)}")


def _check_task(saved: dict, checkpoint: Path, task: str) -> None:
    """Refuse a checkpoint of the other script's task, naming that script (its model is no preset of this one)."""
    other = "vqhit" if task == "gan" else "gan"
    presets = GENERATOR_PRESETS if other == "gan" else TOKENIZER_PRESETS
    if saved.get("model") in presets:
        raise UsageError(f"--resume {checkpoint}: a checkpoint of scripts/{SCRIPT[other]} (--model {saved['model']}); "
                         f"resume it with that script")


def _warn_kept_weights(saved: dict, given: dict, checkpoint: Path) -> None:
    """A resume that changes a choice keeps a value the run set explicitly for the key that follows it: say so."""
    for key, (choice, _) in DERIVED_DEFAULTS.items():
        if key not in given and saved.get(key) is not None and choice in given and given[choice] != saved.get(choice):
            warnings.warn(f"{flag(choice)} {given[choice]}: keeping {flag(key)} {saved[key]}, which "
                          f"{checkpoint}/train_config.yaml sets for {flag(choice)} {saved.get(choice)}; give "
                          f"{flag(key)} to change it")


def _warn_changed_data(saved: dict, given: dict, checkpoint: Path) -> None:
    """A resume continues at the saved data position, which counts batches of the saved data in the saved seed's
    order: a new --data or --seed makes that position point elsewhere. Allowed (it can be meant), but said."""
    if "data" in given and not _same_source(given["data"], saved.get("data")):
        warnings.warn(f"--data {given['data']}: {checkpoint} was trained on --data {saved.get('data')}; its data "
                      f"position (how far into the old data's epoch the run was) is reused on the new data, which "
                      f"now differs")
    if "seed" in given and given["seed"] != saved.get("seed"):
        warnings.warn(f"--seed {given['seed']}: {checkpoint} was trained with --seed {saved.get('seed')}; the data "
                      f"order follows the seed, so the rest of this epoch is another shuffle (some images seen twice, "
                      f"others skipped) and the sample grids change")


def _same_source(a, b) -> bool:
    """Whether two --data values name the same images: equal, or the same local folder spelled differently."""
    if a == b:
        return True
    try:
        return Path(str(a)).expanduser().samefile(Path(str(b)).expanduser())
    except OSError:
        return False


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write the config as YAML; keys left to follow another choice (`DERIVED_DEFAULTS`) are written unset."""
    values = config.to_dict()
    values.update({key: None for key in getattr(config, "derived_keys", ())})
    Path(path).write_text(yaml.safe_dump(values, sort_keys=False))


def describe(config: TrainConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def summary(config: TrainConfig, task: str) -> str:
    """One line saying what a run trains, from which recipe, with which changes, and where it writes."""
    recipe = task_defaults(task, config.model)
    ignored = ("model", "output_dir", "resume", "adam_betas", "perceptual_weight")
    changed = {k: v for k, v in config.to_dict().items() if k not in ignored and v != recipe[k]}
    if [float(b) for b in config.adam_betas] != [float(b) for b in recipe["adam_betas"]]:
        changed["adam_betas"] = config.adam_betas
    changes = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in changed.items())
    return (f"{SCRIPT[task]}: {config.model} with {recipe_kind(config.model)}"
            f"{f', changed: {changes}' if changes else ''}; writing to {config.output_dir}/")
