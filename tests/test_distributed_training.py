"""Both training scripts as 2-process CPU runs (torch.distributed, gloo) for a few steps."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vqhit import HiTGenerator
from vqhit.models.vqhit import VQHiT

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("script,cls", [("train_gan.py", HiTGenerator), ("train_vqhit.py", VQHiT)])
def test_two_process_run(tmp_path, script, cls):
    out = tmp_path / "run"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(ROOT / "scripts" / script), "--steps", "3", "--output-dir", str(out), "--num-workers", "0",
           "--max-images", "16", "--batch-size", "2", "--disc-max-channels", "32", "--checkpoint-every", "3",
           "--adv-start", "1", "--log-every", "1"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = out / "checkpoint-3"
    states = [torch.load(checkpoint / f"random_states_{r}.pkl", weights_only=False) for r in (0, 1)]
    # each process saved its own RNG stream, and they differ: latents are seeded per process
    assert not torch.equal(states[0]["torch_manual_seed"], states[1]["torch_manual_seed"])
    model = cls.from_pretrained(out / "model").eval()
    with torch.no_grad():
        x = torch.randn(2, model.config.latent_dim) if cls is HiTGenerator else torch.rand(2, 3, 64, 64) * 2 - 1
        y = model(x) if cls is HiTGenerator else model(x)[0]
    assert torch.isfinite(y).all()
