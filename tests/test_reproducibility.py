"""Bit-exact training on CPU at more than one thread (the same command twice, a stopped and resumed run), and the
`--deterministic` option (vqhit.reproducibility).

The tokenizer runs use the demo preset at batch 8: its codebook gradient (2,048 tokens x 32 dims) is large enough for
PyTorch to split a scatter-add over threads, which the tiny presets' gradients are not.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from vqhit.resume import list_checkpoints
from vqhit.models.quantizer import VectorQuantizer
from vqhit.preemption import EXIT_PREEMPTED

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def restore_deterministic_flags(monkeypatch):
    """The process-wide switches that use_deterministic_algorithms turns on, set back after the test."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1:]


# -- the codebook's gradient ---------------------------------------------------------------------------------------
def test_the_codebook_gradient_is_the_scatter_add_in_token_order_at_two_threads(two_threads):
    torch.manual_seed(0)
    vq = VectorQuantizer(codebook_size=1024, code_dim=32)
    indices = torch.randint(0, 1024, (8, 16, 16))
    upstream = torch.randn(8, 16, 16, 32)
    vq.lookup(indices).backward(upstream)
    expected = torch.zeros(1024, 32)
    for code, grad in zip(indices.flatten().tolist(), upstream.reshape(-1, 32)):  # one token after the other
        expected[code] += grad
    assert torch.equal(vq.embedding.weight.grad, expected)


def test_the_quantizer_step_gives_the_same_bits_every_time_at_two_threads(two_threads):
    torch.manual_seed(0)
    vq = VectorQuantizer(codebook_size=1024, code_dim=32, l2_normalize=True)  # the demo's codebook
    z = torch.randn(8, 16, 16, 32)

    def codebook_gradient():
        vq.embedding.weight.grad = None
        out = vq(z)
        (out.loss + out.quantized.square().mean()).backward()
        return vq.embedding.weight.grad.clone()

    first = codebook_gradient()
    assert all(torch.equal(first, codebook_gradient()) for _ in range(10))


# -- whole runs of the training script -----------------------------------------------------------------------------
DEMO_ARGS = ["--model", "vqhit-demo", "--max-images", "16", "--batch-size", "8", "--cpu-threads", "2",
             "--model-option", "dead_code_steps=2",  # restarts dead codes from the first steps on
             "--ema-start", "0", "--log-every", "1", "--sample-every", "1000", "--checkpoint-every", "3",
             "--num-samples", "2", "--heldout-data", "none", "--resume", "auto"]


def start(script: str, out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "scripts" / script), *args, "--output-dir", str(out)],
                            cwd=ROOT, env={**os.environ, "ACCELERATE_USE_CPU": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, status: int = 0) -> str:
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == status, output[-3000:]
    return output


def logged_steps(out: Path) -> list[int]:
    path = out / "logs.jsonl"
    steps = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:  # a line being written
            pass
    return steps


def differing(a: Path, b: Path) -> list[str]:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    return [k for k in x if not torch.equal(x[k], y[k])]


def assert_same_run(a: Path, b: Path, steps: int) -> None:
    """The EMA export, the autoencoder and the discriminator of the last checkpoint, and the optimiser states."""
    for part in ("model/model.safetensors", f"checkpoint-{steps}/model.safetensors",
                 f"checkpoint-{steps}/model_1.safetensors"):
        diff = differing(a / part, b / part)
        assert not diff, f"{part}: {len(diff)} tensors differ, e.g. {diff[:3]}"
    for part in ("optimizer.bin", "optimizer_1.bin"):
        x, y = (torch.load(run / f"checkpoint-{steps}" / part, weights_only=False)["state"] for run in (a, b))
        assert all(torch.equal(x[p][k], y[p][k]) for p in x for k in x[p] if torch.is_tensor(x[p][k])), part


def test_the_tokenizer_on_two_threads_gives_the_same_bits_twice_and_after_a_stop_and_resume(tmp_path):
    steps = ["--steps", "6"]
    first, second, stopped = tmp_path / "first", tmp_path / "second", tmp_path / "stopped"
    finish(start("train_vqhit.py", first, *DEMO_ARGS, *steps))
    finish(start("train_vqhit.py", second, *DEMO_ARGS, *steps))
    assert_same_run(first, second, 6)

    proc = start("train_vqhit.py", stopped, *DEMO_ARGS, *steps)
    deadline = time.time() + 300
    while max(logged_steps(stopped), default=0) < 2:
        assert time.time() < deadline and proc.poll() is None, "the run ended before the signal"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output = finish(proc, EXIT_PREEMPTED)
    reached = int(list_checkpoints(stopped)[-1].name.split("-")[1])
    assert 2 <= reached < 6 and f"stopped at step {reached} of 6 by SIGTERM" in output
    finish(start("train_vqhit.py", stopped, *DEMO_ARGS, *steps))  # the same command resumes
    assert_same_run(first, stopped, 6)


# -- --deterministic -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", ["train_vqhit.py", "train_gan.py"])
def test_deterministic_is_offered_by_both_training_scripts(script):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "--deterministic, --no-deterministic" in result.stdout
    assert "CUBLAS_WORKSPACE_CONFIG=:4096:8" in " ".join(result.stdout.split())


@pytest.mark.parametrize("script, model", [("train_vqhit.py", "vqhit-tiny"), ("train_gan.py", "hit-tiny")])
def test_deterministic_trains_on_cpu_and_is_recorded_in_the_runs_config(tmp_path, script, model):
    out = tmp_path / "run"
    args = ["--model", model, "--deterministic", "--batch-size", "2", "--max-images", "4", "--num-workers", "0",
            "--num-samples", "2", "--cpu-threads", "2", "--checkpoint-every", "1", "--resume", "auto"]
    if script == "train_vqhit.py":  # the adversarial term, R1 and bCR too: every op of the step
        args += ["--adv-weight", "0.1", "--bcr-weight", "10", "--heldout-data", "none"]
    finish(start(script, out, *args, "--steps", "2"))
    assert yaml.safe_load((out / "train_config.yaml").read_text())["deterministic"] is True
    assert yaml.safe_load((out / "checkpoint-2" / "train_config.yaml").read_text())["deterministic"] is True
    finish(start(script, out, *[a for a in args if a != "--deterministic"], "--steps", "3"))  # a plain resume
    assert yaml.safe_load((out / "checkpoint-3" / "train_config.yaml").read_text())["deterministic"] is True


def test_deterministic_turns_on_deterministic_kernels_before_the_accelerator_starts(tmp_path, monkeypatch,
                                                                                     restore_deterministic_flags):
    import accelerate

    import vqhit.training as training
    from vqhit.train_config import parse_config

    seen = []

    class Recording(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            seen.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
                         torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG")))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(accelerate, "Accelerator", Recording)  # what the training run's Accelerator is made from
    args = ["--model", "hit-tiny", "--num-workers", "0", "--max-images", "4", "--batch-size", "2"]
    torch.use_deterministic_algorithms(False)
    training.Trainer(parse_config([*args, "--output-dir", str(tmp_path / "plain")], "test", "gan"), "gan")
    training.Trainer(parse_config([*args, "--deterministic", "--output-dir", str(tmp_path / "det")], "test", "gan"),
                     "gan")
    assert seen == [(False, False, False, None), (True, True, False, ":4096:8")]


def test_a_cublas_setting_from_the_environment_is_kept(monkeypatch, restore_deterministic_flags):
    from vqhit.reproducibility import use_deterministic_algorithms

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    use_deterministic_algorithms()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8" and torch.are_deterministic_algorithms_enabled()
