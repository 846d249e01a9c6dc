"""The precision a network runs in, named the same way by training, evaluation, encoding and the benchmarks.

- `fp32`: float32 throughout;
- `bf16`: the network's forward under `torch.autocast` to bfloat16. Whoever needs more range or precision turns
  autocast off locally: R1's double backward, Inception's features, the metrics.

fp16 is not offered: R1's double backward overflows fp16's range, and a gradient scaler does not cover it.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

PRECISIONS = ("fp32", "bf16")
# Other names accepted for a precision: "no" is Accelerate's name for no mixed precision, which training
# configs may hold.
ALIASES = {"no": "fp32"}


def normalize(precision: str) -> str:
    """The precision's name in `PRECISIONS` (an alias replaced); any other value is returned as it is."""
    return ALIASES.get(precision, precision)


def check_precision(precision: str) -> str:
    """The precision's name in `PRECISIONS`, or a ValueError naming the choices."""
    name = normalize(precision)
    if name not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; use one of {', '.join(PRECISIONS)}")
    return name


def autocast(precision: str, device: torch.device | str):
    """A context manager that runs its block at `precision` on `device`: bf16 autocast, or nothing for fp32."""
    if check_precision(precision) == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext()
