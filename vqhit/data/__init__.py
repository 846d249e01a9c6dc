"""Images for training and evaluation, read through Hugging Face `datasets`; one concern per module, each importing
only the ones listed before it:

- `config`: `DataConfig`, the settings a dataset is built from, each one's rule, and those a training run gives it;
- `images`: one row to one item: decoding, bad images (skipped or raised), the transforms, the seeds of every draw;
- `sources`: the built-in photographs (and their licences), local folders, Hub datasets, what each source held;
- `streams`: `StreamingImageDataset`, a stream per process and worker through a shuffle buffer, resumable exactly;
- `datasets`: `build_dataset`, `eval_dataset`, `from_hf_dataset` and the map-style `ImageDataset`;
- `batches`: the order and the batches: `EpochSampler`, `build_dataloader`, `TrainingBatches` (the run's position).

Everything the rest of vqhit uses is importable from here (``from vqhit.data import eval_dataset``).
"""
from .batches import EpochSampler, TrainingBatches, build_dataloader, collate_images
from .config import BAD_IMAGES, DETERMINISTIC_TRANSFORMS, TRANSFORMS, DataConfig
from .datasets import (LOCAL_SHARDS, ImageDataset, build_dataset, check_eval_dataset, data_settings, eval_dataset,
                       first_images, from_hf_dataset)
from .images import IMAGENET_GAN_CROP, BadImageWarning, center_crop_adm
from .sources import (BUILTIN_HELDOUT_PHOTOS, BUILTIN_PHOTOS, BUILTIN_SOURCES, BUILTIN_WHOLE_VIEW, PACKAGED_PHOTOS,
                      SQUARES, builtin_photos, check_source, whole_photos)
from .streams import StreamingImageDataset

__all__ = [
    "BAD_IMAGES", "BUILTIN_HELDOUT_PHOTOS", "BUILTIN_PHOTOS", "BUILTIN_SOURCES", "BUILTIN_WHOLE_VIEW",
    "DETERMINISTIC_TRANSFORMS", "IMAGENET_GAN_CROP", "LOCAL_SHARDS", "PACKAGED_PHOTOS", "SQUARES", "TRANSFORMS",
    "BadImageWarning", "DataConfig", "EpochSampler", "ImageDataset", "StreamingImageDataset", "TrainingBatches",
    "build_dataloader", "build_dataset", "builtin_photos", "center_crop_adm", "check_eval_dataset", "check_source",
    "collate_images", "data_settings", "eval_dataset", "first_images", "from_hf_dataset", "whole_photos",
]
