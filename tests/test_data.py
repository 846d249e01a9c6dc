"""vqhit.data: decoding, bad-image policy, transforms, reproducible randomness, streaming, sampler."""
import dataclasses
import io
import json
import multiprocessing
import os
import signal
import time
import warnings

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from vqhit import distributed
from vqhit.data import (
    TRANSFORMS, BadImageWarning, DataConfig, EpochSampler, ImageDataset, TrainingBatches, build_dataloader,
    build_dataset, from_hf_dataset,
)
from vqhit.errors import UnavailableError, UsageError


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def table(images: list[tuple[bytes, str]], **columns) -> datasets.Dataset:
    features = {"image": datasets.Image(decode=False)}
    data = {"image": [{"bytes": data, "path": name} for data, name in images], **columns}
    return datasets.Dataset.from_dict(data, features=datasets.Features({**features, **{
        key: datasets.Value("string") if isinstance(values[0], str) else datasets.Value("int64")
        for key, values in columns.items()}}))


def coordinate_image(width: int, height: int) -> np.ndarray:
    """Red encodes the column (x * 2), green the row (y * 3): a crop tells where it came from."""
    y, x = np.mgrid[:height, :width]
    return np.stack([x * 2, y * 3, np.zeros_like(x)], axis=-1).astype(np.uint8)


def items(dataset) -> list:
    return [dataset[i] for i in range(len(dataset))]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    (root / "cats").mkdir()
    (root / "dogs").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(root / "cats" / "good.png")
    (root / "cats" / "x.png").write_bytes(b"definitely not a png" * 8)
    Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)).save(root / "dogs" / "gray.png")
    return root


def folder_config(folder, tmp_path_factory, **kwargs) -> DataConfig:
    return DataConfig(source=str(folder), label_column="label", resolution=32,
                      cache_dir=str(tmp_path_factory.getbasetemp() / "hf_cache"), **kwargs)


def test_folder_skip_mode_drops_corrupt_file_and_converts_grayscale(folder, tmp_path_factory):
    dataset = build_dataset(folder_config(folder, tmp_path_factory))
    with pytest.warns(BadImageWarning, match=r"x\.png"):
        first = items(dataset)
    assert dataset.num_skipped == 1 and list(dataset.skipped)[0].endswith("x.png")
    kept = {item["id"].rsplit("/", 1)[-1]: item for item in first if item is not None}
    assert sorted(kept) == ["good.png", "gray.png"]
    gray = kept["gray.png"]["image"]
    assert gray.shape == (3, 32, 32) and torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert dataset.conversions == {"L": 1}
    assert kept["good.png"]["label"] == 0 and kept["gray.png"]["label"] == 1  # sub-folders cats, dogs

    with warnings.catch_warnings(record=True) as caught:  # one warning per file, not per visit
        warnings.simplefilter("always")
        items(dataset)
    assert not [w for w in caught if issubclass(w.category, BadImageWarning)]
    assert dataset.num_skipped == 1

    loader = build_dataloader(dataset, batch_size=3, num_workers=0, shuffle=False, seed=0, drop_last=False)
    (batch,) = list(loader)
    assert batch["image"].shape == (2, 3, 32, 32) and len(batch["id"]) == 2


def test_folder_raise_mode_names_the_file_and_the_option(folder, tmp_path_factory):
    dataset = build_dataset(folder_config(folder, tmp_path_factory, bad_images="raise"))
    with pytest.raises(ValueError, match=r"x\.png.*bad_images='skip'"):
        items(dataset)


def test_folder_without_images_raises(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no image files"):
        build_dataset(DataConfig(source=str(tmp_path / "empty"), cache_dir=str(tmp_path / "cache")))


def test_images_smaller_than_resolution_are_upsampled_unless_min_size_drops_them():
    tiny = table([(png(np.full((20, 24, 3), 100, np.uint8)), "tiny.png"),
                  (png(np.full((10, 12, 3), 100, np.uint8)), "tinier.png")])
    upsampling = from_hf_dataset(tiny, DataConfig(resolution=32))  # the default, as ADM's protocol
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        upsampled = [upsampling[i]["image"] for i in (0, 1, 0, 1)]
    notes = [w for w in caught if issubclass(w.category, BadImageWarning)]
    assert len(notes) == 1 and "tiny.png" in str(notes[0].message) and "upsampled" in str(notes[0].message)
    assert upsampling.num_upsampled == 2 and upsampling.num_skipped == 0
    for image in upsampled:
        assert image.shape == (3, 32, 32)
        assert torch.allclose(image, torch.full_like(image, 100 / 127.5 - 1), atol=1e-6)

    dropping = from_hf_dataset(tiny, DataConfig(resolution=32, min_size=16))
    with pytest.warns(BadImageWarning, match="upsampled"):
        assert dropping[0]["image"].shape == (3, 32, 32)  # 20 px: above min_size, upsampled
    with pytest.warns(BadImageWarning, match=r"tinier\.png"):
        assert dropping[1] is None
    assert dropping.skipped == {"tinier.png": "short side below min_size"}
    with pytest.raises(ValueError, match=r"tinier\.png.*min_size"):
        from_hf_dataset(tiny, DataConfig(resolution=32, min_size=16, bad_images="raise"))[1]


def test_modes_other_than_rgb_are_converted_sensibly():
    half_16bit = png(np.full((32, 32), 32896, np.uint16))  # 32896 / 257 = 128
    transparent = png(np.zeros((32, 32, 4), np.uint8))  # fully transparent black -> white
    cmyk = io.BytesIO()
    Image.new("CMYK", (32, 32), (0, 0, 0, 0)).save(cmyk, format="JPEG")  # no ink -> white
    dataset = from_hf_dataset(table([(half_16bit, "a.png"), (transparent, "b.png"), (cmyk.getvalue(), "c.jpg")]),
                              DataConfig(resolution=32, flip=False))
    grey, alpha, ink = (item["image"] for item in items(dataset))
    assert torch.allclose(grey, torch.full_like(grey, 128 / 127.5 - 1), atol=1e-6)
    assert torch.equal(alpha, torch.ones_like(alpha))
    assert ink.min() > 0.95
    assert dataset.conversions == {"I;16": 1, "RGBA": 1, "CMYK": 1}


def test_same_seed_epoch_index_gives_identical_tensors_and_new_epoch_new_crop():
    source = table([(png(coordinate_image(100, 40)), "wide.png")])
    cfg = DataConfig(resolution=32, transform="random_crop", flip=False)
    first, again = from_hf_dataset(source, cfg, seed=3), from_hf_dataset(source, cfg, seed=3)
    assert torch.equal(first[0]["image"], first[0]["image"])
    assert torch.equal(first[0]["image"], again[0]["image"])
    crops = []
    for epoch in range(6):
        first.set_epoch(epoch)
        crops.append(first[0]["image"])
    assert any(not torch.equal(crops[0], crop) for crop in crops[1:])
    first.set_epoch(0)
    assert torch.equal(first[0]["image"], crops[0])
    assert not torch.equal(from_hf_dataset(source, cfg, seed=4)[0]["image"], crops[0]) or \
        not torch.equal(from_hf_dataset(source, cfg, seed=5)[0]["image"], crops[0])


def test_items_do_not_depend_on_worker_count_or_order():
    rng = np.random.default_rng(1)
    source = table([(png(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)), f"{i}.png") for i in range(6)])
    dataset = from_hf_dataset(source, DataConfig(resolution=16, transform="imagenet_gan"), seed=7)
    dataset.set_epoch(2)
    loader = build_dataloader(dataset, batch_size=2, num_workers=2, shuffle=True, seed=0, drop_last=False)
    for batch in loader:
        for image, index in zip(batch["image"], batch["index"].tolist()):
            assert torch.equal(image, dataset[index]["image"])


def test_flip_mirrors_the_image_sometimes():
    image = coordinate_image(32, 32)
    dataset = from_hf_dataset(table([(png(image), "a.png")]), DataConfig(resolution=32, transform="resize"))
    plain = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1
    seen = set()
    for epoch in range(24):
        dataset.set_epoch(epoch)
        out = dataset[0]["image"]
        assert torch.equal(out, plain) or torch.equal(out, plain.flip(2))
        seen.add(torch.equal(out, plain))
    assert seen == {True, False}


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_every_transform_gives_shape_and_range(transform):
    rng = np.random.default_rng(2)
    photo = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    photo[0, :] = 0
    photo[-1, :] = 255
    black, white = np.zeros((40, 40, 3), np.uint8), np.full((40, 40, 3), 255, np.uint8)
    dataset = from_hf_dataset(table([(png(photo), "p.png"), (png(black), "b.png"), (png(white), "w.png")]),
                              DataConfig(resolution=24, transform=transform))
    out, dark, light = (item["image"] for item in items(dataset))
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1 and out.std() > 0.1
    assert torch.equal(dark, -torch.ones(3, 24, 24)) and torch.equal(light, torch.ones(3, 24, 24))


def test_imagenet_gan_crop_keeps_87_5_percent_of_the_short_side():
    # 96 x 80 image, short side 80 -> a 70 x 70 crop; at resolution 70 no resize, so pixels are the crop's.
    source = table([(png(coordinate_image(96, 80)), "c.png")])
    offsets = set()
    dataset = from_hf_dataset(source, DataConfig(resolution=70, transform="imagenet_gan", flip=False))
    for epoch in range(12):
        dataset.set_epoch(epoch)
        pixels = ((dataset[0]["image"] + 1) * 127.5).round().long()
        left, top = int(pixels[0, 0, 0]) // 2, int(pixels[1, 0, 0]) // 3
        assert torch.equal(pixels[0, 0], (left + torch.arange(70)) * 2)  # 70 consecutive columns
        assert torch.equal(pixels[1, :, 0], (top + torch.arange(70)) * 3)  # 70 consecutive rows
        assert 0 <= left <= 96 - 70 and 0 <= top <= 80 - 70
        offsets.add((left, top))
    assert len(offsets) > 1
    centered = from_hf_dataset(source, DataConfig(resolution=70, transform="imagenet_gan_eval", flip=False))
    pixels = ((centered[0]["image"] + 1) * 127.5).round().long()
    assert (int(pixels[0, 0, 0]) // 2, int(pixels[1, 0, 0]) // 3) == (13, 5)


def test_center_crops_keep_the_middle():
    # 512 x 256: red left, blue right, green from x=96 to 416, a margin around the center square [128, 384)
    # wider than the bicubic kernel's reach.
    image = np.zeros((256, 512, 3), np.uint8)
    image[:, :96, 0] = image[:, 96:416, 1] = image[:, 416:, 2] = 255
    for transform in ("center_crop", "adm_center_crop"):
        out = from_hf_dataset(table([(png(image), "a.png")]), DataConfig(resolution=64, transform=transform))[0]
        green = torch.tensor([-1.0, 1.0, -1.0])[:, None, None]
        assert torch.allclose(out["image"], green.expand(3, 64, 64), atol=0.02), transform


def test_random_crop_with_min_crop_area_sees_several_scales():
    ramp = np.repeat(np.linspace(0, 255, 256).round().astype(np.uint8)[None, :, None], 3, axis=2)
    image = np.repeat(ramp, 256, axis=0)  # left-to-right black-to-white: a crop's span of grey is its width
    source = table([(png(image), "ramp.png")])
    spans = []
    for min_crop_area in (1.0, 0.1):
        dataset = from_hf_dataset(source, DataConfig(resolution=16, flip=False, min_crop_area=min_crop_area))
        crops = []
        for epoch in range(40):
            dataset.set_epoch(epoch)
            crops.append(dataset[0]["image"][0])
        spans.append(torch.stack([c[:, -1].mean() - c[:, 0].mean() for c in crops]) / 2)  # in [0, 1] of the width
    whole, several = spans
    assert whole.min() > 0.9  # min_crop_area=1: the whole short side every time
    assert several.min() < 0.5 and several.max() > 0.85  # from about sqrt(0.1) of the side to all of it
    with pytest.raises(ValueError, match="min_crop_area"):
        DataConfig(min_crop_area=0.0)


def test_builtin_photos_are_many_real_distinct_tiles():
    dataset = build_dataset(DataConfig(resolution=32))
    assert len(dataset) > 50
    sample = torch.stack([dataset[i]["image"] for i in range(0, len(dataset), 4)])
    assert sample.shape[1:] == (3, 32, 32) and sample.min() >= -1 and sample.max() <= 1
    flat = sample.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(len(flat)) * 1e9).min() > 0  # no two tiles identical
    assert len({dataset[i]["id"].split("/")[0] for i in range(len(dataset))}) >= 4  # several photographs


def test_streaming_shards_across_workers_and_skips_bad_images():
    rng = np.random.default_rng(3)
    good = [(png(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)), f"{i}.png") for i in range(7)]
    source = table(good + [(b"garbage", "bad.png")], label=list(range(8)))
    stream = source.to_iterable_dataset(num_shards=2)
    dataset = from_hf_dataset(stream, DataConfig(resolution=16, label_column="label"))
    with pytest.warns(BadImageWarning, match=r"bad\.png"):
        in_process = list(dataset)
    assert sorted(item["id"] for item in in_process) == sorted(name for _, name in good)
    assert dataset.num_skipped == 1
    assert all(item["label"] == int(item["id"].split(".")[0]) for item in in_process)

    loader = build_dataloader(dataset, batch_size=2, num_workers=2, shuffle=True, seed=0, drop_last=False)
    ids = [name for batch in loader for name in batch["id"]]
    indices = [index for batch in loader for index in batch["index"].tolist()]
    assert sorted(ids) == sorted(name for _, name in good)  # every good image once, from either worker
    assert len(set(indices)) == len(indices)


def test_max_images_caps_the_dataset():
    assert len(build_dataset(DataConfig(resolution=32, max_images=10))) == 10
    stream = build_dataset(DataConfig(resolution=32, max_images=5, streaming=True))
    assert len(list(stream)) == 5


def test_epoch_sampler_is_reproducible_and_shards_without_overlap():
    data = list(range(10))
    shards = [list(EpochSampler(data, shuffle=True, seed=1, drop_last=False, rank=r, world_size=3)) for r in range(3)]
    assert sorted(sum(shards, [])) == data  # every index exactly once, no padding
    assert [len(EpochSampler(data, drop_last=False, rank=r, world_size=3)) for r in range(3)] == [4, 3, 3]
    assert [len(list(EpochSampler(data, drop_last=True, rank=r, world_size=3))) for r in range(3)] == [3, 3, 3]
    assert list(EpochSampler(data, seed=1)) == list(EpochSampler(data, seed=1))
    assert list(EpochSampler(data, seed=1)) != list(EpochSampler(data, seed=2))


def test_sampler_order_follows_dataset_epoch():
    dataset = from_hf_dataset(table([(png(np.zeros((8, 8, 3), np.uint8)), f"{i}") for i in range(12)]),
                              DataConfig(resolution=8))
    sampler = EpochSampler(dataset, seed=0)
    orders = []
    for epoch in (0, 1, 0):
        dataset.set_epoch(epoch)
        orders.append(list(sampler))
    assert orders[0] == orders[2] != orders[1]


def test_string_labels_are_encoded_and_bad_config_raises():
    source = table([(png(np.zeros((8, 8, 3), np.uint8)), f"{i}") for i in range(3)], kind=["dog", "cat", "dog"])
    dataset = from_hf_dataset(source, DataConfig(resolution=8, label_column="kind"))
    assert [item["label"] for item in items(dataset)] == [1, 0, 1]  # cat=0, dog=1
    with pytest.raises(ValueError, match="image_column"):
        from_hf_dataset(source, DataConfig(image_column="picture"))
    with pytest.raises(ValueError, match="transform"):
        DataConfig(transform="random_resized_crop")


# The data settings of a training run: (DataConfig field, training config key, a value other than the default)
TRAINING_DATA_SETTINGS = [
    ("source", "data", "some/folder"), ("split", "data_split", "validation"), ("image_column", "image_column", "pic"),
    ("label_column", "label_column", "kind"), ("streaming", "streaming", True), ("transform", "transform", "resize"),
    ("flip", "flip", False), ("min_crop_area", "min_crop_area", 0.5), ("bad_images", "bad_images", "raise"),
    ("min_size", "min_size", 7), ("max_images", "max_images", 9), ("shuffle_buffer", "shuffle_buffer", 11),
    ("open_shards", "open_shards", 3),
]


def test_a_training_run_gives_the_data_every_data_setting_of_its_config():
    from vqhit.data.config import NOT_FROM_TRAINING
    from vqhit.train_config import config_from_dict

    # every DataConfig field is listed here or is not a training setting: a new field must be tested too
    assert {name for name, _, _ in TRAINING_DATA_SETTINGS} | set(NOT_FROM_TRAINING) == {
        f.name for f in dataclasses.fields(DataConfig)}
    assert all(value != getattr(DataConfig(), name) for name, _, value in TRAINING_DATA_SETTINGS)
    config = config_from_dict({key: value for _, key, value in TRAINING_DATA_SETTINGS})
    cfg = DataConfig.from_training(config, resolution=24)
    assert {name: getattr(cfg, name) for name, _, _ in TRAINING_DATA_SETTINGS} == {
        name: value for name, _, value in TRAINING_DATA_SETTINGS}
    assert cfg.resolution == 24 and cfg.cache_dir is None


@pytest.mark.parametrize("key, value", [("min_crop_area", 0), ("min_crop_area", 1.5), ("min_size", -1),
                                        ("max_images", 0), ("shuffle_buffer", 0), ("open_shards", 0),
                                        ("bad_images", "ignore"), ("transform", "imagenet_gan_eval")])
def test_the_training_config_refuses_a_wrong_data_setting_naming_its_option(key, value):
    # refused when the config is made (before a run folder exists), by the data's own rule, naming the option
    from vqhit.train_config import config_from_dict, flag

    with pytest.raises(UsageError, match=f"^{flag(key)}"):
        config_from_dict({key: value})


def test_missing_source_is_no_such_folder_and_the_hub_is_asked_only_for_hub_ids(monkeypatch, tmp_path):
    asked = []

    def offline_hub(name, **kwargs):
        asked.append(name)
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline_hub)
    for path in ("./no/such/folder", str(tmp_path / "missing"), "runs/images/train"):
        with pytest.raises(FileNotFoundError, match="no such folder"):
            build_dataset(DataConfig(source=path))
    assert asked == []  # a path is never sent to the Hub
    with pytest.raises(FileNotFoundError, match="no local folder my_images and the Hub"):
        build_dataset(DataConfig(source="my_images"))  # could be either: both readings are named
    assert asked == ["my_images"]
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        build_dataset(DataConfig(source=str(tmp_path / "file.png")))
    with pytest.raises(ValueError, match="not a built-in source"):
        build_dataset(DataConfig(source="builtin:photo"))


def test_dangling_symlinks_are_named_and_raise_mode_refuses_them(tmp_path, make_images):
    make_images(tmp_path / "images", {"": 2}, size=(40, 40))
    (tmp_path / "images" / "gone.png").symlink_to(tmp_path / "deleted.png")
    cfg = DataConfig(source=str(tmp_path / "images"), resolution=32, cache_dir=str(tmp_path / "cache"))
    with pytest.warns(BadImageWarning, match=r"gone\.png: dangling symlink"):
        dataset = build_dataset(cfg)
    assert len(dataset) == 2 and dataset.num_skipped == 1
    assert dataset.skipped == {str(tmp_path / "images" / "gone.png"): "dangling symlink"}
    with pytest.raises(ValueError, match=r"gone\.png: dangling symlink.*bad_images='skip'"):
        build_dataset(DataConfig(**{**cfg.__dict__, "bad_images": "raise"}))


def test_a_folder_with_no_usable_image_gets_one_error_naming_it(tmp_path, make_images):
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    for name in ("a.png", "b.jpg"):
        (unreadable / name).write_bytes(b"not an image" * 4)
    with pytest.raises(ValueError, match=r"no usable image in .*unreadable.*2 unreadable.*a\.png"):
        build_dataset(DataConfig(source=str(unreadable), cache_dir=str(tmp_path / "cache")))

    links = tmp_path / "links"
    links.mkdir()
    for name in ("a.png", "b.png"):
        (links / name).symlink_to(tmp_path / "moved" / name)
    with pytest.raises(ValueError, match=r"no usable image in .*links.*all 2 image files are dangling symlinks"):
        build_dataset(DataConfig(source=str(links), cache_dir=str(tmp_path / "cache")))

    make_images(tmp_path / "small", {"": 2}, size=(16, 16))
    with pytest.raises(ValueError, match=r"no usable image.*2 short side below min_size.*lower min_size"):
        build_dataset(DataConfig(source=str(tmp_path / "small"), min_size=32, cache_dir=str(tmp_path / "cache")))


@pytest.fixture
def warnings_to_stderr():
    """Print every warning to file descriptor 2, in this process and in forked DataLoader workers (pytest would
    otherwise record the workers' warnings in their own copy of its list, where no test can see them)."""
    def show(message, category, filename, lineno, file=None, line=None):
        os.write(2, f"{category.__name__}: {message}\n".encode())

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        yield


def test_a_bad_file_is_warned_about_once_per_run_with_two_workers(tmp_path, make_images, warnings_to_stderr, capfd):
    make_images(tmp_path / "images", {"": 5}, size=(40, 40))
    (tmp_path / "images" / "x.png").write_bytes(b"not an image" * 4)  # last in order: the build-time check misses it
    dataset = build_dataset(DataConfig(source=str(tmp_path / "images"), resolution=32, cache_dir=str(tmp_path / "c")))
    loader = build_dataloader(dataset, batch_size=2, num_workers=2, shuffle=True, seed=0, drop_last=False)
    seen = 0
    for epoch in range(3):
        dataset.set_epoch(epoch)
        seen += sum(len(batch["id"]) for batch in loader)
    assert seen == 3 * 5
    assert capfd.readouterr().err.count("skipping") == 1  # not once per worker and epoch
    assert dataset.num_skipped == 1 and list(dataset.skipped)[0].endswith("x.png")  # workers' findings reach here

    stream = from_hf_dataset(table([(png(np.zeros((20, 20, 3), np.uint8)), f"{i}.png") for i in range(4)] +
                                   [(b"garbage", "bad.png")]).to_iterable_dataset(num_shards=2),
                             DataConfig(resolution=16))
    loader = build_dataloader(stream, batch_size=2, num_workers=2, shuffle=False, seed=0, drop_last=False)
    for epoch in range(3):
        stream.set_epoch(epoch)
        assert sum(len(batch["id"]) for batch in loader) == 4
    assert capfd.readouterr().err.count("bad.png") == 1


# -- streams: shard order and a shuffle buffer, new each epoch -------------------------------------------------------
def epoch_ids(dataset, loader, epoch: int) -> list[list[str]]:
    dataset.set_epoch(epoch)
    return [list(batch["id"]) for batch in loader]


def test_a_streamed_folder_sorted_by_class_gives_mixed_batches_and_a_new_order_each_epoch(tmp_path, make_images):
    make_images(tmp_path / "images", {"a": 32, "b": 32, "c": 32}, size=(12, 12))  # read class after class
    cfg = DataConfig(source=str(tmp_path / "images"), resolution=8, streaming=True, label_column="label",
                     shuffle_buffer=8, cache_dir=str(tmp_path / "cache"))
    dataset = build_dataset(cfg, seed=0)
    assert dataset.num_shards > 1  # a folder streams as several shards, not one in class order
    loader = build_dataloader(dataset, batch_size=6, num_workers=0, shuffle=True, seed=0, drop_last=False)
    dataset.set_epoch(0)
    first = next(iter(loader))
    assert len(set(first["label"].tolist())) > 1  # mixed from the first batch
    orders = [sum(epoch_ids(dataset, loader, epoch), []) for epoch in (0, 1, 0)]
    assert sorted(orders[0]) == sorted(orders[1]) and len(set(orders[0])) == 96  # every image once an epoch
    assert orders[0] == orders[2] != orders[1]  # the epoch decides the order


def sorted_shards(count: int, per_shard: int) -> datasets.IterableDataset:
    """A Hub-like stream of `count` shards, each holding one class: rows s*per_shard.. of shard s."""
    images = [(png(np.full((8, 8, 3), i, np.uint8)), f"s{i // per_shard}-{i % per_shard:02d}.png")
              for i in range(count * per_shard)]
    return table(images).to_iterable_dataset(num_shards=count)


def test_a_stream_of_sorted_shards_reads_several_at_once_in_a_new_order_each_epoch():
    dataset = from_hf_dataset(sorted_shards(8, 12), DataConfig(resolution=8, shuffle_buffer=10, open_shards=4))
    loader = build_dataloader(dataset, batch_size=8, num_workers=0, shuffle=True, seed=0, drop_last=False)
    shards = lambda ids: [name.split("-")[0] for name in ids]  # noqa: E731
    epochs = [epoch_ids(dataset, loader, epoch) for epoch in range(3)]
    for batches in epochs:
        assert len(set(shards(batches[0]))) >= 3  # the first batch mixes several shards
        assert sorted(sum(batches, [])) == sorted(sum(epochs[0], []))  # every row once an epoch
    # the shards come in another order, and their rows in other batches, from one epoch to the next
    assert len({tuple(dict.fromkeys(shards(sum(batches, [])))) for batches in epochs}) == 3
    assert len({frozenset(batches[0]) for batches in epochs}) == 3
    # a buffer, not a shuffle within windows of 10 rows: a row may stay in it much longer than 10 draws
    dataset.set_epoch(0)
    read_at = [index for batch in loader for index in batch["index"].tolist()]  # the order the stream read them
    assert sorted(read_at) == list(range(96)) and max(out - read for out, read in enumerate(read_at)) > 2 * 10


def test_without_shuffle_a_stream_is_read_in_its_order():
    dataset = from_hf_dataset(sorted_shards(3, 4), DataConfig(resolution=8))
    loader = build_dataloader(dataset, batch_size=5, num_workers=0, shuffle=False, seed=0, drop_last=False)
    ids = sum(epoch_ids(dataset, loader, 1), [])
    assert ids == sorted(ids)


# -- the training position ----------------------------------------------------------------------------------------
def test_drawing_batches_reads_no_tensor_and_talks_to_no_other_process(tmp_path, make_images, monkeypatch):
    # A training step may wait for the device once; the data position is counted without a collective or a read
    make_images(tmp_path / "images", {"": 6}, size=(12, 12))
    for i in range(3):  # batch 1: each of these is a whole batch of unreadable images, dropped
        (tmp_path / "images" / f"broken{i}.png").write_bytes(b"not an image")

    def forbidden(*args, **kwargs):
        raise AssertionError("a collective or a tensor read while drawing a batch")

    for streaming in (False, True):
        cfg = DataConfig(source=str(tmp_path / "images"), resolution=8, streaming=streaming,
                         cache_dir=str(tmp_path / "cache"))
        with pytest.warns(BadImageWarning):
            dataset = build_dataset(cfg)
        batches = TrainingBatches(dataset, build_dataloader(dataset, 1, num_workers=1, shuffle=True, seed=0))
        next(batches)  # starts the worker: the patches below are this process's only
        with monkeypatch.context() as patch:
            for name in ("all_reduce_sum", "all_reduce_mean", "all_gather_cat", "all_gather_objects", "broadcast_",
                         "reduce_scalars", "run_on_main"):
                patch.setattr(distributed, name, forbidden)
            for name in ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy"):
                patch.setattr(torch.Tensor, name, forbidden)
            drawn = [next(batches) for _ in range(12)]  # two epochs of the 6 readable images
        batches.close()
        assert len({batch["id"][0] for batch in drawn}) == 6
        if not streaming:  # the unreadable batches were drawn, counted and dropped
            assert batches.micro_batches == 1 + 12 + 3 * 2 and batches.epoch == 2


def test_another_process_count_or_batch_size_continues_the_epoch_at_the_same_image(monkeypatch):
    dataset = from_hf_dataset(table([(png(np.zeros((8, 8, 3), np.uint8)), f"{i}.png") for i in range(11)]),
                              DataConfig(resolution=8))

    def process(rank: int, world: int, batch_size: int, state: dict | None = None) -> TrainingBatches:
        monkeypatch.setattr(distributed, "rank", lambda: rank)
        monkeypatch.setattr(distributed, "world_size", lambda: world)
        batches = TrainingBatches(dataset, build_dataloader(dataset, batch_size, 0, shuffle=True, seed=3))
        warnings = batches.load_state_dict(json.loads(json.dumps(state))) if state else []
        return batches, warnings

    def draw(batches, count: int) -> list[list[int]]:
        return [next(batches)["index"].tolist() for _ in range(count)]

    order = [EpochSampler(dataset, seed=3, rank=0, world_size=1).indices(epoch) for epoch in range(3)]
    # 2 processes, batch 2: 8 of the 11 images an epoch (each process's 5, cut to 2 batches); 3 batches each
    seen, states = [], []
    for rank in (0, 1):
        batches, _ = process(rank, 2, 2)
        seen.append(draw(batches, 3))
        states.append(batches.state_dict())
    assert states[0]["epoch"] == states[1]["epoch"] == 1 and states[0]["images_in_epoch"] == 4
    assert sorted(seen[0][2] + seen[1][2]) == sorted(order[1][:4])  # epoch 1's first 4 images of its order
    # resumed by 1 process, batch 3 (from the first process's file): epoch 1 goes on at image 4 of its order
    batches, warnings = process(0, 1, 3, states[0])
    assert warnings == ["processes 2 -> 1, batch size 2 -> 3: the data continues in epoch 1 after the 4 images of its "
                        "order already taken, in the same order, cut into other batches"]
    assert draw(batches, 3) == [order[1][4:7], order[1][7:10], order[2][0:3]]
    # and back to 2 processes of batch 2: epoch 2 goes on at image 3, shared out as before
    state = batches.state_dict()
    assert (state["epoch"], state["images_in_epoch"]) == (2, 3)
    rest = [process(rank, 2, 2, state)[0] for rank in (0, 1)]
    assert [draw(rest[rank], 1)[0] for rank in (0, 1)] == [order[2][3:7][0::2], order[2][3:7][1::2]]
    # with the same layout the position is the batch itself
    again, warnings = process(0, 1, 3, state)
    assert warnings == [] and draw(again, 1) == [order[2][3:6]]


class StallingImages(ImageDataset):
    """A dataset whose reads never return, as on a file system or network that stopped answering."""

    def __getitem__(self, key):
        time.sleep(600)


def test_a_stalled_read_ends_with_one_error_naming_data_timeout(monkeypatch):
    monkeypatch.setattr(torch.utils.data._utils, "MP_STATUS_CHECK_INTERVAL", 0.2)  # the DataLoader's own waits
    source = from_hf_dataset(table([(png(np.zeros((8, 8, 3), np.uint8)), f"{i}.png") for i in range(4)]),
                             DataConfig(source="/data/frozen", resolution=8))
    dataset = StallingImages(source.table, source.cfg)
    # the worker ignores SIGTERM as the training's workers ignore the stop signals: it must be ended anyway
    loader = build_dataloader(dataset, 2, num_workers=1, shuffle=True, seed=0, ignore_signals=[signal.SIGTERM],
                              timeout=0.5)
    batches = TrainingBatches(dataset, loader)
    before = set(multiprocessing.active_children())
    with pytest.raises(UnavailableError, match=r"^no batch came from the DataLoader workers in 0.5 s: reading --data "
                                               r"/data/frozen stalled .* raise --data-timeout"):
        next(batches)
    assert not set(multiprocessing.active_children()) - before  # no stuck worker left for the exit to wait on
    assert build_dataloader(dataset, 2, num_workers=0, timeout=0.5).timeout == 0  # no workers: nothing to time


def test_a_resume_says_when_the_folder_changed_since_the_checkpoint(tmp_path, make_images):
    make_images(tmp_path / "images", {"a": 4, "b": 4}, size=(12, 12))

    def batches(streaming: bool) -> TrainingBatches:
        cfg = DataConfig(source=str(tmp_path / "images"), resolution=8, streaming=streaming,
                         cache_dir=str(tmp_path / "cache"))
        dataset = build_dataset(cfg)
        return TrainingBatches(dataset, build_dataloader(dataset, 2, num_workers=0, shuffle=True, seed=0))

    states = {}
    for streaming in (False, True):
        run = batches(streaming)
        next(run)
        states[streaming] = json.loads(json.dumps(run.state_dict()))
        assert batches(streaming).load_state_dict(states[streaming]) == []  # the same files: nothing to say
    make_images(tmp_path / "images" / "c", {"": 1}, size=(12, 12))  # a file added between the runs
    for streaming in (False, True):
        (warning,) = batches(streaming).load_state_dict(states[streaming])
        assert warning.startswith(f"--data {tmp_path / 'images'} has changed since the checkpoint was written (then "
                                  "8 images, names ") and "now 9 images, names " in warning


def test_a_hub_dataset_is_pinned_by_its_commit_or_offline_by_its_fingerprint(monkeypatch):
    import huggingface_hub

    downloaded = table([(png(np.zeros((8, 8, 3), np.uint8)), f"{i}.png") for i in range(3)])
    monkeypatch.setattr(datasets, "load_dataset", lambda hub_id, **kwargs: downloaded)  # no network in tests

    class Info:
        sha = "0123abcd"

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda self, hub_id, **kwargs: Info())
    assert build_dataset(DataConfig(source="someone/photos", resolution=8)).revision == "commit 0123abcd"

    def offline(self, hub_id, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", offline)
    assert build_dataset(DataConfig(source="someone/photos", resolution=8)).revision == \
        f"fingerprint {downloaded._fingerprint}"
