"""Token shards: what encode writes is model.encode of the preprocessed images, decodes to decode_indices,
resumes shard by shard, and covers every image exactly once with two processes, in either file format; a Parquet
folder is a `datasets` dataset that holds the same tokens and goes to the Hub."""
import fnmatch
import io
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from conftest import free_port

from vqhit.data import eval_dataset
from vqhit.metrics import to_uint8
from vqhit.models.vqhit import VQHiT
from vqhit import tokens as tokens_module
from vqhit.tokens import (FORMATS, TokenDataset, encode_dataset, index_dtype, load_tokens, read_shard, shard_file,
                          shard_name)

ROOT = Path(__file__).resolve().parents[1]
COUNTS = {"a": 3, "b": 2}  # two classes: labels 0, 0, 0, 1, 1


@pytest.fixture(scope="module")
def setup(tmp_path_factory, make_images):
    root = tmp_path_factory.mktemp("tokens")
    files = make_images(root / "images", COUNTS)
    torch.manual_seed(0)
    model = VQHiT.from_preset("vqhit-tiny").eval()
    model_dir = model.save_pretrained(root / "model")
    dataset = eval_dataset(str(root / "images"), 64)
    return {"root": root, "files": files, "model": model, "model_dir": model_dir, "dataset": dataset}


@pytest.fixture(scope="module")
def encoded(setup):
    """One single-process encode with shards of 2 and batches of 2 (never the whole set in one batch)."""
    out = setup["root"] / "encoded"
    summary = encode_dataset(setup["model"], setup["dataset"], out, shard_size=2, batch_size=2, device="cpu",
                             model_id="test-model", progress=False)
    return out, summary


def test_index_dtype_is_the_smallest_that_holds_the_codebook():
    assert index_dtype(256) == torch.uint8 and index_dtype(257) == torch.int16
    assert index_dtype(32768) == torch.int16 and index_dtype(32769) == torch.int32
    assert index_dtype(1024) == torch.int16


def test_shards_hold_model_encode_and_decode_to_decode_indices(setup, encoded, tmp_path):
    out, summary = encoded
    model, dataset = setup["model"], setup["dataset"]
    assert summary.num_shards == 3 and summary.encoded == [0, 1, 2] and summary.num_images == 5
    with torch.no_grad():
        images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
        expected = model.encode(images)  # all five in one batch, against the shards' batches of two
        expected_images = to_uint8(model.decode_indices(expected))

    tokens = load_tokens(out)
    assert tokens.indices.dtype == torch.uint8 and tokens.indices.shape == (5, 8, 8)
    assert torch.equal(tokens.indices.long(), expected)
    assert tokens.dataset_index.tolist() == [0, 1, 2, 3, 4]
    assert tokens.labels.tolist() == [0, 0, 0, 1, 1]
    assert tokens.ids == [str(p.relative_to(setup["root"] / "images")) for p in setup["files"]]

    shard = read_shard(out / shard_name(1))
    meta = shard["metadata"]
    assert shard["dataset_index"].tolist() == [2, 3] and shard["skipped"] == []
    assert (meta["model"], meta["preset"], meta["codebook_size"], meta["grid"]) == ("test-model", "vqhit-tiny", 256, 8)
    assert meta["preprocessing"]["transform"] == "center_crop" and meta["preprocessing"]["flip"] is False
    assert json.loads((out / "tokens.json").read_text())["num_items"] == 5

    train_set = TokenDataset(out)
    assert len(train_set) == 5
    item = train_set[3]
    assert item["indices"].dtype == torch.int64 and torch.equal(item["indices"], expected[3])
    assert item["label"] == 1 and item["index"] == 3

    # Decoding, through the script: PNG files named after the source files, equal to decode_indices up to rounding.
    decode = runpy.run_path(str(ROOT / "scripts" / "decode.py"), run_name="script")["main"]
    pngs = tmp_path / "png"
    assert decode(["--model", str(setup["model_dir"]), "--tokens", str(out), "--output-dir", str(pngs),
                   "--name-by", "id", "--batch-size", "3", "--no-progress"]) == 5
    for i, relative in enumerate(tokens.ids):
        decoded = np.asarray(Image.open((pngs / relative).with_suffix(".png")), dtype=np.int16)
        reference = expected_images[i].permute(1, 2, 0).numpy().astype(np.int16)
        assert decoded.shape == (64, 64, 3)
        assert np.abs(decoded - reference).max() <= 1


def test_resume_encodes_only_the_missing_shard(setup, encoded, tmp_path):
    model, dataset = setup["model"], setup["dataset"]
    out = tmp_path / "tokens"
    encode_dataset(model, dataset, out, shard_size=2, batch_size=2, device="cpu", progress=False)
    before = {k: (out / shard_name(k)).stat().st_mtime_ns for k in range(3)}
    content = read_shard(out / shard_name(1))
    (out / shard_name(1)).unlink()

    summary = encode_dataset(model, dataset, out, shard_size=2, batch_size=2, device="cpu", progress=False)
    assert summary.encoded == [1] and summary.reused == [0, 2]
    assert all((out / shard_name(k)).stat().st_mtime_ns == before[k] for k in (0, 2))  # untouched
    again = read_shard(out / shard_name(1))  # the same shard again (the header's key order may differ)
    assert torch.equal(again["indices"], content["indices"]) and again["metadata"] == content["metadata"]
    assert not list(out.glob("*.tmp"))

    with pytest.raises(ValueError, match="shard_size"):  # another shard size would cut different shards
        encode_dataset(model, dataset, out, shard_size=3, device="cpu", progress=False)
    torch.manual_seed(1)
    with pytest.raises(ValueError, match="tokenizer_fingerprint"):  # another model's tokens must not be mixed in
        encode_dataset(VQHiT.from_preset("vqhit-tiny"), dataset, out, shard_size=2, device="cpu", progress=False)


def silent_flip(parquet: bytes) -> bytes:
    """The Parquet file with one byte flipped where a reader that skips the page checksums reads other rows
    without an error (zstd's decoder catches many flips on its own, not all)."""
    rows = pq.read_table(io.BytesIO(parquet))
    for i in range(4, len(parquet)):
        flipped = bytearray(parquet)
        flipped[i] ^= 0xFF
        try:
            if not pq.read_table(io.BytesIO(bytes(flipped)), page_checksum_verification=False).equals(rows):
                return bytes(flipped)
        except (OSError, ValueError):
            pass
    raise AssertionError("no silent flip found")


def _card(vqhit) -> str:
    """A dataset card whose metadata's `vqhit:` entry is `vqhit` (any YAML value)."""
    return "---\n" + yaml.safe_dump({"vqhit": vqhit}) + "---\n\n# Tokens\n"


@pytest.mark.parametrize("file_format", FORMATS)
def test_damaged_shards_and_manifest_are_named_with_the_fix_on_decode_and_on_encode_rerun(setup, tmp_path,
                                                                                           file_format):
    model, dataset = setup["model"], setup["dataset"]
    out = tmp_path / "tokens"
    encode = dict(shard_size=2, batch_size=2, device="cpu", progress=False, file_format=file_format)
    encode_dataset(model, dataset, out, **encode)
    decode = runpy.run_path(str(ROOT / "scripts" / "decode.py"), run_name="script")["main"]
    decode_argv = ["--model", str(setup["model_dir"]), "--tokens", str(out), "--output-dir", str(tmp_path / "png"),
                   "--no-progress"]
    shard = shard_file(out, 1, 3, file_format)
    good_shard = shard.read_bytes()
    damages = {"truncated": good_shard[: len(good_shard) // 2], "garbage": b"\x00garbage" * 50, "empty": b""}
    for kind, data in damages.items():
        shard.write_bytes(data)
        for run in (lambda: decode(decode_argv), lambda: encode_dataset(model, dataset, out, **encode)):
            with pytest.raises(ValueError, match=re.escape(shard.name) + r" is damaged.*delete it and run "
                                                                         r"scripts/encode\.py again"):
                run()
    if file_format == "parquet":  # a changed byte that, unchecked, reads as other rows: the page checksums find it
        shard.write_bytes(silent_flip(good_shard))
        with pytest.raises(ValueError, match=re.escape(shard.name) + r" is damaged.*delete it and run"):
            decode(decode_argv)
    shard.unlink()  # the fix: delete it and encode again
    assert encode_dataset(model, dataset, out, **encode).encoded == [1]
    assert torch.equal(read_shard(shard)["indices"], load_tokens(out).indices[2:4])

    good = json.loads((out / "tokens.json").read_text()) if file_format == "safetensors" else \
        yaml.safe_load((out / "README.md").read_text().split("---")[1])["vqhit"]
    if file_format == "safetensors":
        manifest, name, damages = out / "tokens.json", r"tokens\.json", {
            "truncated": json.dumps(good)[:40], "not an object": "[1, 2]",
            "missing keys": json.dumps({"format": "vqhit-tokens"}),
            "a count as text": json.dumps({**good, "num_shards": "3"})}
    else:  # the manifest is the card's metadata
        manifest, name, damages = out / "README.md", r"README\.md", {
            "truncated": (out / "README.md").read_text()[:40], "not YAML": "---\nvqhit: [\n---\n",
            "no manifest": "---\nlicense: mit\n---\n", "not an object": _card([1, 2]),
            "missing keys": _card({"format": "vqhit-tokens"}), "a count as text": _card({**good, "num_shards": "3"})}
    good_manifest = manifest.read_text()
    for kind, text in damages.items():
        manifest.write_text(text)
        for run in (lambda: decode(decode_argv), lambda: encode_dataset(model, dataset, out, **encode)):
            with pytest.raises(ValueError, match=name + r" is (damaged|not a vqhit token (manifest|card)).*delete it "
                                                        r"and run scripts/encode\.py again"):
                run()
    manifest.unlink()  # the fix: the shards' own metadata let the same encode run resume and rewrite it
    summary = encode_dataset(model, dataset, out, **encode)
    assert summary.encoded == [] and summary.reused == [0, 1, 2]
    assert manifest.read_text() == good_manifest
    manifest.unlink()
    first = re.escape(shard_file(out, 0, 3, file_format).name)
    with pytest.raises(ValueError, match=first + r" does not belong.*shard_size") as refused:
        encode_dataset(model, dataset, out, **{**encode, "shard_size": 3})  # other settings: refused, not mixed in
    # The shards are good tokens of the earlier settings: the fix is another folder, as with the manifest there.
    assert "use a new output folder" in str(refused.value) and "delete it" not in str(refused.value)
    encode_dataset(model, dataset, out, **encode)

    # A shard of another folder (other shard size) copied in is refused by name, not decoded as if it were ours.
    other = tmp_path / "other"
    encode_dataset(model, dataset, other, **{**encode, "shard_size": 3})
    shard_file(other, 1, 2, file_format).replace(shard)
    with pytest.raises(ValueError, match=re.escape(shard.name) + r" does not belong.*shard_size"):
        load_tokens(out)


def test_decoding_with_another_tokenizer_is_refused_unless_allowed(setup, encoded, tmp_path):
    out, _ = encoded
    torch.manual_seed(1)
    other_dir = VQHiT.from_preset("vqhit-tiny").save_pretrained(tmp_path / "other-model")  # same preset, other codes
    decode = runpy.run_path(str(ROOT / "scripts" / "decode.py"), run_name="script")["main"]
    argv = ["--model", str(other_dir), "--tokens", str(out), "--output-dir", str(tmp_path / "png"), "--no-progress"]
    with pytest.raises(ValueError, match="another encoder/codebook.*--allow-other-tokenizer"):
        decode(argv)
    assert not (tmp_path / "png").exists()
    with pytest.warns(UserWarning, match="decoding anyway"):
        assert decode(argv + ["--allow-other-tokenizer"]) == 5


def test_random_transforms_are_refused(setup):
    from vqhit.data import DataConfig, build_dataset

    flipped = build_dataset(DataConfig(source=str(setup["root"] / "images"), resolution=64, transform="center_crop"))
    with pytest.raises(ValueError, match="flip=False"):
        encode_dataset(setup["model"], flipped, setup["root"] / "never", device="cpu")
    with pytest.raises(ValueError, match="deterministic"):
        eval_dataset(str(setup["root"] / "images"), 64, transform="random_crop")


@pytest.mark.parametrize("file_format", FORMATS)
def test_two_processes_encode_every_image_exactly_once(setup, encoded, tmp_path, file_format):
    out = tmp_path / "tokens"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(ROOT / "scripts" / "encode.py"), "--model", str(setup["model_dir"]),
           "--data", str(setup["root"] / "images"), "--output-dir", str(out), "--shard-size", "1",
           "--batch-size", "2", "--num-workers", "0", "--no-progress", "--format", file_format]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    shards = [read_shard(shard_file(out, k, 5, file_format)) for k in range(5)]
    writers = [s["metadata"]["written_by"] for s in shards]  # process r writes the shards k = r (mod 2)
    assert writers == [{"process": k % 2, "num_processes": 2} for k in range(5)]
    ids = [i for s in shards for i in s["ids"]]
    assert len(ids) == len(set(ids)) == 5
    assert set(ids) == {str(p.relative_to(setup["root"] / "images")) for p in setup["files"]}
    assert sorted(i for s in shards for i in s["dataset_index"].tolist()) == [0, 1, 2, 3, 4]
    # The same tokens as one process made (in safetensors): the same in either format, and whatever the processes.
    assert torch.equal(load_tokens(out).indices, load_tokens(encoded[0]).indices)
    if file_format == "parquet":  # and what `datasets` reads is those tokens, in dataset order
        rows = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf")).with_format("torch")[:]
        assert torch.equal(rows["indices"], load_tokens(encoded[0]).indices.long())
        assert rows["dataset_index"].tolist() == [0, 1, 2, 3, 4]


def test_decode_by_id_never_writes_two_images_to_one_file(setup, tmp_path):
    """a.jpg and a.png both end in a.png when the suffix is swapped: the jpg keeps its extension, a.jpg.png."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "a.png", "b.jpg"):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / name)
    model = setup["model"]
    encode_dataset(model, eval_dataset(str(folder), 64), tmp_path / "tokens", shard_size=2, device="cpu",
                   progress=False)
    tokens = load_tokens(tmp_path / "tokens")
    decode = runpy.run_path(str(ROOT / "scripts" / "decode.py"), run_name="script")["main"]
    with pytest.warns(UserWarning, match=r"keep their extension .*a\.jpg -> a\.jpg\.png"):
        written = decode(["--model", str(setup["model_dir"]), "--tokens", str(tmp_path / "tokens"), "--output-dir",
                          str(tmp_path / "png"), "--name-by", "id", "--no-progress"])
    assert written == 3
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["a.jpg.png", "a.png", "b.png"]
    with torch.no_grad():
        expected = to_uint8(model.decode_indices(tokens.indices.long())).permute(0, 2, 3, 1).numpy()
    for image, source in zip(expected, tokens.ids):  # each file holds its own image, not the other's
        name = {"a.jpg": "a.jpg.png", "a.png": "a.png", "b.jpg": "b.png"}[source]
        assert np.array_equal(np.asarray(Image.open(tmp_path / "png" / name)), image)


def test_decode_never_replaces_existing_files_unless_asked(setup, encoded, tmp_path, capsys):
    """--name-by id into the source folder would replace the user's photographs with reconstructions: refused
    before anything is decoded, as is a re-run into the same folder; --overwrite replaces them."""
    from vqhit import cli

    out, _ = encoded
    decode = runpy.run_path(str(ROOT / "scripts" / "decode.py"), run_name="script")["main"]
    source = tmp_path / "source"
    files = {}
    for path in setup["files"]:
        relative = path.relative_to(setup["root"] / "images")
        (source / relative).parent.mkdir(parents=True, exist_ok=True)
        files[relative] = path.read_bytes()
        (source / relative).write_bytes(files[relative])
    argv = ["--model", str(setup["model_dir"]), "--tokens", str(out), "--output-dir", str(source), "--name-by", "id",
            "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:
        cli.run(decode, argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: --output-dir {source} already holds 5 of the 5 files") and "--overwrite" in error
    assert len(error.splitlines()) == 1
    assert all((source / relative).read_bytes() == data for relative, data in files.items())  # untouched

    pngs = tmp_path / "png"
    argv = ["--model", str(setup["model_dir"]), "--tokens", str(out), "--output-dir", str(pngs), "--no-progress"]
    assert decode(argv) == 5
    (pngs / "00000002.png").write_bytes(b"mine")
    with pytest.raises(ValueError, match=r"already holds 5 of the 5 files .*--overwrite"):
        decode(argv)  # a re-run into the same folder is refused alike
    assert (pngs / "00000002.png").read_bytes() == b"mine"
    assert decode(argv + ["--overwrite"]) == 5
    assert Image.open(pngs / "00000002.png").size == (64, 64)


def test_an_output_dir_that_is_a_file_is_refused_before_any_work(setup, encoded, tmp_path):
    out, _ = encoded
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    encode = runpy.run_path(str(ROOT / "scripts" / "encode.py"), run_name="script")["main"]
    decode = runpy.run_path(str(ROOT / "scripts" / "decode.py"), run_name="script")["main"]
    for output_dir, where in ((a_file, "is a file"), (a_file / "sub", f"lies under {a_file}, which is a file")):
        with pytest.raises(ValueError, match=f"--output-dir {output_dir} {where}, not a folder"):
            encode(["--model", str(setup["model_dir"]), "--data", str(setup["root"] / "images"), "--output-dir",
                    str(output_dir), "--num-workers", "0", "--no-progress"])
        with pytest.raises(ValueError, match=f"--output-dir {output_dir} {where}, not a folder"):
            decode(["--model", str(setup["model_dir"]), "--tokens", str(out), "--output-dir", str(output_dir),
                    "--no-progress"])
    assert a_file.read_text() == "not a folder"


LOAD_WITHOUT_VQHIT = """
import json, sys
import datasets
folder, cache = sys.argv[1:]
rows = datasets.load_dataset(folder, split="train", cache_dir=cache)
streamed = next(iter(datasets.load_dataset(folder, split="train", streaming=True)))
print(json.dumps({"features": {k: str(v) for k, v in rows.features.items()}, "rows": rows.to_dict(),
                  "streamed": streamed, "vqhit_imported": any(m.split(".")[0] == "vqhit" for m in sys.modules)}))
"""


def test_a_parquet_folder_is_a_datasets_dataset_of_the_same_tokens_and_images(setup, encoded, tmp_path):
    """encode --format parquet -> datasets.load_dataset, in a process that never imports vqhit -> the tokens,
    ids, positions and labels of the safetensors folder; both decode to the same PNGs, and the card's metadata are
    the safetensors folder's tokens.json."""
    safetensors_dir, _ = encoded
    out = tmp_path / "tokens"
    encode = runpy.run_path(str(ROOT / "scripts" / "encode.py"), run_name="script")["main"]
    argv = ["--model", str(setup["model_dir"]), "--data", str(setup["root"] / "images"), "--output-dir", str(out),
            "--shard-size", "2", "--batch-size", "2", "--num-workers", "0", "--no-progress", "--format", "parquet"]
    assert encode(argv).encoded == [0, 1, 2]
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == \
        ["README.md"] + [f"data/train-0000{k}-of-00003.parquet" for k in range(3)]

    result = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_VQHIT, str(out), str(tmp_path / "hf")],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.splitlines()[-1])
    assert not loaded["vqhit_imported"]
    assert loaded["features"]["indices"] == "Array2D(shape=(8, 8), dtype='uint8')"
    reference = load_tokens(safetensors_dir)
    rows = loaded["rows"]
    assert torch.equal(torch.tensor(rows["indices"]), reference.indices.long())
    assert rows["id"] == reference.ids and rows["dataset_index"] == [0, 1, 2, 3, 4]
    assert rows["label"] == reference.labels.tolist() == [0, 0, 0, 1, 1]
    assert loaded["streamed"] == {key: values[0] for key, values in rows.items()}

    card = (out / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["configs"][0]["data_files"] == [{"split": "train", "path": "data/train-*.parquet"}]
    manifest = json.loads((safetensors_dir / "tokens.json").read_text())
    assert metadata["vqhit"] == {**manifest, "model": str(setup["model_dir"])}  # the same encode, named otherwise
    assert load_tokens(out).manifest == metadata["vqhit"]
    item = TokenDataset(out)[3]
    assert torch.equal(item["indices"], reference.indices[3].long()) and (item["label"], item["index"]) == (1, 3)

    decode = runpy.run_path(str(ROOT / "scripts" / "decode.py"), run_name="script")["main"]
    for folder, pngs in ((safetensors_dir, tmp_path / "png-safetensors"), (out, tmp_path / "png-parquet")):
        assert decode(["--model", str(setup["model_dir"]), "--tokens", str(folder), "--output-dir", str(pngs),
                       "--no-progress"]) == 5
    for i in range(5):
        name = f"{i:08d}.png"
        assert np.array_equal(np.asarray(Image.open(tmp_path / "png-parquet" / name)),
                              np.asarray(Image.open(tmp_path / "png-safetensors" / name)))

    # The same command again: nothing to encode, and the card, edited for the Hub meanwhile, is left as it is.
    (out / "README.md").write_text(card + "\nMy notes.\n")
    summary = encode(argv)
    assert summary.encoded == [] and summary.reused == [0, 1, 2]
    assert (out / "README.md").read_text().endswith("My notes.\n")
    # Resuming in the other format is refused, naming the flag; so is a folder holding both formats.
    with pytest.raises(ValueError, match=r"holds parquet tokens: pass --format parquet"):
        encode([a for a in argv if a not in ("--format", "parquet")])
    # A Parquet file in data/ that is not one of the shards would be read by load_dataset with them: refused.
    stray = out / "data" / "train-00000-of-00002.parquet"
    stray.write_bytes(shard_file(out, 0, 3, "parquet").read_bytes())
    with pytest.raises(ValueError, match=r"train-00000-of-00002\.parquet is not one of the 3 shards"):
        load_tokens(out)
    stray.unlink()
    (out / "tokens.json").write_text("{}")
    with pytest.raises(ValueError, match="holds tokens in both file formats"):
        load_tokens(out)


def test_a_readme_beside_safetensors_tokens_is_a_token_card_only_by_its_vqhit_metadata(encoded, tmp_path):
    """The user's own README.md in a safetensors folder (notes on the tokens) is no second format; a dataset card
    whose metadata hold a `vqhit:` manifest is."""
    out = tmp_path / "tokens"
    shutil.copytree(encoded[0], out)
    (out / "README.md").write_text("---\nlicense: mit\n---\nMy notes on these tokens.\n")
    assert len(load_tokens(out).ids) == 5
    (out / "README.md").write_text("---\nlicense: mit\nvqhit: {}\n---\nMy notes on these tokens.\n")
    with pytest.raises(ValueError, match="holds tokens in both file formats"):
        load_tokens(out)

class FakeHubApi:
    """The Hub API (no network here): records what one upload_folder would send, as the model tests do."""
    uploads: list = []

    def __init__(self, token=None):
        pass

    def create_repo(self, repo_id, repo_type=None, **kwargs):
        self.uploads.append({"created": repo_id, "repo_type": repo_type})
        return type("Repo", (), {"repo_id": repo_id})()

    def upload_folder(self, repo_id, folder_path, repo_type=None, allow_patterns=None, delete_patterns=None,
                      **kwargs):
        folder = Path(folder_path)
        files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()
                 and any(fnmatch.fnmatch(str(p.relative_to(folder)), a) for a in allow_patterns)}
        self.uploads.append(dict(repo_id=repo_id, repo_type=repo_type, files=files, delete_patterns=delete_patterns))
        return f"https://huggingface.co/datasets/{repo_id}/commit/0"


def test_push_tokens_to_hub_uploads_the_card_and_shards_as_a_dataset(setup, encoded, tmp_path, monkeypatch):
    monkeypatch.setattr(FakeHubApi, "uploads", [])
    monkeypatch.setattr(tokens_module, "HfApi", FakeHubApi)
    out = tmp_path / "tokens"
    encode_dataset(setup["model"], setup["dataset"], out, shard_size=2, device="cpu", progress=False,
                   file_format="parquet")
    (out / "notes.txt").write_text("mine, not the dataset's")
    url = tokens_module.push_tokens_to_hub(out, "me/photo-tokens")
    assert url == "https://huggingface.co/datasets/me/photo-tokens/commit/0"
    created, upload = FakeHubApi.uploads
    assert created == {"created": "me/photo-tokens", "repo_type": "dataset"}
    assert upload["repo_type"] == "dataset" and upload["repo_id"] == "me/photo-tokens"
    assert upload["files"] == {name: (out / name).read_bytes() for name in
                               ["README.md"] + [f"data/train-0000{k}-of-00003.parquet" for k in range(3)]}
    # Shards of an earlier upload with another shard count are deleted, not left to be read with these.
    assert any(fnmatch.fnmatch("data/train-00000-of-00007.parquet", p) for p in upload["delete_patterns"])

    FakeHubApi.uploads.clear()
    shard_file(out, 2, 3, "parquet").unlink()  # unfinished: refused before anything is created or sent
    with pytest.raises(ValueError, match="incomplete: 1 of 3 shards missing"):
        tokens_module.push_tokens_to_hub(out, "me/photo-tokens")
    with pytest.raises(ValueError, match="holds safetensors tokens.*--format parquet"):
        tokens_module.push_tokens_to_hub(encoded[0], "me/photo-tokens")
    assert FakeHubApi.uploads == []
