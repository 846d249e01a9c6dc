"""ONNX export: every graph computes in onnxruntime what the model computes in PyTorch, at batch sizes 1 and 3 from
one file; the export folder is written whole or not at all, never over a user's files; the command's mistakes are
one line."""
import json
import runpy
import shutil
from pathlib import Path

import onnxruntime
import pytest
import torch
import torch.nn.functional as F

from conftest import nontrivial

from vqhit import HiTGenerator, VQHiT
from vqhit import cli, export
from vqhit.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4  # max abs difference of float32 images, onnxruntime against PyTorch
BATCHES = (1, 3)  # the graphs are traced at batch 2 (export.TRACE_BATCH): both sizes differ from it


def run_export(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of scripts/export.py run as its `if __name__ == "__main__"` runs it."""
    main = runpy.run_path(str(ROOT / "scripts" / "export.py"), run_name="script")["main"]
    try:
        cli.run(main, argv)
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    out, err = capsys.readouterr()
    return code, out, err


def session(path: Path) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_graph(path: Path, inputs: torch.Tensor) -> torch.Tensor:
    sess = session(path)
    (name,) = [i.name for i in sess.get_inputs()]
    return torch.from_numpy(sess.run(None, {name: inputs.numpy()})[0])


def assert_close_images(got: torch.Tensor, expected: torch.Tensor):
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert expected.abs().max() > 0.5  # far from zero, so that 1e-4 means something
    error = (got - expected).abs().max().item()
    assert error <= TOLERANCE, f"onnxruntime departs from PyTorch by {error:.3g}"


def assert_nearest_codes(model: VQHiT, images: torch.Tensor, got: torch.Tensor):
    """`got` (onnxruntime's indices) is model.encode's, except where two codes are equally near within float32
    rounding (the two runtimes sum in other orders): there it is one of the nearest."""
    expected = model.encode(images)
    assert got.dtype == torch.int64 and got.shape == expected.shape
    assert expected.unique().numel() >= 8  # the images use many codes: an index mix-up would show
    differ = got != expected
    assert differ.float().mean() <= 0.02
    if differ.any():
        q = model.quantize
        with torch.no_grad():
            z = q._to_search_space(model.encode_latents(images))
            z = F.normalize(z, dim=-1) if q.l2_normalize else z
            distances = q._distances(z.reshape(-1, z.shape[-1]), q._codebook())
        gap = distances.gather(1, got.reshape(-1, 1)) - distances.min(1, keepdim=True).values
        assert gap.max() <= TOLERANCE


def image_scale(model, stages, run):
    """Scale the to-RGB Linears of `stages` (the image is linear in them) so that `run()` peaks at 2, as images in
    [-1, 1] with excursions do. `nontrivial`'s unit-gain weights compound over the stages to peaks of 35-46, where
    float32 rounding alone, in either runtime, reaches 1e-4."""
    with torch.no_grad():
        scale = 2 / run().abs().max()
        for stage in stages.stages:
            if stage.to_rgb is not None:
                stage.to_rgb[-1].weight.mul_(scale)
                stage.to_rgb[-1].bias.mul_(scale)
    return model


def tokenizer(preset: str) -> VQHiT:
    torch.manual_seed(0)
    model = VQHiT.from_preset(preset)
    nontrivial(model.decoder).eval()
    if preset == "vqhit-tiny":
        indices = torch.randint(0, model.config.codebook_size, (4, model.config.grid, model.config.grid))
        image_scale(model, model.decoder.stages, lambda: model.decode_indices(indices))
    return model.eval()


@pytest.fixture(scope="module")
def exported_tokenizer(tmp_path_factory):
    """vqhit-tiny saved, then exported by scripts/export.py: (model, model folder, export folder)."""
    root = tmp_path_factory.mktemp("tokenizer")
    model = tokenizer("vqhit-tiny")
    model.save_pretrained(root / "model")
    cli.run(runpy.run_path(str(ROOT / "scripts" / "export.py"), run_name="script")["main"],
            ["--model", str(root / "model"), "--format", "onnx", "--output-dir", str(root / "onnx")])
    return model, root / "model", root / "onnx"


@pytest.mark.parametrize("batch", BATCHES)
def test_the_tokenizer_graphs_compute_what_pytorch_does(exported_tokenizer, batch):
    model, _, folder = exported_tokenizer
    c = model.config
    generator = torch.Generator().manual_seed(batch)
    images = torch.rand(batch, 3, c.resolution, c.resolution, generator=generator) * 2 - 1
    assert_nearest_codes(model, images, run_graph(folder / "encoder.onnx", images))
    indices = torch.randint(0, c.codebook_size, (batch, c.grid, c.grid), generator=generator)
    assert_close_images(run_graph(folder / "decoder.onnx", indices), model.decode_indices(indices))


def test_the_export_folder_holds_the_graphs_and_the_models_config(exported_tokenizer):
    _, model_folder, folder = exported_tokenizer
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "decoder.onnx", "encoder.onnx"]
    assert (folder / "config.json").read_text() == (model_folder / "config.json").read_text()
    assert not list(folder.parent.glob(".*"))  # no staging folder left beside it
    sess = session(folder / "decoder.onnx")
    (graph_input,), (graph_output,) = sess.get_inputs(), sess.get_outputs()
    assert (graph_input.name, graph_input.type, graph_output.name) == ("indices", "tensor(int64)", "images")
    assert graph_input.shape[0] == graph_output.shape[0] == "batch"


@pytest.mark.parametrize("preset", ["vqgan-tiny", "vqvit-tiny"])
def test_the_baseline_decoders_export_too(preset, tmp_path):
    """The decoder graph alone: the encoder is vqhit-tiny's, tested above."""
    model = tokenizer(preset)
    module, example, *names = export.graphs(model)["decoder.onnx"]
    with export.tracing(model):
        export.export_graph(module, example, tmp_path / "decoder.onnx", *names)
    c = model.config
    for batch in BATCHES:
        indices = torch.randint(0, c.codebook_size, (batch, c.grid, c.grid))
        assert_close_images(run_graph(tmp_path / "decoder.onnx", indices), model.decode_indices(indices))


# The paper's generator and the variants whose attention and norms trace other operators.
GENERATORS = [{}, {"multi_query": False, "attention_mode": "axial", "norm": "layer"}]


@pytest.mark.parametrize("overrides", GENERATORS, ids=["hit-tiny", "multi-head-axial-layernorm"])
def test_the_generator_graph_computes_what_pytorch_does(overrides, tmp_path, capsys):
    torch.manual_seed(0)
    model = nontrivial(HiTGenerator.from_preset("hit-tiny", **overrides)).eval()
    image_scale(model, model.stages, lambda: model(torch.randn(4, model.config.latent_dim)))
    model.save_pretrained(tmp_path / "model")
    code, out, err = run_export(["--model", str(tmp_path / "model"), "--output-dir", str(tmp_path / "onnx")], capsys)
    assert code == 0 and err == "", err
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == ["config.json", "generator.onnx"]
    for batch in BATCHES:
        latents = torch.randn(batch, model.config.latent_dim)
        with torch.no_grad():
            expected = model(latents)
        assert_close_images(run_graph(tmp_path / "onnx" / "generator.onnx", latents), expected)


def test_exporting_leaves_the_model_as_it_was(tmp_path):
    """The exporter runs the model in eval mode through its plain modules, and puts back every module's mode (a
    module it found in training mode came back so, and took the model with it) and the inference path."""
    model = tokenizer("vqhit-tiny").train()
    model.encoder.eval()  # a mix of modes, as a frozen encoder has
    modes = {name: m.training for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    export.export_model(model, tmp_path / "onnx")
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert model.decoder.stages.fast_inference
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # no BatchNorm statistics moved
    assert torch.equal(torch.get_rng_state(), rng)


def test_overwrite_replaces_an_earlier_export_whole(exported_tokenizer, tmp_path, capsys):
    generator = tmp_path / "generator"
    HiTGenerator.from_preset("hit-tiny").save_pretrained(generator)
    folder = tmp_path / "onnx"
    shutil.copytree(exported_tokenizer[2], folder)
    code, out, err = run_export(["--model", str(generator), "--output-dir", str(folder), "--overwrite"], capsys)
    assert code == 0 and out == f"{folder}: config.json, generator.onnx\n"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "generator.onnx"]  # no stale encoder.onnx
    assert json.loads((folder / "config.json").read_text())["model_type"] == "hit-generator"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["generator", "onnx"]


def test_a_failed_export_leaves_the_earlier_one(exported_tokenizer, tmp_path, monkeypatch):
    """An export that fails (or is killed) after its first graph leaves the folder as it was; the next export clears
    what a killed one left beside it."""
    model = exported_tokenizer[0]
    folder = tmp_path / "onnx"
    generator = HiTGenerator.from_preset("hit-tiny")
    export.export_model(generator, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    written = []

    def failing(module, example, path, *names):
        if written:
            raise KeyboardInterrupt
        written.append(path)
        real(module, example, path, *names)

    real = export.export_graph
    monkeypatch.setattr(export, "export_graph", failing)
    with pytest.raises(KeyboardInterrupt):
        export.export_model(model, folder, overwrite=True)
    assert written and {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]

    monkeypatch.setattr(export, "export_graph", real)
    (tmp_path / ".onnx.partial").mkdir()  # what a kill leaves
    (tmp_path / ".onnx.partial" / "encoder.onnx").write_text("half")
    export.export_model(generator, folder, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "generator.onnx"]


@pytest.fixture
def folders(tmp_path, exported_tokenizer):
    """{tmp}/model (a saved tokenizer), {tmp}/file, {tmp}/used (a user's file), {tmp}/done (an earlier export)."""
    _, model_folder, export_folder = exported_tokenizer
    (tmp_path / "model").symlink_to(model_folder)
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "config.json").write_text("{}")
    return tmp_path


MISTAKES = [
    (["--model", "{tmp}/missing", "--output-dir", "{tmp}/onnx"], "--model {tmp}/missing: no such folder"),
    (["--model", "{tmp}", "--output-dir", "{tmp}/onnx"], "--model {tmp}: no config.json in {tmp}"),
    (["--model", "{tmp}/model", "--format", "tflite", "--output-dir", "{tmp}/onnx"],
     "argument --format: invalid choice: 'tflite' (choose from 'onnx')"),
    (["--model", "{tmp}/model"], "the following arguments are required: --output-dir"),
    (["--model", "{tmp}/model", "--output-dir", "{tmp}/done"],
     "--output-dir {tmp}/done is not empty (it holds config.json); export into a new or empty folder, or pass "
     "--overwrite"),
    (["--model", "{tmp}/model", "--output-dir", "{tmp}/used"], "--output-dir {tmp}/used is not empty"),
    (["--model", "{tmp}/model", "--output-dir", "{tmp}/used", "--overwrite"],
     "--output-dir {tmp}/used holds notes.txt, which is not a file of an ONNX export"),
    (["--model", "{tmp}/model", "--output-dir", "{tmp}/file"], "--output-dir {tmp}/file is a file, not a folder"),
    (["--model", "{tmp}/model", "--output-dir", "{tmp}/file/onnx"], "--output-dir {tmp}/file/onnx lies under"),
]


@pytest.mark.parametrize("argv, says", MISTAKES, ids=[m[1][:50] for m in MISTAKES])
def test_a_mistake_is_one_line_and_writes_nothing(argv, says, folders, capsys):
    before = sorted(str(p.relative_to(folders)) for p in folders.rglob("*"))
    code, out, err = run_export([a.replace("{tmp}", str(folders)) for a in argv], capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert says.replace("{tmp}", str(folders)) in err
    assert sorted(str(p.relative_to(folders)) for p in folders.rglob("*")) == before


def test_a_model_of_another_kind_is_named(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "discriminator"}')
    code, _, err = run_export(["--model", str(tmp_path / "model"), "--output-dir", str(tmp_path / "onnx")], capsys)
    assert code == 2 and "holds a 'discriminator' model; export takes 'vqhit' or 'hit-generator' models" in err


def test_without_the_onnx_package_the_export_says_what_to_install(folders, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else find_spec(name, *a))
    loads = []
    monkeypatch.setattr(export, "load_pretrained", lambda path: loads.append(path))
    code, _, err = run_export(["--model", str(folders / "model"), "--output-dir", str(folders / "onnx")], capsys)
    assert code == 2 and err.count("\n") == 1 and "ONNX export needs the onnx package: pip install 'vqhit[onnx]'" in err
    assert loads == [] and not (folders / "onnx").exists()  # said before the model was loaded
    with pytest.raises(UsageError, match=r"pip install 'vqhit\[onnx\]'"):
        export.export_model(HiTGenerator.from_preset("hit-tiny"), folders / "onnx")
    assert not (folders / "onnx").exists()


def test_an_unknown_format_or_model_is_refused_by_the_library(tmp_path):
    with pytest.raises(UsageError, match="unknown export format 'tflite'; choose one of onnx"):
        export.export_model(HiTGenerator.from_preset("hit-tiny"), tmp_path / "onnx", format="tflite")
    with pytest.raises(UsageError, match="takes a VQHiT tokenizer or a HiTGenerator, got a Linear"):
        export.export_model(torch.nn.Linear(2, 2), tmp_path / "onnx")
    with pytest.raises(UsageError, match=r"the model holds torch.bfloat16 weights; export model.float\(\)"):
        export.export_model(HiTGenerator.from_preset("hit-tiny").to(torch.bfloat16), tmp_path / "onnx")
    assert list(tmp_path.iterdir()) == []
