"""Every file a run or an export writes gets the mode the user's umask gives any new file (colleagues who share
the user's group can read a model), never the private 0600 a temporary-file writer makes."""
import os
import stat
from pathlib import Path

import pytest
import torch

from vqhit.data import eval_dataset
from vqhit.evaluation import ReferenceStatistics
from vqhit.models.vqhit import VQHiT
from vqhit.tokens import encode_dataset
from vqhit.train_config import config_from_dict
from vqhit.training import Trainer


@pytest.fixture
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("umask", [0o022, 0o027], indirect=True, ids=["umask022", "umask027"])
def test_exports_checkpoints_tokens_and_statistics_follow_the_umask(tmp_path, umask, make_images):
    expected = 0o666 & ~umask  # 0644 or 0640: what `touch` would make
    torch.manual_seed(0)
    model = VQHiT.from_preset("vqhit-tiny").eval()
    exported = modes(model.save_pretrained(tmp_path / "model"))
    assert {"model.safetensors", "config.json", "README.md"} <= set(exported)

    make_images(tmp_path / "images", {"": 3})
    encode_dataset(model, eval_dataset(str(tmp_path / "images"), 64), tmp_path / "tokens", shard_size=2,
                   device="cpu", progress=False)
    tokens = modes(tmp_path / "tokens")
    assert {"tokens.json", "shard-00000.safetensors", "shard-00001.safetensors"} <= set(tokens)

    ReferenceStatistics(torch.zeros(2).numpy(), torch.eye(2).numpy(), 3, {}).save(tmp_path / "stats" / "ref.npz")

    config = config_from_dict(dict(model="hit-tiny", output_dir=str(tmp_path / "run"), num_workers=0, max_images=4,
                                   batch_size=2, disc_max_channels=16, steps=1, log_every=1, num_samples=2))
    Trainer(config, "gan").fit()
    run = modes(tmp_path / "run")
    assert {"checkpoint-1/model.safetensors", "checkpoint-1/model_1.safetensors", "checkpoint-1/ema/model.safetensors",
            "model/model.safetensors", "model/config.json"} <= set(run)

    found = {**exported, **tokens, **modes(tmp_path / "stats"),
             **run}
    wrong = {name: oct(mode) for name, mode in found.items() if mode != expected}
    assert not wrong, f"expected {oct(expected)} for every file"
