"""benchmarks/gpu_check.py, the prepared GPU check, in its CPU smoke mode: every part runs and reports (a result or
the reason it did not run), the JSON and the Markdown agree, and what a machine lacks is skipped, not fatal."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
# The command line for a lent GPU machine (a bash line run in the repository root; files come back from $OUT), with
# room for the flags of its CPU smoke equivalent, which the first test runs as it stands.
DEVICE_COMMAND = ('PYTHONUNBUFFERED=1 timeout {timeout} "$(command -v python || command -v python3)" '
                  'benchmarks/gpu_check.py --output "$OUT"{flags}')
PARTS = ["environment", "sdpa", "train_step", "bf16_agreement", "generator", "tokenizer_decode", "trainer_step", "ddp"]


def clean_env(**extra) -> dict:
    """The environment of a bare shell: no PYTHONPATH, so the script must find this checkout's vqhit itself."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, **extra}


def gpu_check(*args, env=None, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env or clean_env(), capture_output=True,
                          text=True, timeout=timeout)


def check_report(folder: Path, parts=PARTS) -> dict:
    """Every part is present with a status, and a result (ok) or a reason (skipped, error); the Markdown has one
    summary row per part."""
    report = json.loads((folder / "gpu_check.json").read_text())
    assert list(report["parts"]) == PARTS
    for name in parts:
        part = report["parts"][name]
        assert part["status"] in ("ok", "skipped", "error"), (name, part)
        if part["status"] == "ok":
            assert part["result"]["summary"], name
        else:
            assert part["reason"].strip(), name
    markdown = (folder / "gpu_check.md").read_text()
    assert markdown.startswith("# GPU check: ")
    for name in PARTS:
        assert f"| {name} " in markdown
    return report


def test_smoke_run_as_the_device_command(tmp_path):
    """The device machine's command, with the CPU smoke flags: a bash line in the repository root, output under $OUT."""
    out = tmp_path / "out"
    out.mkdir()
    command = DEVICE_COMMAND.format(timeout=170, flags=" --device cpu --smoke")
    env = clean_env(OUT=str(out), PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    proc = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.md"]
    report = check_report(out)
    parts = report["parts"]
    assert {name: p["status"] for name, p in parts.items()} == dict.fromkeys(PARTS, "ok"), \
        {name: p.get("reason") for name, p in parts.items()}
    assert report["mode"] == "smoke"

    env = parts["environment"]["result"]
    assert Path(env["vqhit"]).resolve().is_relative_to(ROOT)  # this checkout's code, not an installed copy
    assert env["stand_ins"] == {}

    sdpa = parts["sdpa"]["result"]
    assert sdpa["fused_everywhere"] is True  # the CPU's flash kernel, in training and inference
    assert all(run["sdpa_calls"] > 0 and run["math_calls"] == 0 for run in sdpa["runs"].values())
    assert any(row["backward"] for row in sdpa["backends"])
    assert all(row["MATH"] == "ok" for row in sdpa["backends"])

    for row in parts["train_step"]["result"]["rows"]:
        assert row["images_per_s"] > 0 and row["flops_per_step"] > 0, row

    agreement = parts["bf16_agreement"]["result"]
    assert agreement["losses_agree"] is True
    assert len(agreement["bf16_losses"]) == len(agreement["fp32_losses"]) == agreement["steps"]
    assert agreement["update_cosine_G"] > 0.9

    generator = parts["generator"]["result"]["rows"]
    assert {row["precision"] for row in generator} == {"bf16", "fp32"}
    decode = parts["tokenizer_decode"]["result"]
    assert {row["decoder"] for row in decode["rows"]} == {"hit", "taming"}
    assert set(decode["speedup_over_taming"]) == {"bf16", "fp32"}
    trainer = parts["trainer_step"]["result"]["rows"]
    assert [row["task"] for row in trainer] == ["gan", "vqhit"]
    assert all(row["images_per_s"] > 0 for row in trainer)

    ddp = parts["ddp"]["result"]
    assert ddp["backend"] == "gloo" and ddp["world_size"] == 2
    assert ddp["states_equal"] and ddp["states_moved"] and ddp["losses_differ"] and ddp["all_reduce_ok"]
    assert ddp["passed"] is True

    markdown = (out / "gpu_check.md").read_text()
    for heading in ("## Summary", "## Training step", "## bf16 against fp32", "## Generator inference",
                    "## Tokenizer decoding", "## Trainer.train_step", "## Attention", "## SDPA backends"):
        assert heading in markdown


def test_a_machine_without_the_packages_runs_what_needs_only_torch(tmp_path):
    """taming-transformers, huggingface_hub, safetensors, Accelerate and datasets hidden: vqhit's models still load
    (stand-ins), the torch-only parts measure, and the parts that need a missing package say which."""
    hidden = tmp_path / "hidden"
    for package in ("taming", "huggingface_hub", "safetensors", "accelerate", "datasets"):
        (hidden / package).mkdir(parents=True)
        (hidden / package / "__init__.py").write_text(f"raise ModuleNotFoundError('hidden', name={package!r})\n")
    out = tmp_path / "out"
    parts = ["environment", "train_step", "tokenizer_decode", "trainer_step"]
    proc = gpu_check("--device", "cpu", "--smoke", "--output", str(out), "--parts", *parts,
                     env=clean_env(PYTHONPATH=str(hidden)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = check_report(out, parts)
    result = report["parts"]
    assert set(result["environment"]["result"]["stand_ins"]) == {
        "taming.modules.diffusionmodules.model", "huggingface_hub", "safetensors", "safetensors.torch"}
    assert result["environment"]["result"]["packages"]["accelerate"].startswith("missing")
    assert result["train_step"]["status"] == "ok"
    assert all(row["images_per_s"] > 0 for row in result["train_step"]["result"]["rows"])
    decode = result["tokenizer_decode"]
    assert decode["status"] == "ok" and {row["decoder"] for row in decode["result"]["rows"]} == {"hit"}
    assert "needs taming-transformers" in decode["result"]["notes"][0]
    assert result["trainer_step"]["status"] == "skipped"
    assert "needs accelerate" in result["trainer_step"]["reason"]
    for name in ("sdpa", "bf16_agreement", "generator", "ddp"):
        assert result[name] == {"status": "skipped", "reason": "not asked for (--parts)"}


def test_a_spent_budget_skips_the_parts_and_says_so(tmp_path):
    proc = gpu_check("--device", "cpu", "--smoke", "--output", str(tmp_path), "--budget-s", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = check_report(tmp_path)
    for part in report["parts"].values():
        assert part["status"] == "skipped" and "time budget (--budget-s 0)" in part["reason"]


@pytest.mark.parametrize("args, message", [
    (["--device", "cpu"], "--device cpu without --smoke"),
    (["--device", "cpu", "--smoke", "--output", "{file}"], "is a file, not a folder"),
    (["--device", "cpu", "--smoke", "--output", "{done}"], "pass --overwrite"),
])
def test_mistakes_are_one_line(tmp_path, args, message):
    (tmp_path / "file").write_text("")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "gpu_check.json").write_text("{}")
    args = [a.format(file=tmp_path / "file", done=tmp_path / "done") for a in args]
    if "--output" not in args:
        args += ["--output", str(tmp_path / "new")]
    proc = gpu_check(*args)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and message in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "done" / "gpu_check.json").read_text() == "{}"
