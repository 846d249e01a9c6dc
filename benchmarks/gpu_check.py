"""Everything vqhit needs to know from a GPU, in one run of a few minutes: run it whenever a GPU is at hand.

    python benchmarks/gpu_check.py --output DIR                       # the full check, one GPU: under 8 minutes
    python benchmarks/gpu_check.py --device cpu --smoke --output DIR  # tiny presets on the CPU, seconds (the tests)

It writes DIR/gpu_check.json (every number, the machine, each part's status) and DIR/gpu_check.md (the tables),
both rewritten after every part: a run stopped part-way (a timeout, a machine taken back) keeps what it measured,
and the parts it did not reach say so. Each part has a time budget and ends as "ok", "skipped" (with the reason:
a package that is not installed, a single GPU, the budget spent) or "error" (with the exception); one part's
failure does not stop the others. The parts, in the order they run:

  environment       torch, CUDA, the GPUs, the packages, and the device's dense bf16 peak FLOP/s (from a table of
                    devices by name; "unknown" for a device not in it, and no share of peak is given then)
  sdpa              which attention kernel scaled_dot_product_attention runs inside the models in bf16 (the
                    operators and CUDA kernels a profile of a training step and of inference shows), and which SDPA
                    backends accept each attention shape the models use, forward and backward
  train_step        the GAN training step of paper presets (G step, then D step with R1, as vqhit's Trainer runs
                    them without bCR and EMA) and the VQ-HiT decoder's step, in bf16: images/s, peak memory, FLOPs
                    per step and their share of the bf16 peak
  bf16_agreement    the same training steps from the same weights and data in bf16 and in strict fp32 (TF32 off):
                    the losses at every step and the direction of the parameter updates
  generator         generator images/s at 256x256 in bf16 and fp32, beside the paper's Table 4 (on one V100)
  tokenizer_decode  the HiT decoder of vqhit-b-f16-1024 against taming's convolutional decoder (vqgan-f16-1024),
                    both from the same 16x16 grid of code vectors, in bf16 and fp32
  trainer_step      `vqhit.training.Trainer.train_step`, what a training run executes (Accelerate, the recipe's bCR
                    or VGG feature loss with random weights), for hit-b-256 and vqhit-b-f16-1024, with R1 and without
  ddp               with two GPUs, two processes on NCCL train a tiny GAN for a few steps; then the parameters and
                    BatchNorm statistics must be equal on both ranks, and the ranks' losses must differ (their data
                    did). With one GPU it is skipped; with --smoke it runs on two CPU processes over gloo.

What a part needs beyond torch: tokenizer_decode's taming side needs taming-transformers; trainer_step needs the
training dependencies (Accelerate, datasets, torchvision, ...). Importing vqhit's models imports taming-transformers,
huggingface_hub and safetensors; where one is missing (a GPU machine with torch alone), a stand-in module takes its
place, raising ModuleNotFoundError when used, so that everything that needs only torch still runs. The JSON names
the stand-ins.

Exit status: 0 when no part ended in error, 1 when one did, 143 when stopped by SIGTERM (the files then hold the
parts done), 2 for a mistake on the command line.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import importlib.metadata
import json
import platform
import re
import signal
import socket
import sys
import tempfile
import time
import traceback
import types
import warnings
from argparse import Namespace
from collections import Counter
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]  # this checkout's vqhit and benchmarks, installed or not

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402


# -- stand-ins for the packages vqhit's models import -----------------------------------------------------------
def _needs(package: str):
    def fail(*args, **kwargs):
        raise ModuleNotFoundError(f"{package} is not installed", name=package)
    return fail


def _unavailable_class(package: str, name: str) -> type:
    """A class that subclasses can name as their base, and that raises when built."""
    return type(name, (), {"__init__": lambda self, *a, **k: _needs(package)()})


class _HubMixin:
    """huggingface_hub's PyTorchModelHubMixin without huggingface_hub: the models' base, with nothing to add."""

    def __init_subclass__(cls, **kwargs):  # the mixin's class options (library_name, tags, ...)
        super().__init_subclass__()


_STAND_INS = {
    # import name -> (distribution, the module's attributes vqhit reads)
    "taming.modules.diffusionmodules.model": ("taming-transformers", lambda p: {
        "Encoder": _unavailable_class(p, "Encoder"), "Decoder": _unavailable_class(p, "Decoder")}),
    "huggingface_hub": ("huggingface_hub", lambda p: {
        "PyTorchModelHubMixin": _HubMixin, "HfApi": _needs(p), "ModelCard": _needs(p), "ModelCardData": _needs(p)}),
    "safetensors": ("safetensors", lambda p: {
        "SafetensorError": type("SafetensorError", (Exception,), {}), "safe_open": _needs(p)}),
    "safetensors.torch": ("safetensors", lambda p: {"load_file": _needs(p), "save_file": _needs(p)}),
}


def install_stand_ins() -> dict:
    """Import each module of `_STAND_INS`; put a stand-in in place of each one that fails. Returns
    {module: why it failed}."""
    missing = {}
    for name, (package, attributes) in _STAND_INS.items():
        try:
            importlib.import_module(name)
        except ImportError as err:
            parent = next((missing[p] for p in missing if name.startswith(p + ".")), None)
            missing[name] = parent or f"{package}: {type(err).__name__}: {err}"
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # the parent packages too, where they did not import either
                sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
            module = sys.modules[name]
            module.__dict__.update(attributes(package))
            module.__vqhit_stand_in__ = True
    return missing


STAND_INS = install_stand_ins()

import vqhit  # noqa: E402
from common import (count_flops, cpu_model, format_table, machine, peak_memory_gb, reset_peak_memory,  # noqa: E402
                    setup, synchronize, time_calls)
from generator import flops_per_image  # noqa: E402
from train_step import build, make_step, trainer_step  # noqa: E402
from vqhit import HiTGenerator, VQHiT, VQHiTConfig  # noqa: E402
from vqhit.cli import ArgumentParser, run  # noqa: E402
from vqhit.distributed import all_gather_cat, all_reduce_sum, average_batchnorm_stats_, broadcast_  # noqa: E402
from vqhit.errors import UsageError  # noqa: E402
from vqhit.files import atomic_write, check_output_folder  # noqa: E402
from vqhit.losses import d_logistic_loss, g_nonsaturating_loss, r1_penalty  # noqa: E402
from vqhit.models.discriminator import Discriminator  # noqa: E402
from vqhit.precision import autocast  # noqa: E402
from vqhit.recipes import RECIPES  # noqa: E402

FILES = ("gpu_check.json", "gpu_check.md")

# Dense (no sparsity) bf16 tensor-core peak of each device, TFLOP/s, from the vendor's data sheets. The first entry
# whose pattern is found in torch.cuda.get_device_name() is used; the names of the SXM parts do not say "SXM" (an
# H100 SXM reports "NVIDIA H100 80GB HBM3"), hence the order.
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", "H100 PCIe", 756.0),
    ("H100 NVL", "H100 NVL", 835.0),
    ("H200 NVL", "H200 NVL", 835.0),
    ("H100", "H100 SXM", 989.0),
    ("H200", "H200 SXM", 989.0),   # GH200 too: the same Hopper chip
    ("A100", "A100", 312.0),
    ("L40S", "L40S", 362.0),
)

# The paper's Table 4: images/s of its generators at 256x256 on one V100 (hit-s-256 there has 38.01M parameters;
# this package's, from the paper's architecture table, has 34.73M).
PAPER_V100_IMAGES_PER_S = {"hit-s-256": 86.6, "hit-b-256": 52.1, "hit-l-256": 20.7}

# What each mode measures: the paper presets on a GPU; the tiny presets on a CPU with --smoke.
FULL = dict(
    gan=[("hit-b-256", 32), ("hit-l-128", 32), ("hit-b-1024", 4)],
    decoder=("vqhit-b-f16-1024", 32),
    sdpa=("hit-b-256", "vqhit-b-f16-1024", 2),
    agreement=("hit-b-256", 8, 5),
    generator=(["hit-s-256", "hit-b-256", "hit-l-256"], 64),
    decode=("vqhit-b-f16-1024", "vqgan-f16-1024", 64),
    trainer=[("gan", "hit-b-256", 32), ("vqhit", "vqhit-b-f16-1024", 16)],
    ddp=("hit-tiny", 8, 4),
    precision="bf16",  # of the timed training steps
    repeats=3, min_repeat_s=0.5,
)
SMOKE = dict(
    gan=[("hit-tiny", 2)],
    decoder=("vqhit-tiny", 2),
    sdpa=("hit-tiny", "vqhit-tiny", 1),
    agreement=("hit-tiny", 2, 3),
    generator=(["hit-tiny"], 2),
    decode=("vqhit-tiny", "vqgan-tiny", 2),
    trainer=[("gan", "hit-tiny", 2), ("vqhit", "vqhit-tiny", 2)],
    ddp=("hit-tiny", 2, 2),
    precision="fp32",  # bf16 convolutions are slow on most CPUs; sdpa and bf16_agreement still run bf16
    repeats=1, min_repeat_s=0.0,
)
AGREEMENT_TOLERANCE = 0.05  # largest relative difference between a bf16 loss and its fp32 twin called agreement


class Skip(Exception):
    """A part, or one measurement of it, cannot run here; the message says why."""


class Stopped(BaseException):
    """The run was told to stop (SIGTERM, e.g. from `timeout`)."""


# -- small helpers -------------------------------------------------------------------------------------------------
def bf16_peak(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    for pattern, entry, tflops in BF16_PEAK_TFLOPS:
        if device.type == "cuda" and pattern in name:
            return {"device_name": name, "entry": entry, "tflops": tflops}
    return {"device_name": name, "entry": "unknown", "tflops": None}


def nccl_version() -> str | None:
    try:
        version = torch.cuda.nccl.version()
    except (AttributeError, RuntimeError):
        return None
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def free_memory(device: torch.device) -> None:
    gc.collect()  # a Trainer's models sit in reference cycles
    if device.type == "cuda":
        torch.cuda.empty_cache()


def recipe_discriminator(preset: str) -> dict:
    """The discriminator settings of `preset`'s training recipe (the training options' defaults where it has none)."""
    recipe = RECIPES.get(preset, {})
    return {"channel_multiplier": recipe.get("disc_channel_multiplier", 1),
            "max_channels": recipe.get("disc_max_channels", 512)}


def build_gan(preset: str, device: torch.device):
    d = recipe_discriminator(preset)
    return build(preset, False, d["channel_multiplier"], device, max_channels=d["max_channels"])


class CodesToImages(nn.Module):
    """A tokenizer's decoder driven as `make_step` drives a generator: its latent, reshaped, is the code grid."""

    def __init__(self, decoder: nn.Module, config: VQHiTConfig):
        super().__init__()
        self.decoder, self.grid, self.code_dim = decoder, config.grid, config.code_dim
        self.config = types.SimpleNamespace(latent_dim=config.grid**2 * config.code_dim, resolution=config.resolution)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z.view(-1, self.grid, self.grid, self.code_dim))


def build_decoder_step_models(preset: str, device: torch.device):
    """The HiT decoder of tokenizer `preset` (no encoder, no codebook: torch alone builds it) and its recipe's D."""
    config = VQHiTConfig.from_preset(preset)
    G = CodesToImages(VQHiT._build_decoder(config), config).to(device).train()
    D = Discriminator(config.resolution, **recipe_discriminator(preset)).to(device).train()
    return G, D


@contextmanager
def strict_fp32():
    """fp32 matmuls and convolutions without TF32: the reference the bf16 run is compared with."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def flat_state(*modules: nn.Module) -> torch.Tensor:
    """Every parameter and floating-point buffer of `modules`, as one float64 vector."""
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers()) if t.is_floating_point()]
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


def error_text(err: BaseException) -> str:
    lines = traceback.format_exception(type(err), err, err.__traceback__)
    return "".join(lines)[-3000:]


class Context:
    """What every part reads: the options, the device, the mode's presets, the budget clock."""

    def __init__(self, args, device: torch.device, threads: int | None):
        self.args, self.device, self.threads = args, device, threads
        self.mode = SMOKE if args.smoke else FULL
        self.cuda = device.type == "cuda"
        self.peak = bf16_peak(device)
        self.start = time.monotonic()
        self.deadline = self.start + args.budget_s

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def timing(self, calls: dict, warmups: dict | None = None) -> dict:
        return time_calls(calls, self.device, self.mode["repeats"], self.mode["min_repeat_s"], warmups)

    def share_of_peak(self, flops: float | None, seconds: float | None, precision: str = "bf16") -> float | None:
        """The share of the device's dense bf16 peak that `flops` in `seconds` make (None unless bf16 and known)."""
        if precision != "bf16" or flops is None or not seconds or self.peak["tflops"] is None:
            return None
        return flops / seconds / (self.peak["tflops"] * 1e12)


class Budget:
    """A part's time: `check(what)` raises Skip once the part's budget or the run's is spent."""

    def __init__(self, ctx: Context, seconds: float):
        self.ctx, self.seconds = ctx, seconds
        self.deadline = min(time.monotonic() + seconds, ctx.deadline)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def check(self, what: str) -> None:
        if time.monotonic() >= self.ctx.deadline:
            raise Skip(f"{what}: not run, the run's time budget (--budget-s {self.ctx.args.budget_s:g}) was spent")
        if self.left() <= 0:
            raise Skip(f"{what}: not run, this part's time budget ({self.seconds:g} s) was spent")


def timed_step(ctx: Context, label: str, step, batch: int) -> dict:
    """Time a training step; its warm-up runs under the FLOP counter, which also names the attention kernels."""
    counted = {}

    def counted_step():
        counted["flops"], counted["sdpa"] = count_flops(step)

    reset_peak_memory(ctx.device)
    t = ctx.timing({label: step}, {label: counted_step})[label]
    row = {"what": label, "batch": batch, **t, "flops_per_step": counted.get("flops"),
           "sdpa": ",".join(counted.get("sdpa", []))}
    if "median_seconds" in t:
        row.update(ms_per_step=1e3 * t["median_seconds"], images_per_s=batch / t["median_seconds"],
                   peak_gb=peak_memory_gb(ctx.device),
                   tflops=row["flops_per_step"] / t["median_seconds"] / 1e12 if row["flops_per_step"] else None,
                   share_of_peak=ctx.share_of_peak(row["flops_per_step"], t["median_seconds"], ctx.mode["precision"]))
    return row


def run_rows(budget: Budget, items, measure) -> list[dict]:
    """`measure(item)` for each item while the budget lasts; a row that cannot run records why."""
    rows = []
    for label, item in items:
        try:
            budget.check(label)
            rows.append(measure(item))
        except Skip as err:
            rows.append({"what": label, "skipped": str(err)})
        except torch.cuda.OutOfMemoryError:
            rows.append({"what": label, "error": "out of memory"})
        except ModuleNotFoundError as err:
            rows.append({"what": label, "skipped": f"needs {err.name}, which is not installed here"})
        except Exception as err:  # noqa: BLE001 - the next row may still run
            rows.append({"what": label, "error": f"{type(err).__name__}: {err}".splitlines()[0][:300],
                         "error_detail": error_text(err)})
        finally:
            free_memory(budget.ctx.device)
    return rows


def fmt(value, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


# -- the parts -----------------------------------------------------------------------------------------------------
def part_environment(ctx: Context, budget: Budget) -> dict:
    packages = {}
    for module, distribution in (("numpy", "numpy"), ("taming.modules.diffusionmodules.model", "taming-transformers"),
                                 ("huggingface_hub", "huggingface_hub"), ("safetensors", "safetensors"),
                                 ("accelerate", "accelerate"), ("datasets", "datasets"),
                                 ("torchvision", "torchvision"), ("yaml", "pyyaml"), ("PIL", "pillow"),
                                 ("tqdm", "tqdm"), ("lpips", "lpips"), ("torch_fidelity", "torch-fidelity"),
                                 ("skimage", "scikit-image")):
        if module in STAND_INS:
            packages[distribution] = f"missing (stand-in): {STAND_INS[module]}"
            continue
        try:
            importlib.import_module(module)
            packages[distribution] = importlib.metadata.version(distribution)
        except ImportError as err:
            packages[distribution] = f"missing: {type(err).__name__}: {err}"
        except importlib.metadata.PackageNotFoundError:
            packages[distribution] = "importable, version unknown"
    info = {"python": platform.python_version(), "torch": torch.__version__, "vqhit": vqhit.__file__,
            "stand_ins": STAND_INS, "packages": packages, "bf16_peak": ctx.peak}
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        info.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    nccl=nccl_version(),
                    gpu_count=torch.cuda.device_count(),
                    gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                    capability=f"{props.major}.{props.minor}", memory_gb=props.total_memory / 2**30,
                    sdp_enabled={"flash": torch.backends.cuda.flash_sdp_enabled(),
                                 "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                                 "math": torch.backends.cuda.math_sdp_enabled()})
    missing = [d for d, v in packages.items() if str(v).startswith("missing")]
    peak = f"{ctx.peak['tflops']:g} TFLOP/s ({ctx.peak['entry']})" if ctx.peak["tflops"] else "unknown"
    info["summary"] = (f"{ctx.peak['device_name']}, torch {torch.__version__}; bf16 peak {peak}; "
                       f"missing: {', '.join(missing) or 'none'}")
    return info


SDPA_FUSED = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
              "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
              "_scaled_dot_product_fused_attention_overrideable")
SDPA_MATH = ("_scaled_dot_product_attention_math",)
KERNEL_PATTERN = re.compile(r"flash|fmha|attention|attn|sdpa", re.IGNORECASE)


def record_sdpa_calls(fn) -> list[tuple]:
    """Run `fn()`; returns the (q shape, k shape, v shape, dtype, backward) of each attention call it made, with
    the dtype the call computes in (autocast's, where it is on)."""
    calls, original = [], F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        kind = q.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else q.dtype
        calls.append((tuple(q.shape), tuple(k.shape), tuple(v.shape), dtype,
                      torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)))
        return original(q, k, v, *args, **kwargs)

    F.scaled_dot_product_attention = spy  # vqhit's attention calls it through the module attribute
    try:
        fn()
    finally:
        F.scaled_dot_product_attention = original
    return calls


def profile_sdpa(fn, device: torch.device) -> dict:
    """The attention operators (and CUDA kernels) one call of `fn()` runs, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    ops, kernels = Counter(), Counter()
    for event in prof.events():
        name = event.name
        if "CUDA" in str(getattr(event, "device_type", "")):
            if KERNEL_PATTERN.search(name):
                kernels[name[:160]] += 1
        elif "scaled_dot_product" in name or name.endswith("attention_forward") or name.endswith("attention_backward"):
            ops[name.replace("aten::", "")] += 1
    calls = ops.get("scaled_dot_product_attention", 0)
    fused = sum(n for op, n in ops.items() if op in SDPA_FUSED)
    math_calls = sum(n for op, n in ops.items() if op in SDPA_MATH)
    return {"sdpa_calls": calls, "fused_calls": fused, "math_calls": math_calls,
            "fused": calls > 0 and fused == calls and math_calls == 0, "ops": dict(ops),
            "cuda_kernels": dict(kernels.most_common(20))}


def probe_backends(shapes: list[tuple], device: torch.device) -> list[dict]:
    """Each SDPA backend alone, on random tensors of each attention shape the models use."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = [n for n in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH") if hasattr(SDPBackend, n)]
    rows = []
    for q_shape, k_shape, v_shape, dtype, backward in shapes:
        row = {"q": "x".join(map(str, q_shape)), "k": "x".join(map(str, k_shape)), "dtype": str(dtype).split(".")[-1],
               "backward": backward}
        for name in names:
            q, k, v = (torch.randn(s, device=device, dtype=dtype, requires_grad=backward)
                       for s in (q_shape, k_shape, v_shape))
            with warnings.catch_warnings(record=True) as caught, sdpa_kernel([getattr(SDPBackend, name)]):
                warnings.simplefilter("always")
                try:
                    out = F.scaled_dot_product_attention(q, k, v)
                    if backward:
                        out.float().sum().backward()
                    synchronize(device)
                    row[name] = "ok"
                except Exception as err:  # noqa: BLE001 - the reasons come as warnings, one per unmet requirement
                    why = dict.fromkeys(str(w.message).split(" (Triggered internally")[0].strip() for w in caught)
                    row[name] = "no: " + "; ".join(why or [str(err).splitlines()[0]])[:400]
        rows.append(row)
    return rows


def part_sdpa(ctx: Context, budget: Budget) -> dict:
    gan_preset, tokenizer_preset, batch = ctx.mode["sdpa"]
    device, runs, shapes = ctx.device, {}, []
    torch.manual_seed(0)
    G, D = build_gan(gan_preset, device)
    step = make_step(G, D, batch, "bf16", device)
    z = torch.randn(batch, G.config.latent_dim, device=device)
    config = VQHiTConfig.from_preset(tokenizer_preset)
    decoder = VQHiT._build_decoder(config).to(device).eval()
    codes = torch.randn(batch, config.grid, config.grid, config.code_dim, device=device)

    def inference(model, x):
        def call():
            with torch.no_grad(), autocast("bf16", device):
                model(x)
        return call

    def generator_inference():
        G.eval()
        try:
            inference(G, z)()
        finally:
            G.train()

    for label, fn in ((f"{gan_preset} training step (G and D, forward and backward)", step),
                      (f"{gan_preset} inference", generator_inference),
                      (f"{tokenizer_preset} HiT decoder inference", inference(decoder, codes))):
        budget.check(label)
        fn()  # warm-up, outside the profile
        shapes += record_sdpa_calls(fn)
        runs[label] = profile_sdpa(fn, device)
    budget.check("backend probe")
    backends = probe_backends(list(dict.fromkeys(shapes)), device)
    fused = all(r["fused"] for r in runs.values())
    chosen = sorted({op for r in runs.values() for op in r["ops"] if op in SDPA_FUSED or op in SDPA_MATH})
    return {"runs": runs, "backends": backends, "fused_everywhere": fused,
            "summary": f"fused kernel in every call: {'yes' if fused else 'NO'} ({', '.join(chosen) or 'no SDPA op'})"}


def part_train_step(ctx: Context, budget: Budget) -> dict:
    device = ctx.device

    def gan(item):
        name, batch = item
        torch.manual_seed(0)
        G, D = build_gan(name, device)
        row = timed_step(ctx, f"{name} GAN step", make_step(G, D, batch, ctx.mode["precision"], device), batch)
        return {**row, "params": G.num_parameters()}

    def decoder(item):
        name, batch = item
        torch.manual_seed(0)
        G, D = build_decoder_step_models(name, device)
        row = timed_step(ctx, f"{name} decoder step", make_step(G, D, batch, ctx.mode["precision"], device), batch)
        return {**row, "params": sum(p.numel() for p in G.parameters())}

    rows = run_rows(budget, [(f"{n} GAN step", (n, b)) for n, b in ctx.mode["gan"]], gan)
    name, batch = ctx.mode["decoder"]
    rows += run_rows(budget, [(f"{name} decoder step", (name, batch))], decoder)
    return {"precision": ctx.mode["precision"], "rows": rows, "summary": "; ".join(
        f"{r['what']} x{r['batch']}: {r['images_per_s']:.3g} img/s, peak {fmt(r.get('peak_gb'))} GB, "
        f"{fmt(r.get('share_of_peak'), '.1%')} of peak" if "images_per_s" in r else
        f"{r['what']}: {r.get('error') or r.get('skipped')}" for r in rows)}


def part_bf16_agreement(ctx: Context, budget: Budget) -> dict:
    name, batch, steps = ctx.mode["agreement"]
    device = ctx.device

    def run_steps(precision: str):
        torch.manual_seed(0)
        G, D = build_gan(name, device)
        start_g, start_d = flat_state(G), flat_state(D)
        step = make_step(G, D, batch, precision, device)
        losses = torch.stack([torch.stack(step()).float() for _ in range(steps)]).cpu()
        return losses, flat_state(G) - start_g, flat_state(D) - start_d

    budget.check("fp32 steps")
    with strict_fp32():
        ref_losses, ref_dg, ref_dd = run_steps("fp32")
    budget.check("bf16 steps")
    losses, dg, dd = run_steps("bf16")
    rel = ((losses - ref_losses).abs() / ref_losses.abs().clamp_min(1e-3))
    cos = lambda a, b: float(F.cosine_similarity(a, b, dim=0))  # noqa: E731
    worst = float(rel.max())
    result = {"preset": name, "batch": batch, "steps": steps, "reference": "fp32 with TF32 off",
              "fp32_losses": ref_losses.tolist(), "bf16_losses": losses.tolist(),
              "relative_difference": rel.tolist(), "max_relative_difference": worst,
              "tolerance": AGREEMENT_TOLERANCE, "losses_agree": worst <= AGREEMENT_TOLERANCE,
              "update_cosine_G": cos(dg, ref_dg), "update_cosine_D": cos(dd, ref_dd)}
    result["summary"] = (f"{name} x{batch}, {steps} steps: losses {'agree' if result['losses_agree'] else 'DIFFER'} "
                         f"(largest relative difference {worst:.2g}, tolerance {AGREEMENT_TOLERANCE:g}); update "
                         f"cosine G {result['update_cosine_G']:.3f}, D {result['update_cosine_D']:.3f}")
    return result


def part_generator(ctx: Context, budget: Budget) -> dict:
    presets, batch = ctx.mode["generator"]
    device = ctx.device

    def measure(name):
        torch.manual_seed(0)
        G = HiTGenerator.from_preset(name).to(device).eval()
        z = torch.randn(batch, G.config.latent_dim, device=device)
        calls = {}
        for precision in ("bf16", "fp32"):
            def forward(precision=precision):
                with torch.no_grad(), autocast(precision, device):
                    return G(z)
            calls[precision] = forward
        flops = flops_per_image(name)
        timings = ctx.timing(calls)
        rows = []
        for precision, t in timings.items():
            row = {"what": name, "preset": name, "precision": precision if precision == "bf16" else
                   "fp32 (TF32 matmuls)" if ctx.cuda else "fp32", "batch": batch, "params": G.num_parameters(),
                   "gflops_per_image": flops / 1e9, "paper_v100_images_per_s": PAPER_V100_IMAGES_PER_S.get(name), **t}
            if "median_seconds" in t:
                ips = batch / t["median_seconds"]
                row.update(images_per_s=ips, peak_gb=t.get("peak_gb"),
                           over_paper=ips / row["paper_v100_images_per_s"] if row["paper_v100_images_per_s"] else None,
                           share_of_peak=ctx.share_of_peak(flops * batch, t["median_seconds"], precision))
            rows.append(row)
        return rows

    rows = [r for group in run_rows(budget, [(n, n) for n in presets], lambda n: {"rows": measure(n)})
            for r in group.get("rows", [group])]
    return {"rows": rows, "summary": "; ".join(
        f"{r['preset']} {r['precision'].split()[0]}: {r['images_per_s']:.4g} img/s"
        + (f" (paper, V100: {r['paper_v100_images_per_s']:g})" if r.get("paper_v100_images_per_s") else "")
        if "images_per_s" in r else f"{r['what']}: {r.get('error') or r.get('skipped')}" for r in rows)}


def part_tokenizer_decode(ctx: Context, budget: Budget) -> dict:
    hit_name, conv_name, batch = ctx.mode["decode"]
    device = ctx.device
    decoders, notes = {}, []
    for kind, name in (("hit", hit_name), ("taming", conv_name)):
        try:
            decoders[kind] = (name, VQHiT._build_decoder(VQHiTConfig.from_preset(name)).to(device).eval())
        except ModuleNotFoundError as err:
            notes.append(f"{kind} decoder ({name}): skipped, needs {err.name}, which is not installed here")
    config = VQHiTConfig.from_preset(hit_name)
    codes = torch.randn(batch, config.grid, config.grid, config.code_dim, device=device)
    flops = {}
    for kind, (name, _) in decoders.items():
        with torch.device("meta"):
            meta_decoder = VQHiT._build_decoder(VQHiTConfig.from_preset(name)).eval()
            meta_codes = torch.randn(1, config.grid, config.grid, config.code_dim)
        with torch.no_grad():
            flops[kind] = count_flops(lambda: meta_decoder(meta_codes))[0]
    calls = {}
    for kind, (name, decoder) in decoders.items():
        for precision in ("bf16", "fp32"):
            def decode(decoder=decoder, precision=precision):
                with torch.no_grad(), autocast(precision, device):
                    return decoder(codes)
            calls[kind, precision] = decode
    budget.check("decoder timings")
    timings = ctx.timing(calls)
    rows = []
    for (kind, precision), t in timings.items():
        name, decoder = decoders[kind]
        row = {"what": f"{name} ({kind})", "decoder": kind, "preset": name, "precision": precision, "batch": batch,
               "params": sum(p.numel() for p in decoder.parameters()), "gflops_per_image": flops[kind] / 1e9, **t}
        if "median_seconds" in t:
            row.update(images_per_s=batch / t["median_seconds"], ms_per_image=1e3 * t["median_seconds"] / batch)
        rows.append(row)
    speedups = {}
    for precision in ("bf16", "fp32"):
        ours, theirs = timings.get(("hit", precision), {}), timings.get(("taming", precision), {})
        if "median_seconds" in ours and "median_seconds" in theirs:
            speedups[precision] = theirs["median_seconds"] / ours["median_seconds"]
    summary = "; ".join([f"{r['what']} {r['precision']}: {r['images_per_s']:.4g} img/s" for r in rows
                         if "images_per_s" in r] + [f"HiT over taming {p}: {s:.2f}x" for p, s in speedups.items()]
                        + notes)
    return {"rows": rows, "speedup_over_taming": speedups, "notes": notes, "summary": summary}


def part_trainer_step(ctx: Context, budget: Budget) -> dict:
    importlib.import_module("vqhit.training")  # Accelerate, datasets, torchvision: a missing one skips the part

    def measure(item):
        task, model, batch = item
        result = trainer_step(task, model, {}, batch, ctx.mode["precision"], ctx.threads, ctx.mode["repeats"],
                              ctx.mode["min_repeat_s"], count_flops_too=True)
        with_r1, without_r1 = result["timings"]["with R1"], result["timings"]["without R1"]
        row = {"what": f"{model} Trainer.train_step", "task": task, "model": model, "batch": batch,
               "params": result["params"], "bcr_weight": result["bcr_weight"], "peak_gb": result["peak_gb"],
               "peak_kind": result["peak_kind"], "flops_per_step": result.get("flops"),
               "sdpa": ",".join(result.get("sdpa", [])), "with_r1": with_r1, "without_r1": without_r1}
        if "median_seconds" in with_r1:
            seconds = with_r1["median_seconds"]
            row.update(ms_per_step=1e3 * seconds, images_per_s=batch / seconds,
                       share_of_peak=ctx.share_of_peak(row["flops_per_step"], seconds, ctx.mode["precision"]))
            if "median_seconds" in without_r1:
                row.update(r1_share=1 - without_r1["median_seconds"] / seconds)
        return row

    rows = run_rows(budget, [(f"{m} Trainer.train_step", (t, m, b)) for t, m, b in ctx.mode["trainer"]], measure)
    return {"precision": ctx.mode["precision"], "rows": rows, "summary": "; ".join(
        f"{r['model']} x{r['batch']}: {r['images_per_s']:.3g} img/s, peak {fmt(r.get('peak_gb'))} GB"
        if "images_per_s" in r else f"{r['what']}: {r.get('error') or r.get('skipped')}" for r in rows)}


def ddp_worker(rank: int, world: int, port: int, backend: str, preset: str, batch: int, steps: int,
               result_file: str) -> None:
    """One rank of the two-process check (a module-level function: the spawned processes import it)."""
    cuda = backend == "nccl"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    # The steps run in a function of their own so that their DDP models, which hold the group, are freed when it
    # returns: the group then really ends here, not while the interpreter finalizes (where gloo can abort the process).
    try:
        ddp_steps(rank, world, backend, preset, batch, steps, result_file, device)
    finally:
        dist.destroy_process_group()


def ddp_steps(rank: int, world: int, backend: str, preset: str, batch: int, steps: int, result_file: str,
              device: torch.device) -> None:
    """The training loop's GAN step under DDP for `steps` steps, then the cross-rank checks, written by rank 0."""
    cuda = backend == "nccl"
    precision = "bf16" if cuda else "fp32"
    torch.manual_seed(rank)  # each rank starts from other weights: DDP must give every rank rank 0's
    G, D = build_gan(preset, device)
    ids = [rank] if cuda else None
    # The training loop's settings: no buffer broadcast; BatchNorm statistics averaged after each step.
    warnings.filterwarnings("ignore", ".*broadcast_buffers", FutureWarning)  # see vqhit.distributed.ddp_kwargs
    G_ddp = nn.parallel.DistributedDataParallel(G, device_ids=ids, broadcast_buffers=False)
    D_ddp = nn.parallel.DistributedDataParallel(D, device_ids=ids, broadcast_buffers=False)
    start = flat_state(G, D)
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-3, betas=(0.0, 0.99))
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.0, 0.99))
    torch.manual_seed(1000 + rank)  # each rank its own latents and images
    real = torch.rand(batch, 3, G.config.resolution, G.config.resolution, device=device) * 2 - 1
    for _ in range(steps):  # as vqhit.training.Trainer.train_step: D outside DDP in the G step
        with autocast(precision, device):
            fake = G_ddp(torch.randn(batch, G.config.latent_dim, device=device))
        D.requires_grad_(False)
        with autocast(precision, device):
            g_loss = g_nonsaturating_loss(D(fake).float())
        D.requires_grad_(True)
        g_loss.backward()
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        r1, real_logits = r1_penalty(D_ddp, real, weight=10.0, return_logits=True)
        with autocast(precision, device):
            fake_logits = D_ddp(fake.detach())
        d_loss = d_logistic_loss(real_logits.float(), fake_logits.float()) + r1
        d_loss.backward()
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)
        g_loss, d_loss = g_loss.detach(), d_loss.detach()
        average_batchnorm_stats_(G)
        average_batchnorm_stats_(D)
    state = flat_state(G, D)
    difference = (state - broadcast_(state.clone(), 0)).abs().max()
    differences = all_gather_cat(difference.view(1))
    moved = all_gather_cat((state - start).abs().max().view(1))
    losses = all_gather_cat(torch.tensor([[g_loss.item(), d_loss.item()]], dtype=torch.float64))
    ranks_sum = all_reduce_sum(torch.tensor([rank + 1.0], dtype=torch.float64))
    if rank == 0:
        Path(result_file).write_text(json.dumps({
            "backend": backend, "world_size": world, "preset": preset, "batch_per_rank": batch, "steps": steps,
            "precision": precision, "state_max_difference_per_rank": differences.tolist(),
            "state_moved_per_rank": moved.tolist(), "last_losses_per_rank": losses.tolist(),
            "all_reduce_sum": float(ranks_sum), "all_reduce_expected": world * (world + 1) / 2,
            "nccl": nccl_version() if cuda else None}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def part_ddp(ctx: Context, budget: Budget) -> dict:
    if ctx.cuda:
        if torch.cuda.device_count() < 2:
            raise Skip(f"one GPU ({torch.cuda.device_count()} visible): the two-process check needs two")
        if not dist.is_nccl_available():
            raise Skip("this torch has no NCCL")
        backend = "nccl"
    else:
        backend = "gloo"
    preset, batch, steps = ctx.mode["ddp"]
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "rank0.json"
        processes = torch.multiprocessing.start_processes(
            ddp_worker, args=(2, free_port(), backend, preset, batch, steps, str(result_file)), nprocs=2,
            join=False, start_method="spawn")
        try:
            while not processes.join(timeout=1):
                if budget.left() <= 0:
                    raise TimeoutError(f"the two processes had not finished when the part's budget "
                                       f"({budget.seconds:g} s) ran out")
        finally:
            for process in processes.processes:  # only ours, by their handles
                if process.is_alive():
                    process.kill()
        result = json.loads(result_file.read_text())
    differences, moved = result["state_max_difference_per_rank"], result["state_moved_per_rank"]
    losses = result["last_losses_per_rank"]
    result.update(states_equal=max(differences) == 0.0, states_moved=min(moved) > 0.0,
                  losses_differ=losses[0] != losses[1],
                  all_reduce_ok=result["all_reduce_sum"] == result["all_reduce_expected"])
    result["passed"] = all(result[k] for k in ("states_equal", "states_moved", "losses_differ", "all_reduce_ok"))
    result["summary"] = (f"{backend}, 2 processes, {steps} steps of {preset}: parameters and BatchNorm statistics "
                         f"{'equal' if result['states_equal'] else 'DIFFER (max %.3g)' % max(differences)} across "
                         f"ranks, losses {'differ' if result['losses_differ'] else 'ARE EQUAL'} (own data), "
                         f"all-reduce {'ok' if result['all_reduce_ok'] else 'WRONG'}")
    return result


PARTS = {  # name -> (function, budget in seconds on a GPU)
    "environment": (part_environment, 20),
    "sdpa": (part_sdpa, 40),
    "train_step": (part_train_step, 110),
    "bf16_agreement": (part_bf16_agreement, 40),
    "generator": (part_generator, 60),
    "tokenizer_decode": (part_tokenizer_decode, 40),
    "trainer_step": (part_trainer_step, 90),
    "ddp": (part_ddp, 60),
}
SMOKE_PART_BUDGET = 120  # a loaded 2-core CPU: generous, so that the test measures every part


# -- the report ----------------------------------------------------------------------------------------------------
def headline(part: dict) -> str:
    """A part's one line: its result's summary, or the last line of its reason (an exception's message)."""
    if "result" in part:
        return part["result"].get("summary", "")
    reason = part.get("reason", "").strip().splitlines()
    return reason[-1] if reason else ""


def markdown(report: dict) -> str:
    m, parts = report["machine"], report["parts"]
    lines = [f"# GPU check: {m['device_name']}", "",
             f"{m['date']}, {report['mode']} run, torch {m['torch']}"
             + (f", CUDA {m['cuda']}" if m.get("cuda") else "") + f", {report['total_seconds']:.0f} s in all. "
             f"Dense bf16 peak: " + (f"{report['bf16_peak']['tflops']:g} TFLOP/s ({report['bf16_peak']['entry']})"
                                     if report['bf16_peak']['tflops'] else "unknown for this device") + ".",
             "", "## Summary", ""]
    summary = [{"part": name, "status": p["status"], "seconds": p.get("seconds"), "result": headline(p)}
               for name, p in parts.items()]
    lines.append(format_table(summary, [("part", "part"), ("status", "status"), ("s", "seconds"),
                                        ("result or reason", "result")]))

    def section(title: str, rows: list[dict], columns: list[tuple[str, str]]):
        if rows:
            lines.extend(["", f"## {title}", "", format_table(rows, columns)])

    result = lambda name: parts.get(name, {}).get("result", {})  # noqa: E731
    env = result("environment")
    section("Environment", [{"what": k, "value": v} for k, v in (
        ("GPUs", ", ".join(env.get("gpus", [])) or None), ("GPU memory GB", env.get("memory_gb")),
        ("compute capability", env.get("capability")), ("CUDA", env.get("cuda")), ("cuDNN", env.get("cudnn")),
        ("NCCL", env.get("nccl")), *env.get("packages", {}).items()) if v is not None], [
        ("item", "what"), ("version or value", "value")])
    section(f"Training step in {result('train_step').get('precision')} (G step + D step with R1)",
            result("train_step").get("rows", []), [
        ("what", "what"), ("batch", "batch"), ("params", "params"), ("ms/step", "ms_per_step"),
        ("img/s", "images_per_s"), ("peak GB", "peak_gb"), ("TFLOP/s", "tflops"), ("of bf16 peak", "share_of_peak"),
        ("attention", "sdpa"), ("skipped", "skipped"), ("error", "error")])
    agreement = result("bf16_agreement")
    if "bf16_losses" in agreement:
        rows = [{"step": i + 1, "g32": a[0], "g16": b[0], "d32": a[1], "d16": b[1], "rel": max(r)}
                for i, (a, b, r) in enumerate(zip(agreement["fp32_losses"], agreement["bf16_losses"],
                                                  agreement["relative_difference"]))]
        section(f"bf16 against fp32 (TF32 off): {agreement['preset']}, batch {agreement['batch']}", rows, [
            ("step", "step"), ("G loss fp32", "g32"), ("G loss bf16", "g16"), ("D loss fp32", "d32"),
            ("D loss bf16", "d16"), ("largest relative difference", "rel")])
        lines.append(f"\nUpdate direction after {agreement['steps']} steps, cosine bf16 / fp32: G "
                     f"{agreement['update_cosine_G']:.4f}, D {agreement['update_cosine_D']:.4f}.")
    section("Generator inference against the paper's Table 4 (one V100)", result("generator").get("rows", []), [
        ("preset", "what"), ("params", "params"), ("precision", "precision"), ("batch", "batch"),
        ("GFLOPs/img", "gflops_per_image"), ("img/s", "images_per_s"), ("paper V100 img/s", "paper_v100_images_per_s"),
        ("ours / paper", "over_paper"), ("of bf16 peak", "share_of_peak"), ("peak GB", "peak_gb"),
        ("skipped", "skipped"), ("error", "error")])
    section("Tokenizer decoding from codes: HiT decoder against taming's", result("tokenizer_decode").get("rows", []), [
        ("decoder", "what"), ("params", "params"), ("GFLOPs/img", "gflops_per_image"), ("precision", "precision"),
        ("batch", "batch"), ("ms/img", "ms_per_image"), ("img/s", "images_per_s"), ("error", "error")])
    section(f"Trainer.train_step in {result('trainer_step').get('precision')} (what a training run executes)",
            result("trainer_step").get("rows", []), [
        ("model", "what"), ("batch", "batch"), ("bCR", "bcr_weight"), ("ms/step", "ms_per_step"),
        ("img/s", "images_per_s"), ("R1 share", "r1_share"), ("peak GB", "peak_gb"), ("peak of", "peak_kind"),
        ("of bf16 peak", "share_of_peak"), ("skipped", "skipped"), ("error", "error")])
    sdpa = result("sdpa")
    section("Attention: the SDPA kernels the models run", [
        {"run": run, "calls": r["sdpa_calls"], "fused": r["fused_calls"], "math": r["math_calls"],
         "ops": ", ".join(f"{op} x{n}" for op, n in r["ops"].items()),
         "kernels": ", ".join(list(r["cuda_kernels"])[:3])} for run, r in sdpa.get("runs", {}).items()], [
        ("run", "run"), ("SDPA calls", "calls"), ("fused", "fused"), ("math", "math"), ("operators", "ops"),
        ("CUDA kernels (first 3)", "kernels")])
    backends = sdpa.get("backends", [])
    section("SDPA backends on each attention shape of the models", backends, [
        ("q", "q"), ("k", "k"), ("dtype", "dtype"), ("backward", "backward")]
        + [(name.lower(), name) for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
           if any(name in row for row in backends)])
    lines.append("")
    return "\n".join(lines)


def write_report(output: Path, report: dict) -> None:
    atomic_write(output / FILES[0], lambda p: p.write_text(json.dumps(report, indent=2, default=str) + "\n"))
    atomic_write(output / FILES[1], lambda p: p.write_text(markdown(report)))


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, metavar="DIR",
                        help=f"folder for {FILES[0]} and {FILES[1]} (made if need be)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", metavar="DEVICE",
                        help="cuda, cuda:N or cpu (default: cuda where there is one)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny presets and one timed round: checks that every part runs (its numbers mean nothing)")
    parser.add_argument("--budget-s", type=float, default=360.0,
                        help="the whole run's time budget in seconds (default 360): no part or measurement starts "
                             "after it; what did not run is recorded as skipped")
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS), metavar="PART",
                        help="run only these parts, of: " + ", ".join(PARTS) + " (the others are recorded as not "
                             "asked for)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch threads on the CPU (default: torch's; 1 with --smoke on the CPU, which keeps it "
                             "to seconds on a machine other processes share)")
    parser.add_argument("--overwrite", action="store_true", help=f"replace {FILES[0]} and {FILES[1]} in --output")
    args = parser.parse_args(argv)
    output = check_output_folder(args.output, FILES, overwrite=args.overwrite, option="--output")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: torch.cuda.is_available() is False here; use --device cpu --smoke")
    if not args.smoke and not args.device.startswith("cuda"):
        raise UsageError(f"--device {args.device} without --smoke would train paper presets on a CPU for hours; "
                         "add --smoke (tiny presets), or run on a GPU")
    output.mkdir(parents=True, exist_ok=True)
    threads = args.threads or (1 if args.smoke and not args.device.startswith("cuda") else None)
    timing_args = Namespace(benchmark="gpu_check", device=args.device, precision="bf16", threads=threads,
                            min_repeat_s=(SMOKE if args.smoke else FULL)["min_repeat_s"], json=str(output / FILES[0]),
                            repeats=(SMOKE if args.smoke else FULL)["repeats"])
    device = setup(timing_args)  # TF32 for the fp32 timings on CUDA, as the other benchmarks
    ctx = Context(args, device, threads)
    report = {"machine": machine(device, timing_args), "mode": "smoke" if args.smoke else "full",
              "command": [sys.executable, *sys.argv] if argv is None else ["gpu_check.py", *argv],
              "budget_s": args.budget_s, "bf16_peak": ctx.peak, "total_seconds": 0.0,
              "parts": {name: {"status": "skipped", "reason": "not run yet: the run stopped before this part"
                               if name in args.parts else "not asked for (--parts)"} for name in PARTS}}

    def stop(signum, frame):
        raise Stopped(f"stopped by signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, stop)
    print(f"gpu check: {ctx.peak['device_name']} | torch {torch.__version__} | {report['mode']} | output {output}",
          flush=True)
    stopped = None
    for name in args.parts:
        function, seconds = PARTS[name]
        started = time.monotonic()
        entry = report["parts"][name] = {"status": "error", "budget_s": SMOKE_PART_BUDGET if args.smoke else seconds,
                                         "reason": "the run ended during this part (killed, or crashed)"}
        write_report(output, report)  # what the files say if this part takes the process down
        del entry["reason"]
        print(f"\n== {name} ({ctx.left():.0f} s left of the run's budget)", flush=True)
        try:
            if ctx.left() <= 0:
                raise Skip(f"not run: the run's time budget (--budget-s {args.budget_s:g}) was spent")
            entry.update(status="ok", result=function(ctx, Budget(ctx, entry["budget_s"])))
        except Skip as err:
            entry.update(status="skipped", reason=str(err))
        except ModuleNotFoundError as err:
            entry.update(status="skipped", reason=f"needs {err.name}, which is not installed here ({err})")
        except Stopped as err:
            entry.update(status="error", reason=str(err))
            stopped = err
        except Exception as err:  # noqa: BLE001 - one part's failure is its result; the others still run
            entry.update(status="error", reason=error_text(err))
        finally:
            free_memory(device)
        entry["seconds"] = time.monotonic() - started
        report["total_seconds"] = time.monotonic() - ctx.start
        print(f"   {entry['status']}: {headline(entry)}", flush=True)
        write_report(output, report)
        if stopped:
            break
    print(f"\nwrote {output / FILES[0]} and {output / FILES[1]} ({report['total_seconds']:.0f} s)", flush=True)
    if stopped:
        return 128 + signal.SIGTERM
    return 1 if any(p["status"] == "error" for p in report["parts"].values()) else 0


if __name__ == "__main__":
    sys.exit(run(main))
