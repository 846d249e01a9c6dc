"""How config values are read and compared: the one type conversion of the model configs and the training config,
and the one comparison of two sets of settings (configs, token manifests, reference-statistics protocols).

YAML reads `1e-2` (no dot) as a string, and so is every `--model-option` value YAML cannot type: a string that
parses as the number a key expects is that number.
"""
from __future__ import annotations


def convert_value(value, kind: type):
    """`value` as `kind` (bool, int, float, list, or any other type it must already be), or raise TypeError.
    A string that parses as the number or bool asked for is that number or bool."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif kind in (int, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or isinstance(value, int)):
            return kind(value)  # an int is a float too; a float is not an int
        if isinstance(value, str):
            try:
                return kind(value)
            except ValueError:
                pass
    elif kind is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    elif isinstance(value, kind):
        return value
    raise TypeError


def differences(old: dict, new: dict) -> dict:
    """The keys whose values differ between two dicts of settings, sorted, as {key: (old's value, new's value)} (a key
    one of them lacks is None there): what an error names when saved settings do not match this run's."""
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}
