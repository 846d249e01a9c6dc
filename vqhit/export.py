"""Export a model's inference graphs to ONNX, for onnxruntime and the other ONNX runtimes.

    from vqhit.export import export_model, load_pretrained
    export_model(load_pretrained("runs/vqhit-demo/model"), "exports/vqhit-demo")
    # or: python scripts/export.py --model runs/vqhit-demo/model --format onnx --output-dir exports/vqhit-demo

A tokenizer (`VQHiT`, whatever its decoder kind) exports two graphs, a generator (`HiTGenerator`) one; every input
and output has a dynamic batch axis (B >= 1), and every float is float32:

    encoder.onnx    images (B, 3, R, R) in [-1, 1]  ->  indices (B, h, w) int64       VQHiT.encode
    decoder.onnx    indices (B, h, w) int64        ->  images (B, 3, R, R)           VQHiT.decode_indices
    generator.onnx  latents (B, latent_dim)        ->  images (B, 3, R, R)           HiTGenerator.forward

beside `config.json`, the file `save_pretrained` writes (model_type, resolution, codebook size, ...), so that a
program running the graphs knows the shapes. Images come out unbounded, as from PyTorch: clamp to [-1, 1] to show.

The graphs are the models' eval-mode function, traced through their plain modules. The eval-mode inference path of
`vqhit.models.inference` computes the same function (tests/test_fast_path.py), but through Python choices that
depend on the batch size and the thread count (which stages to fold, how many pixel chunks to loop over): traced,
they would fix the batch size of the graph. The export turns it off (`HiTStages.fast_inference`), and onnxruntime
makes its own fusions. The checks of the public methods, which read the tensors' values (images in range, no NaN,
indices in range), are not in the graphs either: onnxruntime refuses an index >= K, but takes a negative one as
Python does (-1 is the last code), so pass indices in [0, K).

The exporter is torch.onnx's TorchScript-based one (`dynamo=False`), which needs only the `onnx` package: the
torch.export-based one gives the same outputs but took 7-24 s per graph of the tiny presets against 0.3-2 s, and
needs `onnxscript` besides (docs/decisions.md). Recent torch calls it legacy; its warnings are not shown.

The export folder is written whole or not at all: the graphs and config.json go to a hidden folder beside it,
`.<name>.partial`, which is renamed into place once complete (`files.replace_folder`), so a kill leaves the previous
folder (or none). A non-empty folder is refused unless `overwrite`, which replaces it whole; even then a folder
holding files an export does not write is refused, rather than deleted with it.
"""
from __future__ import annotations

import contextlib
import importlib.util
import inspect
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import UnavailableError, UsageError
from .files import check_output_folder, give_default_mode, replace_folder
from .models.hit import HiTGenerator, HiTStages
from .models.pretrained import CONFIG_NAME, read_config_file, resolve_pretrained
from .models.vqhit import VQHiT

FORMATS = ("onnx",)
OPSET = 17
# The batch size the graphs are traced at: neither 1 nor a size the tests run, so a size traced into a graph instead
# of the dynamic batch axis shows as a wrong shape there.
TRACE_BATCH = 2
MODEL_CLASSES = {cls.model_type: cls for cls in (VQHiT, HiTGenerator)}
# Every name an export may write: what `overwrite` may replace.
GRAPH_FILES = ("encoder.onnx", "decoder.onnx", "generator.onnx")


class TokenizerEncoder(nn.Module):
    """images (B, 3, R, R) -> indices (B, h, w) int64: `VQHiT.encode` without its checks of the images' values."""

    def __init__(self, model: VQHiT):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.quantize.encode(m.quant_conv(m.encoder(images)).permute(0, 2, 3, 1))


class TokenizerDecoder(nn.Module):
    """indices (B, h, w) int64 -> images (B, 3, R, R): `VQHiT.decode_indices` without its checks of the indices'
    values."""

    def __init__(self, model: VQHiT):
        super().__init__()
        self.model = model

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.model.decoder(self.model.quantize.code_vectors(indices))


def graphs(model: nn.Module) -> dict:
    """{file name: (module, example input, input name, output name)} of the graphs `model` exports."""
    if not isinstance(model, (VQHiT, HiTGenerator)):
        raise UsageError(f"ONNX export takes a VQHiT tokenizer or a HiTGenerator, got a {type(model).__name__}")
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise UsageError(f"the graphs are float32 and the model holds {', '.join(sorted(map(str, dtypes)))} weights; "
                         f"export model.float()")
    device = next(model.parameters()).device
    rng = torch.Generator().manual_seed(0)  # the caller's random stream is left alone
    if isinstance(model, VQHiT):
        c = model.config
        images = torch.rand(TRACE_BATCH, 3, c.resolution, c.resolution, generator=rng) * 2 - 1
        indices = torch.randint(0, c.codebook_size, (TRACE_BATCH, c.grid, c.grid), generator=rng)
        return {"encoder.onnx": (TokenizerEncoder(model), images.to(device), "images", "indices"),
                "decoder.onnx": (TokenizerDecoder(model), indices.to(device), "indices", "images")}
    latents = torch.randn(TRACE_BATCH, model.config.latent_dim, generator=rng)
    return {"generator.onnx": (model, latents.to(device), "latents", "images")}


def load_pretrained(path_or_id) -> nn.Module:
    """The model of a save_pretrained folder or Hub repository, of whichever class its config.json names, in eval
    mode."""
    directory = resolve_pretrained(path_or_id)
    model_type = read_config_file(directory).get("model_type")
    if model_type not in MODEL_CLASSES:
        raise UsageError(f"{directory} holds a {model_type!r} model; export takes "
                         f"{' or '.join(repr(t) for t in MODEL_CLASSES)} models (a tokenizer or a generator)")
    return MODEL_CLASSES[model_type].from_pretrained(directory)


def check_format(format: str) -> None:
    """Refuse an unknown export format, or one whose package is not installed."""
    if format not in FORMATS:
        raise UsageError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if importlib.util.find_spec("onnx") is None:
        raise UnavailableError("ONNX export needs the onnx package: pip install 'vqhit[onnx]' (onnxruntime, which "
                               "runs the graphs, comes with it)")


def check_export_folder(folder, *, overwrite: bool = False, option: str = "--output-dir") -> Path:
    """Refuse, before any work, a folder the export cannot write: a file (or under one), a non-empty folder unless
    `overwrite`, and a folder holding files an export does not write, which replacing it would delete."""
    folder = check_output_folder(folder, option=option)
    held = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if held and not overwrite:
        raise _export_folder_not_empty(option, folder, held)
    foreign = [name for name in held if name not in (*GRAPH_FILES, CONFIG_NAME)]
    if foreign:
        raise _not_an_export_file(option, folder, foreign[0])
    return folder


def _export_folder_not_empty(option: str, folder: Path, held: list[str]) -> UsageError:
    return UsageError(f"{option} {folder} is not empty (it holds {held[0]}{' and more' if len(held) > 1 else ''}); "
                      f"export into a new or empty folder, or pass --overwrite (overwrite=True) to replace the "
                      f"export in it")


def _not_an_export_file(option: str, folder: Path, name: str) -> UsageError:
    return UsageError(f"{option} {folder} holds {name}, which is not a file of an ONNX export; --overwrite "
                      f"replaces the folder whole and would delete it: export into a new or empty folder")


def export_model(model: nn.Module, output_dir, *, format: str = "onnx", overwrite: bool = False) -> Path:
    """Write the graphs of a `VQHiT` or `HiTGenerator` (see the module docstring) and its config.json into
    `output_dir`, whole or not at all. Returns the folder. The model is left as it was (its modes, its weights)."""
    check_format(format)
    todo = graphs(model)
    folder = check_export_folder(output_dir, overwrite=overwrite).resolve()
    partial = folder.with_name(f".{folder.name}.partial")
    if partial.exists():  # left by an export that was killed
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        with tracing(model):
            for name, (module, example, input_name, output_name) in todo.items():
                export_graph(module, example, partial / name, input_name, output_name)
        (partial / CONFIG_NAME).write_text(model.config_file_text())
        give_default_mode(partial)
        replace_folder(partial, folder)
    finally:
        if partial.exists():
            shutil.rmtree(partial)
    return folder


@contextlib.contextmanager
def tracing(model: nn.Module):
    """The model in eval mode, through its plain modules, without autograd; every module's mode and every
    `fast_inference` flag are put back afterwards."""
    modes = {m: m.training for m in model.modules()}
    stages = {m: m.fast_inference for m in model.modules() if isinstance(m, HiTStages)}
    model.eval()
    for m in stages:
        m.fast_inference = False
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes.items():
            m.training = training
        for m, fast in stages.items():
            m.fast_inference = fast


def export_graph(module: nn.Module, example: torch.Tensor, path, input_name: str, output_name: str) -> None:
    """`module` traced on `example` into the ONNX file `path`, with the first axis of its input and output dynamic
    ("batch"). Call it inside `tracing(model)`: the exporter traces in eval mode, but then puts back the mode the
    module had, and a wrapper module is created in training mode, which it would pass on to the model it wraps."""
    kwargs = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with warnings.catch_warnings():
        # The tracer warns of every Python branch on a shape; they read only the sizes that are fixed in a graph
        # (widths, heads, resolution), except the empty-batch branches, which a graph with B >= 1 never takes.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy TorchScript-based ONNX export" (torch >= 2.9)
        warnings.filterwarnings("ignore", "Constant folding", UserWarning)  # a strided slice left to the runtime
        torch.onnx.export(module, (example,), str(path), input_names=[input_name], output_names=[output_name],
                          dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}}, opset_version=OPSET,
                          **kwargs)
