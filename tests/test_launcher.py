"""A user's `accelerate config` (bf16, a dynamo backend, accumulation) never silently changes what vqhit trains or
measures: each setting becomes the matching option, or is refused in one line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from vqhit import launcher
from vqhit.errors import UsageError
from vqhit.train_config import parse_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--num-workers", "0", "--max-images", "8", "--batch-size", "2", "--steps", "3", "--disc-max-channels", "32",
        "--sample-every", "1000", "--seed", "5", "--r1-interval", "2", "--ema-start", "0"]


def test_each_launcher_setting_becomes_an_option_or_is_refused():
    assert launcher.requested({}) == {}
    assert launcher.requested({"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO"}) == {}
    assert launcher.requested({"ACCELERATE_MIXED_PRECISION": "bf16", "ACCELERATE_DYNAMO_BACKEND": "INDUCTOR",
                               "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}) == \
        {"precision": "bf16", "compile": True, "grad_accum": 4}
    with pytest.raises(UsageError, match="mixed precision fp16 .*R1's double backward.*--mixed_precision bf16 or no"):
        launcher.requested({"ACCELERATE_MIXED_PRECISION": "fp16"})
    with pytest.raises(UsageError, match="dynamo backend aot_eager.*inductor only.*--dynamo_backend no"):
        launcher.requested({"ACCELERATE_DYNAMO_BACKEND": "AOT_EAGER"})


def test_the_launchers_settings_count_as_given_options(monkeypatch, tmp_path):
    out = ["--output-dir", str(tmp_path / "run")]
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR")
    config = parse_config(out, "test", "gan")
    assert config.precision == "bf16" and config.compile
    assert "precision bf16" in launcher.notes()[0] and "--compile" in launcher.notes()[1]
    with pytest.raises(UsageError, match="--precision fp32 contradicts the launcher, which asks for mixed precision "
                                         "bf16"):
        parse_config([*out, "--precision", "fp32"], "test", "gan")
    with pytest.raises(UsageError, match="--compile False contradicts the launcher"):
        parse_config([*out, "--no-compile"], "test", "gan")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(UsageError, match="mixed precision fp16"):
        parse_config(out, "test", "gan")


def test_scripts_that_train_nothing_take_the_launchers_bf16_and_refuse_the_rest(monkeypatch):
    assert launcher.script_precision(None, "encode.py", {}) == "fp32"
    assert launcher.script_precision(None, "encode.py", {"ACCELERATE_MIXED_PRECISION": "bf16"}) == "bf16"
    with pytest.raises(UsageError, match="--precision fp32 contradicts the launcher"):
        launcher.script_precision("fp32", "encode.py", {"ACCELERATE_MIXED_PRECISION": "bf16"})
    with pytest.raises(UsageError, match="dynamo backend inductor, which eval_rfid.py does not use"):
        launcher.script_precision(None, "eval_rfid.py", {"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"})


def accelerate_launch(tmp_path: Path, name: str, launcher_flags: list[str], args: list[str]):
    out = tmp_path / name
    command = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--num_processes", "1", "--num_machines", "1",
               *launcher_flags, str(ROOT / "scripts" / "train_gan.py"), *TINY, *args, "--output-dir", str(out)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    result = subprocess.run(command, env={**env, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}, cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    return result, out


def test_accelerate_launch_with_bf16_trains_what_precision_bf16_trains(tmp_path):
    launched, a = accelerate_launch(tmp_path, "launched-bf16", ["--mixed_precision", "bf16", "--dynamo_backend", "no"],
                                    [])
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "the launcher's mixed precision bf16 is --precision bf16 here" in launched.stdout
    plain, b = accelerate_launch(tmp_path, "option-bf16", ["--mixed_precision", "no"], ["--precision", "bf16"])
    fp32, c = accelerate_launch(tmp_path, "fp32", ["--mixed_precision", "no"], [])
    assert plain.returncode == 0 and fp32.returncode == 0
    weights = [load_file(str(out / "checkpoint-3" / "model_1.safetensors")) for out in (a, b, c)]  # the discriminator
    assert all((weights[0][k] == weights[1][k]).all() for k in weights[0])
    assert any((weights[0][k] != weights[2][k]).any() for k in weights[0])  # bf16 did change something
    saved = json.loads(json.dumps(__import__("yaml").safe_load((a / "train_config.yaml").read_text())))
    assert saved["precision"] == "bf16"
    refused, _ = accelerate_launch(tmp_path, "refused", ["--mixed_precision", "bf16"], ["--precision", "fp32"])
    assert refused.returncode != 0  # the launcher reports its script's status 2 as 1
    assert "error: --precision fp32 contradicts the launcher" in refused.stderr
    assert "Traceback" not in refused.stderr
