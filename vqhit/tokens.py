"""Token shards: a dataset encoded once by a VQ-HiT tokenizer, decoded back to images, or read for training.

An output folder holds

    tokens.json                   the manifest: model, preset, codebook size, grid, preprocessing, shard size ...
    shard-00000.safetensors       dataset items [0, shard_size)
    shard-00001.safetensors       dataset items [shard_size, 2 * shard_size) ...

and each shard holds the tensors
    indices        (N, h, w)  the smallest integer dtype that holds the codebook (uint8 up to 256 codes, ...)
    dataset_index  (N,) int64 position of each image in the source dataset
    labels         (N,) int64 only when the dataset has labels
and, as safetensors metadata (string -> JSON string), the manifest's fields plus `ids` (the source file
name of each image) and `skipped` (dataset positions of unreadable images, which have no tokens).

Shard k holds a fixed range of dataset positions, and process r of W encodes the shards k = r (mod W):
every image is encoded exactly once with no padding, whatever the number of processes. A shard is
written to a temporary name and renamed, so a shard file that exists is complete; a restarted run
skips those and encodes only the rest.

Files damaged later (a truncated copy, a full disk, garbage) are caught when read: every shard's header is
checked (safetensors refuses a file its header does not cover exactly) and its metadata compared with
`tokens.json`, on decode and on an encode re-run alike, and the error names the file and the fix. Each shard
carries the manifest's fields, so a lost or damaged `tokens.json` can be rewritten by re-running the encode.
Tokens decode only with the tokenizer whose encoder and codebook made them (same fingerprint), unless
the caller says otherwise (`allow_other_tokenizer`, `--allow-other-tokenizer`).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
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
MANIFEST_NAME = "tokens.json"
NAME_BY = ("index", "id")
MANIFEST_KEYS = ("format", "version", "model", "preset", "tokenizer_fingerprint", "codebook_size", "grid",
                 "resolution", "dtype", "preprocessing", "data", "label_column", "precision", "num_items",
                 "shard_size", "num_shards")
REENCODE = "delete it and run scripts/encode.py again with the same arguments: only missing shards are encoded"
NEW_FOLDER = ("resuming needs the same model, data, preprocessing and shard size: to encode with other settings, use "
              "a new output folder")


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


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
    num_shards: int
    encoded: list[int]   # shards this process encoded in this run
    reused: list[int]    # shards of this process that were already complete
    num_images: int      # images with tokens in the whole folder
    num_skipped: int     # unreadable images in the whole folder


@torch.no_grad()
def encode_dataset(model, dataset: ImageDataset, output_dir, *, shard_size: int = 1000, batch_size: int = 64,
                   num_workers: int = 0, model_id: str | None = None, precision: str = "fp32", device=None,
                   progress: bool = True) -> EncodeSummary:
    """Encode every image of `dataset` into token shards in `output_dir` (resumable, multi-process).

    The dataset must be deterministic (vqhit.data.eval_dataset). Restarting with the same model and
    data encodes only the shards that are missing; another model, data or preprocessing is refused.
    """
    check_eval_dataset(dataset, model.config.resolution)
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size={shard_size} and batch_size={batch_size} must be at least 1.")
    precision = check_precision(precision)
    state, device = state_and_device(device)
    output_dir = check_output_folder(output_dir)
    model = model.to(device).eval()
    manifest = token_manifest(model, dataset, shard_size=shard_size, model_id=model_id, precision=precision)
    _check_existing_manifest(output_dir, manifest)
    if state.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(output_dir / MANIFEST_NAME, lambda p: p.write_text(json.dumps(manifest, indent=2) + "\n"))
    state.wait_for_everyone()

    n, dtype = manifest["num_items"], index_dtype(model.config.codebook_size)
    mine = range(state.process_index, manifest["num_shards"], state.num_processes)
    reused = [k for k in mine if (output_dir / shard_name(k)).exists()]
    for k in reused:  # a shard that exists was complete when written; check it is still whole and ours
        check_shard(output_dir / shard_name(k), manifest, k)
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
                _write_shard(output_dir, current, parts, manifest)
            current, parts = k, []
        if batch is not None:
            with autocast(precision, device):
                indices = model.encode(batch["image"].to(device))
            batch = {**batch, "indices": indices.to("cpu", dtype)}
        parts.append((positions, batch))
        bar.update(len(positions))
    if current is not None:
        _write_shard(output_dir, current, parts, manifest)
    bar.close()
    state.wait_for_everyone()
    headers = [read_shard_metadata(output_dir / shard_name(k)) for k in range(manifest["num_shards"])]
    return EncodeSummary(output_dir, manifest["num_shards"], todo, reused,
                         num_images=sum(h["num_images"] for h in headers),
                         num_skipped=sum(len(h["skipped"]) for h in headers))


def _check_existing_manifest(output_dir: Path, manifest: dict) -> None:
    path = output_dir / MANIFEST_NAME
    if not path.exists():
        # No manifest (never written, or deleted because it was damaged): the shards' own metadata say how they
        # were made, so those of this run's settings are kept and anything else is refused.
        # A whole shard made with other settings is another run's good tokens: not to be deleted, but not resumed.
        for shard in sorted(output_dir.glob("shard-*.safetensors")) if output_dir.is_dir() else []:
            check_shard(shard, manifest, int(shard.name[len("shard-"):-len(".safetensors")]), fix=NEW_FOLDER)
        return
    diff = _manifest_differences(read_manifest(output_dir), manifest)
    if diff:
        raise UsageError(f"{output_dir} holds tokens made with other settings (folder, this run): {diff}; "
                         f"{NEW_FOLDER}.")


def _manifest_differences(existing: dict, manifest: dict) -> dict:
    """Manifest fields that differ, as (existing, this run); the model's name may change (a copied folder), its
    fingerprint may not."""
    diff = differences(existing, manifest)
    diff.pop("model", None)
    return diff


def _write_shard(output_dir: Path, k: int, parts: list, manifest: dict) -> None:
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
    asked = {p for positions, _ in parts for p in positions}
    skipped = sorted(asked - set(got.tolist()))
    source = manifest["data"]["data"]
    ids = [_relative_id(i, source) for b in batches for i in b["id"]]
    metadata = {key: json.dumps(value) for key, value in manifest.items()}
    state = process_state()
    metadata.update(shard=json.dumps(k), ids=json.dumps(ids), skipped=json.dumps(skipped),
                    written_by=json.dumps({"process": state.process_index, "num_processes": state.num_processes}))
    tensors = {name: t.contiguous() for name, t in tensors.items()}
    atomic_write(output_dir / shard_name(k), lambda p: save_file(tensors, str(p), metadata=metadata))


def _relative_id(name: str, source: str) -> str:
    """File names inside a local source folder are stored relative to it (the folder may move)."""
    if os.path.isabs(name) and os.path.isdir(source):
        relative = os.path.relpath(name, source)
        if not relative.startswith(".."):
            return relative
    return name


# --------------------------------------------------------------------------------------------------
# Read


def read_shard_metadata(path) -> dict:
    """A shard's metadata (values decoded from JSON) plus num_images and the indices' shape, without reading the
    tensors. A damaged file raises a ValueError that names it and the fix."""
    try:
        with safe_open(str(path), framework="pt") as f:  # refuses a file its header does not cover exactly
            metadata = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            tensors = set(f.keys())
            shape = f.get_slice("indices").get_shape() if "indices" in tensors else None
    except (SafetensorError, json.JSONDecodeError, OSError) as err:
        raise UsageError(f"{path} is damaged ({err}); {REENCODE}.") from err
    missing = sorted({"indices", "dataset_index"} - tensors) + sorted({*MANIFEST_KEYS, "shard", "ids", "skipped"}
                                                                      - metadata.keys())
    if missing:
        raise UsageError(f"{path} is not a complete vqhit token shard (missing {missing}); {REENCODE}.")
    metadata["num_images"], metadata["shape"] = shape[0], list(shape)
    return metadata


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
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise UsageError(f"{path} is damaged ({err}); {REENCODE}.") from err
    return {"indices": tensors["indices"], "dataset_index": tensors["dataset_index"],
            "labels": tensors.get("labels"), "ids": metadata["ids"], "skipped": metadata["skipped"],
            "metadata": metadata}


def read_manifest(token_dir) -> dict:
    path = Path(token_dir) / MANIFEST_NAME
    if not path.exists():
        raise UsageError(f"{token_dir} has no {MANIFEST_NAME}: is it a folder written by scripts/encode.py? If its "
                         f"{MANIFEST_NAME} was lost, run scripts/encode.py again with the same arguments to rewrite "
                         f"it (the shards are kept).")
    rewrite = (f"delete it and run scripts/encode.py again with the same arguments: it is rewritten, and the shards "
               f"already there are kept when their own metadata match that run")
    try:
        manifest = json.loads(path.read_text())
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


def shard_paths(token_dir) -> list[Path]:
    """Every shard of a finished folder, in order; an unfinished folder raises, naming the missing shards."""
    token_dir = Path(token_dir)
    manifest = read_manifest(token_dir)
    paths = [token_dir / shard_name(k) for k in range(manifest["num_shards"])]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise UsageError(f"{token_dir} is incomplete: {len(missing)} of {len(paths)} shards missing "
                         f"({missing[:3]}...); re-run scripts/encode.py with the same arguments to finish it.")
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
    shards = [read_shard(p) for p in shard_paths(token_dir)]
    labels = [s["labels"] for s in shards]
    return Tokens(indices=torch.cat([s["indices"] for s in shards]),
                  dataset_index=torch.cat([s["dataset_index"] for s in shards]),
                  labels=torch.cat(labels) if all(x is not None for x in labels) else None,
                  ids=[i for s in shards for i in s["ids"]], manifest=read_manifest(token_dir))


class TokenDataset(torch.utils.data.Dataset):
    """Map-style dataset over every shard of a token folder, for training a model on tokens.

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
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("dataset_index")


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
