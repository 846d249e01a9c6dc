"""`DataConfig`: the settings a dataset is built from, the rule each one must meet, and the settings a training run
gives it (`DataConfig.from_training`).

Each setting's rule lives here (`CHOICES`, `LIMITS`) and is checked when a DataConfig is made. The training config
holds these settings under their command-line names and checks them with the same rules when it is made
(`vqhit.train_config.LIMITS`), so a wrong value is refused before a run builds anything, in an error naming the
option.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

TRANSFORMS = ("random_crop", "center_crop", "adm_center_crop", "imagenet_gan", "imagenet_gan_eval", "resize")
# Transforms with no randomness: what evaluation and encoding may read (never a random crop, never a flip).
DETERMINISTIC_TRANSFORMS = ("center_crop", "adm_center_crop", "imagenet_gan_eval", "resize")
BAD_IMAGES = ("skip", "raise")


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
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"DataConfig.{name}={getattr(self, name)!r} is unknown; use one of {choices}.")
        for name, (valid, rule) in LIMITS.items():
            value = getattr(self, name)
            if value is not None and not valid(value):  # None: unset (max_images: all images)
                raise ValueError(f"DataConfig.{name} {rule}, got {value}.")

    @classmethod
    def from_training(cls, config, resolution: int) -> DataConfig:
        """The data settings of a training run: each field from the training config's key of the same name (or the
        one `TRAINING_NAMES` gives), the resolution from the model."""
        return cls(resolution=resolution, **{f.name: getattr(config, TRAINING_NAMES.get(f.name, f.name))
                                             for f in dataclasses.fields(cls) if f.name not in NOT_FROM_TRAINING})


CHOICES = {"transform": TRANSFORMS, "bad_images": BAD_IMAGES}
# The valid values of the numeric settings: (test, what the error says after the setting's name).
LIMITS = {
    "resolution": ((lambda v: v >= 1), "must be at least 1"),
    "min_crop_area": ((lambda v: 0 < v <= 1), "must be in (0, 1] (the smallest random crop's share of the short "
                      "side's square)"),
    "min_size": ((lambda v: v >= 0), "must be at least 0 (0 keeps every image, upsampling those smaller than the "
                 "resolution)"),
    **{name: ((lambda v: v >= 1), "must be at least 1") for name in ("max_images", "shuffle_buffer", "open_shards")},
}
# The training config's keys whose names differ from DataConfig's (the command line's --data, --data-split)
TRAINING_NAMES = {"source": "data", "split": "data_split"}
# Not training settings: the resolution is the model's; a training run reads through `datasets`' default cache.
NOT_FROM_TRAINING = ("resolution", "cache_dir")
