"""Configs, saving, loading and sharing for every vqhit model.

A saved model is a folder: `config.json` (the config dataclass + `model_type`), `model.safetensors` (every
parameter and persistent buffer, BatchNorm statistics included) and a `README.md` model card. The models are
huggingface_hub `PyTorchModelHubMixin`s, so `push_to_hub` uploads that folder as any Hub model. Saving and
loading are written here rather than taken from the mixin, because the mixin would lose guarantees we keep:

- every file is written under a temporary name and renamed, so a kill never leaves a half-written file
  (the mixin deletes config.json first and writes in place), with the mode the user's umask gives new files
  (`vqhit.files.atomic_write`);
- loading is strict, and a config that describes another architecture is refused with the differing keys
  (the mixin loads non-strictly and builds whatever the config says);
- a local path that does not exist is an error, never a Hub request (`vqhit.downloads.local_or_hub`);
- a damaged file is a ValueError that names the file and the fix.

Config keys are of two kinds. *Architecture* keys change the parameters or the function the model computes
in eval mode; *runtime* keys (`RUNTIME_KEYS`: freezing, activation checkpointing, BatchNorm momentum, the
quantizer's training-time behaviour, the preset's name) do not. Weights load into any model with the same
architecture; runtime keys always come from the caller.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import os
import re
import shutil
import tempfile
import types
import typing
from pathlib import Path

import torch
from huggingface_hub import HfApi, PyTorchModelHubMixin
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config_values import convert_value, differences
from ..downloads import local_or_hub
from ..errors import UsageError
from ..files import atomic_write
from .model_card import (CARD_NAME, CONFIG_NAME, DEFAULT_CARD, EVALUATION_PATTERN, LIBRARY, TAGS, TRAINING_STEP_KEY,
                         WEIGHTS_NAME, weights_sha256)



def resolve_pretrained(path_or_id: str | os.PathLike, **hub_kwargs) -> Path:
    """A local folder, or a Hub repository id downloaded into the local cache (`hub_kwargs`: revision, token,
    cache_dir, force_download, local_files_only, as for `huggingface_hub.snapshot_download`)."""
    def download(repo_id: str) -> Path:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME], **hub_kwargs))

    folder = local_or_hub(path_or_id, "model folder", fetch=download)
    if folder.is_file():
        raise UsageError(f"{folder} is a file; pass the folder holding {CONFIG_NAME} and {WEIGHTS_NAME}")
    return folder


def read_config_file(directory: Path) -> dict:
    """The keys of a save_pretrained folder's config.json, `model_type` included; a missing or damaged file is a
    UsageError that says so."""
    file = directory / CONFIG_NAME
    if not file.exists():
        raise UsageError(f"no {CONFIG_NAME} in {directory}: is this a folder written by save_pretrained?")
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _damaged_config(file, err) from None
    if not isinstance(meta, dict):
        raise _not_config_keys(file, meta)
    return meta


def _damaged_config(file: Path, err: Exception) -> UsageError:
    return UsageError(f"{file} is not valid JSON ({err}): the file is damaged or incomplete; save the "
                      f"model again or download it again")


def _not_config_keys(file: Path, meta) -> UsageError:
    return UsageError(f"{file} holds a JSON {type(meta).__name__}, not an object of config keys: it was "
                      f"not written by save_pretrained; save the model again")


# -- configs ------------------------------------------------------------------------------------------------
_TYPE_NAMES = {bool: "a bool (true or false)", int: "an int", float: "a float", str: "a string", list: "a list"}


class ConfigMixin:
    """For the config dataclasses: presets, a type-checked dict / JSON round trip, and the architecture view.

    A subclass sets `PRESETS` (name -> keyword arguments, from vqhit.presets) and `RUNTIME_KEYS`, and calls
    `self.check_types()` first in its `__post_init__`.
    """

    PRESETS: dict = {}
    # Keys that change neither the parameters nor the eval-mode function: never compared when loading weights.
    RUNTIME_KEYS: frozenset = frozenset({"preset"})

    @classmethod
    def from_preset(cls, name: str, **overrides):
        """The named preset's config (its `preset` field set to `name`), with keyword overrides applied."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown {cls.__name__} preset {name!r}; available: {', '.join(cls.PRESETS)}")
        return cls.from_dict({**copy.deepcopy(cls.PRESETS[name]), "preset": name, **overrides})

    def check_types(self) -> None:
        """Check every field against its annotation, converting numeric strings ("1e-2" -> 0.01, "4" -> 4)."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            kind, value = hints[f.name], getattr(self, f.name)
            members = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
            optional = type(None) in members
            if value is None and optional:
                continue
            base = next(m for m in members if m is not type(None))
            try:
                setattr(self, f.name, convert_value(value, base))
            except TypeError:
                raise ValueError(f"{f.name} must be {_TYPE_NAMES.get(base, base.__name__)}"
                                 f"{' or None' if optional else ''}, got {value!r}") from None

    def check_range(self, name: str, low: float, high: float = math.inf) -> None:
        """ValueError unless the field `name` is None or within [low, high] (NaN is not)."""
        value = getattr(self, name)
        if value is not None and not low <= value <= high:
            bound = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
            raise ValueError(f"{name} must be {bound}, got {value!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def architecture_dict(self) -> dict:
        """The keys that fix the parameters and the eval-mode function: what two configs must share for the
        weights of one to be loaded into the other."""
        d = {k: v for k, v in self.to_dict().items() if k not in self.RUNTIME_KEYS}
        if d.get("norm") == "syncbatch":  # the same BatchNorm, with statistics over all processes: runtime
            d["norm"] = "batch"
        return d

    def architecture_differences(self, saved) -> dict:
        """The architecture keys on which `saved` (a checkpoint's config) and this config differ, as {key: (saved's
        value, this one's)}: empty when the weights of one load into the other. Loading and resuming both ask this."""
        return differences(saved.architecture_dict(), self.architecture_dict())

    @classmethod
    def from_dict(cls, d: dict):
        if not isinstance(d, dict):
            raise ValueError(f"a {cls.__name__} is built from a dict of keys, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            close = [match for key in sorted(unknown) for match in difflib.get_close_matches(key, known, n=1)]
            raise ValueError(f"unknown {cls.__name__} keys {sorted(unknown)}"
                             f"{f' (did you mean {close[0]}?)' if close else ''}; known keys are {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, s: str):
        return cls.from_dict(json.loads(s))


def _bad_config(file: Path, err: Exception) -> UsageError:
    """A saved config.json whose values the config (or the model built from it) refuses."""
    return UsageError(f"{file}: {err}. Correct the value in the file, or save the model again")


def _describe(diff: dict) -> str:
    """`architecture_differences` as text: "key: saved vs this; ..."."""
    return "; ".join(f"{k}: {saved!r} vs {this!r}" for k, (saved, this) in diff.items())


# -- models -------------------------------------------------------------------------------------------------
# torch.compile wraps a module as `_orig_mod` of an OptimizedModule, which puts that name into the state-dict keys of
# the model holding it (`decoder._orig_mod.…`); saved and compared weights use the keys of the modules themselves.
_COMPILE_WRAPPER = re.compile(r"(^|\.)_orig_mod\.")


def _unwrapped(key: str) -> str:
    return _COMPILE_WRAPPER.sub(r"\1", key)




# (The paper link is in the template, not the mixin's `paper_url`: that needs huggingface_hub >= 0.30.)
class PretrainedMixin(PyTorchModelHubMixin, library_name=LIBRARY, model_card_template=DEFAULT_CARD,
                      tags=TAGS):
    """Mixed into an nn.Module that has a `config` dataclass built on ConfigMixin.

    Subclasses set `model_type` (written into config.json, checked on load) and `config_class`, and may set
    `optional_state_prefixes`: state-dict keys under them are buffers that exist only with some runtime
    option (the quantizer's dead-code restart state), so they may be absent on one side when loading.
    """

    model_type: str
    config_class: type
    optional_state_prefixes: tuple = ()

    @classmethod
    def make_config(cls, config=None, **overrides):
        """The given config (default: the class's default config) with keyword overrides applied."""
        config = config or cls.config_class()
        return cls.config_class.from_dict({**config.to_dict(), **overrides}) if overrides else config

    @classmethod
    def from_preset(cls, name: str, **overrides):
        """A freshly initialised model of the named preset (see vqhit.presets), with config overrides."""
        return cls(cls.config_class.from_preset(name, **overrides))

    # -- saving -------------------------------------------------------------------------------------------
    def _save_pretrained(self, save_directory: Path, training_step: int | None = None) -> None:
        """The mixin's hook: the weights, under a temporary name then renamed."""
        state = {k: v.detach().contiguous().cpu() for k, v in self._module_state_dict().items()}
        metadata = {"format": "pt"}
        if training_step is not None:
            metadata[TRAINING_STEP_KEY] = str(training_step)
        atomic_write(save_directory / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata=metadata))

    def _module_state_dict(self) -> dict:
        """The state dict with the keys of the modules themselves, whether or not some are torch.compile'd."""
        return {_unwrapped(k): v for k, v in self.state_dict().items()}

    def save_pretrained(self, save_directory: str | os.PathLike, *, config=None, push_to_hub: bool = False,
                        repo_id: str | None = None, model_card_kwargs: dict | None = None,
                        training_step: int | None = None, **push_to_hub_kwargs):
        """Write model.safetensors, config.json and (unless the folder has one) a README.md model card, each
        atomically. An existing card is kept, except its evaluation figures when they belong to other weights
        (`write_model_card` records which). `training_step`: the step of a training run these weights are from,
        kept in model.safetensors' metadata and named on evaluated cards. Returns the folder; with
        `push_to_hub=True` also uploads it (to `repo_id`, default the folder's name) and returns the commit URL,
        as the mixin does."""
        if config is not None:
            raise ValueError("a vqhit model saves its own config (model.config); build the model from the config "
                             "you want instead of passing config=")
        directory = Path(save_directory)
        self._write(directory, training_step, model_card_kwargs)
        self._pretrained_folder = directory  # what push_to_hub uploads while it holds this model
        if push_to_hub:
            return self.push_to_hub(repo_id or directory.name, model_card_kwargs=model_card_kwargs,
                                    **push_to_hub_kwargs)
        return directory

    def config_file_text(self) -> str:
        """What config.json holds for this model: its `model_type` and config keys, as JSON (the ONNX export
        writes the same file beside its graphs)."""
        return json.dumps({"model_type": self.model_type, **self.config.to_dict()}, indent=2) + "\n"

    def _write(self, directory: Path, training_step: int | None, model_card_kwargs: dict | None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._save_pretrained(directory, training_step)
        atomic_write(directory / CONFIG_NAME, lambda p: p.write_text(self.config_file_text()))
        card_path = directory / CARD_NAME
        if not card_path.exists():
            card = self.generate_model_card(model_type=self.model_type, preset=self.config.preset,
                                            class_name=type(self).__name__, **(model_card_kwargs or {}))
            atomic_write(card_path, lambda p: card.save(p))
        else:  # kept, as the mixin does; figures of other weights are not
            text = card_path.read_text()
            evaluated = EVALUATION_PATTERN.search(text)
            if evaluated and evaluated.group(1) != weights_sha256(directory):
                atomic_write(card_path, lambda p: p.write_text(EVALUATION_PATTERN.sub("\n", text, count=1)))

    def push_to_hub(self, repo_id: str, *, config=None, commit_message: str = "Push model using huggingface_hub.",
                    private: bool | None = None, token: str | None = None, branch: str | None = None,
                    create_pr: bool | None = None, allow_patterns: list[str] | str | None = None,
                    ignore_patterns: list[str] | str | None = None, delete_patterns: list[str] | str | None = None,
                    model_card_kwargs: dict | None = None) -> str:
        """Upload the model to the Hub repository `repo_id` (created if needed); returns the commit URL. The
        keywords are those of the mixin's `push_to_hub`.

        The folder this model was last saved to or loaded from is uploaded as it is, model card included (with
        the figures scripts/eval_rfid.py wrote into it), when it still holds exactly this model's config and
        weights. Otherwise the model is saved afresh and that is uploaded, with the folder's card if it had one,
        less figures measured on other weights."""
        if config is not None:
            raise ValueError("a vqhit model uploads its own config (model.config); build the model from the config "
                             "you want instead of passing config=")
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id=repo_id, private=private, exist_ok=True).repo_id

        def upload(folder: Path) -> str:
            return api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=folder,
                                     commit_message=commit_message, revision=branch, create_pr=create_pr,
                                     allow_patterns=allow_patterns or [CONFIG_NAME, WEIGHTS_NAME, CARD_NAME],
                                     ignore_patterns=ignore_patterns, delete_patterns=delete_patterns)

        folder = getattr(self, "_pretrained_folder", None)
        if folder is not None and self.holds_this_model(folder):
            return upload(folder)
        with tempfile.TemporaryDirectory() as tmp:
            fresh = Path(tmp) / "model"
            fresh.mkdir()
            if folder is not None and (folder / CARD_NAME).is_file():
                shutil.copyfile(folder / CARD_NAME, fresh / CARD_NAME)
            self._write(fresh, None, model_card_kwargs)
            return upload(fresh)

    def holds_this_model(self, folder: Path) -> bool:
        """Whether `folder` holds a model card and exactly this model's config and weights."""
        if not all((folder / name).is_file() for name in (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)):
            return False
        ours = json.loads(self.config_file_text())
        try:
            if json.loads((folder / CONFIG_NAME).read_text()) != ours:
                return False
            saved = load_file(str(folder / WEIGHTS_NAME))
        except (OSError, ValueError, SafetensorError):
            return False
        state = self._module_state_dict()
        return saved.keys() == state.keys() and all(torch.equal(saved[k], v.detach().cpu()) for k, v in state.items())

    # -- loading ------------------------------------------------------------------------------------------
    @classmethod
    def read_config(cls, path_or_id, **hub_kwargs):
        """(folder, config) of a save_pretrained folder or Hub repository; the file is checked, not trusted."""
        directory = resolve_pretrained(path_or_id, **hub_kwargs)
        file = directory / CONFIG_NAME
        meta = read_config_file(directory)
        model_type = meta.pop("model_type", None)
        if model_type != cls.model_type:
            raise UsageError(f"{directory} holds a {model_type!r} checkpoint, not a {cls.model_type!r} one; "
                             f"load it with the matching class")
        try:
            config = cls.config_class.from_dict(meta)
        except (TypeError, ValueError) as err:
            raise _bad_config(file, err) from None
        return directory, config

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *,
                        map_location: str | torch.device = "cpu", revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, force_download: bool = False,
                        local_files_only: bool = False, token: str | bool | None = None, **overrides):
        """The model saved in a local folder or a Hub repository, in eval mode (as the Hub mixin returns it).

        Keyword `overrides` set runtime keys (e.g. `freeze_encoder=True`, `checkpoint_mlp=True`); architecture
        keys are fixed by the saved weights and refused.
        """
        directory, saved = cls.read_config(pretrained_model_name_or_path, revision=revision, cache_dir=cache_dir,
                                           force_download=force_download, local_files_only=local_files_only,
                                           token=token)
        config = cls.make_config(saved, **overrides)
        changed = _describe(config.architecture_differences(saved))
        if changed:
            raise _architecture_override(changed, directory, cls.config_class.RUNTIME_KEYS)
        try:
            model = cls(config)
        except ValueError as err:  # a check made while building (a stage's block size, ...): of the file's keys,
            raise _bad_config(directory / CONFIG_NAME, err) from None  # as overrides set only runtime ones
        model._load_weights_file(directory, map_location)
        model._pretrained_folder = directory  # what push_to_hub uploads while it holds this model
        return model.eval()

    def load_weights(self, path_or_id, map_location: str | torch.device = "cpu", **hub_kwargs) -> None:
        """Load a save_pretrained folder (or Hub repository) into this model, strictly. Its architecture keys
        must equal this model's; runtime keys (freezing, checkpointing, ...) stay this model's own."""
        directory, config = self.read_config(path_or_id, **hub_kwargs)
        changed = _describe(self.config.architecture_differences(config))
        if changed:
            raise _saved_for_another_configuration(directory, config, self.config, changed, type(self).__name__)
        self._load_weights_file(directory, map_location)

    def _load_weights_file(self, directory: Path, map_location) -> None:
        file = directory / WEIGHTS_NAME
        if not file.exists():
            raise _no_weights_file(directory)
        try:
            state = load_file(str(file), device=str(map_location))
        except (SafetensorError, OSError) as err:
            raise _damaged_weights(file, err) from None
        # Keys without torch.compile's `_orig_mod.`, on both sides: a file saved from a compiled module has it, and
        # this model's modules may be compiled.
        state = {_unwrapped(k): v for k, v in state.items()}
        names = {_unwrapped(k): k for k in self.state_dict()}
        ours, buffers = self._module_state_dict(), {_unwrapped(k) for k, _ in self.named_buffers()}
        optional = self.optional_state_prefixes  # runtime-option buffers: absent on one side is fine
        missing = [k for k in ours if k not in state and not (k.startswith(optional) and k in buffers)]
        unexpected = [k for k in state if k not in ours and not k.startswith(optional)]
        wrong = [f"{k}: {tuple(v.shape)} vs {tuple(ours[k].shape)}" for k, v in state.items()
                 if k in ours and v.shape != ours[k].shape]
        if missing or unexpected or wrong:
            raise _weights_do_not_fit(file, missing, unexpected, wrong)
        self.load_state_dict({names[k]: v for k, v in state.items() if k in ours}, strict=False)


# -- the loading errors: each names the file and the fix -------------------------------------------------------
def _architecture_override(changed: str, directory: Path, runtime_keys) -> UsageError:
    return UsageError(f"from_pretrained cannot change architecture keys (saved vs asked): {changed}. The "
                      f"weights in {directory} fit only their own architecture; overrides may set only "
                      f"runtime keys {sorted(runtime_keys)}")


def _saved_for_another_configuration(directory: Path, saved, this, changed: str, class_name: str) -> UsageError:
    return UsageError(f"checkpoint {directory} was saved for another configuration (preset "
                      f"{saved.preset!r}, this model {this.preset!r}); differing architecture keys "
                      f"(checkpoint vs this model): {changed}. Build the model with the checkpoint's "
                      f"preset and options, or load it with {class_name}.from_pretrained")


def _no_weights_file(directory: Path) -> UsageError:
    return UsageError(f"no {WEIGHTS_NAME} in {directory}: the save was interrupted or the folder is not a "
                      f"save_pretrained folder; save the model again")


def _damaged_weights(file: Path, err: Exception) -> UsageError:
    return UsageError(f"{file} is damaged or incomplete ({err}); save the model again or download it again")


def _weights_do_not_fit(file: Path, missing: list, unexpected: list, wrong: list) -> UsageError:
    return UsageError(f"{file} does not fit this model although its config does: missing {missing[:5]}, "
                      f"unexpected {unexpected[:5]}, other shapes (file vs model) {wrong[:5]}; the file "
                      f"was not written with its config.json: save the model again")
