"""`save_pretrained` / `from_pretrained` for every vqhit model: a folder with `config.json` + `model.safetensors`.

A folder that is not on disk is treated as a Hugging Face Hub repository id and downloaded (when online).
Files are written to a temporary name and renamed, so an interrupted save never leaves a half file.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename tmp_path to path (atomic on POSIX)."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def resolve_pretrained(path_or_id: str | os.PathLike) -> Path:
    """A local folder, or a Hub repository id downloaded into the local cache."""
    path = Path(path_or_id)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; pass the folder holding {CONFIG_NAME} and {WEIGHTS_NAME}")
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(str(path_or_id), allow_patterns=[CONFIG_NAME, WEIGHTS_NAME]))


class ConfigMixin:
    """dict / JSON round trip for a config dataclass; an unknown key is an error that lists the known ones."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {sorted(unknown)}; known keys are {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, s: str):
        return cls.from_dict(json.loads(s))


class PretrainedMixin:
    """Mixed into an nn.Module that has a `config` dataclass with `to_dict` / `from_dict`.

    Subclasses set `model_type` (written into config.json, checked on load) and `config_class`.
    """

    model_type: str
    config_class: type

    @classmethod
    def make_config(cls, config=None, **overrides):
        """The given config (default: the class's default config) with keyword overrides applied."""
        config = config or cls.config_class()
        return cls.config_class.from_dict({**config.to_dict(), **overrides}) if overrides else config

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        meta = {"model_type": self.model_type, **self.config.to_dict()}
        atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
        atomic_write(directory / CONFIG_NAME, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
        return directory

    @classmethod
    def read_config(cls, path_or_id):
        directory = resolve_pretrained(path_or_id)
        if not (directory / CONFIG_NAME).exists():
            raise ValueError(f"no {CONFIG_NAME} in {directory}: is this a folder written by save_pretrained?")
        meta = json.loads((directory / CONFIG_NAME).read_text())
        model_type = meta.pop("model_type", None)
        if model_type != cls.model_type:
            raise ValueError(f"{directory} holds a {model_type!r} checkpoint, not a {cls.model_type!r} one; "
                             f"load it with the matching class")
        return directory, cls.config_class.from_dict(meta)

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, map_location: str | torch.device = "cpu"):
        directory, config = cls.read_config(path_or_id)
        model = cls(config)
        model.load_weights(directory, map_location)
        return model

    def load_weights(self, path_or_id, map_location: str | torch.device = "cpu") -> None:
        """Load a save_pretrained folder into this model, strictly; its config must describe this model."""
        directory, config = self.read_config(path_or_id)
        if config.to_dict() != self.config.to_dict():
            ours, theirs = self.config.to_dict(), config.to_dict()
            diff = {k: (theirs.get(k), ours.get(k)) for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k)}
            raise ValueError(f"checkpoint {directory} was saved for another configuration "
                             f"(preset {theirs.get('preset', '?')!r}); differing keys (checkpoint, this model): "
                             f"{diff}. Build the model with from_pretrained instead")
        state = load_file(str(directory / WEIGHTS_NAME), device=str(map_location))
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"checkpoint {directory} does not fit this model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
