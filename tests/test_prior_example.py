"""The README's tokens commands as written: encode the photographs as a Parquet dataset, load it with `datasets`,
and train the MaskGIT prior of examples/ on it (tiny: a few steps of a small transformer)."""
import json
import math
import os
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from vqhit.metrics import to_uint8
from vqhit.models.vqhit import VQHiT
from vqhit.tokens import load_tokens

ROOT = Path(__file__).resolve().parents[1]
TINY_PRIOR = ["--steps", "3", "--dim", "32", "--depth", "1", "--heads", "2", "--batch-size", "4", "--eval-every", "2",
              "--samples", "4", "--sampling-steps", "3"]


def readme_commands() -> list[list[str]]:
    block = (ROOT / "README.md").read_text().split("Tokens for a generative model")[1].split("```bash")[1]
    return [shlex.split(line) for line in block.split("```")[0].replace("\\\n", " ").splitlines() if line.strip()]


def test_the_readmes_tokens_commands_encode_load_and_train_the_prior(tmp_path, monkeypatch, capsys):
    encode_photos, encode_heldout, load, prior = readme_commands()
    assert [cmd[1] for cmd in (encode_photos, encode_heldout, prior)] == \
        ["scripts/encode.py", "scripts/encode.py", "examples/maskgit_prior.py"]
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    tokenizer = VQHiT.from_preset("vqhit-demo").eval()  # untrained: the wiring, not the figures, is under test
    tokenizer.save_pretrained(tmp_path / "runs" / "vqhit-demo" / "model")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    quick = ["--num-workers", "0", "--no-progress"]
    for command, extra in ((encode_photos, ["--max-images", "24", *quick]), (encode_heldout, quick), (load, [])):
        argv = [sys.executable] + [str(ROOT / word) if word.endswith(".py") else word for word in command[1:]]
        result = subprocess.run(argv + extra, capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    assert "num_rows: 24" in result.stdout  # what load_dataset printed

    main = runpy.run_path(str(ROOT / prior[1]), run_name="example")["main"]
    figures = main([*prior[2:], *TINY_PRIOR, "--cache-dir", str(tmp_path / "hf")])
    out = capsys.readouterr().out
    assert "24 training grids and 12 held-out grids of 16x16 tokens, 1024 codes" in out
    assert "held-out masked-token cross-entropy" in out and "unigram entropy of the codes" in out

    # The unigram figures are those of the tokens themselves.
    train, heldout = load_tokens("tokens/photos").indices.long(), load_tokens("tokens/photos-heldout").indices.long()
    counts = torch.bincount(train.flatten(), minlength=1024).double()
    p = counts[counts > 0] / counts.sum()
    assert math.isclose(figures["unigram_entropy_bits"], -(p * p.log2()).sum().item(), rel_tol=1e-9)
    smoothed = (counts + 1) / (counts.sum() + 1024)
    assert math.isclose(figures["unigram_heldout_bits"], -smoothed.log2()[heldout.flatten()].mean().item(),
                        rel_tol=1e-9)
    assert 0 < figures["heldout_bits"] < 2 * math.log2(1024)  # a few steps from uniform (10 bits): near it
    assert json.loads((tmp_path / "runs" / "maskgit-prior" / "prior.json").read_text()) == \
        {k: v for k, v in figures.items() if k != "samples"}

    # Every position sampled (no mask token left), and samples.png is the tokenizer's decoding of those samples.
    samples = figures["samples"]
    assert samples.shape == (4, 16, 16) and 0 <= samples.min() and samples.max() < 1024
    with torch.no_grad():
        expected = make_grid(to_uint8(tokenizer.decode_indices(samples)), nrow=2, padding=2, pad_value=255)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "runs" / "maskgit-prior" / "samples.png")),
                          expected.permute(1, 2, 0).numpy())


def test_the_prior_reads_its_tokens_without_vqhit(tmp_path, make_images):
    """What the example reads with is `datasets` and the card alone: vqhit is imported only to draw samples."""
    from vqhit.data import eval_dataset
    from vqhit.tokens import encode_dataset

    make_images(tmp_path / "images", {"": 3})
    torch.manual_seed(0)
    encode_dataset(VQHiT.from_preset("vqhit-tiny").eval(), eval_dataset(str(tmp_path / "images"), 64),
                   tmp_path / "tokens", device="cpu", progress=False, file_format="parquet")
    code = ("import runpy, sys; read = runpy.run_path(sys.argv[1])['read_tokens']; "
            "tokens, manifest = read(sys.argv[2], sys.argv[3]); "
            "print(tuple(tokens.shape), manifest['codebook_size'], any(m.split('.')[0] == 'vqhit' for m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code, str(ROOT / "examples" / "maskgit_prior.py"),
                             str(tmp_path / "tokens"), str(tmp_path / "hf")], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[-2] == "(3, 8, 8) 256 False"
