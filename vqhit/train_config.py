"""Training configuration: one flat dataclass, read from YAML, every key overridable on the command line.

    python scripts/train_gan.py --config configs/ffhq256_gan.yaml --lr 2e-5 --model-option norm=syncbatch

Each field's `help` is what `--help` prints. An unknown key or a value of the wrong type, in the YAML file
or on the command line, is an error that names the key.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


def opt(default, help: str, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


def opt_factory(factory, help: str):
    return field(default_factory=factory, metadata={"help": help})


@dataclass
class TrainConfig:
    # -- model ------------------------------------------------------------------------------------------
    model: str = opt("hit-tiny", "Model preset (see vqhit.list_presets()): a hit-* generator for train_gan.py, "
                     "a vqhit-* tokenizer for train_vqhit.py")
    model_options: dict = opt_factory(dict, "Overrides of the preset's config, e.g. {norm: syncbatch}; on the "
                                      "command line --model-option KEY=VALUE (repeatable, VALUE parsed as YAML)")
    init_from: str | None = opt(None, "Start from a save_pretrained folder (or Hub id) of the same model")
    taming_checkpoint: str | None = opt(None, "Tokenizer only: import encoder, quant_conv and codebook from a "
                                        "taming VQGAN .ckpt (combine with model option freeze_encoder/freeze_codebook)")
    disc_channel_multiplier: int = opt(1, "Discriminator channel multiplier m (SPEC §3): 1 for ImageNet, 2 for faces")
    disc_max_channels: int = opt(512, "Cap on the discriminator's widths; 512 is the paper's table, the tiny CPU "
                                 "demos use 64")
    # -- data -------------------------------------------------------------------------------------------
    data: str = opt("builtin:photos", "Training images: 'builtin:photos' (tiles of scikit-image's sample photos, "
                    "offline), a local image folder, or a Hugging Face Hub dataset id")
    data_split: str = opt("train", "Dataset split")
    image_column: str = opt("image", "Image column of a Hub dataset")
    label_column: str | None = opt(None, "Optional label column of a Hub dataset (kept in batches, unused by training)")
    streaming: bool = opt(False, "Stream a Hub dataset instead of downloading it whole")
    transform: str = opt("random_crop", "Training transform",
                         ["random_crop", "center_crop", "adm_center_crop", "imagenet_gan", "resize"])
    flip: bool = opt(True, "Random horizontal flips")
    bad_images: str = opt("skip", "Unreadable or too-small images: skip them (counted, warned with the file "
                          "name) or raise", ["skip", "raise"])
    max_images: int | None = opt(None, "Use only the first N images (quick runs)")
    num_workers: int = opt(2, "DataLoader worker processes per training process")
    # -- optimisation -----------------------------------------------------------------------------------
    batch_size: int = opt(8, "Images per process per micro-batch (global batch = this x processes x grad_accum)")
    grad_accum: int = opt(1, "Gradient accumulation steps per optimiser step")
    steps: int = opt(300, "Optimiser steps to train for")
    lr: float = opt(1e-4, "Learning rate of the generator/autoencoder and the discriminator (SPEC §5: G = D)")
    adam_betas: list = opt_factory(lambda: [0.0, 0.99], "Adam betas for both networks")
    r1_weight: float = opt(10.0, "R1 weight as the paper writes it: r1_weight * E||grad D(x)||^2 "
                           "(StyleGAN's gamma = 2 x this); 0 disables R1")
    r1_interval: int = opt(1, "Apply R1 every k steps with weight x k (lazy regularisation); 1 = every step")
    bcr_weight: float = opt(0.0, "Balanced consistency regularisation weight (paper: 10 on faces, with the lr "
                            "halved; the face recipes' lr already is); 0 disables bCR")
    ema_decay: float = opt(0.999, "EMA decay of the generator/decoder (parameters and BatchNorm statistics)")
    ema_start: int = opt(10, "Step at which the EMA starts averaging (before it, it copies)")
    precision: str = opt("no", "Mixed precision: 'no' (fp32) or 'bf16' autocast; fp16 is refused (R1 needs fp32 "
                         "range)", ["no", "bf16", "fp16"])
    compile: bool = opt(False, "torch.compile the generator/decoder (never the discriminator: R1 needs double "
                        "backward)")
    seed: int = opt(0, "Random seed (latents are seeded per process)")
    # -- tokenizer losses (train_vqhit.py) --------------------------------------------------------------
    perceptual: str = opt("lpips", "Perceptual loss: 'lpips' (LPIPS-VGG, weight ~1), 'vgg_l2' (the paper's raw "
                          "VGG features, weight 5e-5) or 'none'", ["lpips", "vgg_l2", "none"])
    perceptual_weight: float = opt(1.0, "Weight of the perceptual loss (the paper's lambda1 = 5e-5 with vgg_l2)")
    perceptual_pretrained: bool = opt(True, "Use ImageNet-pretrained VGG (downloaded when online, or from "
                                      "--vgg-weights); false = random VGG (tests, offline demos)")
    vgg_weights: str | None = opt(None, "Local torchvision vgg16 state dict, for offline machines")
    adv_weight: float = opt(0.1, "Weight of the adversarial term of the tokenizer (the paper's lambda2 = 0.1)")
    adv_start: int = opt(0, "Step at which the tokenizer's adversarial term (and D training) starts")
    adaptive_adv_weight: bool = opt(False, "Scale the adversarial term by taming's gradient-norm ratio at the "
                                    "decoder's last layer")
    # -- output -----------------------------------------------------------------------------------------
    output_dir: str = opt("runs/demo", "Where checkpoints, samples, TensorBoard logs and the exported model go")
    log_every: int = opt(10, "Log scalars to TensorBoard every N steps")
    sample_every: int = opt(100, "Save a PNG grid of samples / reconstructions every N steps")
    checkpoint_every: int = opt(100, "Save a resumable checkpoint (and export the EMA model) every N steps")
    keep_checkpoints: int = opt(3, "Keep the last K checkpoints")
    resume: str | None = opt(None, "Resume from 'latest' or a checkpoint folder")
    num_samples: int = opt(16, "Images in each sample / reconstruction grid")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name}: {getattr(self, f.name)!r} is not one of {choices}")
        if self.precision == "fp16" and self.r1_weight > 0:
            raise ValueError("precision fp16 is refused while R1 is on: the R1 gradient penalty overflows fp16's "
                             "range; use --precision bf16 (or --precision no)")
        for name in ("batch_size", "grad_accum", "steps", "r1_interval", "log_every", "sample_every",
                     "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _field_type(f: dataclasses.Field):
    """The plain type of a field: int, float, str, bool, list or dict (Optional[...] unwrapped)."""
    hints = typing.get_type_hints(TrainConfig)
    t = hints[f.name]
    args = [a for a in typing.get_args(t) if a is not type(None)]
    if args:
        t = args[0]
    return typing.get_origin(t) or t


def _coerce(name: str, value, f: dataclasses.Field):
    t = _field_type(f)
    if value is None and (f.default is None or t in (dict, list)):
        return value
    ok = (isinstance(value, bool) if t is bool else
          isinstance(value, (int, float)) and not isinstance(value, bool) if t is float else
          isinstance(value, int) and not isinstance(value, bool) if t is int else isinstance(value, t))
    if not ok:
        raise ValueError(f"config key {name!r} must be of type {t.__name__}, got {value!r} "
                         f"({type(value).__name__})")
    return float(value) if t is float else value


def config_from_dict(values: dict, source: str = "config") -> TrainConfig:
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {source}; see --help for the known keys")
    return TrainConfig(**{k: _coerce(k, v, fields[k]) for k, v in values.items()})


def load_yaml(path: str | Path) -> dict:
    values = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of config keys to values")
    return values


def _cli_type(t: type, optional: bool):
    """Parse a command-line value as the field's type ('none' for an optional field); YAML for dicts."""
    def parse(text: str):
        if optional and text.lower() in ("none", "null"):
            return None
        return t(text) if t in (int, float, str) else yaml.safe_load(text)
    parse.__name__ = t.__name__  # argparse names the type in its "invalid value" message
    return parse


def build_parser(description: str, default_config: str | Path | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one --option per TrainConfig field."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of config keys (see configs/); command-line options win. "
                        f"Default: {default_config or 'none (the built-in defaults below)'}")
    for f in dataclasses.fields(TrainConfig):
        t = _field_type(f)
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        choices = f.metadata.get("choices")
        allowed = f"; one of {', '.join(choices)}" if choices else ""
        kwargs = dict(dest=f.name, default=argparse.SUPPRESS,
                      help=f"{f.metadata['help']} (default: {default!r}{allowed})")
        if f.name == "model_options":
            parser.add_argument("--model-option", action="append", metavar="KEY=VALUE", **kwargs)
        elif t is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif t is list:
            parser.add_argument(flag, nargs="+", type=yaml.safe_load, **kwargs)
        else:
            parser.add_argument(flag, type=_cli_type(t, optional=f.default is None), metavar=t.__name__.upper(),
                                choices=choices, **kwargs)
    return parser


def parse_config(argv: list[str] | None, description: str, default_config: str | Path | None = None) -> TrainConfig:
    """TrainConfig defaults < the YAML file (--config, else `default_config`) < the command line."""
    args = vars(build_parser(description, default_config).parse_args(argv))
    config_file = args.pop("config", None) or default_config
    values = load_yaml(config_file) if config_file else {}
    options = args.pop("model_options", None)
    values.update(args)
    if options:
        merged = dict(values.get("model_options") or {})
        for item in options:
            if "=" not in item:
                raise ValueError(f"--model-option expects KEY=VALUE, got {item!r}")
            key, value = item.split("=", 1)
            merged[key] = yaml.safe_load(value)
        values["model_options"] = merged
    return config_from_dict(values, source=str(config_file or "the command line"))


def save_config(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def describe(config: TrainConfig) -> str:
    return json.dumps(config.to_dict(), indent=2)
