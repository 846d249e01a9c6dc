"""The tokenizer demo: held-out photographs, the held-out report, and the demo config."""
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vqhit.data import (BUILTIN_HELDOUT_PHOTOS, BUILTIN_PHOTOS, BUILTIN_SOURCES, PACKAGED_PHOTOS, DataConfig,
                        build_dataset)
from vqhit.data import eval_dataset
from vqhit.evaluation import grid_cell, heldout_report
from vqhit.metrics import codebook_usage, psnr, ssim, to_uint8
from vqhit.models.vqhit import VQHiT
from vqhit.train_config import parse_config

def _package_file(name: str) -> Path:
    import importlib.util
    package, file, _ = PACKAGED_PHOTOS[name]
    return Path(importlib.util.find_spec(package).submodule_search_locations[0]) / file



def _photo(item: dict) -> str:
    return item["id"].split("/")[0].split(":")[1]  # "skimage:astronaut/y0000_x0064.png" -> "astronaut"


def _images(source: str, resolution: int = 16) -> tuple[torch.Tensor, set[str]]:
    dataset = build_dataset(DataConfig(source=source, resolution=resolution, flip=False, transform="center_crop"))
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([item["image"] for item in items]), {_photo(item) for item in items}


def test_heldout_photos_are_whole_colour_photographs_never_trained_on():
    heldout, heldout_photos = _images("builtin:photos-heldout")
    assert heldout_photos == set(BUILTIN_HELDOUT_PHOTOS) and len(heldout_photos) >= 4
    assert len(heldout) >= 3 * len(heldout_photos)  # the centre and corner squares of each 3:2 or 4:3 photograph
    training_sources = [source for source, (photos, _) in BUILTIN_SOURCES.items()
                        if photos is not BUILTIN_HELDOUT_PHOTOS]
    trained_on = set()
    for source in training_sources:
        train, train_photos = _images(source)
        trained_on |= train_photos
        assert not train_photos & heldout_photos, source  # no source photograph in both, by name ...
        # ... nor by content: every held-out thumbnail is far from every training image at the same size
        distance = torch.cdist(heldout.flatten(1), train.flatten(1)).min() / heldout[0].numel() ** 0.5
        assert distance > 0.1, source  # RMS difference in [-1, 1] units; a re-encoded copy would be ~0.01
    # The stereo pair's other view is the held-out motorcycle seen from beside it: never a training photograph.
    assert "motorcycle_right" not in trained_on and trained_on >= set(BUILTIN_PHOTOS)
    # Colour photographs, not grey ones repeated into RGB: every held-out image has chroma.
    chroma = (heldout - heldout.mean(dim=1, keepdim=True)).abs().mean(dim=(1, 2, 3))
    assert chroma.min() > 0.02


def test_whole_photo_squares_are_the_centre_and_corners_of_the_short_side():
    dataset = build_dataset(DataConfig(source="builtin:photos-heldout", resolution=64, flip=False,
                                       transform="center_crop"))
    names = [dataset[i]["id"] for i in range(len(dataset))]
    assert "sklearn:china/centre.png" in names and "sklearn:china/top-right.png" in names
    assert len(names) == len(set(names))
    china = [name for name in names if name.startswith("sklearn:china/")]
    assert len(china) == 3  # a landscape photograph: its four corner squares are two distinct ones, plus the centre
    photo = np.asarray(Image.open(_package_file("china")).convert("RGB"))
    side = min(photo.shape[:2])
    centre = photo[:, (photo.shape[1] - side) // 2:][:, :side]
    expected = Image.fromarray(centre).resize((64, 64), Image.BICUBIC)
    got = to_uint8(dataset[names.index("sklearn:china/centre.png")]["image"][None])[0].permute(1, 2, 0).numpy()
    assert np.abs(got.astype(int) - np.asarray(expected).astype(int)).max() <= 1


def test_heldout_report_equals_the_metrics_computed_directly(tmp_path):
    torch.manual_seed(0)
    model = VQHiT.from_preset("vqhit-tiny")
    dataset = eval_dataset("builtin:photos-heldout", 64, max_images=6, label_column=None)
    assert len(dataset) == 6
    model.train()  # the report must switch to eval mode itself (BatchNorm running statistics) and switch back
    report = heldout_report(model, dataset, batch_size=4, device="cpu", grid_path=tmp_path / "grid.png",
                            grid_images=6)
    assert model.training

    model.eval()
    x = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    with torch.no_grad():
        indices = model.encode(x)
        rec = to_uint8(model.decode_indices(indices)).float() / 127.5 - 1
    usage = codebook_usage(indices, model.config.codebook_size, all_reduce=False)
    assert report["num_images"] == 6
    assert abs(report["psnr"] - psnr(x, rec).mean().item()) < 1e-4
    assert abs(report["ssim"] - ssim(x, rec).mean().item()) < 1e-5
    assert report["codebook_usage"] == usage["usage"]
    assert abs(report["codebook_perplexity"] - usage["perplexity"]) < 1e-6

    grid = np.asarray(Image.open(report["grid"]))
    for k in range(6):  # each original above its reconstruction
        for image, below in ((x[k], False), (rec[k], True)):
            left, top = grid_cell(k, below, 64, columns=8)
            assert np.array_equal(grid[top:top + 64, left:left + 64], to_uint8(image[None])[0].permute(1, 2, 0).numpy())
    left, top = grid_cell(1, False, 64, columns=8)
    assert (grid[top:top + 64, left - 2:left] == 255).all()  # a white gap between neighbours
    assert (grid[top:top + 64, :80] < 128).any() and (grid[top + 66:top + 130, :80] < 128).any()  # the row labels


def test_the_default_tokenizer_run_is_a_16x16_tokenizer_judged_on_heldout_photos():
    config = parse_config([], "demo", "vqhit")
    model = VQHiT.from_preset(config.model, **config.model_options)
    assert (config.data, config.heldout_data) == ("builtin:photos", "builtin:photos-heldout")
    assert (model.config.resolution, model.config.grid) == (64, 16)  # 16x16 tokens: what makes 20 dB reachable


def test_the_readmes_next_commands_work_as_written(tmp_path, monkeypatch):
    """The three commands the README gives a newcomer after the demo: train again with more steps, continue,
    evaluate offline. The training commands are parsed (a demo takes minutes); the evaluation runs for real."""
    import shlex
    import subprocess
    import sys

    from vqhit.recipes import RECIPES
    from vqhit.train_config import save_config

    root = Path(__file__).resolve().parents[1]
    block = (root / "README.md").read_text().split("What a newcomer types next")[1].split("```bash")[1]
    commands = [shlex.split(line) for line in block.split("```")[0].splitlines() if line and line[0] != "#"]
    again, cont, evaluate = [cmd[next(i for i, w in enumerate(cmd) if w.endswith(".py")):] for cmd in commands]
    monkeypatch.chdir(tmp_path)

    config = parse_config(again[1:], "test", "vqhit")  # the demo with more steps, in a new folder
    assert (config.model, config.steps, config.output_dir, config.lr) == \
        ("vqhit-demo", 1500, "runs/vqhit-demo-1500", RECIPES["vqhit-demo"]["lr"])
    first = tmp_path / "runs" / "vqhit-demo" / "checkpoint-350"  # what the demo leaves
    first.mkdir(parents=True)
    save_config(parse_config([], "test", "vqhit"), first / "train_config.yaml")
    (first / "train_state.json").write_text('{"step": 350}\n')
    config = parse_config(cont[1:], "test", "vqhit")  # continues that run, with its settings and more steps
    assert (config.steps, config.output_dir, config.resume) == (1500, "runs/vqhit-demo", "auto")

    torch.manual_seed(0)
    VQHiT.from_preset("vqhit-demo").eval().save_pretrained(tmp_path / "runs" / "vqhit-demo" / "model")
    result = subprocess.run([sys.executable, str(root / "scripts" / evaluate[0].split("/")[-1]), *evaluate[1:],
                             "--num-images", "8", "--output-dir", str(tmp_path / "eval")],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "eval_rfid.json").read_text())
    assert report["metrics"]["psnr"] > 0 and report["metrics"]["rfid"] is None and report["metrics"]["lpips"] is None
