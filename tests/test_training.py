"""The training loop: EMA math, lazy R1, exact resume, learning, NaN guard, bad files, config errors."""
import copy
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vqhit import list_presets
from vqhit.errors import OwnDataError, UsageError
from vqhit.models.model_card import weights_sha256
from vqhit.losses import d_logistic_loss, r1_penalty
from vqhit.train_config import (RECIPES, build_parser, config_from_dict, parse_config, resolve_config, summary,
                                task_defaults)
from vqhit.training import EMA, Trainer, list_checkpoints

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(num_workers=0, max_images=8, batch_size=2, disc_max_channels=32, log_every=1, sample_every=1000,
            checkpoint_every=1000, num_samples=4, seed=3)


def make_trainer(tmp_path, task="gan", resolve=False, **overrides):
    """A tiny run's trainer; `resolve`: its config made as the scripts make it (the recipe's defaults, the preset
    and the resumed checkpoint checked), else from these values alone (a resume is always resolved)."""
    values = dict(TINY, model="hit-tiny" if task == "gan" else "vqhit-tiny", output_dir=str(tmp_path / "run"),
                  perceptual="none")
    values.update(overrides)
    resolve = resolve or values.get("resume")
    return Trainer(resolve_config(values, task) if resolve else config_from_dict(values), task)


def test_ema_copies_before_start_then_averages_parameters_and_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    ema = EMA(model, decay=0.9, start_step=2)
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[1].running_mean.fill_(2.0)
    ema.update(model, step=1)  # before start: a copy
    assert torch.equal(ema.model[0].weight, model[0].weight)
    with torch.no_grad():
        model[0].weight.fill_(3.0)
        model[1].running_mean.fill_(4.0)
        model[1].num_batches_tracked.fill_(7)
    ema.update(model, step=2)
    torch.testing.assert_close(ema.model[0].weight, torch.full((3, 3), 0.9 * 1.0 + 0.1 * 3.0))
    torch.testing.assert_close(ema.model[1].running_mean, torch.full((3,), 0.9 * 2.0 + 0.1 * 4.0))
    assert ema.model[1].num_batches_tracked.item() == 7  # integer buffers are copied, not averaged
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_cpu_threads_as_launched_all_cores_or_a_number(tmp_path, monkeypatch):
    from vqhit.cli import usable_cores

    launched = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # what accelerate launch starts
        make_trainer(tmp_path / "a")
        assert torch.get_num_threads() == 1  # 0: as launched
        make_trainer(tmp_path / "b", cpu_threads=-1)
        assert torch.get_num_threads() == usable_cores()
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(usable_cores() * 2))  # more processes than cores: one each
        make_trainer(tmp_path / "c", cpu_threads=-1)
        assert torch.get_num_threads() == 1
        make_trainer(tmp_path / "d", cpu_threads=3)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(launched)


def test_lazy_r1_runs_every_k_steps_with_weight_times_k(tmp_path):
    trainer = make_trainer(tmp_path, r1_weight=2.0, r1_interval=3)
    real = next(trainer.batches)["image"]
    seen = {}
    for step in range(4):
        trainer.state.step = step
        expected = r1_penalty(trainer.D, real, weight=2.0 * 3).item() if step % 3 == 0 else None
        logs = trainer.train_step(real)
        seen[step] = logs.get("loss/r1")
        if expected is not None:
            assert seen[step].item() == pytest.approx(expected, rel=1e-5)
    assert seen[1] is None and seen[2] is None and seen[3] is not None


@pytest.mark.parametrize("bcr", [False, True])
def test_the_discriminator_sees_the_real_images_once_per_step(tmp_path, bcr):
    """R1's fp32 forward on the reals gives the logistic loss its real logits, and bCR reuses both logits: per
    step D runs on the fakes for G, then once on the reals and once on the fakes (+ the two augmented batches of
    bCR). The logged losses are still those of D as it was before the step, each term computed on its own."""
    trainer = make_trainer(tmp_path, r1_weight=2.0, r1_interval=2, bcr_weight=3.0 if bcr else 0.0)
    real = next(trainer.batches)["image"]
    D = trainer.accelerator.unwrap_model(trainer.D)
    inputs = []
    D.register_forward_hook(lambda module, args, out: inputs.append(args[0].detach().clone()))
    for step in (0, 1):  # an R1 step and one without
        trainer.state.step = step
        inputs.clear()
        before = copy.deepcopy(D)
        before._forward_hooks.clear()
        logs = trainer.train_step(real)
        on_reals = sum(torch.equal(x, real) for x in inputs)
        assert (on_reals, len(inputs)) == (1, 5 if bcr else 3), step
        fake = inputs[0]  # what G made, as D saw it in the G step
        with torch.no_grad():
            assert logs["loss/discriminator"].item() == pytest.approx(
                d_logistic_loss(before(real), before(fake)).item(), rel=1e-5)
        if step == 0:
            assert logs["loss/r1"].item() == pytest.approx(r1_penalty(before, real, weight=2.0 * 2).item(), rel=1e-5)
        else:
            assert "loss/r1" not in logs


@pytest.mark.parametrize("task", ["gan", "vqhit"])
def test_resumed_run_ends_where_an_uninterrupted_run_ends(tmp_path, task):
    # 8 images, batch 2: 4 batches an epoch, so the run crosses an epoch and resumes mid-epoch.
    # dead_code_steps=2: the tokenizer restarts codes around the interruption, so its clocks must resume too.
    common = dict(steps=6, checkpoint_every=3, adv_start=2,
                  model_options={"dead_code_steps": 2} if task == "vqhit" else {})
    straight = make_trainer(tmp_path / "a", task, **common)
    straight.fit()
    interrupted = make_trainer(tmp_path / "b", task, **{**common, "steps": 3})
    interrupted.fit()
    resumed = make_trainer(tmp_path / "b", task, **common, resume="latest")
    resumed.fit()
    a, b = straight.accelerator.unwrap_model(straight.model), resumed.accelerator.unwrap_model(resumed.model)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), f"{name} differs after resume"
    for x, y in zip(straight.D.parameters(), resumed.D.parameters()):
        assert torch.equal(x, y)
    for x, y in zip(straight.ema.model.state_dict().values(), resumed.ema.model.state_dict().values()):
        assert torch.equal(x, y)
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "run")] == ["checkpoint-3", "checkpoint-6"]


def test_tokenizer_reconstruction_loss_falls(tmp_path):
    trainer = make_trainer(tmp_path, "vqhit", adv_start=10_000, lr=1e-3)
    batches = trainer.batches
    losses = []
    for step in range(30):
        trainer.state.step = step
        losses.append(float(trainer.train_step(next(batches)["image"])["loss/l2"]))
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses


def test_checkpoint_holds_ema_export_and_is_atomic(tmp_path):
    trainer = make_trainer(tmp_path, steps=2, checkpoint_every=1)
    trainer.fit()
    run = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-1", "checkpoint-2"]
    assert not list(run.glob(".checkpoint-*.tmp"))
    exported = load_file(str(run / "model" / "model.safetensors"))
    ema = trainer.ema.model.state_dict()
    assert all(torch.equal(exported[k], ema[k]) for k in ema)
    assert (run / "samples").is_dir() and list((run / "samples").glob("*.png"))
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, steps=4, checkpoint_every=1)
    generate = trainer.objective.generate

    def poisoned(forward, real, step):
        fake, terms = generate(forward, real, step)
        return (fake * float("nan") if step >= 2 else fake), terms

    trainer.objective.generate = poisoned
    # checkpoint-2 holds the weights that gave the non-finite loss: resuming it would fail again at once
    with pytest.raises(FloatingPointError, match="non-finite generator loss at step 2.*good checkpoint, .*checkpoint-1"):
        trainer.fit()
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-1", "checkpoint-2"]
    state = load_file(str(tmp_path / "run" / "checkpoint-2" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_folder_with_corrupt_and_grayscale_images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"rgb{i}.png")
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8), mode="L").save(folder / "gray.png")
    (folder / "broken.png").write_bytes(b"not a png at all")
    with pytest.warns(UserWarning, match="broken.png"):
        trainer = make_trainer(tmp_path, data=str(folder), steps=2, max_images=None)
        trainer.fit()
    assert trainer.dataset.num_skipped == 1
    with pytest.raises(ValueError, match="broken.png"):
        make_trainer(tmp_path / "raise", data=str(folder), steps=1, max_images=None, bad_images="raise").fit()
    # met during training, in this process's share of the data: an error this process reports whatever its rank
    (folder / "broken.png").rename(folder / "zz-broken.png")
    with pytest.raises(OwnDataError, match="zz-broken.png"):
        make_trainer(tmp_path / "raise-late", data=str(folder), steps=8, max_images=None, bad_images="raise").fit()


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="unknown key.*'learning_rate'"):
        config_from_dict({"learning_rate": 1e-4})
    with pytest.raises(ValueError, match="--steps must be of type int"):
        config_from_dict({"steps": "many"})
    with pytest.raises(ValueError, match="fp16 is not supported"):
        config_from_dict({"precision": "fp16", "r1_weight": 0.0})  # refused, R1 or not: never a silent fp32 run
    with pytest.raises(ValueError, match="--adam-betas must be two numbers"):
        parse_config(["--adam-betas", "0.9"], "test", "gan")
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("model: hit-tiny\nbatch_sise: 4\n")
    with pytest.raises(ValueError, match="batch_sise"):
        parse_config(["--config", str(yaml_file)], "test", "gan")
    with pytest.raises(ValueError, match=r"train_gan.py trains generator \(hit-\*\) presets"):
        parse_config(["--model", "vqhit-tiny", "--output-dir", str(tmp_path / "run")], "test", "gan")
    assert not (tmp_path / "run").exists()


def test_precision_is_fp32_or_bf16_and_a_saved_no_loads_as_fp32():
    assert config_from_dict({"precision": "no"}).precision == "fp32"  # Accelerate's name, in saved configs
    assert parse_config(["--precision", "no"], "test", "gan").precision == "fp32"
    assert parse_config(["--precision", "bf16"], "test", "gan").precision == "bf16"
    help_text = " ".join(build_parser("test", "gan").format_help().split())
    assert "one of fp32, bf16)" in help_text and "fp16" not in help_text
    with pytest.raises(UsageError, match="argument --precision: invalid choice: 'fp16'"):
        parse_config(["--precision", "fp16"], "test", "gan")


def test_numbers_parse_as_numbers_in_yaml_and_on_the_command_line(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("model: hit-tiny\nlr: 1e-4\nadam_betas: [0, 9e-1]\n")  # YAML 1.1 reads 1e-4 as a string
    config = parse_config(["--config", str(yaml_file), "--model-option", "bn_momentum=1e-2"], "test", "gan")
    assert config.lr == 1e-4 and isinstance(config.lr, float) and config.adam_betas == [0.0, 0.9]
    from vqhit.training import build_model
    model = build_model(config, "gan")
    assert model.config.bn_momentum == 0.01 and isinstance(model.config.bn_momentum, float)
    with pytest.raises(ValueError, match="mlp_ratio"):
        build_model(parse_config(["--model", "hit-tiny", "--model-option", "mlp_ratio=abc"], "test", "gan"), "gan")


@pytest.mark.parametrize("argv", [[], ["--steps", "30"], ["--output-dir", "elsewhere"], ["--overwrite"],
                                  ["--resume", "auto"], ["--data", "/somewhere"]], ids=" ".join)
def test_a_flag_changes_one_setting_of_the_demo_recipe(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # --resume auto looks at runs/vqhit-demo: nothing there, so a fresh start
    demo = {**task_defaults("vqhit"), **RECIPES["vqhit-demo"]}
    config = parse_config(argv, "test", "vqhit").to_dict()
    changed = {k for k in config if config[k] != demo[k] and k not in ("output_dir", "perceptual_weight")}
    given = {a[2:].replace("-", "_") for a in argv if a.startswith("--")}
    assert config["model"] == "vqhit-demo" and changed <= given, changed - given
    gan = parse_config(["--steps", "30"], "test", "gan")
    assert (gan.model, gan.steps, gan.batch_size, gan.r1_interval, gan.disc_max_channels) == ("hit-tiny", 30, 16, 4, 64)


def test_a_start_that_fails_leaves_no_folder_behind(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for overrides, error in ((dict(model="vqhit-dmeo"), "tokenizer presets"), (dict(data=str(empty)), "no image files"),
                             (dict(resume="latest"), "does not exist")):
        out = tmp_path / "run"
        with pytest.raises(ValueError, match=error):
            make_trainer(tmp_path, "vqhit", resolve=True, **overrides)
        assert not out.exists(), f"{overrides} left {list(out.rglob('*'))}"


def test_a_paper_model_gets_the_paper_recipe():
    config = parse_config(["--model", "vqhit-b-f16-1024", "--data", "/somewhere"], "test", "vqhit")
    assert (config.model, config.steps, config.disc_max_channels, config.r1_interval, config.lr,
            config.perceptual, config.perceptual_weight) == ("vqhit-b-f16-1024", 500_000, 512, 1, 1e-4, "vgg_l2", 5e-5)
    face = parse_config(["--model", "hit-b-256"], "test", "gan")
    assert (face.lr, face.disc_channel_multiplier, face.bcr_weight) == (5e-5, 2, 10.0)  # the FFHQ 256 recipe
    assert parse_config(["--model", "hit-l-128"], "test", "gan").transform == "imagenet_gan"
    help_text = " ".join(build_parser("test", "vqhit").format_help().split())
    assert "default: 'vqhit-demo'" in help_text and "default: 'vqhit-b-f16-1024'" not in help_text
    assert summary(config, "vqhit") == ("train_vqhit.py: vqhit-b-f16-1024 with the paper recipe, changed: data "
                                        "/somewhere; writing to runs/vqhit-b-f16-1024/")


def test_command_line_overrides_yaml_and_model_options(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("model: hit-b-256\nlr: 5.0e-5\nmodel_options: {norm: layer}\n")
    config = parse_config(["--config", str(yaml_file), "--lr", "1e-3", "--model-option", "multi_query=false",
                           "--no-flip"], "test", "gan")
    assert config.lr == 1e-3 and config.flip is False and config.model == "hit-b-256"
    assert config.model_options == {"norm": "layer", "multi_query": False}
    # the file's model chooses the recipe: hit-b-256's, not the default model's demo recipe
    assert config.steps == RECIPES["hit-b-256"]["steps"] and config.disc_max_channels == 512
    assert parse_config(["--max-images", "none", "--adam-betas", "0.5", "0.9"], "test", "gan").adam_betas == [0.5, 0.9]
    with pytest.raises(UsageError, match="argument --steps: invalid int value: 'ten'"):  # one line, not a usage block
        parse_config(["--steps", "ten"], "test", "gan")


def test_empty_model_options_in_yaml_are_no_options(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("model: hit-tiny\nmodel_options:\n")  # the key left empty: YAML reads None
    config = parse_config(["--config", str(yaml_file)], "test", "gan")
    assert config.model_options == {}
    from vqhit.training import build_model
    assert build_model(config, "gan").config.preset == "hit-tiny"
    assert parse_config(["--config", str(yaml_file), "--model-option", "mlp_ratio=2"], "test",
                        "gan").model_options == {"mlp_ratio": 2}
    yaml_file.write_text("model: hit-tiny\nmodel_options: [norm, layer]\n")
    with pytest.raises(UsageError, match=r"^--model-option must be of type dict"):
        parse_config(["--config", str(yaml_file)], "test", "gan")


def _checkpoint(output_dir: Path, argv: list[str]) -> Path:
    """A checkpoint folder as a resume reads it first: the run's saved config and its step."""
    from vqhit.train_config import save_config
    checkpoint = output_dir / "checkpoint-10"
    checkpoint.mkdir(parents=True)
    save_config(parse_config([*argv, "--output-dir", str(output_dir)], "test", "vqhit"),
                checkpoint / "train_config.yaml")
    (checkpoint / "train_state.json").write_text('{"step": 10}\n')
    return checkpoint


def test_a_derived_perceptual_weight_follows_the_perceptual_loss_on_resume(tmp_path, recwarn):
    out = tmp_path / "run"
    _checkpoint(out, ["--perceptual", "vgg_l2"])
    resume = ["--output-dir", str(out), "--resume", "auto"]
    assert parse_config(resume, "test", "vqhit").perceptual_weight == 5e-5
    assert parse_config([*resume, "--perceptual", "lpips"], "test", "vqhit").perceptual_weight == 1.0
    fresh = parse_config(["--perceptual", "lpips"], "test", "vqhit")
    assert fresh.perceptual_weight == 1.0
    assert not recwarn.list


def test_an_explicit_perceptual_weight_is_kept_on_resume_and_said(tmp_path):
    out = tmp_path / "run"
    _checkpoint(out, ["--perceptual", "vgg_l2", "--perceptual-weight", "2e-5"])
    resume = ["--output-dir", str(out), "--resume", "auto"]
    with pytest.warns(UserWarning, match=r"--perceptual lpips: keeping --perceptual-weight 2e-05, .* give "
                                         r"--perceptual-weight to change it"):
        assert parse_config([*resume, "--perceptual", "lpips"], "test", "vqhit").perceptual_weight == 2e-5
    assert parse_config([*resume, "--perceptual", "lpips", "--perceptual-weight", "0.5"], "test",
                        "vqhit").perceptual_weight == 0.5


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    task = "gan" if "gan" in path.name else "vqhit"
    config = parse_config(["--config", str(path)], "test", task)
    assert config.model in list_presets("generator" if task == "gan" else "tokenizer")
    from vqhit.training import build_model
    with torch.device("meta"):
        build_model(config, task)  # the preset and its model_options build


def test_bf16_autocast_trains_and_r1_stays_fp32(tmp_path):
    trainer = make_trainer(tmp_path, "vqhit", precision="bf16", adv_start=0)
    D = trainer.accelerator.unwrap_model(trainer.D)
    calls = []  # (is it the R1 call, output dtype, autocast on) of D's first layer, for every D forward

    def record(module, inputs, output):  # R1 differentiates D with respect to a leaf copy of the real images
        is_r1 = inputs[0].requires_grad and inputs[0].grad_fn is None
        calls.append((is_r1, output.dtype, torch.is_autocast_enabled("cpu")))

    first = next(m for m in D.modules() if isinstance(m, torch.nn.Conv2d))
    handle = first.register_forward_hook(record)
    logs = trainer.train_step(next(trainer.batches)["image"])
    handle.remove()
    r1_calls = [c for c in calls if c[0]]
    other_calls = [c for c in calls if not c[0]]
    assert r1_calls and all(dtype == torch.float32 and not autocast for _, dtype, autocast in r1_calls)
    assert other_calls and all(dtype == torch.bfloat16 for _, dtype, _ in other_calls)  # the networks run in bf16
    assert logs["loss/r1"].dtype == torch.float32
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in logs.values())


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_recipe_configs_agree_with_the_recipe_defaults(path):
    """A recipe file and a bare `--model X` run must train the same recipe."""
    values = parse_config(["--config", str(path)], "test", "gan" if "gan" in path.name else "vqhit").to_dict()
    recipe = RECIPES[values["model"]]
    for key, expected in recipe.items():
        if key == "steps" or ("modern" in path.name and key == "perceptual"):
            continue  # CelebA-HQ trains 250k-500k steps; the modern recipe departs on purpose
        assert values[key] == expected, f"{path.name}: {key} = {values[key]!r}, the recipe says {expected!r}"


def test_tokenizer_run_ends_with_a_heldout_report(tmp_path, capsys):
    from vqhit.data import eval_dataset
    from vqhit.evaluation import heldout_report
    trainer = make_trainer(tmp_path, "vqhit", steps=1, adv_start=10, heldout_data="builtin:photos-heldout")
    ema = trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "logs.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "heldout/psnr" in r]
    assert len(logged) == 1 and logged[0]["step"] == 1
    direct = heldout_report(ema, eval_dataset("builtin:photos-heldout", 64))
    assert logged[0]["heldout/psnr"] == pytest.approx(direct["psnr"])
    assert logged[0]["heldout/codebook_usage"] == pytest.approx(direct["codebook_usage"])
    # The training photographs, seen the same way (whole), for the generalisation gap
    train = heldout_report(ema, eval_dataset("builtin:photos-whole", 64))
    assert logged[0]["train_source/psnr"] == pytest.approx(train["psnr"])
    assert logged[0]["heldout/gap_psnr"] == pytest.approx(train["psnr"] - direct["psnr"])
    out = capsys.readouterr().out
    assert "builtin:photos-heldout (12 images, never trained on)" in out
    assert "builtin:photos-whole (11 images, the training images)" in out and "generalisation gap" in out
    assert (tmp_path / "run" / "samples" / "heldout-step-0000001.png").is_file()
    # the same command again (a job script rerun after the end): nothing is trained, reported or logged twice
    logs = (tmp_path / "run" / "logs.jsonl").read_text()
    make_trainer(tmp_path, "vqhit", steps=1, adv_start=10, heldout_data="builtin:photos-heldout", resume="auto").fit()
    assert (tmp_path / "run" / "logs.jsonl").read_text() == logs
    out = capsys.readouterr().out
    assert "already finished at step 1 (--steps 1): nothing to train" in out and "PSNR" not in out


def test_a_stop_signal_after_the_last_checkpoint_lets_the_report_finish(tmp_path, monkeypatch, capsys):
    """SIGTERM while the held-out report runs (training done and checkpointed) used to kill the process without its
    report; the report now finishes and the run ends normally."""
    from vqhit import heldout

    report = heldout.report_once

    def signalled_report(*args):
        os.kill(os.getpid(), signal.SIGTERM)  # handled at once, in this (the main) thread
        return report(*args)

    def killed(signum, frame):  # SIGTERM's default, death, as an exception this test can see
        raise SystemExit(128 + signum)

    monkeypatch.setattr(heldout, "report_once", signalled_report)
    previous = signal.signal(signal.SIGTERM, killed)
    try:
        make_trainer(tmp_path, "vqhit", steps=1, adv_start=10, heldout_data="builtin:photos-heldout").fit()
    finally:
        signal.signal(signal.SIGTERM, previous)
    rows = [json.loads(line) for line in (tmp_path / "run" / "logs.jsonl").read_text().splitlines()]
    assert sum("heldout/psnr" in r for r in rows) == 1
    out, err = capsys.readouterr()
    assert "received SIGTERM: training is complete and checkpointed" in err and "finished at step 1" in out


def test_decoder_only_fine_tuning_keeps_every_token_id(tmp_path):
    from vqhit.models.vqhit import VQHiT
    make_trainer(tmp_path / "base", "vqhit", steps=2, adv_start=10).fit()
    base = VQHiT.from_pretrained(tmp_path / "base" / "run" / "model")
    tuned_trainer = make_trainer(tmp_path / "tuned", "vqhit", steps=3, adv_start=10, lr=1e-2, ema_start=0,
                                 init_from=str(tmp_path / "base" / "run" / "model"),
                                 model_options={"freeze_encoder": True, "freeze_codebook": True,
                                                "dead_code_steps": 1})  # restarts would be due every step
    tuned = tuned_trainer.fit()
    x = next(tuned_trainer.batches)["image"]
    with torch.no_grad():
        assert torch.equal(base.encode(x), tuned.encode(x))  # token shards made with the base stay valid
        assert not torch.equal(base.decode_indices(base.encode(x)), tuned.decode_indices(tuned.encode(x)))
    trained = tuned_trainer.accelerator.unwrap_model(tuned_trainer.model)
    for name, value in base.state_dict().items():
        if name.startswith(("encoder.", "quant_conv.", "quantize.embedding")):
            assert torch.equal(value, trained.state_dict()[name]), name


def test_model_card_figures_name_their_weights_and_leave_with_them(tmp_path, capsys):
    """eval_rfid writes figures into the run's model card, naming the step and weights they measured; a resumed
    run's new export removes them (they measured other weights) and keeps the rest of the card."""
    import runpy
    make_trainer(tmp_path, "vqhit", steps=1, checkpoint_every=1, adv_start=10).fit()
    model_dir = tmp_path / "run" / "model"
    evaluate = runpy.run_path(str(ROOT / "scripts" / "eval_rfid.py"), run_name="script")["main"]
    report = evaluate(["--model", str(model_dir), "--data", "builtin:photos-heldout", "--num-images", "4", "--no-fid",
                       "--no-lpips", "--num-workers", "0", "--output-dir", str(tmp_path / "eval"), "--no-progress"])
    sha = weights_sha256(model_dir)  # of the content: the tensors and the header's keys in order
    assert report["settings"]["weights_sha256"] == sha and report["settings"]["training_step"] == 1
    card = (model_dir / "README.md").read_text()
    assert f"sha256 `{sha[:16]}` (after\n1 training steps)" in card and "| PSNR (dB) |" in card
    assert "| data | builtin:photos-heldout |" in card and "| crop | adm_center_crop |" in card

    # a finished run resumed (a job restarted after the end) has nothing new to export: the weights file is not
    # rewritten (its bytes could differ: safetensors does not fix the order of its metadata), and the figures stay
    inode = (model_dir / "model.safetensors").stat().st_ino
    make_trainer(tmp_path, "vqhit", steps=1, checkpoint_every=1, adv_start=10, resume="latest").fit()
    assert (model_dir / "model.safetensors").stat().st_ino == inode
    assert (model_dir / "README.md").read_text() == card
    assert weights_sha256(model_dir) == sha

    make_trainer(tmp_path, "vqhit", steps=2, checkpoint_every=1, adv_start=10, resume="latest").fit()
    card = (model_dir / "README.md").read_text()
    assert "PSNR" not in card and "sha256" not in card  # the figures of step 1 left with step 1's weights
    assert "VQHiT.from_pretrained" in card  # the rest of the card stays


def test_progress_bar_shows_window_means_and_a_finished_run_says_where_its_model_is(tmp_path, capsys):
    """The bar's losses are means over the log window, not one batch's; `usage` is said as codes used of the
    codebook; the last line names the exported model."""
    trainer = make_trainer(tmp_path, "vqhit", steps=4, log_every=2, adv_start=10)
    l2 = []
    step = trainer.train_step
    trainer.train_step = lambda real: (logs := step(real), l2.append(float(logs["loss/l2"])))[0]
    trainer.fit()
    out, err = capsys.readouterr()
    bar = err.replace("\r", "\n").splitlines()[-1]
    last = json.loads((tmp_path / "run" / "logs.jsonl").read_text().splitlines()[-1])
    assert f"mean of 2 steps: l2 {(l2[2] + l2[3]) / 2:.3g}" in bar and f"l2 {l2[3]:.3g}" not in bar
    assert f"codes used {int(last['codebook/codes_used'])} of 256" in bar and "usage" not in bar
    model = tmp_path / "run" / "model"
    assert out.splitlines()[-1] == f'finished at step 4: the EMA model is in {model} (VQHiT.from_pretrained("{model}"))'


def test_tensorboard_gets_a_histogram_of_code_use_at_log_steps(tmp_path):
    """At every log step: one value per code, the times it was picked since the previous log step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    make_trainer(tmp_path, "vqhit", steps=4, log_every=2, adv_start=10, heldout_data=None).fit()
    events = next((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*")).parent
    accumulator = EventAccumulator(str(events), size_guidance={"histograms": 0})
    accumulator.Reload()
    histograms = accumulator.Histograms("codebook/code_use")
    assert [h.step for h in histograms] == [2, 4]
    for h in histograms:  # 256 codes; 2 steps x 2 images x an 8x8 grid = 256 picks in each window
        assert (h.histogram_value.num, h.histogram_value.sum) == (256, 256)
