"""The on-disk format of a token folder: a dataset encoded once by a VQ-HiT tokenizer (`vqhit.tokens` encodes,
decodes and loads it). This module names, writes, reads and checks its files; the dataset card of a Parquet folder
is `vqhit.token_card`'s.

A token folder holds its tokens in one of two file formats (`FORMATS`), chosen when it is encoded:

safetensors (the default)          parquet: a Hugging Face `datasets` dataset
    tokens.json   the manifest         README.md   the dataset card; its metadata (`vqhit:`) is the manifest
    shard-00000.safetensors            data/train-00000-of-00003.parquet
    shard-00001.safetensors ...        data/train-00001-of-00003.parquet ...

The manifest says how the tokens were made: model, preset, tokenizer fingerprint, codebook size, grid,
preprocessing, data, shard size. Shard k holds dataset items [k * shard_size, (k + 1) * shard_size), minus the
unreadable ones. A safetensors shard holds the tensors
    indices        (N, h, w)  the smallest integer dtype that holds the codebook (uint8 up to 256 codes, ...)
    dataset_index  (N,) int64 position of each image in the source dataset
    labels         (N,) int64 only when the dataset has labels
and, as safetensors metadata (string -> JSON string), the manifest's fields plus `ids` (the source file
name of each image) and `skipped` (dataset positions of unreadable images, which have no tokens). A Parquet
shard holds one row per image, with the columns `indices` (a `datasets` Array2D of that dtype), `id`,
`dataset_index` and `label` (when the dataset has labels), and the same metadata as one JSON object under the
`vqhit` key of its schema metadata. `datasets.load_dataset(folder)` reads a Parquet folder without vqhit: the
card's `configs` name its shards as the split "train", and the shards carry their features.

Shard k holds a fixed range of dataset positions, and process r of W encodes the shards k = r (mod W):
every image is encoded exactly once with no padding, whatever the number of processes. A shard is
written to a temporary name and renamed, so a shard file that exists is complete; a restarted run
skips those and encodes only the rest.

Files damaged later (a truncated copy, a full disk, garbage) are caught when read: every shard's header is
checked (safetensors refuses a file its header does not cover exactly; a Parquet file needs its footer, and its
pages carry checksums that are verified when read) and its metadata compared with the manifest, on decode and on
an encode re-run alike, and the error names the file and the fix. Each shard carries the manifest's fields, so a
lost or damaged manifest can be rewritten by re-running the encode.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config_values import differences
from .data import ImageDataset, data_settings
from .distributed import process_state
from .errors import UsageError
from .files import atomic_write
from .token_card import CARD_KEY, CARD_NAME, PARQUET_SPLIT, card_manifest, is_token_card, token_card

FORMAT, VERSION = "vqhit-tokens", 1
FORMATS = ("safetensors", "parquet")  # the file formats of a token folder; the first is the default
MANIFEST_NAME = "tokens.json"         # the manifest of a safetensors folder
MANIFEST_KEYS = ("format", "version", "model", "preset", "tokenizer_fingerprint", "codebook_size", "grid",
                 "resolution", "dtype", "preprocessing", "data", "label_column", "precision", "num_items",
                 "shard_size", "num_shards")
REENCODE = "delete it and run scripts/encode.py again with the same arguments: only missing shards are encoded"
REWRITE = ("delete it and run scripts/encode.py again with the same arguments: it is rewritten, and the shards already "
           "there are kept when their own metadata match that run")  # the fix of a damaged manifest
NEW_FOLDER = ("resuming needs the same model, data, preprocessing and shard size: to encode with other settings, use "
              "a new output folder")


def shard_name(k: int) -> str:
    """The file name of shard k of a safetensors folder."""
    return f"shard-{k:05d}.safetensors"


def parquet_shard_name(k: int, num_shards: int) -> str:
    """The path of shard k of a Parquet folder, relative to it: the Hub's naming, which `datasets` reads as a split."""
    return f"data/{PARQUET_SPLIT}-{k:05d}-of-{num_shards:05d}.parquet"


def shard_file(token_dir, k: int, num_shards: int, file_format: str) -> Path:
    """Shard k of a folder of `num_shards` shards in `file_format`."""
    name = parquet_shard_name(k, num_shards) if file_format == "parquet" else shard_name(k)
    return Path(token_dir) / name


def token_format(token_dir) -> str | None:
    """The file format of a token folder ("safetensors" or "parquet", by the files it holds), None when it holds
    neither; a folder that holds both is refused: each reader would see other tokens."""
    token_dir = Path(token_dir)
    if not token_dir.is_dir():
        return None
    found = [fmt for fmt, present in (
        ("safetensors", (token_dir / MANIFEST_NAME).exists() or any(token_dir.glob("shard-*.safetensors"))),
        ("parquet", any((token_dir / "data").glob("*.parquet")) or is_token_card(token_dir / CARD_NAME)))
        if present]
    if len(found) > 1:
        raise UsageError(f"{token_dir} holds tokens in both file formats ({MANIFEST_NAME} or shard-*.safetensors, "
                         f"and data/*.parquet or a token card {CARD_NAME}); keep each format in its own folder.")
    return found[0] if found else None


def check_file_format(file_format: str) -> str:
    if file_format not in FORMATS:
        raise UsageError(f"--format {file_format}: use one of {', '.join(FORMATS)}")
    return file_format


def index_dtype(codebook_size: int) -> torch.dtype:
    """The smallest integer dtype safetensors stores that holds indices [0, codebook_size)."""
    for dtype in (torch.uint8, torch.int16, torch.int32, torch.int64):
        if codebook_size - 1 <= torch.iinfo(dtype).max:
            return dtype
    raise ValueError(f"codebook_size={codebook_size} does not fit in int64")


def tokenizer_fingerprint(model) -> str:
    """sha256 of the weights that decide the indices (encoder, quant_conv, codebook); the decoder is left out,
    so a decoder trained later on the same codes still matches."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith(("encoder.", "quant_conv.", "quantize.")) and tensor.is_floating_point():
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def token_manifest(model, dataset: ImageDataset, *, shard_size: int, model_id: str | None,
                   precision: str = "fp32") -> dict:
    """What a token folder holds and how it was made; a restart must produce the same manifest."""
    config, n = model.config, len(dataset)
    settings = data_settings(dataset)
    return {
        "format": FORMAT, "version": VERSION,
        "model": model_id or config.preset, "preset": config.preset,
        "tokenizer_fingerprint": tokenizer_fingerprint(model),
        "codebook_size": config.codebook_size, "grid": config.grid, "resolution": config.resolution,
        "dtype": str(index_dtype(config.codebook_size)).removeprefix("torch."),
        "preprocessing": {"transform": settings["crop"], "resolution": settings["resolution"], "flip": False,
                          "bad_images": dataset.cfg.bad_images, "min_size": settings["min_size"]},
        "data": {k: settings[k] for k in ("data", "split", "image_column", "max_images")},
        "label_column": dataset.cfg.label_column, "precision": precision,
        "num_items": n, "shard_size": shard_size, "num_shards": -(-n // shard_size),
    }


# --------------------------------------------------------------------------------------------------
# Write


def write_shard(path: Path, k: int, parts: list, manifest: dict) -> None:
    """parts: (dataset positions asked for, collated batch with indices or None) in order."""
    batches = [batch for _, batch in parts if batch is not None]
    grid, dtype = manifest["grid"], getattr(torch, manifest["dtype"])
    got = torch.cat([b["index"] for b in batches]) if batches else torch.zeros(0, dtype=torch.int64)
    tensors = {
        "indices": torch.cat([b["indices"] for b in batches]) if batches else torch.zeros(0, grid, grid, dtype=dtype),
        "dataset_index": got.long(),
    }
    if manifest["label_column"] is not None:
        tensors["labels"] = torch.cat([b["label"] for b in batches]).long() if batches else torch.zeros(0).long()
    tensors = {name: t.contiguous() for name, t in tensors.items()}
    asked = {p for positions, _ in parts for p in positions}
    skipped = sorted(asked - set(got.tolist()))
    source = manifest["data"]["data"]
    ids = [_relative_id(i, source) for b in batches for i in b["id"]]
    state = process_state()
    metadata = {**manifest, "shard": k, "skipped": skipped,
                "written_by": {"process": state.process_index, "num_processes": state.num_processes}}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        atomic_write(path, lambda p: _write_parquet(p, tensors, ids, metadata))
    else:
        strings = {key: json.dumps(value) for key, value in {**metadata, "ids": ids}.items()}
        atomic_write(path, lambda p: save_file(tensors, str(p), metadata=strings))


def token_features(grid: int, dtype: str, labels: bool) -> datasets.Features:
    """The `datasets` features of a Parquet folder's rows."""
    features = {"indices": datasets.Array2D((grid, grid), dtype), "id": datasets.Value("string"),
                "dataset_index": datasets.Value("int64")}
    if labels:
        features["label"] = datasets.Value("int64")
    return datasets.Features(features)


def _write_parquet(path: Path, tensors: dict, ids: list, metadata: dict) -> None:
    """One row per image; the features (for `datasets`) and vqhit's metadata in the schema's metadata; page
    checksums, so that damage inside the file is found when it is read."""
    indices = tensors["indices"].numpy()
    n, grid = indices.shape[0], metadata["grid"]
    labels = tensors.get("labels")
    schema = token_features(grid, metadata["dtype"], labels is not None).arrow_schema
    rows = pa.array(np.arange(0, n * grid + 1, grid, dtype=np.int32))
    cells = pa.array(np.arange(0, n * grid * grid + 1, grid, dtype=np.int32))
    grids = pa.ListArray.from_arrays(rows, pa.ListArray.from_arrays(cells, pa.array(indices.reshape(-1))))
    columns = {"indices": pa.ExtensionArray.from_storage(schema.field("indices").type, grids),
               "id": pa.array(ids, pa.string()), "dataset_index": pa.array(tensors["dataset_index"].numpy())}
    if labels is not None:
        columns["label"] = pa.array(labels.numpy())
    table = pa.Table.from_arrays([columns[name] for name in schema.names], schema=schema)
    table = table.replace_schema_metadata({**schema.metadata, CARD_KEY.encode(): json.dumps(metadata).encode()})
    pq.write_table(table, str(path), compression="zstd", write_page_checksum=True)


def write_manifest(output_dir: Path, manifest: dict, file_format: str) -> None:
    """tokens.json, or the dataset card of a Parquet folder. A card already there holds this manifest (checked
    before) and is kept as it is: its text may have been edited for the Hub."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if file_format == "parquet":
        if not (output_dir / CARD_NAME).exists():
            atomic_write(output_dir / CARD_NAME, lambda p: p.write_text(token_card(manifest)))
    else:
        atomic_write(output_dir / MANIFEST_NAME, lambda p: p.write_text(json.dumps(manifest, indent=2) + "\n"))


def _relative_id(name: str, source: str) -> str:
    """File names inside a local source folder are stored relative to it (the folder may move)."""
    if os.path.isabs(name) and os.path.isdir(source):
        relative = os.path.relpath(name, source)
        if not relative.startswith(".."):
            return relative
    return name


# --------------------------------------------------------------------------------------------------
# Read and check


# What reading a damaged shard raises: safetensors' and pyarrow's errors (ArrowInvalid is a ValueError), bad JSON,
# an unreadable file, and a column whose values do not fill the grids.
_DAMAGE = (SafetensorError, pa.ArrowException, json.JSONDecodeError, UnicodeDecodeError, OSError, RuntimeError)


def _damaged(path, err: Exception) -> UsageError:
    return UsageError(f"{path} is damaged ({' '.join(str(err).split())}); {REENCODE}.")


def read_shard_metadata(path) -> dict:
    """A shard's metadata (values decoded from JSON) plus num_images and the indices' shape, without reading the
    tensors (a Parquet shard's `id` column is read: it is its `ids`). A damaged file raises a ValueError that names
    it and the fix."""
    path = Path(path)
    try:
        metadata, tensors, shape = (_parquet_header if path.suffix == ".parquet" else _safetensors_header)(path)
    except _DAMAGE as err:
        raise _damaged(path, err) from err
    missing = sorted({"indices", "dataset_index"} - tensors) + sorted({*MANIFEST_KEYS, "shard", "ids", "skipped"}
                                                                      - metadata.keys())
    if missing:
        raise UsageError(f"{path} is not a complete vqhit token shard (missing {missing}); {REENCODE}.")
    metadata["num_images"], metadata["shape"] = shape[0], list(shape)
    return metadata


def _safetensors_header(path: Path) -> tuple[dict, set, list | None]:
    """(metadata, tensor names, the indices' shape) of a safetensors shard."""
    with safe_open(str(path), framework="pt") as f:  # refuses a file its header does not cover exactly
        metadata = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        tensors = set(f.keys())
        return metadata, tensors, f.get_slice("indices").get_shape() if "indices" in tensors else None


def _parquet_header(path: Path) -> tuple[dict, set, list | None]:
    """(metadata with the `id` column as `ids`, the columns as tensor names, the indices' shape) of a Parquet
    shard. Its footer must be whole (a truncated file has none)."""
    file = pq.ParquetFile(str(path), page_checksum_verification=True)
    schema = file.schema_arrow
    metadata = json.loads((schema.metadata or {}).get(CARD_KEY.encode(), b"{}"))
    if not isinstance(metadata, dict):
        metadata = {}
    tensors = {"indices", "dataset_index"} & set(schema.names) | ({"labels"} if "label" in schema.names else set())
    if "id" in schema.names:
        metadata["ids"] = file.read(columns=["id"]).column("id").to_pylist()
    # The grid's shape is the Array2D feature's (pyarrow knows the type once `datasets` is imported).
    shape = [file.metadata.num_rows, *getattr(schema.field("indices").type, "shape", ())] if "indices" in tensors \
        else None
    return metadata, tensors, shape


def check_shard(path, manifest: dict, k: int, fix: str = REENCODE) -> dict:
    """Read shard k's header and check it belongs to the folder `manifest` describes; returns its metadata. `fix`:
    the advice when it is a whole shard that does not belong (a damaged one is always to be re-encoded)."""
    metadata = read_shard_metadata(path)
    diff = _manifest_differences({key: metadata[key] for key in MANIFEST_KEYS}, manifest)
    expected = [metadata["num_images"], manifest["grid"], manifest["grid"]]
    if metadata["shard"] != k:
        diff["shard"] = (metadata["shard"], k)
    if metadata["shape"] != expected or len(metadata["ids"]) != metadata["num_images"]:
        diff["indices shape (ids)"] = (f"{metadata['shape']} ({len(metadata['ids'])})", expected)
    if diff:
        raise UsageError(f"{path} does not belong with this folder's tokens (shard, folder): {diff}; {fix}.")
    return metadata


def read_shard(path) -> dict:
    """{"indices", "dataset_index", "labels" (or None), "ids", "skipped", "metadata"} of one shard."""
    metadata = read_shard_metadata(path)
    try:
        tensors = _read_parquet(path, metadata["shape"]) if Path(path).suffix == ".parquet" else load_file(str(path))
    except _DAMAGE as err:
        raise _damaged(path, err) from err
    return {"indices": tensors["indices"], "dataset_index": tensors["dataset_index"],
            "labels": tensors.get("labels"), "ids": metadata["ids"], "skipped": metadata["skipped"],
            "metadata": metadata}


def _read_parquet(path, shape: list) -> dict:
    """The tensors of a Parquet shard (`shape`: its indices' shape, from its header); every page's checksum is
    verified."""
    table = pq.read_table(str(path), page_checksum_verification=True)
    grids = table.column("indices").combine_chunks()
    if isinstance(grids, pa.ExtensionArray):
        grids = grids.storage
    indices = torch.from_numpy(grids.flatten().flatten().to_numpy(zero_copy_only=False).copy()).view(shape)
    tensors = {"indices": indices, "dataset_index": torch.from_numpy(table.column("dataset_index").to_numpy().copy())}
    if "label" in table.column_names:
        tensors["labels"] = torch.from_numpy(table.column("label").to_numpy().copy())
    return tensors


def read_dataset_index(path) -> torch.Tensor:
    """A shard's dataset positions alone (the names of --name-by index), without reading its tokens."""
    try:
        if Path(path).suffix == ".parquet":
            column = pq.read_table(str(path), columns=["dataset_index"], page_checksum_verification=True)
            return torch.from_numpy(column.column("dataset_index").to_numpy().copy())
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor("dataset_index")
    except _DAMAGE as err:
        raise _damaged(path, err) from err


def read_manifest(token_dir) -> dict:
    """The manifest of a token folder, in either format (tokens.json, or the metadata of a Parquet folder's
    README.md), checked: a missing, damaged or foreign one raises with the fix."""
    token_dir = Path(token_dir)
    file_format = token_format(token_dir)
    if file_format is None:
        raise UsageError(f"{token_dir} holds no tokens (no {MANIFEST_NAME}, no {CARD_NAME} token card, no shards): is "
                         f"it a folder written by scripts/encode.py?")
    return _read_manifest_file(token_dir, file_format)


def _read_manifest_file(token_dir: Path, file_format: str) -> dict:
    path = token_dir / (CARD_NAME if file_format == "parquet" else MANIFEST_NAME)
    if not path.exists():
        raise UsageError(_no_manifest(token_dir, path.name))
    try:
        text = path.read_text()
        manifest = card_manifest(path, text, REWRITE) if file_format == "parquet" else json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{path} is damaged (not JSON: {err}); {REWRITE}.") from err
    problem = _manifest_problem(manifest)
    if problem:
        raise UsageError(f"{path} {problem}; {REWRITE}.")
    return manifest


def _manifest_problem(manifest) -> str | None:
    """What makes `manifest` no vqhit token manifest, or a damaged one (None when it is whole)."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        return f"is not a vqhit token manifest (format {found!r})"
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        return f"is damaged (missing {missing})"
    counts = ("codebook_size", "grid", "resolution", "num_items", "shard_size", "num_shards")
    wrong = {key: manifest[key] for key in counts
             if isinstance(manifest[key], bool) or not isinstance(manifest[key], int) or manifest[key] < 0}
    if wrong:  # e.g. an edit that left "5" for 5: every reader below does arithmetic with them
        return f"is damaged ({', '.join(f'{k}: {v!r}' for k, v in wrong.items())}, where whole numbers belong)"
    return None


def _no_manifest(token_dir: Path, name: str) -> str:
    return (f"{token_dir} has no {name}: is it a folder written by scripts/encode.py? If its {name} was lost, run "
            f"scripts/encode.py again with the same arguments to rewrite it (the shards are kept).")


def check_existing_manifest(output_dir: Path, manifest: dict, file_format: str) -> None:
    """Refuse to encode `manifest`'s tokens into `output_dir` when it holds tokens of another format or of other
    settings (by its manifest, or by its shards' own metadata when the manifest is gone)."""
    existing = token_format(output_dir)
    if existing not in (None, file_format):
        raise UsageError(f"{output_dir} holds {existing} tokens: pass --format {existing} (file_format=\"{existing}\") "
                         f"to resume it, or encode {file_format} tokens into a new output folder.")
    path = output_dir / (CARD_NAME if file_format == "parquet" else MANIFEST_NAME)
    if not path.exists():
        # No manifest (never written, or deleted because it was damaged): the shards' own metadata say how they
        # were made, so those of this run's settings are kept and anything else is refused.
        # A whole shard made with other settings is another run's good tokens: not to be deleted, but not resumed.
        for shard, k in _shard_files(output_dir, file_format):
            check_shard(shard, manifest, k, fix=NEW_FOLDER)
        return
    diff = _manifest_differences(_read_manifest_file(output_dir, file_format), manifest)
    if diff:
        raise UsageError(f"{output_dir} holds tokens made with other settings (folder, this run): {diff}; "
                         f"{NEW_FOLDER}.")


def _manifest_differences(existing: dict, manifest: dict) -> dict:
    """Manifest fields that differ, as (existing, this run); the model's name may change (a copied folder), its
    fingerprint may not."""
    diff = differences(existing, manifest)
    diff.pop("model", None)
    return diff


def _shard_files(output_dir: Path, file_format: str) -> list[tuple[Path, int]]:
    """(path, shard number its name gives, -1 for none) of every shard file of a folder, whatever its count."""
    if file_format == "parquet":
        files, number = sorted((output_dir / "data").glob("*.parquet")), r"train-(\d+)-of-\d+\.parquet"
    else:
        files, number = sorted(output_dir.glob("shard-*.safetensors")), r"shard-(\d+)\.safetensors"
    return [(f, int(m.group(1)) if (m := re.fullmatch(number, f.name)) else -1) for f in files]


def shard_paths(token_dir) -> list[Path]:
    """Every shard of a finished folder, in order; an unfinished folder raises, naming the missing shards."""
    token_dir = Path(token_dir)
    manifest = read_manifest(token_dir)
    file_format = token_format(token_dir)
    paths = [shard_file(token_dir, k, manifest["num_shards"], file_format) for k in range(manifest["num_shards"])]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise UsageError(f"{token_dir} is incomplete: {len(missing)} of {len(paths)} shards missing "
                         f"({missing[:3]}...); re-run scripts/encode.py with the same arguments to finish it.")
    strays = sorted({path for path, _ in _shard_files(token_dir, file_format)} - set(paths))
    if strays and file_format == "parquet":  # load_dataset would read it as more rows of these tokens
        raise UsageError(f"{strays[0]} is not one of the {len(paths)} shards of {token_dir} (of other settings?), "
                         f"yet datasets.load_dataset would read it with them; move it out of {token_dir / 'data'}.")
    for k, path in enumerate(paths):  # headers only: a damaged or foreign shard fails here, before any work
        check_shard(path, manifest, k)
    return paths

