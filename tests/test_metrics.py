"""Tests for vqhit.metrics: every metric is checked against an independent computation or a closed form."""
import datetime
import math
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import random_inception_network
import scipy.linalg
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from vqhit.data import center_crop_adm
from vqhit.metrics import (
    FeatureStatistics,
    InceptionFeatures,
    LPIPSMetric,
    codebook_usage,
    frechet_distance,
    inception_score,
    psnr,
    ssim,
    to_uint8,
)


def _random_statistics(rng, n, d):
    feats = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)
    return feats.mean(0), np.cov(feats, rowvar=False)


def _reference_fid(mu1, s1, mu2, s2):
    # The pytorch-fid computation, an independent route: the general matrix square root of s1 s2.
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(mu1)) * 1e-6
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = covmean.real
    return ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


# ------------------------------------------------------------------------------------------------ FID


def test_frechet_distance_matches_pytorch_fid_sqrtm_and_is_zero_on_itself():
    rng = np.random.default_rng(0)
    mu1, s1 = _random_statistics(rng, 200, 16)
    mu2, s2 = _random_statistics(rng, 200, 16)
    expected = _reference_fid(mu1, s1, mu2, s2)
    assert expected > 1.0
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_rank_deficient_covariances():
    # Fewer samples than dimensions: singular covariances (pytorch-fid needs its eps fallback here).
    rng = np.random.default_rng(1)
    mu1, s1 = _random_statistics(rng, 6, 12)
    mu2, s2 = _random_statistics(rng, 6, 12)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_reference_fid(mu1, s1, mu2, s2), rel=1e-4)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="Mismatched"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_statistics_match_numpy_and_batching_does_not_matter(tmp_path):
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(37, 5)) * 3 + 10  # offset mean: the sum-of-outer-products route must not lose it
    one = FeatureStatistics(5)
    one.update(torch.from_numpy(feats).float())
    batched = FeatureStatistics(5)
    for chunk in np.array_split(feats, [4, 5, 20]):
        batched.update(torch.from_numpy(chunk).float())
    feats32 = feats.astype(np.float32).astype(np.float64)  # what update() actually sees
    for stats in (one, batched):
        mu, sigma = stats.mean_cov()
        assert stats.n == 37
        np.testing.assert_allclose(mu, feats32.mean(0), rtol=1e-12)
        np.testing.assert_allclose(sigma, np.cov(feats32, rowvar=False, ddof=1), rtol=1e-9, atol=1e-11)

    one.save(tmp_path / "ref.npz")
    loaded = FeatureStatistics.load(tmp_path / "ref.npz")
    assert loaded.n == 37
    for a, b in zip(loaded.mean_cov(), one.mean_cov()):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)

    with pytest.raises(ValueError, match="shape"):
        one.update(torch.zeros(2, 6))
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStatistics(5).mean_cov()


def _distributed_worker(rank, world_size, init_file, shards, index_shards, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        stats = FeatureStatistics(shards[rank].shape[1])
        stats.update(torch.from_numpy(shards[rank]))
        mu, sigma = stats.all_reduce().mean_cov()
        usage = codebook_usage(torch.from_numpy(index_shards[rank]), codebook_size=16)
        np.savez(f"{out_dir}/rank{rank}.npz", mu=mu, sigma=sigma, n=stats.n, counts=usage["counts"].numpy(),
                 usage=usage["usage"], perplexity=usage["perplexity"])
    finally:
        dist.destroy_process_group()


def _spawned_worker(index, *args):
    _distributed_worker(index + 1, *args)  # spawned processes are ranks 1.., this process is rank 0


def test_all_reduce_over_two_processes_equals_one_process(tmp_path):
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(20, 6))
    indices = rng.integers(0, 10, size=(30,))  # codes 10..15 never used
    # Uneven shards: each process counts exactly its own samples, nothing is padded.
    shards = [feats[:7], feats[7:]]
    index_shards = [indices[:11], indices[11:]]
    args = (2, str(tmp_path / "init"), shards, index_shards, str(tmp_path))
    # Rank 1 in a spawned process, rank 0 here: one interpreter start instead of two keeps the test fast.
    context = mp.start_processes(_spawned_worker, args=args, nprocs=1, join=False, start_method="spawn")
    _distributed_worker(0, *args)
    context.join()
    assert not dist.is_initialized()

    single = FeatureStatistics(6)
    single.update(torch.from_numpy(feats))
    mu, sigma = single.mean_cov()
    expected_usage = codebook_usage(torch.from_numpy(indices), codebook_size=16)
    for rank in range(2):
        out = np.load(tmp_path / f"rank{rank}.npz")
        assert int(out["n"]) == 20
        np.testing.assert_allclose(out["mu"], mu, rtol=1e-12)
        np.testing.assert_allclose(out["sigma"], sigma, rtol=1e-10, atol=1e-12)
        np.testing.assert_array_equal(out["counts"], np.bincount(indices, minlength=16))
        assert float(out["usage"]) == pytest.approx(expected_usage["usage"])
        assert float(out["perplexity"]) == pytest.approx(expected_usage["perplexity"])


# ------------------------------------------------------------------------------------------------ IS


def test_inception_score_closed_forms():
    assert inception_score(torch.zeros(12, 1008))[0] == pytest.approx(1.0, abs=1e-12)

    # K distinct, fully confident classes: KL(one-hot || uniform over K) = log K, so IS = K.
    k = 7
    confident = torch.full((k, 1008), -1e4)
    confident[torch.arange(k), torch.arange(k) * 3] = 1e4
    mean, std = inception_score(confident, split_size=5000)  # fewer samples than one split
    assert mean == pytest.approx(k) and std == 0.0

    # Two splits of 10: one with 10 distinct classes (IS 10), one with a single class (IS 1).
    logits = torch.full((20, 1008), -1e4)
    logits[torch.arange(10), torch.arange(10)] = 1e4
    logits[10:, 5] = 1e4
    mean, std = inception_score(logits, split_size=10)
    assert mean == pytest.approx(5.5) and std == pytest.approx(4.5)


# ------------------------------------------------------------------------------------------------ image metrics


def test_to_uint8_rounds_and_clamps():
    values = torch.tensor([127.6, 127.4, 0.49, 254.6]) / 127.5 - 1
    assert to_uint8(values).tolist() == [128, 127, 0, 255]
    assert to_uint8(torch.tensor([-3.0, 2.0])).tolist() == [0, 255]
    with pytest.raises(ValueError, match="floating-point"):
        to_uint8(torch.zeros(2, dtype=torch.uint8))


def test_psnr_closed_form():
    u = torch.rand(3, 3, 8, 8) * 0.6 + 0.2  # [0, 1] images away from the clamp boundaries
    delta = 0.05
    x, y = u * 2 - 1, (u + delta) * 2 - 1
    expected = 10 * math.log10(1 / delta**2)
    # (torch.testing.assert_close costs seconds on its first call; numpy's checks are instant.)
    np.testing.assert_allclose(psnr(x, y).numpy(), np.full(3, expected), rtol=1e-5)
    assert torch.isinf(psnr(x, x)).all()
    with pytest.raises(ValueError, match="same shape"):
        psnr(x, y[:2])


@pytest.mark.parametrize("metric", [psnr, ssim])
def test_psnr_and_ssim_refuse_images_outside_minus_one_to_one(metric):
    # Clamped to [-1, 1], these would all be the same image: PSNR inf, SSIM 1.
    tens = torch.full((1, 3, 16, 16), 10, dtype=torch.uint8)
    twenties = torch.full((1, 3, 16, 16), 20, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"floating-point images in \[-1, 1\]; got dtype torch.uint8.*/ 127.5 - 1"):
        metric(tens, twenties)
    with pytest.raises(ValueError, match=r"images in \[-1, 1\]; got values reaching 10\. Convert.*x / 127.5 - 1"):
        metric(tens.float(), twenties.float())
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    overshoot = (x * 1.2).clamp(-1.4, 1.4)  # a decoder's output a little outside: clamped, as saving it would
    np.testing.assert_allclose(metric(x, overshoot).numpy(), metric(x, overshoot.clamp(-1, 1)).numpy(), rtol=1e-6)


def test_ssim_matches_skimage():
    from skimage.metrics import structural_similarity

    torch.manual_seed(0)
    u = torch.rand(2, 3, 24, 20, dtype=torch.float64)
    v = (u + 0.2 * torch.randn_like(u)).clamp(0, 1)  # correlated, so SSIM is far from 0
    ours = ssim(u * 2 - 1, v * 2 - 1)
    assert ours.shape == (2,)
    for i in range(2):
        ref = structural_similarity(u[i].numpy(), v[i].numpy(), gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=1.0, channel_axis=0)
        assert ours[i].item() == pytest.approx(ref, abs=1e-4)
    np.testing.assert_allclose(ssim(u * 2 - 1, u * 2 - 1).numpy(), np.ones(2), rtol=1e-6)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


def test_lpips_per_image_and_local_backbone(tmp_path):
    import torchvision

    # A random state dict with torchvision's AlexNet names and shapes (built on the meta device, so
    # the 58M-parameter classifier is never initialised; the backbone only needs `features.*`).
    with torch.device("meta"):
        names_and_shapes = {k: v.shape for k, v in torchvision.models.alexnet().state_dict().items()}
    torch.manual_seed(0)
    state = {k: torch.randn(shape) * 0.05 for k, shape in names_and_shapes.items() if k.startswith("features.")}
    torch.save(state, tmp_path / "alexnet.pth")
    metric = LPIPSMetric(net="alex", pretrained=True, backbone_path=tmp_path / "alexnet.pth")
    # The backbone really is the file's (lpips keeps torchvision's indices inside its slices).
    assert torch.equal(metric.lpips.net.state_dict()["slice2.3.weight"], state["features.3.weight"])

    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    d = metric(x, y)
    assert d.shape == (2,) and (d > 0).all()
    assert torch.equal(metric(x, x), torch.zeros(2))
    np.testing.assert_allclose(torch.cat([metric(x[:1], y[:1]), metric(x[1:], y[1:])]).numpy(), d.numpy(), rtol=1e-5)

    random_backbone = LPIPSMetric(net="alex", pnet_rand=True)
    assert random_backbone(x, y).shape == (2,)


# ------------------------------------------------------------------------------------------------ Inception


@pytest.fixture(scope="module")
def random_inception_files(tmp_path_factory):
    """Two random-weight Inception state dicts saved like the official file, plus the network that made the first."""
    torch.manual_seed(0)
    net = random_inception_network()
    # Random BN statistics too, so the file carries information beyond the default init.
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    folder = tmp_path_factory.mktemp("inception")
    state = net.state_dict()
    torch.save(state, folder / "a.pth")
    other = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}
    torch.save(other, folder / "b.pth")
    return folder / "a.pth", folder / "b.pth", net


def test_inception_offline_weights_path(random_inception_files):
    path_a, path_b, source_net = random_inception_files
    images = to_uint8(torch.rand(2, 3, 32, 32) * 2 - 1)

    model = InceptionFeatures(weights_path=path_a, device="cpu")
    pool, logits = model(images)
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
    assert pool.dtype == torch.float32 and torch.isfinite(pool).all() and pool.abs().sum() > 0

    # Loading the file reproduces the saved network exactly (so two loads of one file agree), and a
    # different file gives different features: the weights really come from weights_path.
    ref_pool, ref_logits = source_net(images)
    assert torch.equal(pool, ref_pool) and torch.equal(logits, ref_logits)
    pool_b, _ = InceptionFeatures(weights_path=path_b, device="cpu")(images[:1])  # one image: CPU time
    assert not torch.allclose(pool[:1], pool_b)

    with pytest.raises(ValueError, match="to_uint8"):
        model(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="does not exist"):
        InceptionFeatures(weights_path=path_a.parent / "missing.pth", device="cpu")


class _RunsCodeWhenUnpickled:
    """A pickled object that creates a file when loaded: what a malicious weights file could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_inception_weights_are_loaded_without_running_pickled_code(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "inception-evil.pth"
    torch.save({"fc.weight": torch.zeros(1), "payload": _RunsCodeWhenUnpickled(marker)}, path)
    with pytest.raises(ValueError, match=r"inception-evil\.pth.*weights_only=True"):
        InceptionFeatures(weights_path=path, device="cpu")
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # the override ends with the construction


class _PickledObject:
    """Any object beyond tensors, as Accelerate's RNG files hold: it loads only with weights_only=False."""

    def __init__(self, value):
        self.value = value


def test_building_inception_leaves_no_process_wide_state(random_inception_files, tmp_path):
    """Two threads build the network at once; afterwards (and meanwhile) torch.load(weights_only=False) of a
    pickled object still works: weights-only loading of the Inception file is no setting of the process."""
    path_a, _, source_net = random_inception_files
    pickled = tmp_path / "object.pt"
    torch.save(_PickledObject(7), pickled)
    barrier, built, loaded = threading.Barrier(3), [], []

    def build():
        barrier.wait()
        built.append(InceptionFeatures(weights_path=path_a, device="cpu"))

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    barrier.wait()
    while any(t.is_alive() for t in threads):  # a load in this thread while the others build
        loaded.append(torch.load(pickled, weights_only=False).value)
    for t in threads:
        t.join()
    assert len(built) == 2 and loaded and set(loaded) == {7}
    assert torch.load(pickled, weights_only=False).value == 7
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
    images = to_uint8(torch.rand(1, 3, 16, 16) * 2 - 1)
    assert all(torch.equal(model(images)[0], source_net(images)[0]) for model in built)


def test_inception_builds_with_pytorchs_no_weights_only_override(random_inception_files, monkeypatch, tmp_path):
    """PyTorch's documented TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 (weights_only=False wherever a call does not say)
    neither stops the network from being built nor lets a weights file run code."""
    path_a, _, source_net = random_inception_files
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    images = to_uint8(torch.rand(1, 3, 16, 16) * 2 - 1)
    assert torch.equal(InceptionFeatures(weights_path=path_a, device="cpu")(images)[0], source_net(images)[0])
    marker, evil = tmp_path / "code-ran", tmp_path / "inception-evil.pth"
    torch.save({"fc.weight": torch.zeros(1), "payload": _RunsCodeWhenUnpickled(marker)}, evil)
    with pytest.raises(ValueError, match="weights_only=True"):
        InceptionFeatures(weights_path=evil, device="cpu")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ tokenizer / data


def test_codebook_usage_closed_form():
    indices = torch.tensor([[0, 1], [2, 3]]).repeat(5, 1)  # 4 of 8 codes, uniformly
    out = codebook_usage(indices, codebook_size=8)
    assert out["usage"] == 0.5
    assert out["perplexity"] == pytest.approx(4.0)
    assert out["counts"].tolist() == [5, 5, 5, 5, 0, 0, 0, 0]
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        codebook_usage(torch.tensor([8]), codebook_size=8)


def _adm_center_crop_arr(pil_image, image_size):
    # guided-diffusion/guided_diffusion/image_datasets.py, transcribed for an independent reference.
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


@pytest.mark.parametrize("width,height", [(70, 53), (53, 70), (131, 40), (40, 32), (20, 31), (9, 12)])
def test_center_crop_adm_matches_reference(width, height):
    rng = np.random.default_rng(width * height)
    image = Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
    size = 16  # short side >= 32 (incl. exactly 32): box-downsampled first; (20, 31) only bicubic; (9, 12) is upsampled
    out = center_crop_adm(image, size)
    assert out.size == (size, size) and out.mode == "RGB"
    np.testing.assert_array_equal(np.array(out), _adm_center_crop_arr(image, size))


def test_inception_download_failure_says_how_to_work_offline(monkeypatch):
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match="--inception-weights PATH"):
        InceptionFeatures(weights_path=None, device="cpu")