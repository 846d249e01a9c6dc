"""The tokenizer demo: held-out photographs, the held-out report, and the demo config."""
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vqhit.data import BUILTIN_HELDOUT_PHOTOS, BUILTIN_PHOTOS, DataConfig, build_dataset
from vqhit.evaluation import eval_dataset, heldout_report
from vqhit.metrics import codebook_usage, psnr, ssim, to_uint8
from vqhit.models.vqhit import VQHiT
from vqhit.train_config import parse_config


def _photo(item: dict) -> str:
    return item["id"].split("/")[0]  # "skimage:astronaut/y0000_x0064.png" -> "skimage:astronaut"


def test_heldout_photos_are_other_photographs_than_the_training_ones():
    train = build_dataset(DataConfig(source="builtin:photos", resolution=16, flip=False, transform="center_crop"))
    heldout = build_dataset(DataConfig(source="builtin:photos-heldout", resolution=16, flip=False,
                                       transform="center_crop"))
    train_photos = {_photo(train[i]) for i in range(len(train))}
    heldout_photos = {_photo(heldout[i]) for i in range(len(heldout))}
    assert train_photos == {f"skimage:{name}" for name in BUILTIN_PHOTOS}
    assert heldout_photos == {f"skimage:{name}" for name in BUILTIN_HELDOUT_PHOTOS}
    assert not train_photos & heldout_photos  # no source photograph in both
    assert len(heldout) >= 100  # enough tiles for a stable mean
    # And by content, not only by name: no held-out tile equals a training tile.
    a = torch.stack([train[i]["image"] for i in range(len(train))]).flatten(1)
    b = torch.stack([heldout[i]["image"] for i in range(len(heldout))]).flatten(1)
    assert torch.cdist(b, a).min() > 1.0


def test_heldout_report_equals_the_metrics_computed_directly(tmp_path):
    torch.manual_seed(0)
    model = VQHiT.from_preset("vqhit-tiny")
    dataset = eval_dataset("builtin:photos-heldout", 64, max_images=6, label_column=None)
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
    assert grid.shape == (2 * 64, 8 * 64, 3)  # 6 pairs, four (original, reconstruction) pairs per row
    first = to_uint8(torch.stack([x[0], rec[0]]))
    assert np.array_equal(grid[:64, :64], first[0].permute(1, 2, 0).numpy())    # the original ...
    assert np.array_equal(grid[:64, 64:128], first[1].permute(1, 2, 0).numpy())  # ... beside its reconstruction


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
        ("vqhit-demo", 700, "runs/vqhit-demo-700", RECIPES["vqhit-demo"]["lr"])
    first = tmp_path / "runs" / "vqhit-demo" / "checkpoint-350"  # what the demo leaves
    first.mkdir(parents=True)
    save_config(parse_config([], "test", "vqhit"), first / "train_config.yaml")
    (first / "train_state.json").write_text('{"step": 350}\n')
    config = parse_config(cont[1:], "test", "vqhit")  # continues that run, with its settings and more steps
    assert (config.steps, config.output_dir, config.resume) == (700, "runs/vqhit-demo", "auto")

    torch.manual_seed(0)
    VQHiT.from_preset("vqhit-demo").eval().save_pretrained(tmp_path / "runs" / "vqhit-demo" / "model")
    result = subprocess.run([sys.executable, str(root / "scripts" / evaluate[0].split("/")[-1]), *evaluate[1:],
                             "--num-images", "8", "--output-dir", str(tmp_path / "eval")],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "eval_rfid.json").read_text())
    assert report["metrics"]["psnr"] > 0 and report["metrics"]["rfid"] is None and report["metrics"]["lpips"] is None
