"""Token folders: a dataset encoded once by a VQ-HiT tokenizer (`encode_dataset`, resumable and multi-process),
decoded back to images (`decode_tokens`), read for training (`load_tokens`, `TokenDataset`) or shared on the Hub
(`push_tokens_to_hub`, a Parquet folder as a dataset). The folder's two file formats, safetensors and Parquet, and
how damaged files are caught are described in `vqhit.token_files`.

Tokens decode only with the tokenizer whose encoder and codebook made them (same fingerprint), unless the caller
says otherwise (`allow_other_tokenizer`, `--allow-other-tokenizer`).
"""
from __future__ import annotations

import itertools
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import HfApi
from PIL import Image
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data import ImageDataset, check_eval_dataset, collate_images
from .distributed import state_and_device
from .errors import UsageError
from .files import check_output_folder
from .metrics import to_uint8
from .precision import autocast, check_precision
from .token_card import CARD_NAME, PARQUET_DATA
from .token_files import (FORMATS, check_existing_manifest, check_file_format, check_shard, index_dtype,
                          read_dataset_index, read_manifest, read_shard, read_shard_metadata, shard_file, shard_name,
                          shard_paths, token_format, token_manifest, tokenizer_fingerprint, write_manifest,
                          write_shard)

# What users call, and the format's names they import from here (defined in token_files).
__all__ = ["FORMATS", "NAME_BY", "EncodeSummary", "Tokens", "TokenDataset", "decode_tokens", "encode_dataset",
           "index_dtype", "load_tokens", "push_tokens_to_hub", "read_manifest", "read_shard", "shard_file",
           "shard_name", "tokenizer_fingerprint"]

NAME_BY = ("index", "id")  # how decode_tokens names its PNGs


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
    check_existing_manifest(output_dir, manifest, file_format)
    if state.is_main_process:
        write_manifest(output_dir, manifest, file_format)
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
                write_shard(path(current), current, parts, manifest)
            current, parts = k, []
        if batch is not None:
            with autocast(precision, device):
                indices = model.encode(batch["image"].to(device))
            batch = {**batch, "indices": indices.to("cpu", dtype)}
        parts.append((positions, batch))
        bar.update(len(positions))
    if current is not None:
        write_shard(path(current), current, parts, manifest)
    bar.close()
    state.wait_for_everyone()
    headers = [read_shard_metadata(path(k)) for k in range(manifest["num_shards"])]
    return EncodeSummary(output_dir, file_format, manifest["num_shards"], todo, reused,
                         num_images=sum(h["num_images"] for h in headers),
                         num_skipped=sum(len(h["skipped"]) for h in headers))


# --------------------------------------------------------------------------------------------------
# Load


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
        raise UsageError(_other_grid(manifest, config))
    fingerprint = tokenizer_fingerprint(model)
    if manifest["tokenizer_fingerprint"] != fingerprint:
        problem = _other_tokenizer(token_dir, manifest, fingerprint)
        if not allow_other_tokenizer:
            raise UsageError(f"{problem}: {_OTHER_TOKENIZER_FIX}")
        warnings.warn(f"{problem}; decoding anyway (allow_other_tokenizer=True).")
    state, device = state_and_device(device)
    model = model.to(device).eval()
    paths = shard_paths(token_dir)
    # Every process names every shard's files, so all of them see the same files already there and agree.
    if name_by == "id":  # names are checked across all shards: two processes must not write the same file either
        names = _names_by_id([read_shard_metadata(p) for p in paths], warn=state.is_main_process)
    else:
        names = [[f"{i:08d}.png" for i in read_dataset_index(p).tolist()] for p in paths]
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


def _other_grid(manifest: dict, config) -> str:
    return (f"the tokens are {manifest['grid']}x{manifest['grid']} grids of {manifest['codebook_size']} codes but the "
            f"model decodes {config.grid}x{config.grid} grids of {config.codebook_size}; use the tokenizer that made "
            f"them ({manifest['model']}).")


def _other_tokenizer(token_dir, manifest: dict, fingerprint: str) -> str:
    return (f"the tokens in {token_dir} were made by another encoder/codebook ({manifest['model']}, fingerprint "
            f"{manifest['tokenizer_fingerprint'][:12]}) than this model's ({fingerprint[:12]})")


_OTHER_TOKENIZER_FIX = ("its decoder would turn them into meaningless images. Decode with the tokenizer that made them, "
                        "or pass allow_other_tokenizer=True (--allow-other-tokenizer) if this decoder was trained on "
                        "those codes.")


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
