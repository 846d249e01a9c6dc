"""Image datasets for training and evaluation, through Hugging Face `datasets`.

Three kinds of source share one decode-and-transform path:

* ``"builtin:photos"`` -- overlapping tiles cut from the sample photographs that scikit-image ships
  inside its wheel (no network). The photographs are public domain or CC0:
  astronaut (NASA, public domain), coffee (Rachel Michetti, CC0), chelsea (Stefan van der Walt, CC0),
  rocket (SpaceX, public domain), immunohistochemistry (CMMI, no known copyright restrictions).
  ``"builtin:photos-whole"`` -- the same photographs whole: the centre square of the short side and the four
  corner squares (each distinct square once), each one image that a transform downsamples whole.
  ``"builtin:photos-heldout"`` -- those squares of four *other* colour photographs of everyday scenes, for
  measuring reconstruction on what a tokenizer meets in use (whole photographs, downsampled) and never
  trained on: motorcycle (the left view of scikit-image's ``stereo_motorcycle``, from the Middlebury 2014
  stereo benchmark, distributed for research), china (a temple; shipped in scikit-learn's wheel, by Daniel
  Buechele, CC BY 2.0) and flower (shipped in scikit-learn's wheel, by vultilion on Flickr, CC BY 2.0), and
  grace_hopper (a portrait of Grace Hopper shipped in matplotlib's wheel; an official U.S. Navy photograph,
  public domain). scikit-learn and matplotlib are dependencies for these files alone: they are read from the
  installed packages without importing them (no network).
* a local folder -- loaded with ``datasets.load_dataset("imagefolder", data_dir=...)`` (sub-folders
  become a ``label`` column), as a table of file paths; to stream, it is cut into shards (`from_hf_dataset`).
* a Hub dataset id -- ``datasets.load_dataset(id, split=..., streaming=...)``.

Every source has a ``revision`` (the Hub commit, or the count and names of a folder's files), which a training
position records: a resume on data that changed says so.

Images are decoded here, not by `datasets` (the image column is cast to ``Image(decode=False)``), so
an unreadable file is caught in this module with its name: it is skipped with one warning per file
and counted, or raises a ``ValueError`` naming the file (``DataConfig.bad_images``). A dangling symlink
in a folder is a bad image too (the ``imagefolder`` loader would drop it silently). "One warning per
file" holds per run, whatever the DataLoader workers: a DataLoader that `build_dataloader` makes starts new worker
processes every epoch, so what a map-style dataset learnt about each position (skipped, upsampled) lives in a small
tensor in shared memory that every worker of the run reads and writes (one byte per image); it also gives the
main process the run's counts. A source with no usable image at all fails when it is built, with one
error naming it. Images smaller than the resolution are upsampled (bicubic), as ADM's evaluation crop
does; ``min_size`` makes those below it bad images instead. Every random
draw for item ``i`` comes from a generator seeded by ``(seed, epoch, i)``, so a map-style dataset
returns the same tensor for the same ``(seed, epoch, index)`` whatever the worker count or order:
training can resume exactly. Streams (`StreamingImageDataset`) shuffle their shard order and a buffer of rows,
anew each epoch, and resume exactly from a small position (`TrainingBatches`).
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import io
import os
import warnings
from collections import Counter, deque
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node
from PIL import Image
from torch.utils.data import DataLoader, Sampler, get_worker_info

from . import distributed
from .downloads import local_or_hub
from .errors import UnavailableError, UsageError
from .preemption import ignore_in_workers

TRANSFORMS = ("random_crop", "center_crop", "adm_center_crop", "imagenet_gan", "imagenet_gan_eval", "resize")
# Transforms with no randomness: what evaluation and encoding may read (never a random crop, never a flip).
DETERMINISTIC_TRANSFORMS = ("center_crop", "adm_center_crop", "imagenet_gan_eval", "resize")
IMAGENET_GAN_CROP = 0.875  # HiT's ImageNet recipe keeps 87.5% of the short side
BUILTIN_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")
# Held out from training: other photographs, not other crops of the training ones (neighbouring crops of one photo
# share content, so they would flatter a tokenizer), all colour photographs of everyday scenes (grey ones are the
# easy case). The other bundled scikit-image images are left out: scientific ones (hubble_deep_field, mostly black
# sky; retina; moon) and textures/text would say little about photographs (a black sky alone would inflate PSNR),
# and motorcycle_right is the held-out motorcycle seen from beside it (the stereo pair's other view).
BUILTIN_HELDOUT_PHOTOS = ("motorcycle", "china", "flower", "grace_hopper")
# source -> (photographs, how they become images): "tiles" of 128 pixels, or "whole" (the short side's squares)
BUILTIN_SOURCES = {"builtin:photos": (BUILTIN_PHOTOS, "tiles"), "builtin:photos-whole": (BUILTIN_PHOTOS, "whole"),
                   "builtin:photos-heldout": (BUILTIN_HELDOUT_PHOTOS, "whole")}
# The training photographs whole, as the held-out ones are seen: what a tiled source is scored on for the gap
BUILTIN_WHOLE_VIEW = {"builtin:photos": "builtin:photos-whole"}
# Photographs that ship inside other installed packages: name -> (package, file inside it, pip name)
PACKAGED_PHOTOS = {"china": ("sklearn", "datasets/images/china.jpg", "scikit-learn"),
                   "flower": ("sklearn", "datasets/images/flower.jpg", "scikit-learn"),
                   "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "matplotlib")}


class BadImageWarning(UserWarning):
    """An image was unreadable, a dangling symlink or below min_size and was skipped; or (once per run)
    images smaller than the resolution are being upsampled."""


# What became of an image, when it is worth recording (0 in a map-style dataset's status tensor: nothing to say).
_UNREADABLE, _TOO_SMALL, _UPSAMPLED = 1, 2, 3
_REASONS = {_UNREADABLE: "unreadable", _TOO_SMALL: "short side below min_size"}


@dataclass
class DataConfig:
    source: str = "builtin:photos"  # "builtin:photos" | path to a local folder | Hub dataset id
    split: str = "train"
    image_column: str = "image"
    label_column: str | None = None  # "auto": the column named "label" when there is one
    streaming: bool = False
    resolution: int = 64
    transform: str = "random_crop"  # one of TRANSFORMS
    flip: bool = True  # random horizontal flip with probability 1/2
    # random_crop: the square covers a random fraction, uniform in [min_crop_area, 1], of the area of the short
    # side's square (torchvision's RandomResizedCrop scale, at aspect 1): several scales. 1: the whole short side.
    min_crop_area: float = 1.0
    bad_images: str = "skip"  # "skip" (count + warn once per file) | "raise" (ValueError naming the file)
    min_size: int = 0  # short side below this is a bad image; 0 keeps all (smaller than resolution: upsampled)
    max_images: int | None = None  # keep only the first max_images (quick runs)
    shuffle_buffer: int = 1000  # streaming only: rows in each stream's shuffle buffer (1: no buffer)
    open_shards: int = 4  # streaming only: shards each stream reads at once, a row from each in turn
    cache_dir: str | None = None

    def __post_init__(self):
        if self.transform not in TRANSFORMS:
            raise ValueError(f"DataConfig.transform={self.transform!r} is unknown; use one of {TRANSFORMS}.")
        if self.bad_images not in ("skip", "raise"):
            raise ValueError(f"DataConfig.bad_images={self.bad_images!r}; use 'skip' or 'raise'.")
        if not 0 < self.min_crop_area <= 1:
            raise ValueError(f"DataConfig.min_crop_area={self.min_crop_area} must be in (0, 1]: the smallest random "
                             "crop as a fraction of the short side's square (1 keeps the whole short side).")
        if self.resolution < 1:
            raise ValueError(f"DataConfig.resolution={self.resolution} must be a positive number of pixels.")
        if self.min_size < 0:
            raise ValueError(f"DataConfig.min_size={self.min_size} must be >= 0 (0 keeps every image, upsampling "
                             "those smaller than the resolution).")
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"DataConfig.max_images={self.max_images} must be >= 1, or None for all images.")
        for name in ("shuffle_buffer", "open_shards"):
            if getattr(self, name) < 1:
                raise ValueError(f"DataConfig.{name}={getattr(self, name)} must be >= 1.")


# --------------------------------------------------------------------------------------------------
# Public builders


def build_dataset(cfg: DataConfig, seed: int = 0) -> ImageDataset | StreamingImageDataset:
    """The dataset `cfg` describes: map-style, or iterable when ``cfg.streaming``.

    A mistyped local path gets "no such folder", never a Hub lookup (vqhit.downloads.local_or_hub). The items
    are read up to the first usable one, so a source with none fails here with one error naming it. The dataset's
    ``revision`` says what the source held (`source_revision`), for a resume to notice that it changed.
    """
    dangling = {}
    if cfg.split != "train" and (cfg.source in BUILTIN_SOURCES or os.path.isdir(os.path.expanduser(cfg.source))):
        # A built-in set or a plain image folder has one split; another must not be accepted (and recorded in reports)
        raise UsageError(f"--split {cfg.split}: {cfg.source} has only the split 'train' (a local folder or a built-in "
                         f"set is one split); leave --split out, or point --data at the images of that split.")
    if cfg.source in BUILTIN_SOURCES:
        photos, cut = BUILTIN_SOURCES[cfg.source]
        table = builtin_photos(tile=max(128, cfg.resolution), photos=photos) if cut == "tiles" else whole_photos(photos)
        revision = _names_revision(row["path"] for row in table["image"])
    elif cfg.source.startswith("builtin:"):
        raise UsageError(f"--data {cfg.source} is not a built-in source; use one of "
                         f"{', '.join(sorted(BUILTIN_SOURCES))}, a folder of images or a Hub dataset id.")
    else:
        found = local_or_hub(cfg.source, "image folder or Hub dataset given to --data",
                             fetch=lambda hub_id: datasets.load_dataset(hub_id, split=cfg.split,
                                                                        streaming=cfg.streaming,
                                                                        cache_dir=cfg.cache_dir))
        if isinstance(found, Path) and not found.is_dir():
            raise UsageError(f"--data {cfg.source} is a file, not a folder; give a folder of images, a Hub dataset "
                             "id, or builtin:photos.")
        if isinstance(found, Path):
            table, dangling, revision = _load_folder(str(found), cfg)
        else:
            table, revision = found, _hub_revision(cfg.source, found)
    dataset = from_hf_dataset(table, cfg, seed=seed)
    dataset.dangling, dataset.revision = dangling, revision
    _check_usable(dataset)
    return dataset


def check_source(source: str, option: str) -> None:
    """Check what can be checked of an image source without reading it, with errors naming `option`: a built-in name
    is known, a local folder exists and holds image files. For a source read only late in a run (the held-out
    images, after training), so a mistake in it is found at the start. A Hub id is checked when it is loaded."""
    if source.startswith("builtin:"):
        if source not in BUILTIN_SOURCES:
            raise UsageError(f"{option} {source} is not a built-in source; use one of "
                             f"{', '.join(sorted(BUILTIN_SOURCES))}, a folder of images or a Hub dataset id.")
        return
    found = local_or_hub(source, f"image folder or Hub dataset given to {option}")
    if isinstance(found, Path):
        if not found.is_dir():
            raise UsageError(f"{option} {source} is a file, not a folder; give a folder of images, a Hub dataset id, "
                             "or a builtin: source.")
        if _scan_folder(str(found)).count == 0:
            raise UsageError(f"{option} {source}: no image files found in it; give a folder holding images, a Hub "
                             "dataset id, or a builtin: source.")


def _check_usable(dataset: ImageDataset | StreamingImageDataset) -> None:
    """Read items up to the first usable one; when there is none, raise one error naming the source and why.

    Without this, a source whose every image is bad fails far away (an empty batch in torch.stack). The bad
    images met on the way are warned about as usual (and, being recorded, never again in this run).
    """
    if isinstance(dataset, StreamingImageDataset):
        items = iter(dataset)
    else:
        items = (dataset[i] for i in range(len(dataset)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", BadImageWarning)  # once per file is ours to enforce, not the filter's
        usable = any(item is not None for item in items)
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


def _num_shards(table: datasets.IterableDataset) -> int:
    return int(getattr(table, "num_shards", None) or table.n_shards)  # n_shards: datasets before 3.x


def build_dataloader(dataset, batch_size: int, num_workers: int = 0, shuffle: bool = True, seed: int = 0,
                     drop_last: bool = True, ignore_signals=(), timeout: float = 0) -> DataLoader:
    """A DataLoader whose collate drops skipped items (a batch may come out smaller, or None if all failed).

    Map-style: the order is a permutation seeded by ``(seed, dataset.epoch)``, sharded ``rank::world_size``
    when torch.distributed is initialised. Call ``dataset.set_epoch(e)`` before each epoch; it changes both
    the order and the augmentations. Workers are not persistent so that they see the new epoch (`TrainingBatches`
    iterates one loader for the whole run instead, its epochs carried by the sampler).
    ``ignore_signals``: signals the worker processes ignore (the training loop's stop signals, which a signal to the
    whole process group would otherwise deliver to the workers too, killing them).
    ``timeout``: seconds to wait for a batch from the workers before failing (`TrainingBatches` names the cause);
    0 waits forever. Only with workers: without them the reads happen in this process.
    """
    # A private generator: iter(DataLoader) draws its workers' base seed from it, never from the global RNG
    # that the training loop's latents come from (a resumed run would otherwise draw different latents).
    common = dict(batch_size=batch_size, num_workers=num_workers, collate_fn=collate_images,
                  drop_last=drop_last, pin_memory=torch.cuda.is_available(),
                  timeout=timeout if num_workers > 0 else 0,
                  generator=torch.Generator().manual_seed(seed), worker_init_fn=ignore_in_workers(ignore_signals))
    if isinstance(dataset, torch.utils.data.IterableDataset):
        dataset.shuffle = shuffle  # shard order and shuffle buffer; a DataLoader cannot shuffle a stream
        return DataLoader(dataset, **common)
    sampler = EpochSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    return DataLoader(dataset, sampler=sampler, **common)


def _loader_like(loader: DataLoader, dataset, **how) -> DataLoader:
    """A DataLoader with `loader`'s workers, collate, pinning, timeout and worker setup, over `dataset`, drawing
    batches `how` says (batch_size, or batch_sampler)."""
    return DataLoader(dataset, num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory, timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                      generator=loader.generator, prefetch_factor=loader.prefetch_factor,
                      multiprocessing_context=loader.multiprocessing_context, **how)


def collate_images(items: list[dict | None]) -> dict | None:
    """Stack the items that were not skipped; None when every item of the batch was skipped.

    A stream's items carry their position; the batch keeps the last one (a batch comes from one stream).
    """
    items = [item for item in items if item is not None]
    if not items:
        return None
    positions = [item.pop("stream_position") for item in items if "stream_position" in item]
    batch = torch.utils.data.default_collate(items)
    if positions:
        batch["stream_position"] = positions[-1]
    return batch


class TrainingBatches:
    """The batches one training process draws, in order, from any position; the position is its state.

    One DataLoader serves the whole run: its workers live as long as the run (what `persistent_workers` would give)
    and its prefetching goes on across epochs. The position is counted here as batches arrive, without talking to
    the other processes and without reading any tensor:

    - map-style datasets: the epoch, and how many images of that epoch's order (a function of ``(seed, epoch)``)
      all processes have taken; a resume skips by index in that order and reads none of the skipped images;
    - streams: the position each stream (`StreamingImageDataset`) reported with its latest batch, and whose turn is
      next; a resume restores them, re-reading a bounded number of raw rows per stream.

    A batch whose images were all unreadable is dropped by the process that drew it, which draws the next one
    (`micro_batches` counts both). `state_dict()` is per process. `load_state_dict` continues exactly when the
    process count, batch size and (streams) DataLoader worker count are those of the run that saved it; otherwise a
    map-style dataset continues in the same epoch at the same image of its order, and a stream starts its epoch
    again; a warning says which.
    """

    def __init__(self, dataset, loader: DataLoader):
        self.dataset, self.loader = dataset, loader
        self.streaming = isinstance(dataset, torch.utils.data.IterableDataset)
        self.micro_batches = 0  # batches drawn, including those dropped as unusable
        # map-style: the epoch being drawn, the images of its order taken before this layout began (another process
        # count or batch size on resume), and the batches drawn since
        self._epoch, self.epoch_start, self.batches_in_epoch = 0, 0, 0
        # streams: stream -> the position its latest batch reported; the epoch of streams with none yet
        self.stream_positions: dict[int, dict] = {}
        self.first_epoch = 0
        self._iterator = None  # the generator of batches
        self._loader_iterator = None  # the DataLoader's iterator inside it, which owns the worker processes
        self._unusable = 0  # batches in a row whose images were all unreadable

    @property
    def epoch(self) -> int:
        """The epoch being drawn (streams: the earliest epoch among this process's streams)."""
        if not self.streaming:
            return self._epoch
        return min((p["epoch"] for p in self.stream_positions.values()), default=self.first_epoch)

    def _layout(self) -> dict:
        """What must match for a saved position to mean the same batches."""
        return {"num_processes": distributed.world_size(), "batch_size": self.loader.batch_size,
                "num_workers": max(1, self.loader.num_workers) if self.streaming else None}

    def _images_per_batch(self) -> int:
        return self.loader.batch_size * distributed.world_size()

    def state_dict(self) -> dict:
        state = {"micro_batches": self.micro_batches, **self._layout(), "epoch": self.epoch,
                 "data_revision": getattr(self.dataset, "revision", None)}
        if self.streaming:
            state.update(first_epoch=self.first_epoch, streams={str(k): v for k, v in self.stream_positions.items()})
        else:
            state.update(epoch_start=self.epoch_start, batches_in_epoch=self.batches_in_epoch,
                         images_in_epoch=self.epoch_start + self.batches_in_epoch * self._images_per_batch())
        return state

    def load_state_dict(self, state: dict) -> list[str]:
        """Continue from a saved position; returns warnings (empty when the continuation is exact)."""
        self.close()
        self.micro_batches = int(state["micro_batches"])
        warnings = []
        saved, ours = state.get("data_revision"), getattr(self.dataset, "revision", None)
        if saved is not None and ours is not None and saved != ours:
            warnings.append(f"--data {self.dataset.cfg.source} has changed since the checkpoint was written (then "
                            f"{saved}, now {ours}): the saved position is taken in the data as it is now, so the "
                            "rest of the epoch is not the images the run would have seen")
        changed = {k: (state.get(k), v) for k, v in self._layout().items() if state.get(k) != v}
        if self.streaming:
            return warnings + self._load_streams(state, changed)
        if "epoch_start" in state:
            epoch, start, done = int(state["epoch"]), int(state["epoch_start"]), int(state["batches_in_epoch"])
            images = int(state["images_in_epoch"])
        else:  # written before positions were kept by epoch: its layout's batches per epoch give the epoch
            per_epoch = self._epoch_batches(0, state["num_processes"], state["batch_size"])
            epoch, done = divmod(self.micro_batches, max(1, per_epoch))
            start, images = 0, done * state["batch_size"] * state["num_processes"]
        if changed:
            self._epoch, self.epoch_start, self.batches_in_epoch = epoch, images, 0
            warnings.append(f"{_changes(changed)}: the data continues in epoch {epoch} after the {images} images of "
                            "its order already taken, in the same order, cut into other batches")
        else:
            self._epoch, self.epoch_start, self.batches_in_epoch = epoch, start, done
        self._next_epoch_if_done()
        return warnings

    def _load_streams(self, state: dict, changed: dict) -> list[str]:
        positions = {int(k): v for k, v in state.get("streams", {}).items()}
        readable = all("draws" in p for p in positions.values())
        if readable and not {"num_processes", "num_workers"} & set(changed):  # the same streams
            self.stream_positions, self.first_epoch = positions, int(state.get("first_epoch", 0))
            if changed:  # the batch size alone: each stream goes on from its own position
                return [f"{_changes(changed)}: every stream continues where it was, but the batches are cut "
                        "differently"]
            return []
        self.stream_positions, self.first_epoch = {}, int(state.get("epoch", 0))
        why = _changes(changed) if readable else "the checkpoint's stream positions are of an earlier vqhit"
        return [f"{why}: the streams' positions do not carry over, so epoch {self.first_epoch} starts again from its "
                "beginning (images of this epoch already trained on are seen again)"]

    # -- map-style position --------------------------------------------------------------------------------------
    def _epoch_batches(self, start: int, num_processes: int | None = None, batch_size: int | None = None) -> int:
        """This process's batches in an epoch whose first `start` images of the order were already taken."""
        sampler = self.loader.sampler
        return sampler.batches(start, batch_size or self.loader.batch_size, self.loader.drop_last,
                               world_size=num_processes)

    def _next_epoch_if_done(self) -> None:
        while self.batches_in_epoch >= self._epoch_batches(self.epoch_start):
            if self._epoch_batches(0) == 0:
                raise UsageError(f"--data {self.dataset.cfg.source} has fewer images ({len(self.dataset)}) than one "
                                 f"batch per process ({self._images_per_batch()}); lower --batch-size")
            self._epoch, self.epoch_start, self.batches_in_epoch = self._epoch + 1, 0, 0

    # -- drawing -------------------------------------------------------------------------------------------------
    def __iter__(self):
        return self

    def close(self) -> None:
        """Stop the DataLoader's worker processes now (the position is kept: `next` goes on from it). Workers that
        ignore the stop signals (`ignore_signals`) must be stopped this way: at interpreter exit, multiprocessing
        ends them with SIGTERM and waits for them."""
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = self._loader_iterator = None  # the last reference: the DataLoader shuts its workers down

    def _stop_stalled_workers(self) -> None:
        """End the workers after a timeout. They ignore the stop signals, so the SIGTERM with which the DataLoader
        ends a worker that does not stop when asked leaves one stuck in a read alive, and the process would wait
        for it at exit."""
        workers = list(getattr(self._loader_iterator, "_workers", ()))
        self.close()
        for worker in workers:
            if worker.is_alive():
                worker.kill()
                worker.join()

    def __next__(self) -> dict:
        """The next usable batch of this process (a batch of only unreadable images is dropped here)."""
        if self._iterator is None:
            self._iterator = self._stream_batches() if self.streaming else self._indexed_batches()
        while True:
            try:
                batch = next(self._iterator)
            except RuntimeError as err:
                if not str(err).startswith("DataLoader timed out"):
                    raise
                self._stop_stalled_workers()
                raise UnavailableError(
                    f"no batch came from the DataLoader workers in {self.loader.timeout:g} s: reading --data "
                    f"{self.dataset.cfg.source} stalled (a network or file system that stopped answering?). Check "
                    "the source and resume; raise --data-timeout if reads are legitimately that slow") from None
            self.micro_batches += 1
            if not self.streaming:
                self.batches_in_epoch += 1
                self._next_epoch_if_done()
            if batch is not None:
                self._unusable = 0
                return batch
            self._unusable += 1
            if not self.streaming and self._unusable > self._epoch_batches(0):
                raise UsageError(f"a whole epoch of this process's share of --data {self.dataset.cfg.source} held no "
                                 "readable image (every batch unreadable); check the files")

    def _indexed_batches(self):
        start = self.epoch_start + self.batches_in_epoch * self._images_per_batch()
        sampler, size = self.loader.sampler, self.loader.batch_size
        order = _TrainingOrder(sampler, size, self.loader.drop_last, self._epoch, start)
        items = _TrainingItems(self.dataset, sampler, size)
        self._loader_iterator = iter(_loader_like(self.loader, items, batch_sampler=order))
        yield from self._loader_iterator

    def _stream_batches(self):
        turn = self.micro_batches % max(1, self.loader.num_workers)
        view = self.dataset.training_view(self.stream_positions, turn, self.first_epoch)
        self._loader_iterator = iter(_loader_like(self.loader, view, batch_size=self.loader.batch_size,
                                                  drop_last=False))
        for batch in self._loader_iterator:
            position = batch.pop("stream_position")
            self.stream_positions[position["stream"]] = position
            yield batch


_LAYOUT_NAMES = {"num_processes": "processes", "batch_size": "batch size", "num_workers": "DataLoader workers"}


def _changes(changed: dict) -> str:
    """What differs from the run that saved a position: 'processes 2 -> 1, batch size 2 -> 4'."""
    return ", ".join(f"{_LAYOUT_NAMES[key]} {saved} -> {now}" for key, (saved, now) in changed.items())


class _TrainingOrder(Sampler):
    """Batches of a map-style dataset, epoch after epoch without end, from image `start` of `epoch`'s order: what one
    DataLoader iterates for a whole run. Each epoch is cut as `EpochSampler` cuts it (this process's share, whole
    batches when `drop_last`), so a batch never spans two epochs. A batch is named by ``(epoch, start, number)``
    and `_TrainingItems` finds its images in the worker: the training process computes no order, only counts."""

    def __init__(self, sampler: EpochSampler, batch_size: int, drop_last: bool, epoch: int, start: int):
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last
        self.epoch, self.start = epoch, start

    def __iter__(self):
        epoch, start = self.epoch, self.start
        while True:
            for number in range(self.sampler.batches(start, self.batch_size, self.drop_last)):
                yield epoch, start, number
            epoch, start = epoch + 1, 0


class _TrainingItems(torch.utils.data.Dataset):
    """The items of the batches `_TrainingOrder` names, each augmented as its epoch says (the DataLoader passes a
    batch's name to `__getitems__`). The epoch's order is computed once per epoch in each worker."""

    def __init__(self, dataset: ImageDataset, sampler: EpochSampler, batch_size: int):
        self.dataset, self.sampler, self.batch_size = dataset, sampler, batch_size
        self._order = (None, [])  # ((epoch, start), this process's indices of that epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, batch: tuple[int, int, int]) -> list[dict | None]:
        epoch, start, number = batch
        if self._order[0] != (epoch, start):
            self._order = ((epoch, start), self.sampler.indices(epoch, start))
        first = number * self.batch_size
        return [self.dataset[(epoch, index)] for index in self._order[1][first:first + self.batch_size]]


# --------------------------------------------------------------------------------------------------
# Datasets


class _ImageRows:
    """Decode, check and transform one row; records which files were skipped or upsampled (see `_record`)."""

    def __init__(self, cfg: DataConfig, seed: int):
        self.cfg = cfg
        self.seed = seed
        self.epoch = 0
        self.dangling: dict[str, str] = {}  # dangling symlink -> its missing target (folders; set by build_dataset)
        self.converted: dict[str, str] = {}  # file name -> original PIL mode, for images converted to RGB
        self.revision: str | None = None  # what the source held when it was read (set by build_dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def skipped(self) -> dict[str, str]:
        """File name -> why it was skipped: "unreadable", "short side below min_size" or "dangling symlink"."""
        return {**{name: _REASONS[code] for name, code in self._outcomes() if code in _REASONS},
                **{link: "dangling symlink" for link in self.dangling}}

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    @property
    def conversions(self) -> Counter:
        """How many files of each original mode ("L", "P", "RGBA", "CMYK", "I;16", ...) became RGB."""
        return Counter(self.converted.values())

    def _item(self, row: dict, index: int, fallback_name: str, epoch: int) -> dict | None:
        value = row[self.cfg.image_column]
        name = _file_name(value) or fallback_name
        try:
            image = _decode(value)
        except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBomb...)
            return self._bad(index, name, _UNREADABLE, f"unreadable image ({type(err).__name__}: {err})",
                             "Pass --bad-images skip (bad_images='skip') to skip unreadable images.", epoch)
        if min(image.size) < self.cfg.min_size:
            return self._bad(index, name, _TOO_SMALL, f"image of {image.width}x{image.height} has a short side "
                             f"below min_size={self.cfg.min_size}", "Pass --bad-images skip (bad_images='skip') to "
                             "skip such images, or --min-size 0 to upsample them.", epoch)
        if min(image.size) < self.cfg.resolution and self._record(index, name, _UPSAMPLED, epoch) and \
                self._first_upsample():
            warnings.warn(f"{name} is {image.width}x{image.height}, smaller than the resolution {self.cfg.resolution}: "
                          "upsampled (bicubic), as ADM's protocol does. Further small images are upsampled without a "
                          "warning and counted (num_upsampled); set min_size to skip them instead.",
                          BadImageWarning, stacklevel=2)
        if image.mode != "RGB":
            self.converted.setdefault(name, image.mode)
            image = _to_rgb(image)
        generator = torch.Generator().manual_seed(_derive_seed(_ITEM, self.seed, epoch, index))
        item = {"image": _transform(image, self.cfg, generator), "index": index, "id": name}
        if self.cfg.label_column is not None:
            item["label"] = int(row[self.cfg.label_column])
        return item

    def _bad(self, index: int, name: str, code: int, problem: str, fix: str, epoch: int) -> None:
        if self.cfg.bad_images == "raise":
            raise UsageError(f"{name}: {problem}. {fix}")
        if self._record(index, name, code, epoch):
            warnings.warn(f"skipping {name}: {problem}", BadImageWarning, stacklevel=2)
        return None

    # Subclasses keep the record, and count `num_upsampled` from it.
    def _record(self, index: int, name: str, code: int, epoch: int) -> bool:
        """Note what became of an item; True the first time in this run that the item has this outcome."""
        raise NotImplementedError

    def _first_upsample(self) -> bool:
        """True for the first upsampled image of the run (the one that is warned about)."""
        raise NotImplementedError

    def _outcomes(self):
        """(file name, outcome code) of every item recorded so far."""
        raise NotImplementedError


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


class StreamingImageDataset(_ImageRows, torch.utils.data.IterableDataset):
    """Iterable dataset over a `datasets.IterableDataset`; skipped images are left out of the stream.

    The rows are split into ``world_size * num_workers`` *streams*, one per process and DataLoader worker. Each epoch
    the shards are put in a new order (seeded by ``(seed, epoch)``) and dealt to the streams (shard i of that order to
    stream i mod streams) when the shard count is a multiple of the stream count; otherwise every stream reads every
    shard and keeps one row in `streams`. A stream reads ``cfg.open_shards`` of its shards at a time, one row from each
    in turn, into a shuffle buffer of ``cfg.shuffle_buffer`` rows: each draw takes the row of a random slot and puts
    the next row read in its place, as `datasets.IterableDataset.shuffle` does; at the epoch's end the buffer is
    emptied in random order. Every random choice is seeded by ``(seed, epoch, stream, ...)``: `shuffle` False reads
    the shards in their order, one at a time, without a buffer.

    A position in a stream is small and exact (``item["stream_position"]``, carried to the batch by
    `collate_images`): the epoch, the number of draws, and where the shard readers were at the oldest row still in
    the buffer. Which slot holds which row follows from the slot draws alone (not from the data), so resuming from a
    position (`training_view`) reads the rows again from that point -- about ``shuffle_buffer * ln(shuffle_buffer)``
    raw rows, plus the skipped start of each open shard -- and decodes only the rows it yields.

    ``index`` is ``row * streams + stream`` (``row`` counting the rows the stream read in the epoch), so augmentations
    repeat exactly for the same process and worker counts. Iterating gives one epoch (`set_epoch`); the view that
    `TrainingBatches` iterates goes on from epoch to epoch, each stream on its own, and lets DataLoader worker ``w``
    play stream ``w + rotation``: a DataLoader always asks worker 0 first, and a resumed run must continue with the
    stream whose turn it was.
    """

    def __init__(self, table: datasets.IterableDataset, cfg: DataConfig, seed: int = 0, num_shards: int | None = None):
        super().__init__(cfg, seed)
        self.table = table
        self.num_shards = num_shards if num_shards is not None else _num_shards(table)
        self.shuffle = False  # set by build_dataloader
        self.endless = False  # a training view: epoch after epoch
        self.positions: dict[int, dict] = {}  # stream -> position to continue from (a training view)
        self.first_epoch = 0  # a training view: the epoch of streams without a position
        self.rotation = 0
        self._seen: dict[str, int] = {}  # file name -> outcome code, in this process
        self._upsample_warned = False

    def training_view(self, positions: dict[int, dict], rotation: int, first_epoch: int) -> StreamingImageDataset:
        """This dataset, endless, with each stream starting from its position (else at the start of `first_epoch`)
        and worker 0 playing stream `rotation`."""
        view = copy.copy(self)
        view.endless, view.positions, view.rotation, view.first_epoch = True, dict(positions), rotation, first_epoch
        return view

    # A stream has no fixed positions to keep shared flags for. Every epoch reads every file of the run once (by one
    # stream), so warning only in a stream's epoch 0 warns about each bad file once per run.
    def _record(self, index: int, name: str, code: int, epoch: int) -> bool:
        first = epoch == 0 and name not in self._seen
        self._seen[name] = code
        return first

    def _first_upsample(self) -> bool:
        first, self._upsample_warned = not self._upsample_warned, True
        return first

    @property
    def num_upsampled(self) -> int:
        """Images this process met whose short side is below the resolution, upsampled by the transform."""
        return sum(code == _UPSAMPLED for code in self._seen.values())

    def _outcomes(self):
        return self._seen.items()

    def __iter__(self):
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        stream = _Stream(self, distributed.rank() * num_workers + (worker_id + self.rotation) % num_workers,
                         distributed.world_size() * num_workers)
        if not self.endless:
            yield from stream.epoch(self.epoch)
            return
        start = self.positions.get(stream.id)
        epoch = start["epoch"] if start is not None else self.first_epoch
        while True:
            yielded = False
            for item in stream.epoch(epoch, start):
                yielded = True
                yield item
            if not yielded and start is None:  # a whole epoch without an image: the next would be the same
                raise UsageError(stream.why_empty())
            epoch, start = epoch + 1, None


_SLOT_BLOCK = 4096  # slot draws are made this many at a time, each block from its own seed
_EMPTY = np.iinfo(np.int64).max  # a buffer slot that holds no row
_READ_ROWS = 16  # raw rows a shard reader asks `datasets` for at once


class _Stream:
    """One stream of a `StreamingImageDataset`: its share of the rows, one epoch at a time, through the shuffle
    buffer. The buffer's slot s holds a row identified by its *input index* (the rows the stream read this epoch
    are numbered in the order read), kept in ``held``."""

    def __init__(self, dataset: StreamingImageDataset, stream: int, streams: int):
        self.dataset, self.id, self.streams = dataset, stream, streams
        self.size = dataset.cfg.shuffle_buffer if dataset.shuffle else 1
        self.width = dataset.cfg.open_shards if dataset.shuffle else 1
        self.by_shard = dataset.num_shards % streams == 0
        self.rows_read = 0

    def _seed(self, *numbers: int) -> torch.Generator:
        return torch.Generator().manual_seed(_derive_seed(*numbers))

    def _shards(self, epoch: int) -> list[int]:
        count = self.dataset.num_shards
        order = list(range(count))
        if self.dataset.shuffle:  # the same order on every stream: dealing it out gives each shard to one stream
            order = torch.randperm(count, generator=self._seed(_SHARDS, self.dataset.seed, epoch)).tolist()
        return order[self.id::self.streams] if self.by_shard else order

    def _keep(self, shard: int, row: int) -> bool:
        """Whether the stream takes raw row `row` of `shard`: all of its own shards, or one row in `streams` of each
        (starting at a row that depends on the shard, so that small shards are spread over the streams too)."""
        return self.by_shard or row % self.streams == (self.id + shard) % self.streams

    def _open(self, shard: int, skip: int):
        """The raw rows of `shard` after its first `skip`, as dicts (read, not decoded)."""
        table = self.dataset.table
        if self.dataset.num_shards > 1:
            table = split_dataset_by_node(table, rank=shard, world_size=self.dataset.num_shards)
        if skip:
            table = table.skip(skip)
        # .iter(), not iter(table): inside a DataLoader worker iter() would shard by worker a second time.
        for rows in table.iter(batch_size=_READ_ROWS):
            for values in zip(*rows.values()):
                yield dict(zip(rows, values))

    def _slots(self, epoch: int, block: int) -> np.ndarray:
        generator = self._seed(_SLOTS, self.dataset.seed, epoch, self.streams, self.id, block)
        return torch.randint(self.size, (_SLOT_BLOCK,), generator=generator).numpy()

    def _drain_order(self, epoch: int) -> list[int]:
        return torch.randperm(self.size, generator=self._seed(_DRAIN, self.dataset.seed, epoch, self.streams,
                                                              self.id)).tolist()

    def _held_after(self, epoch: int, draws: int) -> np.ndarray:
        """The input index each slot holds after `draws` draws that all put a new row in: found from the slot draws
        alone, looking back from the last until every slot's latest draw is found (about size * ln(size) draws)."""
        held, found = np.arange(self.size, dtype=np.int64), np.zeros(self.size, dtype=bool)
        for block in range((draws - 1) // _SLOT_BLOCK, -1, -1):
            first = block * _SLOT_BLOCK
            latest_first = self._slots(epoch, block)[:draws - first][::-1]  # this block's draws, the last first
            slots, back = np.unique(latest_first, return_index=True)
            new = ~found[slots]
            held[slots[new]] = self.size + (min(draws, first + _SLOT_BLOCK) - 1 - back[new])
            found[slots[new]] = True
            if found.all():
                break
        return held

    def epoch(self, epoch: int, start: dict | None = None):
        """The items of `epoch` (from the position `start`, when given), each carrying its position."""
        size, dataset = self.size, self.dataset
        lanes = _Lanes(self._open, self._shards(epoch), self._keep, self.width, start["lanes"] if start else None)
        buffer, held = [None] * size, np.full(size, _EMPTY, dtype=np.int64)
        every = max(1, size // 4)  # a reader snapshot every `every` rows: a resume re-reads at most that many more
        if start is None:
            draws, rows, read = 0, None, 0
            targets = {slot: slot for slot in range(size)}  # the fill: input index -> slot
        else:
            draws, rows, read = start["draws"], start["rows"], start["anchor"]
            # the draws that put a new row in; after them (the epoch's rows all read) the buffer empties
            refilled = draws if rows is None else min(draws, max(0, rows - size))
            held = self._held_after(epoch, refilled) if refilled else np.arange(size, dtype=np.int64)
            if rows is not None:
                held[held >= rows] = _EMPTY  # slots the fill never reached (an epoch shorter than the buffer)
                emptied = [slot for slot in self._drain_order(epoch) if held[slot] != _EMPTY][:draws - refilled]
                held[emptied] = _EMPTY
            targets = {int(index): slot for slot, index in enumerate(held) if index != _EMPTY}
        end = size + draws if rows is None else rows  # rows read before the next draw
        snapshots = deque([(read, lanes.state())])  # (input index, the readers' state before reading it)
        while read < end:  # the fill, or a resume's re-read from the snapshot
            if read % every == 0 and read != snapshots[-1][0]:
                snapshots.append((read, lanes.state()))
            row = lanes.read()
            if row is None:
                rows = end = read
                break
            if read in targets:
                buffer[targets[read]], held[targets[read]] = row, read
            read += 1
        held[[slot for slot in range(size) if buffer[slot] is None]] = _EMPTY
        draining = iter(slot for slot in self._drain_order(epoch) if held[slot] != _EMPTY)
        slots = None
        while True:
            if rows is None:
                if read % every == 0 and read != snapshots[-1][0]:
                    snapshots.append((read, lanes.state()))
                row = lanes.read()
                if row is None:
                    rows = read
                    draining = iter(slot for slot in self._drain_order(epoch) if held[slot] != _EMPTY)
            if rows is None:  # a random slot gives its row and takes the new one
                if draws % _SLOT_BLOCK == 0 or slots is None:
                    slots = self._slots(epoch, draws // _SLOT_BLOCK)
                slot = int(slots[draws % _SLOT_BLOCK])
                out, index = buffer[slot], int(held[slot])
                buffer[slot], held[slot] = row, read
                read += 1
            else:  # the epoch's rows are all read: the buffer empties in a random order
                slot = next(draining, None)
                if slot is None:
                    self.rows_read = rows
                    return
                out, index = buffer[slot], int(held[slot])
                buffer[slot], held[slot] = None, _EMPTY
            draws += 1
            item = dataset._item(out, index * self.streams + self.id, epoch=epoch,
                                 fallback_name=f"{dataset.cfg.source}[stream {self.id}, row {index}]")
            if item is not None:
                oldest = held.min()  # the oldest row still buffered: a resume reads again from a snapshot before it
                while len(snapshots) > 1 and snapshots[1][0] <= oldest:
                    snapshots.popleft()
                anchor, state = snapshots[0]
                item["stream_position"] = {"stream": self.id, "epoch": epoch, "draws": draws, "rows": rows,
                                           "anchor": anchor, "lanes": state}
                yield item

    def why_empty(self) -> str:
        source = self.dataset.cfg.source
        if self.rows_read == 0:
            return (f"--data {source}: its {self.dataset.num_shards} shard(s) give no rows to stream {self.id} of "
                    f"{self.streams} (one per process and DataLoader worker); lower --num-workers or the process "
                    "count")
        return (f"--data {source}: all {self.rows_read} images of stream {self.id} of {self.streams} (one per process "
                "and DataLoader worker) were skipped as unreadable or below --min-size; check the files")


class _Lanes:
    """The rows of a stream's shards for one epoch, `width` shards at a time, one row from each open shard in turn;
    when a shard ends the next one in `shards` takes its place. The state (which shards are open, how many raw rows
    of each were read, whose turn it is) is what a position keeps."""

    def __init__(self, open_shard, shards: list[int], keep, width: int, state: dict | None = None):
        self.open_shard, self.shards, self.keep = open_shard, shards, keep
        if state is None:
            count = min(width, len(shards))
            state = {"next": count, "open": [[ordinal, 0] for ordinal in range(count)], "turn": 0}
        self.next, self.turn = state["next"], state["turn"]
        self.open = [list(lane) for lane in state["open"]]  # [ordinal in shards, raw rows read]
        self.readers = [None] * len(self.open)

    def state(self) -> dict:
        return {"next": self.next, "open": [list(lane) for lane in self.open], "turn": self.turn}

    def read(self) -> dict | None:
        """The next row, or None when every shard is read."""
        while self.open:
            lane = self.open[self.turn]
            shard = self.shards[lane[0]]
            if self.readers[self.turn] is None:
                self.readers[self.turn] = self.open_shard(shard, lane[1])
            for row in self.readers[self.turn]:
                lane[1] += 1
                if self.keep(shard, lane[1] - 1):
                    self.turn = (self.turn + 1) % len(self.open)
                    return row
            if self.next < len(self.shards):  # this shard is done: the next one takes its lane
                self.open[self.turn], self.readers[self.turn] = [self.next, 0], None
                self.next += 1
            else:
                del self.open[self.turn], self.readers[self.turn]
                self.turn = self.turn % len(self.open) if self.open else 0
        return None



# --------------------------------------------------------------------------------------------------
# Decoding


def _file_name(value) -> str | None:
    if isinstance(value, dict):
        return value.get("path")
    return value if isinstance(value, str) else None


def _decode(value) -> Image.Image:
    """Open an image column value (dict of bytes/path, a path, raw bytes, or a PIL image) and load it."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, str):
        value = {"path": value, "bytes": None}
    elif isinstance(value, (bytes, bytearray)):
        value = {"path": None, "bytes": bytes(value)}
    elif not isinstance(value, dict):
        raise TypeError(f"an image column value must be bytes, a path or a dict, not {type(value).__name__}")
    # datasets' own decoder reads local and remote (hf://, zip://) paths, loads the pixels and applies
    # the EXIF orientation; calling it here keeps its errors in our hands, next to the file name.
    return datasets.Image(decode=True).decode_example(value)


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode: 16-bit scaled down (PIL would clip), alpha composited on white."""
    if image.mode.startswith("I"):  # 16/32-bit integer grey, as 16-bit PNGs open
        grey = np.asarray(image, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")
    return image.convert("RGB")


# --------------------------------------------------------------------------------------------------
# Transforms: PIL crops and antialiased bicubic resizes, then a tensor in [-1, 1] and the flip


def _transform(image: Image.Image, cfg: DataConfig, generator: torch.Generator) -> torch.Tensor:
    size, (width, height), kind = cfg.resolution, image.size, cfg.transform
    if kind == "adm_center_crop":
        image = center_crop_adm(image, size)
    elif kind == "resize":  # whole image to size x size (datasets already square, e.g. FFHQ)
        image = image if image.size == (size, size) else image.resize((size, size), Image.BICUBIC)
    else:
        side = min(width, height)
        if kind.startswith("imagenet_gan"):
            side = round(IMAGENET_GAN_CROP * side)  # round half to even, as the release's tf.math.rint
        if kind == "random_crop" and cfg.min_crop_area < 1:
            area = cfg.min_crop_area + (1 - cfg.min_crop_area) * float(torch.rand(1, generator=generator))
            side = max(1, round(side * area ** 0.5))
        if kind in ("random_crop", "imagenet_gan"):
            left = _randint(width - side + 1, generator)
            top = _randint(height - side + 1, generator)
        elif kind == "center_crop":
            left, top = (width - side) // 2, (height - side) // 2
        else:  # imagenet_gan_eval: the release's center_crop rounds the offset up
            left, top = (width - side + 1) // 2, (height - side + 1) // 2
        image = image.resize((size, size), Image.BICUBIC, box=(left, top, left + side, top + side))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    if cfg.flip and _randint(2, generator) == 1:
        pixels = pixels.flip(2)
    # pixels / 127.5 - 1 in one float copy, laid out (3, R, R), then in place: the same values at a third of the time
    # of converting the (R, R, 3) view and copying the floats into place (30 ms at 1024 on one thread)
    return torch.empty(pixels.shape, dtype=torch.float32).copy_(pixels).div_(127.5).sub_(1.0)


def center_crop_adm(pil_image: Image.Image, size: int) -> Image.Image:
    """ADM's evaluation center crop (guided-diffusion `center_crop_arr`), returned as an RGB PIL image.

    Box-downsample by 2 while the short side is >= 2 * size (for 256: while >= 512), so the final bicubic
    resize never shrinks by more than 2x and does not alias; then bicubic-resize the short side to `size`
    and cut the central size x size square.
    """
    image = pil_image.convert("RGB")
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def _randint(high: int, generator: torch.Generator) -> int:
    return int(torch.randint(high, (1,), generator=generator))


# purposes, so that the seeds of different draws never coincide
_ITEM, _ORDER, _SHARDS, _SLOTS, _DRAIN, _PARTITION = 1, 2, 4, 5, 6, 7


def _derive_seed(*numbers: int) -> int:
    """A 63-bit seed mixing the numbers well (nearby epochs/indices give unrelated streams)."""
    state = np.random.SeedSequence(list(numbers)).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


# --------------------------------------------------------------------------------------------------
# Sources


def _load_folder(folder: str, cfg: DataConfig) -> tuple[datasets.Dataset, dict, str]:
    """The folder's `imagefolder` table, its dangling symlinks (link -> missing target), checked first (imagefolder
    drops dangling links silently and fails cryptically when no file is left), and its revision.

    Read as a table of file paths (the images themselves are read when used) also when the folder is to stream:
    `from_hf_dataset` then cuts it into shards; `imagefolder` would stream a folder as one shard, in class order."""
    listing = _scan_folder(folder)
    count, dangling = listing.count, listing.dangling
    if count == 0:
        raise UsageError(f"--data {folder}: no image files found in it; give a folder holding images (sub-folders "
                         "become labels), a Hub dataset id, or builtin:photos.")
    if dangling:
        link, target = next(iter(dangling.items()))
        if len(dangling) == count:
            raise UsageError(f"no usable image in {folder!r}: all {count} image files are dangling symlinks (e.g. "
                             f"{link} -> {target}, which does not exist); restore their targets or point "
                             "--data at the real images.")
        if cfg.bad_images == "raise":
            raise UsageError(f"{link}: dangling symlink to {target}, which does not exist ({len(dangling)} such links "
                             f"in {folder!r}). Restore the targets, or pass --bad-images skip (bad_images='skip') to "
                             f"skip them.")
        if distributed.rank() == 0:  # every process lists the folder; one is enough to tell
            for link, target in dangling.items():
                warnings.warn(f"skipping {link}: dangling symlink to {target}, which does not exist",
                              BadImageWarning, stacklevel=3)
    # A local folder needs no network: without this, datasets pings its download counter (a request to S3 that
    # waits up to 3 s for an answer) for the imagefolder builder on every load.
    counting, datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = datasets.config.HF_UPDATE_DOWNLOAD_COUNTS, False
    try:
        table = datasets.load_dataset("imagefolder", data_dir=folder, split=cfg.split, cache_dir=cfg.cache_dir)
    finally:
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = counting
    return table, dangling, listing.revision


class _Listing(NamedTuple):
    count: int  # image files
    dangling: dict[str, str]  # dangling symlink -> its missing target
    revision: str  # the file count and a digest of the names: another set of files, another revision


def _scan_folder(folder: str) -> _Listing:
    """The image files a folder tree holds (by extension, as imagefolder): how many, which are dangling symlinks,
    and the revision their names make.

    One pass of os.scandir: its entries know whether they are links without a stat, so only links cost a stat.
    """
    extensions = set(Image.registered_extensions())
    names, dangling, folders = [], {}, [folder]
    while folders:
        with os.scandir(folders.pop()) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                if entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
                elif os.path.splitext(entry.name)[1].lower() in extensions:
                    names.append(os.path.relpath(entry.path, folder))
                    if entry.is_symlink() and not os.path.exists(entry.path):
                        dangling[entry.path] = os.readlink(entry.path)
    return _Listing(len(names), dangling, _names_revision(names))


def _names_revision(names) -> str:
    """'N images, names <digest>': what a local or built-in source is, without reading the images."""
    names = sorted(names)
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    return f"{len(names)} images, names {digest}"


def _hub_revision(hub_id: str, table) -> str | None:
    """The Hub dataset's commit (asked of the Hub), else, offline, the fingerprint `datasets` gave the downloaded
    table (it follows the files' revision); None for an offline stream, which then goes unchecked."""
    try:
        from huggingface_hub import HfApi

        return f"commit {HfApi().dataset_info(hub_id, timeout=30).sha}"
    except Exception:  # noqa: BLE001 - offline, or a Hub that does not answer: fall back, never fail the run
        fingerprint = getattr(table, "_fingerprint", None)
        return f"fingerprint {fingerprint}" if fingerprint else None


@lru_cache(maxsize=4)
def builtin_photos(tile: int = 128, photos: tuple[str, ...] = BUILTIN_PHOTOS) -> datasets.Dataset:
    """Tiles of ``tile`` pixels, stride ``tile // 2``, cut from the bundled photographs.

    The training photos (BUILTIN_PHOTOS) give 201 tiles at tile=128 (resolution <= 128), 34 at 256. Deterministic
    and offline: the photographs are files inside installed wheels (see the module docstring for their licences).
    Stored as PNG bytes so they go through the same decode path as any other dataset.
    """
    crops = []
    for name in photos:
        photo = _photo(name)
        height, width = photo.shape[:2]
        stride = tile // 2
        for top in range(0, height - tile + 1, stride):
            for left in range(0, width - tile + 1, stride):
                crops.append((f"{name}/y{top:04d}_x{left:04d}.png", photo[top:top + tile, left:left + tile]))
    if not crops:
        raise ValueError(f"builtin photos: tile={tile} is larger than every photograph; use a resolution <= 400.")
    return _png_table(crops)


SQUARES = ("centre", "top-left", "top-right", "bottom-left", "bottom-right")


@lru_cache(maxsize=4)
def whole_photos(photos: tuple[str, ...]) -> datasets.Dataset:
    """Each photograph as the squares of its short side: the centre one (ADM's evaluation crop) and the four
    corners, each square once (a square photo is one image). A transform then downsamples each square whole,
    which is how a photograph reaches a tokenizer in use. A landscape photograph gives three squares (its
    corners coincide in pairs): left, centre, right; the held-out photographs give 12 images."""
    crops = []
    for name in photos:
        photo = _photo(name)
        height, width = photo.shape[:2]
        side = min(height, width)
        corners = {"centre": ((height - side) // 2, (width - side) // 2), "top-left": (0, 0),
                   "top-right": (0, width - side), "bottom-left": (height - side, 0),
                   "bottom-right": (height - side, width - side)}
        seen = set()
        for square in SQUARES:
            top, left = corners[square]
            if (top, left) not in seen:
                seen.add((top, left))
                crops.append((f"{name}/{square}.png", photo[top:top + side, left:left + side]))
    return _png_table(crops)


def _png_table(crops: list[tuple[str, np.ndarray]]) -> datasets.Dataset:
    """A table of PNG-encoded (path, pixels) crops, its paths prefixed by the package that ships the photograph."""
    images = []
    for path, pixels in crops:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
        name = path.split("/")[0]
        package = PACKAGED_PHOTOS[name][0] if name in PACKAGED_PHOTOS else "skimage"
        images.append({"bytes": buffer.getvalue(), "path": f"{package}:{path}"})
    features = datasets.Features({"image": datasets.Image(decode=False)})
    return datasets.Dataset.from_dict({"image": images}, features=features)


def _photo(name: str) -> np.ndarray:
    """One of the bundled photographs as (H, W, 3) uint8; grey ones are repeated into RGB."""
    if name in PACKAGED_PHOTOS:
        package, file, pip_name = PACKAGED_PHOTOS[name]
        # find_spec locates the installed package without importing it (importing scikit-learn takes seconds)
        spec = importlib.util.find_spec(package)
        path = Path(spec.submodule_search_locations[0]) / file if spec is not None else None
        if path is None or not path.is_file():
            raise ValueError(f"the built-in photograph {name!r} ships inside {pip_name}, which is not installed; "
                             f"install it (pip install {pip_name}) or reinstall vqhit, which depends on it.")
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    import skimage.data

    photo = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    return np.repeat(photo[..., None], 3, axis=2) if photo.ndim == 2 else photo


# --------------------------------------------------------------------------------------------------
# Order


class EpochSampler(Sampler):
    """Indices permuted by a generator seeded from ``(seed, dataset.epoch)``, then sharded ``rank::world_size``.

    drop_last=True cuts the permutation to a multiple of world_size so every process takes the same number
    of steps (DDP training); drop_last=False keeps every index once, shards uneven, no padding (evaluation).
    `indices(epoch, start)` is one process's share of an epoch whose first `start` images of the order were taken
    already (by a run with another process count, say): the rest of the order, sharded the same way.
    """

    def __init__(self, dataset, shuffle: bool = True, seed: int = 0, drop_last: bool = True,
                 rank: int | None = None, world_size: int | None = None):
        self.dataset, self.shuffle, self.seed, self.drop_last = dataset, shuffle, seed, drop_last
        self.rank = distributed.rank() if rank is None else rank
        self.world_size = distributed.world_size() if world_size is None else world_size

    def _shared(self, start: int, world_size: int) -> int:
        """How many images of the order after `start` the processes share out."""
        left = max(0, len(self.dataset) - start)
        return left - left % world_size if self.drop_last else left

    def __len__(self) -> int:
        return len(range(self.rank, self._shared(0, self.world_size), self.world_size))

    def batches(self, start: int, batch_size: int, drop_last: bool, world_size: int | None = None) -> int:
        """This process's batches of `batch_size` in an epoch from image `start` (with `world_size` processes)."""
        world_size = world_size or self.world_size
        mine = len(range(self.rank, self._shared(start, world_size), world_size))
        return mine // batch_size if drop_last else -(-mine // batch_size)

    def indices(self, epoch: int, start: int = 0) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(_derive_seed(_ORDER, self.seed, epoch))
            order = torch.randperm(len(self.dataset), generator=generator)
        else:
            order = torch.arange(len(self.dataset))
        return order[start:start + self._shared(start, self.world_size)][self.rank::self.world_size].tolist()

    def __iter__(self):
        return iter(self.indices(getattr(self.dataset, "epoch", 0)))


def _is_string(feature) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")
