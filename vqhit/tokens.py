"""Token shards: a dataset encoded once by a VQ-HiT tokenizer, decoded back to images, or read for training.

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
lost or damaged manifest can be rewritten by re-running the encode. Tokens decode only with the tokenizer whose
encoder and codebook made them (same fingerprint), unless the caller says otherwise (`allow_other_tokenizer`,
`--allow-other-tokenizer`). `push_tokens_to_hub` uploads a Parquet folder as a Hub dataset.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml
from huggingface_hub import HfApi
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .config_values import differences
from .data import ImageDataset, check_eval_dataset, collate_images, data_settings
from .distributed import process_state, state_and_device
from .errors import UsageError
from .files import atomic_write, check_output_folder
from .metrics import to_uint8
from .precision import autocast, check_precision

FORMAT, VERSION = "vqhit-tokens", 1
FORMATS = ("safetensors", "parquet")  # the file formats of a token folder; the first is the default
MANIFEST_NAME = "tokens.json"         # the manifest of a safetensors folder
CARD_NAME = "README.md"               # the dataset card of a Parquet folder: its metadata hold the manifest
CARD_KEY = "vqhit"                    # the card metadata's key of the manifest, and the Parquet shards' metadata key
PARQUET_SPLIT = "train"               # the split `datasets.load_dataset` gives a Parquet folder's tokens
PARQUET_DATA = f"data/{PARQUET_SPLIT}-*.parquet"
NAME_BY = ("index", "id")
MANIFEST_KEYS = ("format", "version", "model", "preset", "tokenizer_fingerprint", "codebook_size", "grid",
                 "resolution", "dtype", "preprocessing", "data", "label_column", "precision", "num_items",
                 "shard_size", "num_shards")
REENCODE = "delete it and run scripts/encode.py again with the same arguments: only missing shards are encoded"
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
        ("parquet", any((token_dir / "data").glob("*.parquet")) or _is_token_card(token_dir / CARD_NAME)))
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
# Encode


@dataclass
class EncodeSummary:
    output_dir: Path
    file_format: str
    num_shards: int
    encoded: list[int]   # shards this process encoded in this run
    reused: list[int]    # shards of this process that were already complete
    num_images: int      # images with tokens in the whole folder
    num_skipped: int     # unreadable images in the whole folder


@torch.no_grad()
def encode_dataset(model, dataset: ImageDataset, output_dir, *, shard_size: int = 1000, batch_size: int = 64,
                   num_workers: int = 0, model_id: str | None = None, precision: str = "fp32", device=None,
                   progress: bool = True, file_format: str = "safetensors") -> EncodeSummary:
    """Encode every image of `dataset` into token shards in `output_dir` (resumable, multi-process).

    The dataset must be deterministic (vqhit.data.eval_dataset). Restarting with the same model and
    data encodes only the shards that are missing; another model, data or preprocessing is refused.
    file_format: "safetensors" (tokens.json and shard-NNNNN.safetensors) or "parquet" (a `datasets` dataset:
    README.md and data/train-NNNNN-of-NNNNN.parquet); a folder is resumed in the format it was started in.
    """
    check_eval_dataset(dataset, model.config.resolution)
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size={shard_size} and batch_size={batch_size} must be at least 1.")
    precision = check_precision(precision)
    file_format = check_file_format(file_format)
    state, device = state_and_device(device)
    output_dir = check_output_folder(output_dir)
    model = model.to(device).eval()
    manifest = token_manifest(model, dataset, shard_size=shard_size, model_id=model_id, precision=precision)
    _check_existing_manifest(output_dir, manifest, file_format)
    if state.is_main_process:
        _write_manifest(output_dir, manifest, file_format)
    state.wait_for_everyone()

    n, dtype = manifest["num_items"], index_dtype(model.config.codebook_size)
    path = lambda k: shard_file(output_dir, k, manifest["num_shards"], file_format)  # noqa: E731
    mine = range(state.process_index, manifest["num_shards"], state.num_processes)
    reused = [k for k in mine if path(k).exists()]
    for k in reused:  # a shard that exists was complete when written; check it is still whole and ours
        check_shard(path(k), manifest, k)
    todo = [k for k in mine if k not in reused]
    # One loader over all of this process's batches; a batch never crosses a shard boundary.
    plan = [(k, list(range(start, min(start + batch_size, (k + 1) * shard_size, n))))
            for k in todo for start in range(k * shard_size, min((k + 1) * shard_size, n), batch_size)]
    loader = DataLoader(dataset, batch_sampler=[positions for _, positions in plan], num_workers=num_workers,
                        collate_fn=collate_images)
    bar = tqdm(total=sum(len(p) for _, p in plan), desc=f"encode (process {state.process_index} of "
               f"{state.num_processes})", disable=not (progress and state.is_main_process), dynamic_ncols=True)
    current, parts = None, []
    for (k, positions), batch in zip(plan, loader):
        if k != current:
            if current is not None:
                _write_shard(path(current), current, parts, manifest)
            current, parts = k, []
        if batch is not None:
            with autocast(precision, device):
                indices = model.encode(batch["image"].to(device))
            batch = {**batch, "indices": indices.to("cpu", dtype)}
        parts.append((positions, batch))
        bar.update(len(positions))
    if current is not None:
        _write_shard(path(current), current, parts, manifest)
    bar.close()
    state.wait_for_everyone()
    headers = [read_shard_metadata(path(k)) for k in range(manifest["num_shards"])]
    return EncodeSummary(output_dir, file_format, manifest["num_shards"], todo, reused,
                         num_images=sum(h["num_images"] for h in headers),
                         num_skipped=sum(len(h["skipped"]) for h in headers))


def _check_existing_manifest(output_dir: Path, manifest: dict, file_format: str) -> None:
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


def _write_shard(path: Path, k: int, parts: list, manifest: dict) -> None:
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


def _write_manifest(output_dir: Path, manifest: dict, file_format: str) -> None:
    """tokens.json, or the dataset card of a Parquet folder. A card already there holds this manifest (checked
    before) and is kept as it is: its text may have been edited for the Hub."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if file_format == "parquet":
        if not (output_dir / CARD_NAME).exists():
            atomic_write(output_dir / CARD_NAME, lambda p: p.write_text(token_card(manifest)))
    else:
        atomic_write(output_dir / MANIFEST_NAME, lambda p: p.write_text(json.dumps(manifest, indent=2) + "\n"))


def token_card(manifest: dict) -> str:
    """The dataset card of a Parquet folder: metadata that tell `datasets` and the Hub where the shards are and
    hold the manifest (under `vqhit:`), then what the tokens are and how to read and decode them."""
    metadata = {"configs": [{"config_name": "default",
                             "data_files": [{"split": PARQUET_SPLIT, "path": PARQUET_DATA}]}],
                "tags": ["vqhit", "image-tokens"], CARD_KEY: manifest}
    data, grid, labels, size = manifest["data"], manifest["grid"], manifest["label_column"], manifest["resolution"]
    columns = ["`indices`: the token grid", "`id`: the source image's file name", "`dataset_index`: its position "
               "in the source dataset"] + ([f"`label`: the source's `{labels}` column"] if labels is not None else [])
    return f"""---
{yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True).strip()}
---

# Image tokens of {data['data']}

The images of `{data['data']}` (split `{data['split']}`), {manifest['preprocessing']['transform']} to {size}x{size},
encoded by the VQ-HiT tokenizer `{manifest['model']}` (preset `{manifest['preset']}`): each image is a {grid}x{grid}
grid of indices into its codebook of {manifest['codebook_size']} codes. One row per image: {'; '.join(columns)}.
Unreadable images have no row.

```python
from datasets import load_dataset
tokens = load_dataset("path/or/repo-id", split="{PARQUET_SPLIT}").with_format("torch")
tokens[0]["indices"]   # ({grid}, {grid}) codes
```

The tokens mean images only to the tokenizer that made them, whose encoder and codebook have the fingerprint
`{manifest['tokenizer_fingerprint']}` (sha256). vqhit decodes them with it:

```bash
python scripts/decode.py --model {manifest['model']} --tokens path/to/this/folder --output-dir decoded/
```

The metadata above (`{CARD_KEY}:`) are the manifest: the tokenizer, the preprocessing, the data and how the shards
were cut. Written by vqhit's `scripts/encode.py --format parquet`.
"""


_FRONT_MATTER = re.compile(r"---\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|$)", re.S)


def _is_token_card(path: Path) -> bool:
    """Whether `path` is a dataset card whose metadata have a `vqhit:` key (without judging its contents)."""
    if not path.is_file():
        return False
    match = _FRONT_MATTER.match(path.read_text(errors="replace"))
    return bool(match and re.search(rf"^{CARD_KEY}:", match.group(1), re.M))


def _relative_id(name: str, source: str) -> str:
    """File names inside a local source folder are stored relative to it (the folder may move)."""
    if os.path.isabs(name) and os.path.isdir(source):
        relative = os.path.relpath(name, source)
        if not relative.startswith(".."):
            return relative
    return name


# --------------------------------------------------------------------------------------------------
# Read


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
    name = CARD_NAME if file_format == "parquet" else MANIFEST_NAME
    path = token_dir / name
    if not path.exists():
        raise UsageError(f"{token_dir} has no {name}: is it a folder written by scripts/encode.py? If its {name} was "
                         f"lost, run scripts/encode.py again with the same arguments to rewrite it (the shards are "
                         f"kept).")
    rewrite = (f"delete it and run scripts/encode.py again with the same arguments: it is rewritten, and the shards "
               f"already there are kept when their own metadata match that run")
    try:
        text = path.read_text()
        manifest = _card_manifest(path, text, rewrite) if file_format == "parquet" else json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{path} is damaged (not JSON: {err}); {rewrite}.") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise UsageError(f"{path} is not a vqhit token manifest (format {found!r}); {rewrite}.")
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise UsageError(f"{path} is damaged (missing {missing}); {rewrite}.")
    counts = ("codebook_size", "grid", "resolution", "num_items", "shard_size", "num_shards")
    wrong = {key: manifest[key] for key in counts
             if isinstance(manifest[key], bool) or not isinstance(manifest[key], int) or manifest[key] < 0}
    if wrong:  # e.g. an edit that left "5" for 5: every reader below does arithmetic with them
        raise UsageError(f"{path} is damaged ({', '.join(f'{k}: {v!r}' for k, v in wrong.items())}, where whole "
                         f"numbers belong); {rewrite}.")
    return manifest


def _card_manifest(path: Path, text: str, rewrite: str):
    """The `vqhit:` entry of a dataset card's metadata (checked by the caller)."""
    match = _FRONT_MATTER.match(text)
    try:
        metadata = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError as err:
        raise UsageError(f"{path} is damaged (its metadata are not YAML: {' '.join(str(err).split())}); "
                         f"{rewrite}.") from err
    if not isinstance(metadata, dict) or CARD_KEY not in metadata:
        raise UsageError(f"{path} is not a vqhit token card (no `{CARD_KEY}:` manifest in its metadata): if it is "
                         f"your own file, encode into another folder; if it was the tokens' card, {rewrite}.")
    return metadata[CARD_KEY]


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


@dataclass
class Tokens:
    """All tokens of a folder, sorted by dataset position."""

    indices: torch.Tensor         # (N, h, w), stored dtype
    dataset_index: torch.Tensor   # (N,) int64
    labels: torch.Tensor | None   # (N,) int64
    ids: list[str]
    manifest: dict


def load_tokens(token_dir) -> Tokens:
    """Every token of a finished folder, in either format, after checking every shard against the manifest."""
    shards = [read_shard(p) for p in shard_paths(token_dir)]
    labels = [s["labels"] for s in shards]
    return Tokens(indices=torch.cat([s["indices"] for s in shards]),
                  dataset_index=torch.cat([s["dataset_index"] for s in shards]),
                  labels=torch.cat(labels) if all(x is not None for x in labels) else None,
                  ids=[i for s in shards for i in s["ids"]], manifest=read_manifest(token_dir))


class TokenDataset(torch.utils.data.Dataset):
    """Map-style dataset over every shard of a token folder (either format), for training a model on tokens.

    Item: {"indices": int64 (h, w), "index": position in the source dataset, "label": int (if any)}.
    All shards are read into memory once in their stored dtype (256 tokens of int16 = 512 bytes per image).
    """

    def __init__(self, token_dir):
        self.tokens = load_tokens(token_dir)
        self.manifest, self.ids = self.tokens.manifest, self.tokens.ids

    def __len__(self) -> int:
        return len(self.tokens.indices)

    def __getitem__(self, i: int) -> dict:
        item = {"indices": self.tokens.indices[i].long(), "index": int(self.tokens.dataset_index[i])}
        if self.tokens.labels is not None:
            item["label"] = int(self.tokens.labels[i])
        return item


# --------------------------------------------------------------------------------------------------
# Share


def push_tokens_to_hub(token_dir, repo_id: str, *, private: bool | None = None, token: str | None = None,
                       branch: str | None = None, create_pr: bool | None = None,
                       commit_message: str = "Upload vqhit tokens") -> str:
    """Upload a finished Parquet token folder to the Hub dataset repository `repo_id` (created if needed), as
    `model.push_to_hub` uploads a model; returns the commit URL. The card and the shards go as they are, and the
    repository's earlier shards of the split are deleted, so that a re-upload with another shard count leaves no
    stale rows; `datasets.load_dataset(repo_id)` then reads them. A safetensors folder is refused: it is no
    `datasets` dataset."""
    token_dir = Path(token_dir)
    file_format = token_format(token_dir)
    if file_format == "safetensors":
        raise UsageError(f"{token_dir} holds safetensors tokens, which the Hub cannot show or load as a dataset; "
                         f"encode them again with --format parquet (file_format=\"parquet\") into a new folder and "
                         f"push that one.")
    shard_paths(token_dir)  # finished, whole and of one encode: refused before anything is uploaded
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id=repo_id, repo_type="dataset", private=private, exist_ok=True).repo_id
    return api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=token_dir,
                             commit_message=commit_message, revision=branch, create_pr=create_pr,
                             allow_patterns=[CARD_NAME, PARQUET_DATA], delete_patterns=[PARQUET_DATA])


# --------------------------------------------------------------------------------------------------
# Decode


@torch.no_grad()
def decode_tokens(model, token_dir, output_dir, *, batch_size: int = 32, name_by: str = "index", device=None,
                  allow_other_tokenizer: bool = False, overwrite: bool = False, progress: bool = True) -> int:
    """Decode every shard to PNGs in `output_dir`; returns the number of images this process wrote.

    name_by="index": <dataset position>.png (zero-padded to 8 digits); "id": the source file's relative path
    with a .png suffix, keeping the source extension where two files differ only in it (a.jpg beside a.png is
    written as a.jpg.png, with a warning): no image overwrites another. Process r decodes the shards
    k = r (mod world size). The model's encoder and codebook must be those that made the tokens (same
    fingerprint; a decoder trained later on those codes is fine):
    another tokenizer of the same preset reads the same index range but means other images by it. Pass
    allow_other_tokenizer=True only for a decoder you know was trained on these codes.

    Before anything is decoded, a file of `output_dir` that decoding would write (a re-run's, or the user's own
    images: --name-by id into the source folder) is refused unless overwrite=True (--overwrite) replaces them.
    """
    if name_by not in NAME_BY:
        raise ValueError(f"name_by={name_by!r}; use one of {NAME_BY}.")
    check_output_folder(output_dir)
    manifest = read_manifest(token_dir)
    config = model.config
    if (manifest["codebook_size"], manifest["grid"]) != (config.codebook_size, config.grid):
        raise UsageError(f"the tokens are {manifest['grid']}x{manifest['grid']} grids of {manifest['codebook_size']} "
                         f"codes but the model decodes {config.grid}x{config.grid} grids of {config.codebook_size}; "
                         f"use the tokenizer that made them ({manifest['model']}).")
    fingerprint = tokenizer_fingerprint(model)
    if manifest["tokenizer_fingerprint"] != fingerprint:
        problem = (f"the tokens in {token_dir} were made by another encoder/codebook ({manifest['model']}, fingerprint "
                   f"{manifest['tokenizer_fingerprint'][:12]}) than this model's ({fingerprint[:12]})")
        if not allow_other_tokenizer:
            raise UsageError(f"{problem}: its decoder would turn them into meaningless images. Decode with the "
                             f"tokenizer that made them, or pass allow_other_tokenizer=True (--allow-other-tokenizer) "
                             f"if this decoder was trained on those codes.")
        warnings.warn(f"{problem}; decoding anyway (allow_other_tokenizer=True).")
    state, device = state_and_device(device)
    model = model.to(device).eval()
    paths = shard_paths(token_dir)
    # Every process names every shard's files, so all of them see the same files already there and agree.
    if name_by == "id":  # names are checked across all shards: two processes must not write the same file either
        names = _names_by_id([read_shard_metadata(p) for p in paths], warn=state.is_main_process)
    else:
        names = [[f"{i:08d}.png" for i in _dataset_index(p).tolist()] for p in paths]
    output_dir = check_output_folder(output_dir, [name for shard in names for name in shard], overwrite=overwrite)
    state.wait_for_everyone()  # no process writes a file before all have checked that none is there
    mine = range(state.process_index, len(paths), state.num_processes)
    written = 0
    for k in tqdm(mine, desc="decode", disable=not (progress and state.is_main_process), dynamic_ncols=True):
        shard = read_shard(paths[k])
        for chunk, chunk_names in zip(shard["indices"].split(batch_size), _chunks(names[k], batch_size)):
            images = to_uint8(model.decode_indices(chunk.to(device).long()).float()).permute(0, 2, 3, 1).cpu()
            for image, name in zip(images.numpy(), chunk_names):
                target = output_dir / name
                target.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(target)
            written += len(chunk)
    state.wait_for_everyone()
    return written


def _dataset_index(path) -> torch.Tensor:
    """A shard's dataset positions alone (the names of --name-by index), without reading its tokens."""
    try:
        if Path(path).suffix == ".parquet":
            column = pq.read_table(str(path), columns=["dataset_index"], page_checksum_verification=True)
            return torch.from_numpy(column.column("dataset_index").to_numpy().copy())
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor("dataset_index")
    except _DAMAGE as err:
        raise _damaged(path, err) from err


def _names_by_id(headers: list[dict], warn: bool) -> list[list[str]]:
    """The PNG name of every image under --name-by id, shard by shard (headers: `read_shard_metadata` of every
    shard, in order): the source file's relative path with a .png suffix. Files that differ only in their
    extension (a.jpg and a.png) would both become a.png, so those of them not already named .png keep their
    extension (a.jpg.png), and `warn` says so. Names that still clash are refused: no decoded image ever
    overwrites another."""
    ids = [i for header in headers for i in header["ids"]]
    if any(i is None for i in ids):
        raise UsageError("--name-by id: these images have no file names (a Hub dataset of raw image bytes); "
                         "use --name-by index")
    paths = [Path(os.path.basename(i) if os.path.isabs(i) else i) for i in ids]
    plain = Counter(p.with_suffix(".png") for p in paths)
    names, renamed = [], []
    for path in paths:
        if plain[path.with_suffix(".png")] > 1 and path.suffix.lower() != ".png":
            names.append(f"{path}.png")
            renamed.append(str(path))
        else:
            names.append(str(path.with_suffix(".png")))
    clashes = sorted(name for name, count in Counter(names).items() if count > 1)
    if clashes:
        raise UsageError(f"--name-by id: {len(clashes)} file names occur more than once among the source images "
                         f"(e.g. {clashes[0]}), so one decoded image would overwrite another; use --name-by index")
    if renamed and warn:
        warnings.warn(f"--name-by id: {len(renamed)} source files share their name with another up to the "
                      f"extension; they keep their extension so that none overwrites another (e.g. {renamed[0]} -> "
                      f"{renamed[0]}.png)", stacklevel=3)
    ends = list(itertools.accumulate(len(header["ids"]) for header in headers))
    return [names[end - len(header["ids"]):end] for header, end in zip(headers, ends)]


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]
