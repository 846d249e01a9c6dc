"""Where images come from: the built-in photographs, local folders, Hub datasets, and what each source held.

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
  become a ``label`` column), as a table of file paths; to stream, it is cut into shards
  (`vqhit.data.datasets.from_hf_dataset`). A dangling symlink in a folder is a bad image (the ``imagefolder`` loader
  would drop it silently).
* a Hub dataset id -- ``datasets.load_dataset(id, split=..., streaming=...)`` (`vqhit.data.datasets.build_dataset`).

Every source has a ``revision`` (the Hub commit, or the count and names of a folder's files), which a training
position records: a resume on data that changed says so.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import warnings
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import datasets
import numpy as np
from PIL import Image

from .. import distributed
from ..downloads import local_or_hub
from ..errors import UsageError
from .config import DataConfig
from .images import BadImageWarning

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


# --------------------------------------------------------------------------------------------------
# Local folders and Hub datasets


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


# --------------------------------------------------------------------------------------------------
# The built-in photographs


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
