"""Datasets from a source: `build_dataset` for training, `eval_dataset` for evaluation and encoding, and the
map-style `ImageDataset` (streams are `vqhit.data.streams`).

A source with no usable image at all fails when it is built, with one error naming it. "One warning per file" holds
per run, whatever the DataLoader workers: a DataLoader that `vqhit.data.batches.build_dataloader` makes starts new
worker processes every epoch, so what a map-style dataset learnt about each position (skipped, upsampled) lives in a
small tensor in shared memory that every worker of the run reads and writes (one byte per image); it also gives the
main process the run's counts.
"""
from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path

import datasets
import torch

from ..downloads import local_or_hub
from ..errors import UsageError
from .config import DETERMINISTIC_TRANSFORMS, DataConfig
from .images import _PARTITION, _REASONS, _TOO_SMALL, _UPSAMPLED, BadImageWarning, _derive_seed, _file_name, _ImageRows
from .sources import BUILTIN_SOURCES, _hub_revision, _load_folder, _names_revision, builtin_photos, whole_photos
from .streams import StreamingImageDataset


def build_dataset(cfg: DataConfig, seed: int = 0) -> ImageDataset | StreamingImageDataset:
    """The dataset `cfg` describes: map-style, or iterable when ``cfg.streaming``.

    A mistyped local path gets "no such folder", never a Hub lookup (vqhit.downloads.local_or_hub). The items
    are read up to the first usable one, so a source with none fails here with one error naming it. The dataset's
    ``revision`` says what the source held (`source_revision`), for a resume to notice that it changed.
    """
    dangling = {}
    if cfg.split != "train" and (cfg.source in BUILTIN_SOURCES or os.path.isdir(os.path.expanduser(cfg.source))):
        raise _one_split_only(cfg)  # not accepted, and then recorded in reports, as if it were another split
    if cfg.source in BUILTIN_SOURCES:
        photos, cut = BUILTIN_SOURCES[cfg.source]
        table = builtin_photos(tile=max(128, cfg.resolution), photos=photos) if cut == "tiles" else whole_photos(photos)
        revision = _names_revision(row["path"] for row in table["image"])
    elif cfg.source.startswith("builtin:"):
        raise _unknown_builtin(cfg.source)
    else:
        found = local_or_hub(cfg.source, "image folder or Hub dataset given to --data",
                             fetch=lambda hub_id: datasets.load_dataset(hub_id, split=cfg.split,
                                                                        streaming=cfg.streaming,
                                                                        cache_dir=cfg.cache_dir))
        if isinstance(found, Path) and not found.is_dir():
            raise _file_not_folder(cfg.source)
        if isinstance(found, Path):
            table, dangling, revision = _load_folder(str(found), cfg)
        else:
            table, revision = found, _hub_revision(cfg.source, found)
    dataset = from_hf_dataset(table, cfg, seed=seed)
    dataset.dangling, dataset.revision = dangling, revision
    _check_usable(dataset)
    return dataset


def _one_split_only(cfg: DataConfig) -> UsageError:
    return UsageError(f"--split {cfg.split}: {cfg.source} has only the split 'train' (a local folder or a built-in "
                      f"set is one split); leave --split out, or point --data at the images of that split.")


def _unknown_builtin(source: str) -> UsageError:
    return UsageError(f"--data {source} is not a built-in source; use one of {', '.join(sorted(BUILTIN_SOURCES))}, a "
                      "folder of images or a Hub dataset id.")


def _file_not_folder(source: str) -> UsageError:
    return UsageError(f"--data {source} is a file, not a folder; give a folder of images, a Hub dataset id, or "
                      "builtin:photos.")


def _items(dataset):
    """The items of `dataset` in order (None for a bad image), map-style or streamed."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return iter(dataset)
    return (dataset[i] for i in range(len(dataset)))


def first_images(dataset, n: int, source: str) -> torch.Tensor:
    """The first `n` readable images of `dataset` (`source`: its --data), stacked: a training run's reconstruction
    grids show these."""
    images = []
    for item in _items(dataset):
        if item is not None:
            images.append(item["image"])
        if len(images) == n:
            break
    if not images:
        raise UsageError(f"--data {source}: no readable image")
    return torch.stack(images)


def _check_usable(dataset: ImageDataset | StreamingImageDataset) -> None:
    """Read items up to the first usable one; when there is none, raise one error naming the source and why.

    Without this, a source whose every image is bad fails far away (an empty batch in torch.stack). The bad
    images met on the way are warned about as usual (and, being recorded, never again in this run).
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", BadImageWarning)  # once per file is ours to enforce, not the filter's
        usable = any(item is not None for item in _items(dataset))
    if usable:
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return
    kinds = Counter(dataset.skipped.values())
    why = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items())) or "it holds no images"
    first = next((str(w.message) for w in caught if issubclass(w.category, BadImageWarning)), None)
    first = first or next((f"{name}: {kind}" for name, kind in dataset.skipped.items()), "")
    fix = " or lower min_size (--min-size 0 keeps small images)" if _REASONS[_TOO_SMALL] in kinds else ""
    raise UsageError(f"no usable image in {dataset.cfg.source!r}: {why}. First: {first}. Check the files, or point "
                     f"--data at the images you mean{fix}.")


# --------------------------------------------------------------------------------------------------
# Evaluation and encoding: deterministic map-style datasets


def eval_dataset(source: str, resolution: int, *, transform: str = "center_crop", split: str = "train",
                 image_column: str = "image", label_column: str | None = "auto", max_images: int | None = None,
                 bad_images: str = "skip", min_size: int = 0, cache_dir: str | None = None) -> ImageDataset:
    """A map-style dataset with a deterministic transform and no flip, for evaluation and encoding.

    source: a local image folder, a Hub dataset id, or "builtin:photos". label_column="auto" keeps a
    column named "label" when there is one (an image folder with sub-folders has it), None drops labels.
    min_size=0 keeps every image, upsampling those smaller than `resolution` as ADM's protocol does;
    min_size=N treats images whose short side is below N as bad images (skipped, or raised on).
    """
    if transform not in DETERMINISTIC_TRANSFORMS:
        raise ValueError(f"transform={transform!r} is random or unknown; evaluation and encoding need a deterministic "
                         f"one of {DETERMINISTIC_TRANSFORMS} (center_crop, or adm_center_crop for the rFID protocol).")
    cfg = DataConfig(source=source, split=split, image_column=image_column, label_column=label_column,
                     streaming=False, resolution=resolution, transform=transform, flip=False, bad_images=bad_images,
                     min_size=min_size, max_images=max_images, cache_dir=cache_dir)
    return build_dataset(cfg)


def check_eval_dataset(dataset, resolution: int) -> None:
    """Refuse datasets that would make evaluation or encoding random, partial or mis-sized."""
    if not isinstance(dataset, ImageDataset):
        raise ValueError(f"expected a map-style vqhit ImageDataset (build one with vqhit.data.eval_dataset), "
                         f"got {type(dataset).__name__}; streamed datasets cannot be split into exact shards, use "
                         f"streaming=False.")
    cfg = dataset.cfg
    if cfg.flip or cfg.transform not in DETERMINISTIC_TRANSFORMS:
        raise ValueError(f"the dataset uses transform={cfg.transform!r}, flip={cfg.flip}; evaluation and encoding "
                         f"need a deterministic one ({DETERMINISTIC_TRANSFORMS}) and flip=False.")
    if cfg.resolution != resolution:
        raise ValueError(f"the dataset makes {cfg.resolution}x{cfg.resolution} images but the model works at "
                         f"{resolution}x{resolution}; build the dataset with resolution={resolution}.")


def data_settings(dataset: ImageDataset) -> dict:
    """What the dataset is, for reports and for the protocol of cached statistics."""
    cfg = dataset.cfg
    source = cfg.source
    if os.path.isdir(os.path.expanduser(source)):
        source = os.path.abspath(os.path.expanduser(source))  # the same folder however it was spelled
    small = ("upsampled (bicubic), as ADM's protocol" if cfg.min_size == 0 else
             f"short side < {cfg.min_size} skipped, the rest below the resolution upsampled (bicubic)")
    return {"data": source, "split": cfg.split, "image_column": cfg.image_column, "crop": cfg.transform,
            "resolution": cfg.resolution, "min_size": cfg.min_size, "small_images": small,
            "max_images": cfg.max_images, "dataset_size": len(dataset)}


def from_hf_dataset(table: datasets.Dataset | datasets.IterableDataset, cfg: DataConfig, seed: int = 0):
    """Wrap a `datasets` table whose ``cfg.image_column`` holds images (bytes, paths or `Image` features).

    A `datasets.IterableDataset` becomes a stream; so does a `datasets.Dataset` when ``cfg.streaming`` (a local folder
    or a built-in set asked to stream), cut into shards of rows drawn at random (`LOCAL_SHARDS`)."""
    if seed < 0:
        raise ValueError(f"seed={seed} must be >= 0.")
    columns = table.column_names
    if cfg.label_column == "auto":  # a column named "label" when there is one (an image folder with sub-folders)
        has_label = columns is not None and "label" in columns and cfg.image_column != "label"
        cfg = replace(cfg, label_column="label" if has_label else None)
    if columns is not None:  # None for some streamed sets whose features are unknown until read
        for what, name in (("--image-column", cfg.image_column), ("--label-column", cfg.label_column)):
            if name is not None and name not in columns:
                raise UsageError(f"{what} {name}: not a column of --data {cfg.source} (image_column/label_column); "
                                 f"it has {', '.join(columns)}.")
    features = table.features or {}
    if isinstance(features.get(cfg.image_column), datasets.Image):
        table = table.cast_column(cfg.image_column, datasets.Image(decode=False))
    string_labels = cfg.label_column is not None and _is_string(features.get(cfg.label_column))
    if isinstance(table, datasets.IterableDataset):
        if string_labels:
            raise UsageError(f"--label-column {cfg.label_column} holds strings; a stream needs integer labels "
                             "(cast it to datasets.ClassLabel, or drop --streaming: a downloaded set is encoded).")
        num_shards = None
        if cfg.max_images is not None:  # the first rows of the stream: one shard, which every stream reads
            table, num_shards = table.take(cfg.max_images), 1
        return StreamingImageDataset(table, cfg, seed, num_shards=num_shards)
    if cfg.max_images is not None:
        table = table.select(range(min(cfg.max_images, len(table))))
    if string_labels:
        table = table.class_encode_column(cfg.label_column)  # class names -> ids, sorted alphabetically
    if cfg.streaming:
        return StreamingImageDataset(_local_shards(table), cfg, seed)
    return ImageDataset(table, cfg, seed)


# A local folder or built-in set that streams is cut into LOCAL_SHARDS shards of rows drawn at random (a fixed
# partition, the same in every run and process, as a Hub dataset's files are): each shard is a sample of the whole
# folder, so a folder sorted by class gives mixed batches from the first one, whatever the buffer. 960 = 2^6 * 3 * 5:
# any count of streams (processes x workers) among 1-6, 8, 10, 12, 15, 16, 20, 24, 32, 40, 48, 64, ... divides it,
# and each stream then reads its own shards only. A smaller folder gets the largest divisor of 960 that leaves
# MIN_SHARD_ROWS rows in each shard (opening a shard costs about as much as reading ten rows).
LOCAL_SHARDS, MIN_SHARD_ROWS = 960, 16


def _local_shards(table: datasets.Dataset) -> datasets.IterableDataset:
    count = max(d for d in range(1, LOCAL_SHARDS + 1) if LOCAL_SHARDS % d == 0 and
                (d == 1 or d * MIN_SHARD_ROWS <= len(table)))
    # to_iterable_dataset cuts contiguous shards: of a random order of the rows, they are random samples
    order = torch.randperm(len(table), generator=torch.Generator().manual_seed(_derive_seed(_PARTITION)))
    return table.select(order.tolist()).to_iterable_dataset(num_shards=count)


def _is_string(feature) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


# --------------------------------------------------------------------------------------------------
# The map-style dataset


class ImageDataset(_ImageRows, torch.utils.data.Dataset):
    """Map-style dataset over a `datasets.Dataset`; ``ds[i]`` is an item dict, or None for a skipped image.

    Item: ``{"image": float32 (3, R, R) in [-1, 1], "index": i, "id": file name, "label": int (if any)}``.
    ``ds[(epoch, i)]`` is item i as epoch `epoch` augments it, whatever `set_epoch` said (how `TrainingBatches`
    tells workers that outlive an epoch which one they serve).
    """

    def __init__(self, table: datasets.Dataset, cfg: DataConfig, seed: int = 0):
        super().__init__(cfg, seed)
        self.table = table
        # Shared memory: DataLoader workers (new processes each epoch) write what they find here, so each bad
        # file is warned about once per run and the main process sees the run's counts.
        self._status = torch.zeros(len(table), dtype=torch.uint8).share_memory_()
        self._upsample_warned = torch.zeros(1, dtype=torch.bool).share_memory_()

    def _record(self, index: int, name: str, code: int, epoch: int) -> bool:
        first = int(self._status[index]) != code
        self._status[index] = code
        return first

    def _first_upsample(self) -> bool:
        first = not bool(self._upsample_warned[0])
        self._upsample_warned[0] = True
        return first

    @property
    def num_upsampled(self) -> int:
        """Images met so far (by any worker) whose short side is below the resolution, upsampled by the transform."""
        return int((self._status == _UPSAMPLED).sum())

    def upsampled_positions(self) -> set[int]:
        """Dataset positions of the images met so far that were smaller than the resolution (and upsampled)."""
        return set((self._status == _UPSAMPLED).nonzero().flatten().tolist())

    def _outcomes(self):
        for index in self._status.nonzero().flatten().tolist():
            name = _file_name(self.table[index][self.cfg.image_column]) or f"{self.cfg.source}[{index}]"
            yield name, int(self._status[index])

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, key: int | tuple[int, int]) -> dict | None:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        return self._item(self.table[int(index)], int(index), f"{self.cfg.source}[{index}]", epoch)
