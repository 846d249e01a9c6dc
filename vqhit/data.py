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
  become a ``label`` column).
* a Hub dataset id -- ``datasets.load_dataset(id, split=..., streaming=...)``.

Images are decoded here, not by `datasets` (the image column is cast to ``Image(decode=False)``), so
an unreadable file is caught in this module with its name: it is skipped with one warning per file
and counted, or raises a ``ValueError`` naming the file (``DataConfig.bad_images``). A dangling symlink
in a folder is a bad image too (the ``imagefolder`` loader would drop it silently). "One warning per
file" holds per run, whatever the DataLoader workers: DataLoader workers are new processes every epoch,
so what a map-style dataset learnt about each position (skipped, upsampled) lives in a small tensor in
shared memory that every worker of the run reads and writes (one byte per image); it also gives the
main process the run's counts. A source with no usable image at all fails when it is built, with one
error naming it. Images smaller than the resolution are upsampled (bicubic), as ADM's evaluation crop
does; ``min_size`` makes those below it bad images instead. Every random
draw for item ``i`` comes from a generator seeded by ``(seed, epoch, i)``, so a map-style dataset
returns the same tensor for the same ``(seed, epoch, index)`` whatever the worker count or order:
training can resume exactly.
"""
from __future__ import annotations

import importlib.util
import io
import itertools
import os
import warnings
from collections import Counter
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node
from PIL import Image
from torch.utils.data import DataLoader, Sampler, get_worker_info

from . import distributed
from .downloads import local_or_hub
from .errors import UsageError
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
    shuffle_window: int = 1000  # streaming only: each stream is shuffled in consecutive windows of this many rows
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


# --------------------------------------------------------------------------------------------------
# Public builders


def build_dataset(cfg: DataConfig, seed: int = 0) -> ImageDataset | StreamingImageDataset:
    """The dataset `cfg` describes: map-style, or iterable when ``cfg.streaming``.

    A mistyped local path gets "no such folder", never a Hub lookup (vqhit.downloads.local_or_hub). The items
    are read up to the first usable one, so a source with none fails here with one error naming it.
    """
    dangling = {}
    if cfg.split != "train" and (cfg.source in BUILTIN_SOURCES or os.path.isdir(os.path.expanduser(cfg.source))):
        # A built-in set or a plain image folder has one split; another must not be accepted (and recorded in reports)
        raise UsageError(f"--split {cfg.split}: {cfg.source} has only the split 'train' (a local folder or a built-in "
                         f"set is one split); leave --split out, or point --data at the images of that split.")
    if cfg.source in BUILTIN_SOURCES:
        photos, cut = BUILTIN_SOURCES[cfg.source]
        table = builtin_photos(tile=max(128, cfg.resolution), photos=photos) if cut == "tiles" else whole_photos(photos)
        if cfg.streaming:
            table = table.to_iterable_dataset()
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
        table, dangling = _load_folder(str(found), cfg) if isinstance(found, Path) else (found, {})
    dataset = from_hf_dataset(table, cfg, seed=seed)
    dataset.dangling = dangling
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
        if _scan_folder(str(found))[0] == 0:
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
    """Wrap a `datasets` table whose ``cfg.image_column`` holds images (bytes, paths or `Image` features)."""
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
        if cfg.max_images is not None:
            table = table.take(cfg.max_images)
        return StreamingImageDataset(table, cfg, seed)
    if cfg.max_images is not None:
        table = table.select(range(min(cfg.max_images, len(table))))
    if string_labels:
        table = table.class_encode_column(cfg.label_column)  # class names -> ids, sorted alphabetically
    return ImageDataset(table, cfg, seed)


def build_dataloader(dataset, batch_size: int, num_workers: int = 0, shuffle: bool = True, seed: int = 0,
                     drop_last: bool = True, ignore_signals=()) -> DataLoader:
    """A DataLoader whose collate drops skipped items (a batch may come out smaller, or None if all failed).

    Map-style: the order is a permutation seeded by ``(seed, dataset.epoch)``, sharded ``rank::world_size``
    when torch.distributed is initialised. Call ``dataset.set_epoch(e)`` before each epoch; it changes both
    the order and the augmentations. Workers are not persistent so that they see the new epoch.
    ``ignore_signals``: signals the worker processes ignore (the training loop's stop signals, which a signal to the
    whole process group would otherwise deliver to the workers too, killing them).
    """
    # A private generator: iter(DataLoader) draws its workers' base seed from it, never from the global RNG
    # that the training loop's latents come from (a resumed run would otherwise draw different latents).
    common = dict(batch_size=batch_size, num_workers=num_workers, collate_fn=collate_images,
                  drop_last=drop_last, pin_memory=torch.cuda.is_available(),
                  generator=torch.Generator().manual_seed(seed), worker_init_fn=ignore_in_workers(ignore_signals))
    if isinstance(dataset, torch.utils.data.IterableDataset):
        dataset.shuffle = shuffle  # datasets' buffer shuffle; a DataLoader cannot shuffle a stream
        return DataLoader(dataset, **common)
    sampler = EpochSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    return DataLoader(dataset, sampler=sampler, **common)


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


class SkipFirst(Sampler):
    """A sampler without its first `n` indices: where a resumed run picks up inside an epoch."""

    def __init__(self, sampler: Sampler, n: int):
        self.sampler, self.n = sampler, n

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.n, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.n)


class TrainingBatches:
    """The batches one training process draws, in order, from any position; the position is its state.

    Every process draws the same number of batches (`micro_batches`, counting batches whose images were all
    unreadable: they are skipped on every process together, so the processes stay in step). Resuming costs the
    same at any position:

    - map-style datasets: the order is a function of ``(seed, epoch)``, so a resume skips by index in the sampler
      and reads none of the skipped images;
    - streams: each process keeps the position of each of its streams (`StreamingImageDataset`) and which
      stream's turn it is; a resume restores them, re-reading at most one shuffle window of raw rows per stream.

    `state_dict()` is per process. `load_state_dict` continues exactly when the process count, batch size and
    DataLoader worker count are those of the run that saved it; otherwise it continues at the same image count,
    rounded up to whole batches (map-style), or at the start of the stream's current epoch (streams), and says so.
    """

    def __init__(self, dataset, loader: DataLoader):
        self.dataset, self.loader = dataset, loader
        self.streaming = isinstance(dataset, torch.utils.data.IterableDataset)
        self.micro_batches = 0
        self.epoch = 0
        self.batches_in_epoch = 0  # streams: batches drawn in this epoch, so whose turn is next
        self.stream_positions: dict[int, dict] = {}
        self._iterator = None

    def _layout(self) -> dict:
        """What must match for a saved position to mean the same images."""
        return {"num_processes": distributed.world_size(), "batch_size": self.loader.batch_size,
                "num_workers": max(1, self.loader.num_workers) if self.streaming else None}

    def state_dict(self) -> dict:
        state = {"micro_batches": self.micro_batches, **self._layout()}
        if self.streaming:
            state.update(epoch=self.epoch, batches_in_epoch=self.batches_in_epoch,
                         streams={str(k): v for k, v in self.stream_positions.items()})
        return state

    def load_state_dict(self, state: dict) -> list[str]:
        """Continue from a saved position; returns warnings (empty when the continuation is exact)."""
        saved = {k: state.get(k) for k in self._layout()}
        self._iterator = None
        if saved == self._layout():
            self.micro_batches = int(state["micro_batches"])
            if self.streaming:
                self.epoch, self.batches_in_epoch = int(state["epoch"]), int(state["batches_in_epoch"])
                self.stream_positions = {int(k): v for k, v in state["streams"].items()}
            return []
        changed = ", ".join(f"{k} {saved[k]} -> {v}" for k, v in self._layout().items() if saved[k] != v)
        if self.streaming:
            self.epoch = int(state.get("epoch", 0))
            self.micro_batches = int(state["micro_batches"])
            return [f"{changed}: the stream's positions do not carry over, so its epoch {self.epoch} starts again "
                    "from its beginning (images of this epoch already trained on are seen again)"]
        images = state["micro_batches"] * state["batch_size"] * state["num_processes"]
        self.micro_batches = -(-images // (self.loader.batch_size * distributed.world_size()))  # whole batches, up
        return [f"{changed}: the data continues at the same image count ({images}, rounded up to whole batches), "
                "not with the same batches"]

    def __iter__(self):
        return self

    def close(self) -> None:
        """Stop the DataLoader's worker processes now (the position is kept: `next` goes on from it). Workers that
        ignore the stop signals (`ignore_signals`) must be stopped this way: at interpreter exit, multiprocessing
        ends them with SIGTERM and waits for them."""
        if self._iterator is not None:
            self._iterator.close()  # drops the DataLoader iterator, which shuts its workers down
            self._iterator = None

    def __next__(self) -> dict:
        """The next batch that every process can use (a batch of only unreadable images is skipped by all)."""
        if self._iterator is None:
            self._iterator = self._stream_batches() if self.streaming else self._indexed_batches()
        while True:
            batch = next(self._iterator)
            self.micro_batches += 1
            empty = torch.tensor([float(batch is None)])
            if not distributed.all_reduce_sum(empty).item():
                return batch

    def _indexed_batches(self):
        epoch, skip = divmod(self.micro_batches, len(self.loader))
        while True:
            self.dataset.set_epoch(epoch)
            loader = self.loader
            if skip:  # skip by index: seen images are not decoded again
                bs = loader.batch_size
                loader = DataLoader(self.dataset, batch_size=bs, sampler=SkipFirst(loader.sampler, skip * bs),
                                    num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                                    drop_last=loader.drop_last, generator=loader.generator,
                                    worker_init_fn=loader.worker_init_fn)
                skip = 0
            yield from loader
            epoch += 1

    def _stream_batches(self):
        num_workers = max(1, self.loader.num_workers)
        while True:
            self.dataset.set_epoch(self.epoch)
            self.dataset.resume_from = {k: v for k, v in self.stream_positions.items() if v["epoch"] == self.epoch}
            self.dataset.rotation = self.batches_in_epoch % num_workers
            for batch in self.loader:
                if batch is not None and "stream_position" in batch:
                    position = batch.pop("stream_position")
                    self.stream_positions[position["stream"]] = position
                self.batches_in_epoch += 1
                yield batch
            self.epoch, self.batches_in_epoch, self.stream_positions = self.epoch + 1, 0, {}


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

    def _item(self, row: dict, index: int, fallback_name: str) -> dict | None:
        value = row[self.cfg.image_column]
        name = _file_name(value) or fallback_name
        try:
            image = _decode(value)
        except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBomb...)
            return self._bad(index, name, _UNREADABLE, f"unreadable image ({type(err).__name__}: {err})",
                             "Pass --bad-images skip (bad_images='skip') to skip unreadable images.")
        if min(image.size) < self.cfg.min_size:
            return self._bad(index, name, _TOO_SMALL, f"image of {image.width}x{image.height} has a short side "
                             f"below min_size={self.cfg.min_size}", "Pass --bad-images skip (bad_images='skip') to "
                             "skip such images, or --min-size 0 to upsample them.")
        if min(image.size) < self.cfg.resolution and self._record(index, name, _UPSAMPLED) and self._first_upsample():
            warnings.warn(f"{name} is {image.width}x{image.height}, smaller than the resolution {self.cfg.resolution}: "
                          "upsampled (bicubic), as ADM's protocol does. Further small images are upsampled without a "
                          "warning and counted (num_upsampled); set min_size to skip them instead.",
                          BadImageWarning, stacklevel=2)
        if image.mode != "RGB":
            self.converted.setdefault(name, image.mode)
            image = _to_rgb(image)
        generator = torch.Generator().manual_seed(_derive_seed(_ITEM, self.seed, self.epoch, index))
        item = {"image": _transform(image, self.cfg, generator), "index": index, "id": name}
        if self.cfg.label_column is not None:
            item["label"] = int(row[self.cfg.label_column])
        return item

    def _bad(self, index: int, name: str, code: int, problem: str, fix: str) -> None:
        if self.cfg.bad_images == "raise":
            raise UsageError(f"{name}: {problem}. {fix}")
        if self._record(index, name, code):
            warnings.warn(f"skipping {name}: {problem}", BadImageWarning, stacklevel=2)
        return None

    # Subclasses keep the record, and count `num_upsampled` from it.
    def _record(self, index: int, name: str, code: int) -> bool:
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
    """

    def __init__(self, table: datasets.Dataset, cfg: DataConfig, seed: int = 0):
        super().__init__(cfg, seed)
        self.table = table
        # Shared memory: DataLoader workers (new processes each epoch) write what they find here, so each bad
        # file is warned about once per run and the main process sees the run's counts.
        self._status = torch.zeros(len(table), dtype=torch.uint8).share_memory_()
        self._upsample_warned = torch.zeros(1, dtype=torch.bool).share_memory_()

    def _record(self, index: int, name: str, code: int) -> bool:
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

    def __getitem__(self, index: int) -> dict | None:
        return self._item(self.table[int(index)], int(index), fallback_name=f"{self.cfg.source}[{index}]")


class StreamingImageDataset(_ImageRows, torch.utils.data.IterableDataset):
    """Iterable dataset over a `datasets.IterableDataset`; skipped images are left out of the stream.

    The rows are split into ``world_size * num_workers`` *streams*, one per process and DataLoader worker, with
    `datasets.distributed.split_dataset_by_node` (by shard when the shards divide evenly, else every n-th row).
    Each stream is shuffled in consecutive windows of ``cfg.shuffle_window`` rows, each window permuted by a
    generator seeded by ``(seed, epoch, stream, window)``. So a position in a stream is small and exact: the
    `datasets` state at the start of the current window and the offset inside it (``item["stream_position"]``,
    carried to the batch by `collate_images`). Resuming from it (`resume_from`) reads at most one window of raw
    rows again and decodes none of the rows it skips, whatever the position.

    ``index`` is ``row * streams + stream`` (``row`` counting the stream's rows), so augmentations repeat exactly
    for the same process and worker counts. `rotation` lets DataLoader worker ``w`` play stream ``w + rotation``:
    a DataLoader always asks worker 0 first, and a resumed run must continue with the stream whose turn it was.
    """

    def __init__(self, table: datasets.IterableDataset, cfg: DataConfig, seed: int = 0):
        super().__init__(cfg, seed)
        self.table = table
        self.shuffle = False  # set by build_dataloader
        self.resume_from: dict[int, dict] = {}  # stream -> stream_position to continue from (this epoch only)
        self.rotation = 0
        self._seen: dict[str, int] = {}  # file name -> outcome code, in this process
        self._upsample_warned = False

    # A stream has no fixed positions to keep shared flags for. Every epoch reads every file of this process's
    # share once (by one worker), so warning only in epoch 0 warns about each bad file once per run.
    def _record(self, index: int, name: str, code: int) -> bool:
        first = self.epoch == 0 and name not in self._seen
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
        streams = distributed.world_size() * num_workers
        stream = distributed.rank() * num_workers + (worker_id + self.rotation) % num_workers
        table = split_dataset_by_node(self.table, rank=stream, world_size=streams)  # a copy, also for 1 stream
        table.set_epoch(self.epoch)
        start = self.resume_from.get(stream)
        window, skip, window_state = 0, 0, None
        if start is not None and start["epoch"] == self.epoch:
            window, skip, window_state = start["window"], start["offset"], start["window_state"]
            if window_state is not None:
                table.load_state_dict(window_state)
        size = self.cfg.shuffle_window if self.shuffle else 1
        # .iter(), not iter(table): inside a DataLoader worker iter() would shard by worker a second time.
        rows = (batch for batch in table.iter(batch_size=1))
        while True:
            chunk = [{k: v[0] for k, v in batch.items()} for batch in itertools.islice(rows, size)]
            if not chunk:
                return
            order = range(len(chunk))
            if size > 1:
                generator = torch.Generator().manual_seed(_derive_seed(_WINDOW, self.seed, self.epoch, stream, window))
                order = torch.randperm(len(chunk), generator=generator).tolist()
            for offset in range(skip, len(chunk)):
                row = window * size + offset
                item = self._item(chunk[order[offset]], row * streams + stream,
                                  fallback_name=f"{self.cfg.source}[stream {stream}, item {row}]")
                if item is not None:
                    item["stream_position"] = {"stream": stream, "epoch": self.epoch, "window": window,
                                               "offset": offset + 1, "window_state": window_state}
                    yield item
            window, skip, window_state = window + 1, 0, table.state_dict()


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
    return (pixels.float() / 127.5 - 1.0).contiguous()


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


_ITEM, _ORDER, _WINDOW = 1, 2, 3  # purposes, so item, order and window seeds never coincide


def _derive_seed(*numbers: int) -> int:
    """A 63-bit seed mixing the numbers well (nearby epochs/indices give unrelated streams)."""
    state = np.random.SeedSequence(list(numbers)).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


# --------------------------------------------------------------------------------------------------
# Sources


def _load_folder(folder: str, cfg: DataConfig) -> tuple[datasets.Dataset | datasets.IterableDataset, dict]:
    """The folder's `imagefolder` table and its dangling symlinks (link -> missing target), checked first:
    imagefolder drops dangling links silently and fails cryptically when no file is left."""
    count, dangling = _scan_folder(folder)
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
        table = datasets.load_dataset("imagefolder", data_dir=folder, split=cfg.split,
                                      streaming=cfg.streaming, cache_dir=cfg.cache_dir)
    finally:
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = counting
    return table, dangling


def _scan_folder(folder: str) -> tuple[int, dict[str, str]]:
    """How many image files the folder tree holds (by extension, as imagefolder), and which are dangling symlinks.

    One pass of os.scandir: its entries know whether they are links without a stat, so only links cost a stat.
    """
    extensions = set(Image.registered_extensions())
    count, dangling, folders = 0, {}, [folder]
    while folders:
        with os.scandir(folders.pop()) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                if entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
                elif os.path.splitext(entry.name)[1].lower() in extensions:
                    count += 1
                    if entry.is_symlink() and not os.path.exists(entry.path):
                        dangling[entry.path] = os.readlink(entry.path)
    return count, dangling


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
    """

    def __init__(self, dataset, shuffle: bool = True, seed: int = 0, drop_last: bool = True,
                 rank: int | None = None, world_size: int | None = None):
        self.dataset, self.shuffle, self.seed, self.drop_last = dataset, shuffle, seed, drop_last
        self.rank = distributed.rank() if rank is None else rank
        self.world_size = distributed.world_size() if world_size is None else world_size

    def _total(self) -> int:
        n = len(self.dataset)
        return n - n % self.world_size if self.drop_last else n

    def __len__(self) -> int:
        return len(range(self.rank, self._total(), self.world_size))

    def __iter__(self):
        n = len(self.dataset)
        if self.shuffle:
            epoch = getattr(self.dataset, "epoch", 0)
            generator = torch.Generator().manual_seed(_derive_seed(_ORDER, self.seed, epoch))
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        return iter(order[: self._total()][self.rank:: self.world_size].tolist())


def _is_string(feature) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")
