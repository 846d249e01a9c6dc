"""Token shards: what encode writes is model.encode of the preprocessed images, decodes to decode_indices,
resumes shard by shard, and covers every image exactly once with two processes."""
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import free_port

from vqhit.data import eval_dataset
from vqhit.metrics import to_uint8
from vqhit.models.vqhit import VQHiT
from vqhit.tokens import TokenDataset, encode_dataset, index_dtype, load_tokens, read_shard, shard_name

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


def test_damaged_shards_and_manifest_are_named_with_the_fix_on_decode_and_on_encode_rerun(setup, tmp_path):
    model, dataset = setup["model"], setup["dataset"]
    out = tmp_path / "tokens"
    encode = dict(shard_size=2, batch_size=2, device="cpu", progress=False)
    encode_dataset(model, dataset, out, **encode)
    decode = runpy.run_path(str(ROOT / "scripts" / "decode.py"), run_name="script")["main"]
    decode_argv = ["--model", str(setup["model_dir"]), "--tokens", str(out), "--output-dir", str(tmp_path / "png"),
                   "--no-progress"]
    shard = out / shard_name(1)
    good_shard, good_manifest = shard.read_bytes(), (out / "tokens.json").read_text()
    damages = {"truncated": good_shard[: len(good_shard) // 2], "garbage": b"\x00garbage" * 50, "empty": b""}
    for kind, data in damages.items():
        shard.write_bytes(data)
        for run in (lambda: decode(decode_argv), lambda: encode_dataset(model, dataset, out, **encode)):
            with pytest.raises(ValueError, match=r"shard-00001\.safetensors is damaged.*delete it and run "
                                                 r"scripts/encode\.py again"):
                run()
    shard.unlink()  # the fix: delete it and encode again
    assert encode_dataset(model, dataset, out, **encode).encoded == [1]
    assert torch.equal(read_shard(shard)["indices"], load_tokens(out).indices[2:4])

    manifest = out / "tokens.json"
    for kind, text in {"truncated": good_manifest[:40], "not an object": "[1, 2]",
                       "missing keys": json.dumps({"format": "vqhit-tokens"}),
                       "a count as text": json.dumps({**json.loads(good_manifest), "num_shards": "3"})}.items():
        manifest.write_text(text)
        for run in (lambda: decode(decode_argv), lambda: encode_dataset(model, dataset, out, **encode)):
            with pytest.raises(ValueError, match=r"tokens\.json is (damaged|not a vqhit token manifest).*delete it "
                                                 r"and run scripts/encode\.py again"):
                run()
    manifest.unlink()  # the fix: the shards' own metadata let the same encode run resume and rewrite it
    summary = encode_dataset(model, dataset, out, **encode)
    assert summary.encoded == [] and summary.reused == [0, 1, 2]
    assert json.loads(manifest.read_text()) == json.loads(good_manifest)
    manifest.unlink()
    with pytest.raises(ValueError, match=r"shard-00000\.safetensors does not belong.*shard_size") as refused:
        encode_dataset(model, dataset, out, **{**encode, "shard_size": 3})  # other settings: refused, not mixed in
    # The shards are good tokens of the earlier settings: the fix is another folder, as with tokens.json there.
    assert "use a new output folder" in str(refused.value) and "delete it" not in str(refused.value)
    encode_dataset(model, dataset, out, **encode)

    # A shard of another folder (other shard size) copied in is refused by name, not decoded as if it were ours.
    other = tmp_path / "other"
    encode_dataset(model, dataset, other, **{**encode, "shard_size": 3})
    (other / shard_name(1)).replace(shard)
    with pytest.raises(ValueError, match=r"shard-00001\.safetensors does not belong.*shard_size"):
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


def test_two_processes_encode_every_image_exactly_once(setup, encoded, tmp_path):
    out = tmp_path / "tokens"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(ROOT / "scripts" / "encode.py"), "--model", str(setup["model_dir"]),
           "--data", str(setup["root"] / "images"), "--output-dir", str(out), "--shard-size", "1",
           "--batch-size", "2", "--num-workers", "0", "--no-progress"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    shards = [read_shard(out / shard_name(k)) for k in range(5)]
    writers = [s["metadata"]["written_by"] for s in shards]  # process r writes the shards k = r (mod 2)
    assert writers == [{"process": k % 2, "num_processes": 2} for k in range(5)]
    ids = [i for s in shards for i in s["ids"]]
    assert len(ids) == len(set(ids)) == 5
    assert set(ids) == {str(p.relative_to(setup["root"] / "images")) for p in setup["files"]}
    assert sorted(i for s in shards for i in s["dataset_index"].tolist()) == [0, 1, 2, 3, 4]
    # The same tokens as one process made.
    assert torch.equal(load_tokens(out).indices, load_tokens(encoded[0]).indices)


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
