"""The scripts' command line: a user's mistake is one line naming the option, a bug keeps its traceback."""
import os
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from vqhit import cli
from vqhit.errors import NotFoundError, UnavailableError, UsageError

ROOT = Path(__file__).resolve().parents[1]


def script_main(name: str):
    return runpy.run_path(str(ROOT / "scripts" / f"{name}.py"), run_name="script")["main"]


def run_script(name: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of a script run as its `if __name__ == "__main__"` runs it."""
    with pytest.raises(SystemExit) as exit_info:
        cli.run(script_main(name), argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.fixture
def folders(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path


# (script, arguments, what the one line must say). {tmp} is a fresh folder; {tmp}/empty holds no image.
MISTAKES = [
    ("train_vqhit", ["--steps", "-1"], "--steps must be at least 1, got -1"),
    ("train_vqhit", ["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    ("train_vqhit", ["--steps", "ten"], "argument --steps: invalid int value: 'ten'"),
    ("train_vqhit", ["--stpes", "3"], "unrecognized arguments: --stpes 3"),
    ("train_vqhit", ["--model", "vqhit-dmeo", "--output-dir", "{tmp}/run"],
     "--model vqhit-dmeo: train_vqhit.py trains tokenizer presets; did you mean vqhit-demo?"),
    ("train_vqhit", ["--model", "vqhit-tiny", "--model-option", "codebook_sise=8", "--output-dir", "{tmp}/run"],
     "--model-option codebook_sise=8: unknown VQHiTConfig keys ['codebook_sise'] (did you mean codebook_size?)"),
    ("train_vqhit", ["--model", "vqhit-tiny", "--data", "{tmp}/empty", "--output-dir", "{tmp}/run", "--num-workers",
                     "0"], "--data {tmp}/empty: no image files found in it"),
    ("train_gan", ["--model", "hit-tiny", "--data", "{tmp}/missing", "--output-dir", "{tmp}/run", "--num-workers", "0"],
     "no such folder: {tmp}/missing (the image folder or Hub dataset given to --data)"),
    ("train_gan", ["--model", "hit-tiny", "--model-option", "mlp_ratio=abc", "--output-dir", "{tmp}/run"],
     "mlp_ratio must be an int, got 'abc'"),
    ("encode", ["--model", "{tmp}/no-model", "--data", "builtin:photos", "--output-dir", "{tmp}/tokens"],
     "--model {tmp}/no-model: no such folder"),
    ("decode", ["--model", "{tmp}", "--tokens", "{tmp}", "--output-dir", "{tmp}/png"], "--model {tmp}: no config.json"),
    ("eval_rfid", ["--model", "{tmp}", "--data", "builtin:photos", "--batch-size", "0"],
     "argument --batch-size: must be at least 1, got 0"),
    ("eval_gan", ["--model", "{tmp}"], "eval_gan.py needs a reference: --data, or --ref-stats"),
]


@pytest.mark.parametrize("script, argv, says", MISTAKES, ids=[" ".join([m[0], *m[1][:2]]) for m in MISTAKES])
def test_a_mistake_is_one_line_naming_the_option(script, argv, says, folders, capsys):
    argv = [a.replace("{tmp}", str(folders)) for a in argv]
    code, out, err = run_script(script, argv, capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line, no traceback, nothing else
    assert says.replace("{tmp}", str(folders)) in err
    assert "Traceback" not in out + err and "DataConfig" not in err


def test_only_the_first_process_prints_a_mistake(monkeypatch, capsys):
    """Every process of a launch meets the same mistake: the others stop as quietly, with the same status."""
    def main(argv):
        raise UsageError("--steps must be at least 1, got -1")

    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as exit_info:
        cli.run(main, [])
    assert exit_info.value.code == 2 and capsys.readouterr() == ("", "")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit):
        cli.run(main, [])
    assert capsys.readouterr().err == "error: --steps must be at least 1, got -1\n"


def test_a_bug_keeps_its_traceback():
    def buggy(argv):
        return {}["missing key"]  # a KeyError is never the user's

    def library_value_error(argv):
        raise ValueError("an internal check failed")  # a plain ValueError is not a UsageError

    with pytest.raises(KeyError):
        cli.run(buggy, [])
    with pytest.raises(ValueError, match="internal check"):
        cli.run(library_value_error, [])


def test_usage_errors_are_still_the_builtin_types_callers_catch():
    assert issubclass(UsageError, ValueError)
    assert issubclass(NotFoundError, FileNotFoundError) and issubclass(NotFoundError, UsageError)
    assert issubclass(UnavailableError, RuntimeError) and issubclass(UnavailableError, UsageError)
    wrapped = UsageError("Caught UsageError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                         "last):\n  File \"x.py\", line 1, in f\nvqhit.errors.UsageError: a.png: unreadable image")
    assert cli._message(wrapped) == "a.png: unreadable image"  # a worker's error keeps its own message


def test_warnings_print_once_and_vqhit_warnings_as_one_line(capsys):
    def main(argv):
        warnings.warn("--name-by id: 1 source file keeps its extension")
        warnings.warn("This DataLoader will create 4 worker processes in total")  # torch's DataLoader warns at
        warnings.warn("This DataLoader will create 4 worker processes in total")  # creation and at iteration
    shown = warnings.showwarning
    cli.run(main, [])
    assert warnings.showwarning is shown  # the script's settings end with it
    err = capsys.readouterr().err
    assert err.startswith("warning: --name-by id: 1 source file keeps its extension\n")
    assert err.count("This DataLoader will create") == 1


@pytest.mark.parametrize("script", ["encode", "eval_rfid", "eval_gan"])
def test_default_dataloader_workers_leave_a_core_to_the_main_process(script, monkeypatch):
    parse_args = runpy.run_path(str(ROOT / "scripts" / f"{script}.py"), run_name="script")["parse_args"]
    argv = ["--model", "m", "--data", "d"] + (["--output-dir", "o"] if script == "encode" else [])
    for cores, workers in [(2, 1), (1, 0), (16, 4)]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert parse_args(argv).num_workers == workers
    assert parse_args(argv + ["--num-workers", "3"]).num_workers == 3


def script_parser(script: str, monkeypatch) -> cli.ArgumentParser:
    """The argument parser a script builds (its `parse_args` stopped before parsing)."""
    parse_args = runpy.run_path(str(ROOT / "scripts" / f"{script}.py"), run_name="script")["parse_args"]
    with monkeypatch.context() as patch:
        patch.setattr(cli.ArgumentParser, "parse_args", lambda self, argv=None: self)
        return parse_args([])


def test_the_scripts_share_one_definition_of_their_common_options(monkeypatch):
    """Every option of the four scripts has a help text, and an option two scripts share is explained the same way
    in both (it comes from vqhit.cli)."""
    helps = {}
    for script in ("encode", "decode", "eval_rfid", "eval_gan"):
        for action in script_parser(script, monkeypatch)._actions:
            if action.dest != "help":
                assert action.help and len(action.help) > 15, f"{script} {action.option_strings}"
                helps.setdefault(action.option_strings[0], {})[script] = action.help % {"default": action.default}
    shared = ["--split", "--image-column", "--min-size", "--bad-images", "--num-workers", "--no-progress",
              "--inception-weights"]
    for option in shared:
        assert len(helps[option]) >= 2 and len(set(helps[option].values())) == 1, helps[option]
    assert set(helps["--precision"]) == {"encode", "eval_rfid", "eval_gan"}
    assert set(helps["--data"]) == {"encode", "eval_rfid", "eval_gan"}
    assert set(helps["--model"]) == set(helps["--no-progress"]) == {"encode", "decode", "eval_rfid", "eval_gan"}


def test_readme_launch_command_prints_only_the_error(tmp_path):
    """The README's command, `accelerate launch -q --config_file accelerate.yaml scripts/...`, through the real
    launcher: a mistake prints exactly its one line (no launcher warning, no CalledProcessError traceback)."""
    readme = (ROOT / "README.md").read_text()
    for script in ("train_vqhit", "train_gan"):
        assert f".venv/bin/accelerate launch -q --config_file accelerate.yaml scripts/{script}.py" in readme
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HOME": str(tmp_path / "hf")}  # no user-wide config
    accelerate = Path(sys.executable).with_name("accelerate")
    result = subprocess.run([str(accelerate), "launch", "-q", "--config_file", "accelerate.yaml",
                             "scripts/train_vqhit.py", "--steps", "-1"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0
    assert result.stdout + result.stderr == "error: --steps must be at least 1, got -1\n"


def test_other_processes_stop_quietly_on_a_mistake_the_main_process_found(monkeypatch):
    """A check only the main process runs (the output folder): the others learn it failed, and that it was the
    user's mistake, which the main process prints; they stop with a UsageError (no line of their own)."""
    import torch
    from types import SimpleNamespace
    from vqhit import distributed
    from vqhit.training import Trainer

    def never_called():
        raise AssertionError("only the main process runs it")

    other = SimpleNamespace(accelerator=SimpleNamespace(is_main_process=False))
    monkeypatch.setattr(distributed, "all_reduce_sum", lambda t: torch.tensor([1.0, 1.0]))  # main: a UsageError
    with pytest.raises(UsageError, match="stopped on the user's error"):
        Trainer._on_main(other, never_called)
    monkeypatch.setattr(distributed, "all_reduce_sum", lambda t: torch.tensor([1.0, 0.0]))  # main: a bug
    with pytest.raises(RuntimeError, match="the main process failed"):
        Trainer._on_main(other, never_called)
