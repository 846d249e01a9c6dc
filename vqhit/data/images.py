"""One row of a table to one training or evaluation item: decoding, the bad-image policy, the transforms, the seeds.

Images are decoded here, not by `datasets` (the image column is cast to ``Image(decode=False)``), so an unreadable
file is caught with its name: it is skipped with one warning per file and counted, or raises a ``ValueError`` naming
the file (``DataConfig.bad_images``). Images smaller than the resolution are upsampled (bicubic), as ADM's evaluation
crop does; ``min_size`` makes those below it bad images instead. What became of each file is recorded by the dataset
(`_ImageRows._record`: `vqhit.data.datasets` and `vqhit.data.streams` keep it each their way).

Every random draw for item ``i`` comes from a generator seeded by ``(seed, epoch, i)``, so an item is the same tensor
for the same ``(seed, epoch, index)`` whatever the worker count or order: training can resume exactly.
"""
from __future__ import annotations

import warnings
from collections import Counter

import datasets
import numpy as np
import torch
from PIL import Image

from ..errors import UsageError
from .config import DataConfig

IMAGENET_GAN_CROP = 0.875  # HiT's ImageNet recipe keeps 87.5% of the short side


class BadImageWarning(UserWarning):
    """An image was unreadable, a dangling symlink or below min_size and was skipped; or (once per run)
    images smaller than the resolution are being upsampled."""


# What became of an image, when it is worth recording (0 in a map-style dataset's status tensor: nothing to say).
_UNREADABLE, _TOO_SMALL, _UPSAMPLED = 1, 2, 3
_REASONS = {_UNREADABLE: "unreadable", _TOO_SMALL: "short side below min_size"}


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
