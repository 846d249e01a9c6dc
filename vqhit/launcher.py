"""What `accelerate launch` asks of a script, held to vqhit's own options.

`accelerate launch` hands a script the settings of the user's `accelerate config` (or of its own flags) as
`ACCELERATE_*` environment variables, and an `Accelerator` built without arguments obeys them: a `mixed_precision:
bf16` default would wrap every forward, the discriminator's R1 included, in autocast; a dynamo backend would compile
the discriminator and R1's double backward; a gradient-accumulation count would replace `--grad-accum`. vqhit builds
its `Accelerator` with all three pinned, and this module turns what the launcher asked for into the matching option:

| launcher setting | becomes |
|---|---|
| `mixed_precision: bf16` | `--precision bf16` (R1, metrics and Inception stay fp32, as always) |
| `mixed_precision: fp16` / `fp8` | refused: R1's double backward overflows fp16 |
| `dynamo_backend: inductor` | `--compile` (the generator / decoder only) |
| another dynamo backend | refused |
| `gradient_accumulation_steps: N` | `--grad-accum N` |

A launcher setting counts as if it were given on the command line: a different value given there too is refused,
naming both, rather than one silently winning. The launcher's "no" (its default) asks for nothing.
"""
from __future__ import annotations

import os

from .errors import UsageError

PRECISION_VARIABLE = "ACCELERATE_MIXED_PRECISION"
DYNAMO_VARIABLE = "ACCELERATE_DYNAMO_BACKEND"
GRAD_ACCUM_VARIABLE = "ACCELERATE_GRADIENT_ACCUMULATION_STEPS"

# What to pass to `Accelerator(...)` so that it applies none of the launcher's settings itself.
PINNED_ACCELERATOR_SETTINGS = {"mixed_precision": "no", "dynamo_backend": "no"}


def requested(environ=None) -> dict:
    """The vqhit option values the launcher asks for ({} when it asks for nothing), e.g. {"precision": "bf16"}.
    A setting vqhit cannot honour is a UsageError naming the launcher's option."""
    environ = os.environ if environ is None else environ
    wanted = {}
    precision = environ.get(PRECISION_VARIABLE, "no").strip().lower()
    if precision in ("fp16", "fp8"):
        raise _overflowing_precision(precision)
    if precision == "bf16":
        wanted["precision"] = "bf16"
    elif precision not in ("no", ""):
        raise _unknown_precision(precision)
    backend = environ.get(DYNAMO_VARIABLE, "no").strip().lower()
    if backend == "inductor":
        wanted["compile"] = True
    elif backend not in ("no", ""):
        raise _other_dynamo_backend(backend)
    steps = environ.get(GRAD_ACCUM_VARIABLE, "").strip()
    if steps and steps != "1":
        if not steps.isdigit() or int(steps) < 1:
            raise _bad_accumulation_steps(steps)
        wanted["grad_accum"] = int(steps)
    return wanted


# -- the launcher settings vqhit cannot honour: each names the launcher's option and what to launch with instead ----
def _overflowing_precision(precision: str) -> UsageError:
    return UsageError(f"the launcher asks for mixed precision {precision} (accelerate config, or accelerate launch "
                      f"--mixed_precision {precision}): vqhit does not run in {precision}, since R1's double backward "
                      "overflows it; launch with --mixed_precision bf16 or no, and choose with --precision")


def _unknown_precision(precision: str) -> UsageError:
    return UsageError(f"the launcher asks for mixed precision {precision!r}, which vqhit does not know; launch with "
                      "--mixed_precision no and choose with --precision")


def _other_dynamo_backend(backend: str) -> UsageError:
    return UsageError(f"the launcher asks for the dynamo backend {backend} (accelerate config, or accelerate launch "
                      f"--dynamo_backend {backend}): vqhit compiles with inductor only, and only the generator / "
                      "decoder (--compile); launch with --dynamo_backend no (or inductor)")


def _bad_accumulation_steps(steps: str) -> UsageError:
    return UsageError(f"the launcher asks for {steps!r} gradient accumulation steps; launch without "
                      "--gradient_accumulation_steps and give --grad-accum N")


def merge(given: dict, environ=None) -> dict:
    """`given` (the options of the config file and the command line) with the launcher's requests added; an option
    given there with another value than the launcher's is a UsageError naming both."""
    wanted = requested(environ)
    for key, value in wanted.items():
        if key in given and given[key] != value:
            flag = f"--{key.replace('_', '-')}"
            raise UsageError(f"{flag} {given[key]} contradicts the launcher, which asks for {describe(key, value)} "
                             f"(accelerate config or accelerate launch flags); drop one of the two")
    return {**given, **wanted}


def describe(key: str, value) -> str:
    """A launcher request in the launcher's words."""
    return {"precision": f"mixed precision {value}", "compile": "the dynamo backend inductor",
            "grad_accum": f"{value} gradient accumulation steps"}[key]


def notes(environ=None) -> list[str]:
    """One line per launcher setting that became a vqhit option, for the run's start."""
    flags = {"precision": "--precision bf16", "compile": "--compile", "grad_accum": "--grad-accum {}"}
    return [f"the launcher's {describe(key, value)} is {flags[key].format(value)} here"
            for key, value in requested(environ).items()]


def script_precision(precision: str | None, script: str, environ=None) -> str:
    """The --precision of a script that trains nothing (evaluation, encoding): the option when given, else the
    launcher's bf16 when it asks for it, else fp32. A launcher's dynamo backend or accumulation is refused: these
    scripts compile nothing and accumulate nothing, and would otherwise ignore it silently."""
    wanted = requested(environ)
    for key in ("compile", "grad_accum"):
        if key in wanted:
            raise UsageError(f"the launcher asks for {describe(key, wanted[key])}, which {script} does not use; launch "
                             "it with --dynamo_backend no and without --gradient_accumulation_steps")
    if precision is not None and "precision" in wanted and precision != wanted["precision"]:
        raise UsageError(f"--precision {precision} contradicts the launcher, which asks for mixed precision "
                         f"{wanted['precision']}; drop one of the two")
    return precision or wanted.get("precision", "fp32")
