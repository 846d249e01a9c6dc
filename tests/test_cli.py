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
    (tmp_path / "file").write_text("not a folder")
    return tmp_path


# A tokenizer run of a few seconds: where a mistake went unnoticed, the test fails fast
TINY_RUN = ["--model", "vqhit-tiny", "--batch-size", "1", "--num-samples", "1", "--num-workers", "0", "--cpu-threads",
            "1", "--perceptual", "none", "--heldout-data", "none", "--max-images", "2"]


# (script, arguments, what the one line must say). {tmp} is a fresh folder; {tmp}/empty holds no image.
MISTAKES = [
    ("train_gan", ["--collective-timeout", "inf"], "--collective-timeout must be a finite number of seconds > 0"),
    ("train_vqhit", ["--stop-signals", "SIGTERM,,SIGUSR1"], "--stop-signals SIGTERM,,SIGUSR1: an empty name"),
    ("train_vqhit", ["--config", "{tmp}/empty"], "--config {tmp}/empty is a folder; give the path of a YAML file"),
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
    # values the optimiser, the data or the networks would refuse (or silently misuse), refused at the start
    *[("train_vqhit", [*TINY_RUN, "--steps", "1", option, value, "--output-dir", "{tmp}/run"], says)
      for option, value, says in [
          ("--lr", "-1", "--lr must be a finite number > 0, got -1.0"),
          ("--lr", "nan", "--lr must be a finite number > 0, got nan"),
          ("--lr", "inf", "--lr must be a finite number > 0, got inf"),
          ("--min-crop-area", "0", "--min-crop-area must be in (0, 1]"),
          ("--min-crop-area", "2", "--min-crop-area must be in (0, 1]"),
          ("--seed", "-1", "--seed must be in [0, 4294967295], got -1"),
          ("--disc-channel-multiplier", "0", "--disc-channel-multiplier must be at least 1, got 0"),
          ("--lecam-weight", "-1", "--lecam-weight must be a finite number >= 0"),
          ("--ema-decay", "2", "--ema-decay must be in [0, 1], got 2.0"),
          ("--ema-decay", "-0.5", "--ema-decay must be in [0, 1], got -0.5"),
          ("--ema-start", "-1", "--ema-start must be at least 0, got -1"),
          ("--adv-start", "-1", "--adv-start must be at least 0, got -1"),
          ("--r1-weight", "-1", "--r1-weight must be a finite number >= 0"),
          ("--bcr-weight", "-1", "--bcr-weight must be a finite number >= 0"),
          ("--adv-weight", "-1", "--adv-weight must be a finite number >= 0"),
          ("--perceptual-weight", "-1", "--perceptual-weight must be a finite number >= 0"),
          ("--model-option", "codebook_size=0", "--model-option codebook_size=0: codebook_size and code_dim must be "
                                                "positive"),
          ("--heldout-data", "{tmp}/missing", "no such folder: {tmp}/missing (the image folder or Hub dataset given "
                                              "to --heldout-data)"),
          ("--heldout-data", "{tmp}/empty", "--heldout-data {tmp}/empty: no image files found in it"),
          ("--heldout-data", "builtin:phtos", "--heldout-data builtin:phtos is not a built-in source"),
      ]],
    *[("train_vqhit", [*TINY_RUN, "--steps", "1", "--output-dir", folder], says) for folder, says in [
        ("{tmp}/file", "--output-dir {tmp}/file is a file, not a folder"),
        ("{tmp}/file/run", "--output-dir {tmp}/file/run lies under {tmp}/file, which is a file"),
        ("/proc/vqhit-run", "--output-dir /proc/vqhit-run: cannot create a folder in /proc"),
        ("", "--output-dir is empty"),
    ]],
    # train_gan.py does not offer the tokenizer's options
    *[("train_gan", ["--model", "hit-tiny", "--batch-size", "1", "--num-samples", "1", "--num-workers", "0", "--steps",
                     "1", "--max-images", "2", *given, "--output-dir", "{tmp}/run"],
       f"unrecognized arguments: {given[0]}")
      for given in [["--taming-checkpoint", "/x.ckpt"], ["--heldout-data", "builtin:photos-heldout"],
                    ["--perceptual", "lpips"], ["--adv-weight", "0.5"]]],
    ("encode", ["--model", "{tmp}/no-model", "--data", "builtin:photos", "--output-dir", "{tmp}/tokens"],
     "--model {tmp}/no-model: no such folder"),
    ("decode", ["--model", "{tmp}", "--tokens", "{tmp}", "--output-dir", "{tmp}/png"], "--model {tmp}: no config.json"),
    ("eval_rfid", ["--model", "{tmp}", "--data", "builtin:photos", "--batch-size", "0"],
     "argument --batch-size: must be at least 1, got 0"),
    ("eval_gan", ["--model", "{tmp}"], "eval_gan.py needs a reference: --data, or --ref-stats"),
]


@pytest.mark.parametrize("script, argv, says", MISTAKES, ids=[f"{m[0]}: {m[2][:60]}" for m in MISTAKES])
def test_a_mistake_is_one_line_naming_the_option(script, argv, says, folders, capsys):
    argv = [a.replace("{tmp}", str(folders)) for a in argv]
    code, out, err = run_script(script, argv, capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line, no traceback, nothing else
    assert says.replace("{tmp}", str(folders)) in err
    assert "Traceback" not in out + err and "DataConfig" not in err
    assert sorted(p.name for p in folders.iterdir()) == ["empty", "file"]  # no output folder, no probe left


@pytest.mark.parametrize("script, other, model", [("train_vqhit", "train_gan", "hit-tiny"),
                                                  ("train_gan", "train_vqhit", "vqhit-tiny")])
def test_a_checkpoint_of_the_other_script_is_named_as_such(script, other, model, tmp_path, capsys):
    checkpoint = tmp_path / "run" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "train_state.json").write_text('{"step": 2}')
    (checkpoint / "train_config.yaml").write_text(f"model: {model}\n")
    code, _, err = run_script(script, ["--resume", str(checkpoint)], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"a checkpoint of scripts/{other}.py (--model {model}); resume it with that script" in err


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


def test_a_mistake_in_a_processs_own_data_is_printed_by_that_process(monkeypatch, capsys):
    """Another process's shard holds the unreadable image: only it knows, so it says so, naming itself."""
    from vqhit.errors import OwnDataError

    def main(argv):
        raise OwnDataError("--data imgs: img039.png is an unreadable image")

    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as exit_info:
        cli.run(main, [])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error (process 1): --data imgs: img039.png is an unreadable image\n"


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
    """Work only the main process runs (the output folder): the others learn from the store that it failed, and
    whether it was the user's mistake, which the main process prints; they stop with a UsageError (no line of
    their own), and tell the main process they have read the outcome."""
    import torch.distributed as dist
    from vqhit import distributed

    class Store(dict):
        def set(self, key, value):
            self[key] = value.encode()

        def check(self, keys):
            return all(k in self for k in keys)

        def get(self, key):
            return self[key]

        def add(self, key, amount):
            self[key] = dict.get(self, key, 0) + amount
            return self[key]

    def never_called():
        raise AssertionError("only the main process runs it")

    store = Store()
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(dist.distributed_c10d, "_get_default_store", lambda: store)
    for outcome, error, message in (("usage", UsageError, "stopped on the user's error"),
                                    ("error", RuntimeError, "the main process failed")):
        store.clear()
        monkeypatch.setattr(distributed, "_main_work", iter([7]))  # the number of this call of run_on_main
        store.set("vqhit/main-work-7", outcome)  # what the main process wrote
        with pytest.raises(error, match=message):
            distributed.run_on_main(never_called)
        assert store["vqhit/main-work-7/read"] == 1


def test_a_config_file_value_is_checked_as_the_option_is(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("min_crop_area: 0\n")
    code, out, err = run_script("train_vqhit", ["--model", "vqhit-tiny", "--config", str(config), "--output-dir",
                                                str(tmp_path / "run")], capsys)
    assert code == 2 and err.startswith("error: --min-crop-area must be in (0, 1]") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_train_gan_neither_offers_nor_reads_the_tokenizer_options(tmp_path, capsys):
    from vqhit.train_config import build_parser

    def options(task):
        return {s for action in build_parser("", task)._actions for s in action.option_strings}

    tokenizer_only = {"--taming-checkpoint", "--heldout-data", "--perceptual", "--perceptual-weight",
                      "--perceptual-pretrained", "--vgg-weights", "--adv-weight", "--adv-start",
                      "--adaptive-adv-weight"}
    assert tokenizer_only <= options("vqhit") and not tokenizer_only & options("gan")
    config = tmp_path / "gan.yaml"
    config.write_text("steps: 3\nperceptual: lpips\n")
    code, out, err = run_script("train_gan", ["--config", str(config), "--output-dir", str(tmp_path / "run")], capsys)
    assert code == 2 and "sets perceptual, which only scripts/train_vqhit.py uses" in err


def test_the_output_folder_check_leaves_nothing_behind(tmp_path):
    from vqhit.train_config import check_output_dir

    check_output_dir(str(tmp_path / "new" / "run"))  # can be made: no error, and nothing made
    check_output_dir(str(tmp_path))  # an existing folder
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A one-step tokenizer run with a checkpoint, to resume."""
    output_dir = tmp_path_factory.mktemp("tiny") / "run"
    cli.run(script_main("train_vqhit"), [*TINY_RUN, "--steps", "1", "--checkpoint-every", "1", "--output-dir",
                                         str(output_dir)])
    return output_dir


@pytest.mark.parametrize("option, says", [("embed_dim=32", "unknown VQHiTConfig keys ['embed_dim']"),
                                          ("mlp_ratio=abc", "mlp_ratio must be an int, got 'abc'")])
def test_a_model_option_mistake_on_resume_is_one_line(tiny_run, option, says, capsys):
    code, out, err = run_script("train_vqhit", [*TINY_RUN, "--steps", "2", "--output-dir", str(tiny_run), "--resume",
                                                "auto", "--model-option", option], capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: --model vqhit-tiny --model-option {option}: {says}")


def test_a_resume_on_other_data_or_another_seed_says_so(tiny_run):
    from vqhit.train_config import parse_config

    resume = [*TINY_RUN, "--output-dir", str(tiny_run), "--resume", "auto"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parse_config(resume, "test", "vqhit")  # the same data and seed: nothing to say
        assert not [str(w.message) for w in caught if "trained" in str(w.message)]
        parse_config([*resume, "--data", "builtin:photos-whole", "--seed", "5"], "test", "vqhit")
    said = [str(w.message) for w in caught]
    assert any(m.startswith("--data builtin:photos-whole: ") and "was trained on --data builtin:photos" in m
               and "data position" in m and "reused" in m for m in said), said
    assert any(m.startswith("--seed 5: ") and "trained with --seed 0" in m for m in said), said
