"""How config values are read: the one type conversion of the model configs and the training config.

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
