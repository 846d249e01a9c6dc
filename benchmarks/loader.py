#!/usr/bin/env python3
"""Images per second one DataLoader worker delivers for the paper recipes' training transforms, on JPEGs of the
recipes' sizes, decoded by PIL (what vqhit does) and by `torchvision.io.decode_jpeg`.

    python benchmarks/loader.py                       # 5 interleaved rounds of 48 images per recipe
    python benchmarks/loader.py --images 96 --repeats 7 --recipes imagenet256_vqhit

The JPEGs (quality 95) are cut from the real photographs the package ships (scikit-image's, scikit-learn's,
matplotlib's), resized to each recipe's source size: 500x375 as ImageNet's typical image for the ImageNet recipes,
256x256 for FFHQ/CelebA-HQ at 256 (folders of images already at the resolution), 1024x1024 for FFHQ at 1024. They
are written once under benchmarks/results/loader-images/ (ignored by git). For each recipe, in interleaved rounds,
one process (a worker runs one thread) takes every image once through:

- `vqhit`: `ImageDataset[(epoch, i)]`, the item a worker makes for training: read the file, PIL decode (with
  the EXIF rotation), the recipe's crop and antialiased bicubic resize, flip, float tensor in [-1, 1];
- `pil decode`: PIL's open, load and RGB conversion alone;
- `torchvision`: the same crop, resize and flip on `torchvision.io.decode_jpeg`'s tensor
  (`transforms.v2.functional.resize`, bicubic, antialiased: close to PIL's pixels, not equal);
- `tv decode`: `decode_jpeg` alone.

Workers per GPU for a training rate R images/s per GPU: R / (the `vqhit` images/s of one worker), rounded up, plus
one for the slack (a worker's batch arrives all at once).
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image

import common
from vqhit.data import BUILTIN_HELDOUT_PHOTOS, BUILTIN_PHOTOS, IMAGENET_GAN_CROP, DataConfig, from_hf_dataset
from vqhit.data.sources import _photo

# recipe -> (preset, transform, resolution, source width, source height)
RECIPES = {
    "imagenet128_gan": ("hit-l-128", "imagenet_gan", 128, 500, 375),
    "imagenet256_vqhit": ("vqhit-b-f16-1024", "random_crop", 256, 500, 375),
    "ffhq256_gan": ("hit-b-256", "resize", 256, 256, 256),
    "ffhq1024_gan": ("hit-b-1024", "resize", 1024, 1024, 1024),
}


def make_jpegs(folder: Path, count: int, width: int, height: int) -> list[Path]:
    """`count` JPEGs of width x height, random crops of the shipped photographs at the target aspect, resized."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    photos = [_photo(name) for name in (*BUILTIN_PHOTOS, *BUILTIN_HELDOUT_PHOTOS)]
    paths = []
    for i in range(count):
        path = folder / f"{i:04d}.jpg"
        if not path.exists():
            photo = photos[i % len(photos)]
            h, w = photo.shape[:2]
            scale = rng.uniform(0.8, 1.0) * min(w / width, h / height)  # a crop of the target's aspect
            cw, ch = int(width * scale), int(height * scale)
            left, top = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
            crop = Image.fromarray(photo[top:top + ch, left:left + cw]).resize((width, height), Image.BICUBIC)
            crop.save(path, quality=95)
        paths.append(path)
    return paths


def tv_item(path: Path, transform: str, size: int, generator: torch.Generator) -> torch.Tensor:
    """The recipe's item through torchvision's decoder and tensor resize."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2.functional import resize

    data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    image = decode_jpeg(data, mode=ImageReadMode.RGB)
    _, height, width = image.shape
    if transform != "resize":
        side = min(width, height)
        if transform == "imagenet_gan":
            side = round(IMAGENET_GAN_CROP * side)
        left = int(torch.randint(width - side + 1, (1,), generator=generator))
        top = int(torch.randint(height - side + 1, (1,), generator=generator))
        image = image[:, top:top + side, left:left + side]
    if image.shape[1:] != (size, size):
        image = resize(image, [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    if int(torch.randint(2, (1,), generator=generator)):
        image = image.flip(2)
    return image.float() / 127.5 - 1.0


def main() -> None:
    parser = common.base_parser("loader", __doc__)
    parser.add_argument("--images", type=int, default=48, help="JPEGs per recipe, each read once a round")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.set_defaults(repeats=5, threads=1)
    args = parser.parse_args()
    device = common.setup(args)
    root = common.RESULTS / "loader-images"

    calls, sizes = {}, {}
    for recipe in args.recipes:
        preset, transform, size, width, height = RECIPES[recipe]
        paths = make_jpegs(root / f"{width}x{height}", args.images, width, height)
        sizes[recipe] = statistics.mean(p.stat().st_size for p in paths) / 1e3
        table = datasets.Dataset.from_dict({"image": [{"path": str(p), "bytes": None} for p in paths]},
                                           features=datasets.Features({"image": datasets.Image(decode=False)}))
        dataset = from_hf_dataset(table, DataConfig(resolution=size, transform=transform, flip=True))

        def vqhit(dataset=dataset, count=len(paths)):
            for i in range(count):
                dataset[(1, i)]

        def pil_decode(paths=paths):
            for path in paths:
                with Image.open(path) as image:
                    image.convert("RGB")

        def torchvision(paths=paths, transform=transform, size=size):
            generator = torch.Generator().manual_seed(0)
            for path in paths:
                tv_item(path, transform, size, generator)

        def tv_decode(paths=paths):
            from torchvision.io import ImageReadMode, decode_jpeg

            for path in paths:
                decode_jpeg(torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8), mode=ImageReadMode.RGB)

        for name, fn in (("vqhit", vqhit), ("pil decode", pil_decode), ("torchvision", torchvision),
                         ("tv decode", tv_decode)):
            calls[recipe, name] = fn

    print(f"{len(calls)} functions, {args.repeats} interleaved rounds", flush=True)
    for fn in calls.values():  # warm-up: file cache, lazy imports
        fn()
    seconds, loads = {key: [] for key in calls}, []
    for _ in range(args.repeats):
        loads.append(common.load_average())
        for key, fn in calls.items():
            start = time.perf_counter()
            fn()
            seconds[key].append(time.perf_counter() - start)

    rows = []
    for recipe in args.recipes:
        preset, transform, size, width, height = RECIPES[recipe]
        rate = {name: args.images / statistics.median(seconds[recipe, name])
                for name in ("vqhit", "pil decode", "torchvision", "tv decode")}
        rows.append({"recipe": recipe, "preset": preset, "transform": f"{transform} {size}",
                     "source": f"{width}x{height}", "jpeg_kb": sizes[recipe], "vqhit": rate["vqhit"], "pil_decode": rate["pil decode"],
                     "torchvision": rate["torchvision"], "tv_decode": rate["tv decode"],
                     "per_100": int(np.ceil(100 / rate["vqhit"])) + 1,
                     "all_seconds": {name: seconds[recipe, name] for name in rate}})
    print(common.format_table(rows, [
        ("recipe", "recipe"), ("preset", "preset"), ("transform", "transform"), ("source JPEG", "source"),
        ("mean KB", "jpeg_kb"), ("vqhit img/s", "vqhit"), ("PIL decode img/s", "pil_decode"),
        ("torchvision img/s", "torchvision"), ("decode_jpeg img/s", "tv_decode"),
        ("workers for 100 img/s", "per_100")]))
    print(f"load average (1 min) at each round: {', '.join(f'{load:.1f}' for load in loads)}")
    info = {**common.machine(device, args), "images": args.images, "load_1m_per_round": loads}
    common.write_json(args.json or str(common.RESULTS / "loader-cpu.json"), info, rows=rows)


if __name__ == "__main__":
    main()
