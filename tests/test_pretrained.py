"""Configs, save/load and sharing: runtime vs architecture keys, type-checked configs, local path vs Hub id,
damaged files, atomic writes, the model card and push_to_hub (with the Hub API faked: no network here)."""
import ast
import fnmatch
import inspect
import json
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch

import vqhit.presets
from vqhit import HiTConfig, HiTGenerator, VQHiT, VQHiTConfig
from vqhit.downloads import local_or_hub
from vqhit.models import pretrained
from vqhit.models.model_card import write_model_card


@pytest.fixture(scope="module")
def saved_tokenizer(tmp_path_factory):
    """vqhit-tiny (dead-code restart on) after a few training forwards, saved; and its eval outputs."""
    torch.manual_seed(0)
    model = VQHiT.from_preset("vqhit-tiny")
    model.train()
    for _ in range(2):
        model(torch.rand(4, 3, 64, 64) * 2 - 1)  # moves BatchNorm statistics and the restart clocks
    folder = model.eval().save_pretrained(tmp_path_factory.mktemp("saved") / "tok")
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        return folder, model, x, model(x)[0]


def no_hub(*args, **kwargs):
    raise AssertionError("the Hub was asked for something that is not a Hub id")


# -- runtime vs architecture keys ---------------------------------------------------------------------------
def test_architecture_dict_leaves_out_runtime_keys():
    a = VQHiTConfig.from_preset("vqhit-tiny")
    b = VQHiTConfig.from_preset("vqhit-tiny", freeze_encoder=True, freeze_codebook=True, checkpoint_mlp=True,
                                bn_momentum=0.5, restart_dead_codes=False, dead_code_steps=3, beta=1.0,
                                entropy_loss_weight=0.1, norm="syncbatch", preset="renamed")
    assert a.to_dict() != b.to_dict() and a.architecture_dict() == b.architecture_dict()
    assert "freeze_encoder" not in a.architecture_dict() and "codebook_size" in a.architecture_dict()
    assert VQHiTConfig.from_preset("vqhit-tiny", norm="layer").architecture_dict() != a.architecture_dict()
    g = HiTConfig.from_preset("hit-tiny")
    assert g.architecture_dict() == HiTConfig.from_preset("hit-tiny", checkpoint_mlp=True, bn_momentum=0.01,
                                                          norm="syncbatch").architecture_dict()
    assert g.architecture_dict() != HiTConfig.from_preset("hit-tiny", mlp_ratio=2).architecture_dict()


def test_load_weights_takes_runtime_keys_from_the_caller(saved_tokenizer):
    folder, model, x, expected = saved_tokenizer
    # restart off: the saved restart state is not needed; freezing and momentum are the caller's.
    other = VQHiT.from_preset("vqhit-tiny", restart_dead_codes=False, freeze_encoder=True, bn_momentum=0.01,
                              checkpoint_mlp=True)
    other.load_weights(folder)
    assert other.config.freeze_encoder and not any(p.requires_grad for p in other.encoder.parameters())
    assert other.config.bn_momentum == 0.01 and not other.config.restart_dead_codes
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(x)[0], expected)


def test_load_weights_refuses_another_architecture_naming_the_keys(saved_tokenizer):
    folder = saved_tokenizer[0]
    other = VQHiT.from_preset("vqhit-tiny", codebook_size=128, mlp_ratio=2)
    with pytest.raises(ValueError, match=r"another configuration.*codebook_size: 256 vs 128; mlp_ratio: 4 vs 2"):
        other.load_weights(folder)
    with pytest.raises(ValueError, match="holds a 'vqhit' checkpoint"):
        HiTGenerator.from_pretrained(folder)


def test_restart_state_is_optional_in_both_directions(tmp_path, saved_tokenizer):
    _, model, x, expected = saved_tokenizer
    plain = VQHiT.from_preset("vqhit-tiny", restart_dead_codes=False)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k in plain.state_dict()})
    plain.eval().save_pretrained(tmp_path / "plain")
    assert not any("steps_since_used" in k for k in plain.state_dict())
    restarting = VQHiT.from_preset("vqhit-tiny")  # restart on: the checkpoint has no restart state
    restarting.load_weights(tmp_path / "plain")
    assert int(restarting.quantize.steps_since_used.sum()) == 0  # fresh clocks
    with torch.no_grad():
        torch.testing.assert_close(restarting.eval()(x)[0], expected)


def test_from_pretrained_accepts_runtime_overrides_and_refuses_architecture_ones(saved_tokenizer):
    folder, _, x, expected = saved_tokenizer
    model = VQHiT.from_pretrained(folder, freeze_encoder=True, freeze_codebook=True, norm="syncbatch")
    assert not model.training  # eval mode, as the Hub mixin returns models
    assert model.config.freeze_codebook and not model.quantize.embedding.weight.requires_grad
    assert model.config.norm == "syncbatch"
    with pytest.raises(ValueError, match=r"cannot change architecture keys.*codebook_size: 256 vs 512"):
        VQHiT.from_pretrained(folder, codebook_size=512)
    with pytest.raises(ValueError, match=r"unknown VQHiTConfig keys \['codebook_sise'\]"):
        VQHiT.from_pretrained(folder, codebook_sise=512)
    with torch.no_grad():
        torch.testing.assert_close(VQHiT.from_pretrained(folder)(x)[0], expected)


# -- config values ------------------------------------------------------------------------------------------
def test_config_values_are_type_checked_and_numeric_strings_converted():
    config = VQHiTConfig.from_preset("vqhit-tiny", bn_momentum="1e-2", mlp_ratio="2", freeze_encoder="true",
                                     beta=1, lookup_dim=None)
    assert config.bn_momentum == 0.01 and isinstance(config.bn_momentum, float)
    assert config.mlp_ratio == 2 and config.freeze_encoder is True and config.beta == 1.0
    assert config.lookup_dim is None and config.decoder_widths == [128, 64, 32, 32]
    assert VQHiTConfig.from_preset("vqhit-tiny", lookup_dim="8").lookup_dim == 8
    with pytest.raises(ValueError, match="mlp_ratio must be an int, got 'abc'"):
        HiTConfig.from_preset("hit-tiny", mlp_ratio="abc")
    with pytest.raises(ValueError, match="mlp_ratio must be an int, got 2.5"):
        HiTConfig.from_preset("hit-tiny", mlp_ratio=2.5)
    with pytest.raises(ValueError, match=r"lookup_dim must be an int or None, got 'x'"):
        VQHiTConfig(lookup_dim="x")
    with pytest.raises(ValueError, match=r"widths must be a list, got 128"):
        HiTConfig.from_preset("hit-tiny", widths=128)
    with pytest.raises(ValueError, match=r"freeze_encoder must be a bool \(true or false\), got 1"):
        VQHiTConfig(freeze_encoder=1)
    with pytest.raises(ValueError, match=r"unknown HiTConfig preset 'hit-huge'; available: hit-s-256"):
        HiTConfig.from_preset("hit-huge")


@pytest.mark.parametrize("config_class, preset, key, value, message", [
    (HiTConfig, "hit-tiny", "latent_dim", 0, r"latent_dim must be >= 1, got 0"),
    (HiTConfig, "hit-tiny", "mlp_ratio", 0, r"mlp_ratio must be >= 1, got 0"),
    (HiTConfig, "hit-tiny", "memory_tokens", -1, r"memory_tokens must be >= 1, got -1"),
    (HiTConfig, "hit-tiny", "bn_momentum", 5.0, r"bn_momentum must be in \[0, 1\], got 5.0"),
    (VQHiTConfig, "vqhit-tiny", "bn_momentum", float("nan"), r"bn_momentum must be in \[0, 1\], got nan"),
    (VQHiTConfig, "vqhit-tiny", "mlp_ratio", 0, r"mlp_ratio must be >= 1, got 0"),
    (VQHiTConfig, "vqhit-tiny", "beta", float("nan"), r"beta \(the commitment loss weight\) must be a finite"),
    (VQHiTConfig, "vqhit-tiny", "codebook_size", 0, r"codebook_size and code_dim must be positive, got 0"),
    (VQHiTConfig, "vqhit-tiny", "dead_code_steps", 0, r"dead_code_steps and restart_buffer_size must be >= 1"),
])
def test_config_values_that_build_a_broken_model_are_refused(config_class, preset, key, value, message):
    with pytest.raises(ValueError, match=message):
        config_class.from_preset(preset, **{key: value})


def test_presets_module_is_plain_data():
    tree = ast.parse(inspect.getsource(vqhit.presets))
    imports = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert [node.module for node in imports if isinstance(node, ast.ImportFrom)] == ["__future__"]
    assert not any(isinstance(node, ast.Import) for node in imports)
    assert HiTGenerator.from_preset("hit-tiny").config == HiTConfig.from_preset("hit-tiny")


# -- local path or Hub id -----------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["runs/vqhit-demo/model", "./model", "/no/such", "~/no-such-model", "model/",
                                  "C:\\models\\x", "a b", "org/na--me", "x" * 97])
def test_a_path_that_does_not_exist_is_not_sent_to_the_hub(text):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        local_or_hub(text, "model folder", fetch=no_hub)


def test_local_or_hub(tmp_path, monkeypatch):
    assert local_or_hub(tmp_path, "data") == tmp_path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_images").mkdir()
    assert local_or_hub("my_images", "data") == Path("my_images")  # an existing folder wins over a Hub id
    with pytest.raises(FileNotFoundError, match="no such folder"):
        local_or_hub(tmp_path / "missing", "data", fetch=no_hub)  # a Path object is never a Hub id
    assert local_or_hub("org/name", "data") == "org/name"
    assert local_or_hub("name", "data", fetch=lambda repo_id: ("fetched", repo_id)) == ("fetched", "name")

    def unreachable(repo_id):
        raise OSError("network is unreachable")
    with pytest.raises(FileNotFoundError, match=r"no local folder my_model and the Hub has no repository "
                                                r"my_model / is unreachable: OSError: network is unreachable"):
        local_or_hub("my_model", "data", fetch=unreachable)


def test_from_pretrained_names_both_readings_of_a_missing_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    with pytest.raises(FileNotFoundError, match="no such folder: runs/vqhit-demo/model"):
        VQHiT.from_pretrained("runs/vqhit-demo/model")

    def offline(repo_id, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="no local folder someone/tok and the Hub has no repository"):
        VQHiT.from_pretrained("someone/tok")


# -- damaged files ------------------------------------------------------------------------------------------
def copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "model.safetensors").write_bytes(b""), r"model.safetensors is damaged or incomplete"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
     r"model.safetensors is damaged or incomplete"),
    (lambda d: (d / "model.safetensors").unlink(), r"no model.safetensors in"),
    (lambda d: (d / "config.json").write_text((d / "config.json").read_text()[:40]),
     r"config.json is not valid JSON .*save the model again"),
    (lambda d: (d / "config.json").write_text("[1, 2]"), r"config.json holds a JSON list, not an object"),
    (lambda d: (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()),
                                                          "mlp_ratio": "abc"})),
     r"config.json: mlp_ratio must be an int, got 'abc'. Correct the value"),
    (lambda d: (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()),
                                                          "codebook_size": -5})),
     r"config.json: codebook_size and code_dim must be positive, got -5 and 32. Correct the value"),
    (lambda d: (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()),
                                                          "decoder_block_sizes": [3, None, None, None]})),
     r"config.json: block size 3 does not divide the 8x8 map.*Correct the value"),
])
def test_damaged_files_are_named_with_the_fix(tmp_path, saved_tokenizer, damage, message):
    folder = copy_folder(saved_tokenizer[0], tmp_path / "tok")
    damage(folder)
    with pytest.raises(ValueError, match=message):
        VQHiT.from_pretrained(folder)


def test_taming_checkpoint_holding_a_tensor_is_explained(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.ckpt")
    model = VQHiT.from_preset("vqhit-tiny")
    with pytest.raises(ValueError, match=r"tensor.ckpt holds a Tensor, not a checkpoint dict"):
        model.load_taming_checkpoint(tmp_path / "tensor.ckpt")
    torch.save({"state_dict": torch.zeros(3)}, tmp_path / "nested.ckpt")
    with pytest.raises(ValueError, match=r"nested.ckpt: its 'state_dict' is a Tensor"):
        model.load_taming_checkpoint(tmp_path / "nested.ckpt")


# -- writing and sharing ------------------------------------------------------------------------------------
def test_an_interrupted_save_leaves_the_previous_files(tmp_path, monkeypatch):
    torch.manual_seed(0)
    old = HiTGenerator.from_preset("hit-tiny").eval()
    folder = old.save_pretrained(tmp_path / "g")
    new = HiTGenerator.from_preset("hit-tiny", mlp_ratio=2)

    def killed(tensors, path, metadata=None):  # the process dies half way through writing the weights
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(pretrained, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(folder)
    monkeypatch.undo()
    loaded = HiTGenerator.from_pretrained(folder)  # the old model, whole
    z = torch.randn(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(z), old(z))


def test_compiled_modules_save_and_load_under_their_own_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = VQHiT.from_preset("vqhit-tiny").eval()
    plain_keys = set(model.state_dict())
    model.decoder = torch.compile(model.decoder)  # lazy: nothing is compiled unless it is called
    folder = model.save_pretrained(tmp_path / "tok")
    assert set(load_file(str(folder / "model.safetensors"))) == plain_keys
    loaded = VQHiT.from_pretrained(folder)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, model.state_dict()[key.replace("decoder.", "decoder._orig_mod.", 1)])
    model.load_weights(folder)  # into a model whose decoder is compiled
    assert model.holds_this_model(folder)

    whole = torch.compile(HiTGenerator.from_preset("hit-tiny").eval())
    assert set(load_file(str(whole.save_pretrained(tmp_path / "g") / "model.safetensors"))) == set(
        whole._orig_mod.state_dict())

    # A file an earlier version saved from a compiled decoder: its `_orig_mod.` keys are read as the module's.
    old = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert any("_orig_mod." in k for k in old)
    save_file(old, str(folder / "model.safetensors"), metadata={"format": "pt"})
    again = VQHiT.from_pretrained(folder)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in again.state_dict().items())


def test_model_card_is_written_and_kept(tmp_path):
    model = VQHiT.from_preset("vqhit-tiny")
    folder = model.save_pretrained(tmp_path / "tok")
    card = huggingface_hub.ModelCard.load(folder / "README.md")
    assert card.data.library_name == "vqhit" and "pytorch_model_hub_mixin" in card.data.tags
    assert "VQHiT.from_pretrained" in card.text and "vqhit (vqhit-tiny)" in card.text

    path = write_model_card(folder, {"rFID": 6.371234, "PSNR": 21.5, "usage": 0.97},
                            {"data": "imagenet/val", "images": 50000})
    assert path == folder / "README.md" and not list(folder.glob("*.tmp"))
    card = huggingface_hub.ModelCard.load(path)
    assert card.data.library_name == "vqhit"
    assert "| rFID | 6.371 |" in card.text and "| images | 50000 |" in card.text
    model.save_pretrained(folder)  # a re-save keeps the evaluated card, as the Hub mixin does
    assert "| rFID | 6.371 |" in path.read_text()


def test_model_card_keeps_the_users_text_and_replaces_its_figures_in_place(tmp_path):
    torch.manual_seed(0)
    folder = VQHiT.from_preset("vqhit-tiny").eval().save_pretrained(tmp_path / "tok")
    mine = "# My tokenizer\n\nTrained on my photos.\n\nLicense: CC-BY\n"
    (folder / "README.md").write_text(mine)
    path = write_model_card(folder, {"rFID": 6.371234}, {"data": "imagenet/val"})
    text = path.read_text()
    assert text.startswith(mine) and "| rFID | 6.371 |" in text
    (folder / "README.md").write_text(text + "\n## Notes\n\nAdded after the evaluation.\n")
    write_model_card(folder, {"rFID": 5.5}, {"data": "imagenet/val"})
    text = path.read_text()
    assert text.startswith(mine) and text.endswith("## Notes\n\nAdded after the evaluation.\n")
    assert "| rFID | 5.5 |" in text and "6.371" not in text and text.count("<!-- vqhit-evaluation") == 1
    write_model_card(folder, {"rFID": 5.5}, {"data": "imagenet/val"})
    assert path.read_text() == text  # nothing piles up


class FakeHubApi:
    """The Hub API push_to_hub talks to (no network here): records what one upload_folder would send."""
    uploads: list = []

    def __init__(self, token=None):
        pass

    def create_repo(self, repo_id, **kwargs):
        return type("Repo", (), {"repo_id": repo_id})()

    def upload_folder(self, repo_id, folder_path, allow_patterns=None, **kwargs):
        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()
                 if allow_patterns is None or any(fnmatch.fnmatch(p.name, a) for a in allow_patterns)}
        self.uploads.append(dict(repo_id=repo_id, files=files))
        return f"https://huggingface.co/{repo_id}/commit/{len(self.uploads) - 1}"


@pytest.fixture
def hub(monkeypatch):
    monkeypatch.setattr(FakeHubApi, "uploads", [])
    monkeypatch.setattr(huggingface_hub.hub_mixin, "HfApi", FakeHubApi)
    monkeypatch.setattr(pretrained, "HfApi", FakeHubApi)
    return FakeHubApi.uploads


def test_push_to_hub_uploads_the_saved_folder(hub):
    model = VQHiT.from_preset("vqhit-tiny")
    assert model.push_to_hub("me/tok") == "https://huggingface.co/me/tok/commit/0"
    assert hub[0]["repo_id"] == "me/tok"
    assert sorted(hub[0]["files"]) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads(hub[0]["files"]["config.json"])
    assert config["model_type"] == "vqhit" and config["preset"] == "vqhit-tiny"
    assert b"VQHiT.from_pretrained" in hub[0]["files"]["README.md"]


def test_push_to_hub_uploads_the_folders_evaluated_model_card(tmp_path, hub):
    torch.manual_seed(0)
    folder = VQHiT.from_preset("vqhit-tiny").eval().save_pretrained(tmp_path / "tok")
    write_model_card(folder, {"rFID": 6.371234}, {"data": "imagenet/val"})  # what scripts/eval_rfid.py does
    (folder / "notes.txt").write_text("not part of the model")
    model = VQHiT.from_pretrained(folder)
    model.push_to_hub("me/tok")
    assert hub[-1]["files"] == {name: (folder / name).read_bytes()
                                for name in ("README.md", "config.json", "model.safetensors")}
    assert b"| rFID | 6.371 |" in hub[-1]["files"]["README.md"]

    with torch.no_grad():  # trained on: the folder's figures are not this model's
        next(model.parameters()).add_(1.0)
    model.push_to_hub("me/tok")
    card = hub[-1]["files"]["README.md"].decode()
    assert "VQHiT.from_pretrained" in card and "rFID" not in card
    assert hub[-1]["files"]["model.safetensors"] != (folder / "model.safetensors").read_bytes()
    assert "| rFID | 6.371 |" in (folder / "README.md").read_text()  # the folder itself is left alone


def test_the_weights_hash_follows_the_content_not_the_files_bytes(tmp_path):
    # safetensors writes its metadata map in an arbitrary order (per process): the same weights saved by several
    # processes can differ in their bytes, never in the hash that names them on a model card
    from vqhit.models.model_card import weights_sha256

    model = HiTGenerator.from_preset("hit-tiny")
    model.save_pretrained(tmp_path / "model", training_step=7)
    code = ("import sys, torch; from vqhit import HiTGenerator; m = HiTGenerator.from_pretrained(sys.argv[1]); "
            "m.save_pretrained(sys.argv[2], training_step=7)")
    folders = [tmp_path / f"saved-{i}" for i in range(4)]
    for folder in folders:
        subprocess.run([sys.executable, "-c", code, str(tmp_path / "model"), str(folder)], check=True, timeout=300)
    hashes = {weights_sha256(folder) for folder in [tmp_path / "model", *folders]}
    assert len(hashes) == 1
    other = HiTGenerator.from_preset("hit-tiny")  # other weights: another hash
    other.save_pretrained(tmp_path / "other", training_step=7)
    assert weights_sha256(tmp_path / "other") not in hashes
