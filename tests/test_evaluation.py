"""Evaluation pipelines on a tiny folder with random-weight Inception / LPIPS / models (numbers mean nothing;
the tests check the wiring: which images reach which statistics, caching, counting, reports, PNG sizes).

scipy's sqrtm on 2048 x 2048 matrices takes tens of seconds on a CI CPU, so the pipelines' Fréchet distance is
replaced by `lowrank_frechet_distance`: with a handful of samples the covariances have rank < 10, and projecting
onto an orthonormal basis of their column spaces gives the same distance exactly (checked against
vqhit.metrics.frechet_distance below). The real frechet_distance is tested in test_metrics.py.
"""
import json
import runpy
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from vqhit import evaluation
from vqhit.data import BadImageWarning, eval_dataset
from vqhit.errors import UsageError
from vqhit.evaluation import ReferenceStatistics, evaluate_generator, interpolate_latents, process_shares
from vqhit.metrics import frechet_distance, psnr, ssim, to_uint8
from vqhit.models.hit import HiTGenerator
from vqhit.models.vqhit import VQHiT

ROOT = Path(__file__).resolve().parents[1]


def lowrank_frechet_distance(mu1, s1, mu2, s2, sketch: int = 32) -> float:
    """Exact FID for covariances of rank < sketch: reduce both to an orthonormal basis Q of their column spaces
    (s = Q (Q^T s Q) Q^T exactly), where Tr sqrt(s1 s2) is that of the small matrices."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(np.hstack([s @ rng.normal(size=(len(mu1), sketch)) for s in (s1, s2)]))
    a1, a2 = q.T @ s1 @ q, q.T @ s2 @ q
    w, v = scipy.linalg.eigh(a1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    eig = scipy.linalg.eigvalsh(root @ a2 @ root)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(eig, 0, None)).sum())


@pytest.fixture
def fid_calls(monkeypatch):
    """Route the pipelines' FID through lowrank_frechet_distance and record its inputs."""
    calls = []

    def spy(mu1, s1, mu2, s2):
        calls.append((mu1, s1, mu2, s2))
        return lowrank_frechet_distance(mu1, s1, mu2, s2)

    monkeypatch.setattr(evaluation, "frechet_distance", spy)
    return calls


@pytest.fixture(scope="module")
def folder(tmp_path_factory, make_images):
    root = tmp_path_factory.mktemp("eval")
    make_images(root / "images", {"": 2})  # each image costs ~0.5 s per Inception pass
    return root / "images"


def test_lowrank_frechet_distance_is_exact_for_low_rank_covariances():
    rng = np.random.default_rng(0)
    stats = []
    for _ in range(2):
        feats = rng.normal(size=(6, 48)) * 3 + rng.normal(size=48)  # 6 samples in 48 dimensions: rank 5
        stats += [feats.mean(0), np.cov(feats, rowvar=False)]
    assert lowrank_frechet_distance(*stats) == pytest.approx(frechet_distance(*stats), rel=1e-6)
    assert abs(lowrank_frechet_distance(stats[0], stats[1], stats[0], stats[1])) < 1e-6


def test_process_shares_and_interpolation():
    for total, world in [(50_000, 8), (7, 3), (2, 4)]:
        shares = process_shares(total, world)
        assert sum(shares) == total and max(shares) - min(shares) <= 1
    z0, z1 = torch.randn(3, 16), torch.randn(3, 16)
    linear = interpolate_latents(z0, z1, 5, "linear")
    assert linear.shape == (3, 5, 16)
    assert torch.allclose(linear[:, 0], z0) and torch.allclose(linear[:, -1], z1, atol=1e-6)
    assert torch.allclose(linear[:, 2], (z0 + z1) / 2, atol=1e-6)
    u0, u1 = z0 / z0.norm(dim=1, keepdim=True), z1 / z1.norm(dim=1, keepdim=True)
    slerp = interpolate_latents(u0, u1, 5, "slerp")  # stays on the unit sphere, unlike linear
    assert torch.allclose(slerp.norm(dim=-1), torch.ones(3, 5), atol=1e-5)
    assert torch.allclose(slerp[:, 0], u0, atol=1e-6) and torch.allclose(slerp[:, -1], u1, atol=1e-5)
    with pytest.raises(ValueError, match="slerp"):
        interpolate_latents(z0, z1, 5, "cubic")


def test_eval_rfid_script_report_and_cached_reference(folder, random_inception_weights, random_alexnet_backbone,
                                                      fid_calls, tmp_path, capsys):
    torch.manual_seed(0)
    model_dir = VQHiT.from_preset("vqhit-tiny").save_pretrained(tmp_path / "model")
    ref = tmp_path / "ref.npz"
    argv = ["--model", str(model_dir), "--data", str(folder), "--ref-stats", str(ref), "--inception-weights",
            str(random_inception_weights), "--lpips-backbone", str(random_alexnet_backbone), "--batch-size", "3",
            "--num-workers", "0", "--output-dir", str(tmp_path / "out"), "--no-progress"]
    main = runpy.run_path(str(ROOT / "scripts" / "eval_rfid.py"), run_name="script")["main"]

    report = main(argv)
    metrics, settings = report["metrics"], report["settings"]
    assert set(metrics) == {"rfid", "psnr", "ssim", "lpips", "codebook_usage", "codebook_perplexity",
                            "num_images", "num_skipped", "num_upsampled"}
    assert metrics["num_images"] == 2 and metrics["num_skipped"] == 0 and metrics["num_upsampled"] == 0
    assert metrics["rfid"] > 0 and np.isfinite(metrics["psnr"]) and 0 < metrics["ssim"] <= 1
    assert metrics["lpips"] > 0 and 0 < metrics["codebook_usage"] <= 1
    assert 1 <= metrics["codebook_perplexity"] <= 2 * 64  # at most 2 images x 64 tokens distinct codes
    assert settings["crop"] == "adm_center_crop" and settings["split"] == "train"
    assert (settings["preset"], settings["resolution"], settings["grid"], settings["codebook_size"]) == \
        ("vqhit-tiny", 64, 8, 256)
    assert str(random_inception_weights) in settings["inception_weights"]
    assert str(random_alexnet_backbone) in settings["lpips"]
    assert settings["precision"] == "fp32" and settings["num_processes"] == 1
    assert settings["reference_statistics"]["status"] == "computed" and settings["reference_statistics"]["n"] == 2
    assert json.loads((tmp_path / "out" / "eval_rfid.json").read_text()) == json.loads(json.dumps(report))
    table = capsys.readouterr().out
    for row in ("rfid", "psnr", "codebook_usage", "crop", "inception_weights", "precision", "dataset_size"):
        assert row in table
    # The evaluated folder's model card holds the figures and the protocol they were measured with.
    card = (model_dir / "README.md").read_text()
    assert f"| rFID | {metrics['rfid']:.4g} |" in card and f"| PSNR (dB) | {metrics['psnr']:.4g} |" in card
    assert "| crop | adm_center_crop |" in card and "| min_size | 0 |" in card
    assert "| reference_statistics.status | computed |" in card

    # PSNR, SSIM and usage are those of the uint8-rounded reconstructions of the ADM-cropped images.
    model = VQHiT.from_pretrained(model_dir).eval()
    dataset = eval_dataset(str(folder), 64, transform="adm_center_crop")
    x = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    with torch.no_grad():
        indices = model.encode(x)
        rec = to_uint8(model.decode_indices(indices)).float() / 127.5 - 1
    assert metrics["psnr"] == pytest.approx(psnr(x, rec).mean().item(), rel=1e-5)
    assert metrics["ssim"] == pytest.approx(ssim(x, rec).mean().item(), rel=1e-5)
    assert metrics["codebook_usage"] == len(indices.unique()) / 256

    # The reference file holds the originals' statistics (the first argument of the FID).
    saved = ReferenceStatistics.load(ref)
    assert saved.n == 2 and saved.protocol["crop"] == "adm_center_crop"
    np.testing.assert_array_equal(saved.mu, fid_calls[0][0])

    # Second run: the file is read, not recomputed or rewritten. Shift its mean so its use is visible.
    ReferenceStatistics(saved.mu + 1.0, saved.sigma, saved.n, saved.protocol).save(ref)
    stamp = ref.stat().st_mtime_ns
    again = main(argv + ["--overwrite"])  # the same --output-dir: its eval_rfid.json is replaced only when asked
    assert again["settings"]["reference_statistics"]["status"] == "loaded"
    assert ref.stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(fid_calls[1][0], saved.mu + 1.0)
    np.testing.assert_array_equal(fid_calls[1][2], fid_calls[0][2])  # the reconstructions' statistics, unchanged
    assert again["metrics"]["rfid"] != pytest.approx(report["metrics"]["rfid"])

    with pytest.raises(ValueError, match="another protocol"):  # 1 image is not the set the file describes
        main(argv + ["--num-images", "1", "--no-lpips", "--overwrite"])


def test_eval_rfid_without_fid_upsamples_small_images_and_min_size_skips_them(tmp_path, make_images, monkeypatch):
    def no_inception(*args, **kwargs):
        raise AssertionError("--no-fid must not build Inception")

    monkeypatch.setattr(evaluation, "InceptionFeatures", no_inception)
    torch.manual_seed(0)
    model_dir = VQHiT.from_preset("vqhit-tiny").save_pretrained(tmp_path / "model")  # 64 x 64 images
    make_images(tmp_path / "images", {"": 2}, size=(80, 70))
    make_images(tmp_path / "small", {"": 1}, size=(40, 32))
    (tmp_path / "small" / "img0.png").rename(tmp_path / "images" / "small.png")
    main = runpy.run_path(str(ROOT / "scripts" / "eval_rfid.py"), run_name="script")["main"]
    argv = ["--model", str(model_dir), "--data", str(tmp_path / "images"), "--no-fid", "--no-lpips",
            "--batch-size", "2", "--num-workers", "0", "--output-dir", str(tmp_path / "out"), "--no-progress",
            "--no-model-card", "--overwrite"]

    with pytest.warns(BadImageWarning, match=r"small\.png is 40x32.*upsampled"):
        report = main(argv)  # the protocol's default: the 40 x 32 image is upsampled (ADM), not dropped
    metrics, settings = report["metrics"], report["settings"]
    assert (metrics["num_images"], metrics["num_skipped"], metrics["num_upsampled"]) == (3, 0, 1)
    assert metrics["rfid"] is None and metrics["lpips"] is None
    assert np.isfinite(metrics["psnr"]) and 0 < metrics["ssim"] <= 1 and 0 < metrics["codebook_usage"] <= 1
    assert settings["min_size"] == 0 and "upsampled" in settings["small_images"]
    assert settings["inception_weights"] == "not used (no rFID)"
    card = model_dir / "README.md"  # save_pretrained may write a card without figures
    assert not card.exists() or "PSNR" not in card.read_text()  # --no-model-card

    with pytest.warns(BadImageWarning, match=r"small\.png: .*below min_size=48"):
        report = main(argv + ["--min-size", "48"])  # the user's choice: short side below 48 skipped, and recorded
    assert (report["metrics"]["num_images"], report["metrics"]["num_skipped"]) == (2, 1)
    assert report["settings"]["min_size"] == 48 and "< 48 skipped" in report["settings"]["small_images"]
    with pytest.raises(ValueError, match="--no-fid"):
        main(argv + ["--ref-stats", str(tmp_path / "ref.npz")])


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network: every name lookup and connection fails, and is recorded; no download cache holds weights."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-cache"))
    return attempts


def test_eval_rfid_offline_reports_what_needs_no_weights_and_names_the_flags_otherwise(folder, offline, tmp_path,
                                                                                        capsys):
    """`--no-fid --no-lpips` downloads nothing (PSNR, SSIM, codebook usage and perplexity), as --help says;
    `--no-fid` alone still needs LPIPS's backbone, and offline says so in one error naming both ways out."""
    torch.manual_seed(0)
    model_dir = VQHiT.from_preset("vqhit-tiny").save_pretrained(tmp_path / "model")
    main = runpy.run_path(str(ROOT / "scripts" / "eval_rfid.py"), run_name="script")["main"]
    argv = ["--model", str(model_dir), "--data", str(folder), "--num-workers", "0", "--output-dir",
            str(tmp_path / "out"), "--overwrite"]

    report = main(argv + ["--no-fid", "--no-lpips"])
    metrics = report["metrics"]
    assert metrics["rfid"] is None and metrics["lpips"] is None and metrics["num_images"] == 2
    assert np.isfinite(metrics["psnr"]) and 0 < metrics["ssim"] <= 1
    assert 0 < metrics["codebook_usage"] <= 1 and metrics["codebook_perplexity"] >= 1
    assert offline == []  # not one connection attempted
    # Beside the report, the plot of the code frequencies, whose title holds the report's usage and perplexity.
    plot = Image.open(tmp_path / "out" / "codebook_usage.png")
    assert plot.size == (700, 400)
    used = round(metrics["codebook_usage"] * 256)
    assert plot.text["Title"] == (f"codebook usage {100 * metrics['codebook_usage']:.1f}% ({used} of 256 codes), "
                                  f"perplexity {metrics['codebook_perplexity']:.1f}")
    bar = capsys.readouterr().err
    assert "reconstruct" in bar and "rFID" not in bar  # the progress bar names what it does

    with pytest.raises(UsageError, match=r"LPIPS .*--lpips-backbone PATH.*--no-lpips"):
        main(argv + ["--no-fid"])
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "with --no-lpips too, no metric needs downloaded weights" in help_text


class ReplayGenerator(torch.nn.Module):
    """A 'generator' that returns given images in order, whatever the latents: samples = a known image set."""

    def __init__(self, images: torch.Tensor):
        super().__init__()
        self.images, self.position = images, 0
        self.config = SimpleNamespace(resolution=images.shape[-1], latent_dim=4, preset=None)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.images[self.position:self.position + len(z)]
        self.position += len(z)
        return out


def test_fid_of_a_set_with_itself_is_zero_through_the_pipeline(folder, random_inception_weights, fid_calls):
    # Reference: the folder through the data path. Samples: the same images through the generator path.
    dataset = eval_dataset(str(folder), 32)
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    report = evaluate_generator(ReplayGenerator(images), dataset=dataset, num_samples=2,
                                inception_weights=random_inception_weights, batch_size=1, device="cpu",
                                progress=False)
    mu_ref, sigma_ref, mu_samples, sigma_samples = fid_calls[0]
    np.testing.assert_allclose(mu_samples, mu_ref, rtol=1e-6)
    np.testing.assert_allclose(sigma_samples, sigma_ref, rtol=1e-4, atol=1e-6 * np.abs(sigma_ref).max())
    trace = np.trace(sigma_ref)
    assert trace > 1.0  # the random Inception's features do differ between images
    assert abs(report["metrics"]["fid"]) < 1e-6 * trace
    assert report["metrics"]["num_samples"] == 2 and report["metrics"]["inception_score"] >= 1.0
    reference = report["settings"]["reference_statistics"]
    assert (reference["status"], reference["n"], reference["protocol"]["crop"]) == ("computed", 2, "center_crop")


def test_eval_gan_script(random_inception_weights, fid_calls, tmp_path, capsys):
    torch.manual_seed(0)
    model_dir = HiTGenerator.from_preset("hit-tiny").save_pretrained(tmp_path / "model")
    main = runpy.run_path(str(ROOT / "scripts" / "eval_gan.py"), run_name="script")["main"]
    out = tmp_path / "out"
    # A foreign reference file (pytorch-fid's format: mu and sigma only), of low rank for lowrank_frechet_distance.
    feats = np.random.default_rng(0).normal(size=(5, 2048))
    np.savez(tmp_path / "foreign.npz", mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
    report = main(["--model", str(model_dir), "--ref-stats", str(tmp_path / "foreign.npz"), "--num-samples", "3",
                   "--is-split-size", "2", "--inception-weights", str(random_inception_weights), "--batch-size", "2",
                   "--grid-size", "2", "--interp-rows", "2", "--interp-steps", "3", "--interpolation", "slerp",
                   "--output-dir", str(out), "--no-progress"])
    metrics, settings = report["metrics"], report["settings"]
    assert set(metrics) == {"fid", "inception_score", "inception_score_std", "num_samples"}
    assert metrics["num_samples"] == 3 and metrics["fid"] > 0
    assert metrics["inception_score"] >= 1.0 and metrics["inception_score_std"] >= 0
    assert settings["is_splits"] == 1 and settings["seed"] == 0 and settings["interpolation"] == "slerp"
    assert settings["reference_statistics"]["status"] == "loaded" and settings["reference_statistics"]["n"] is None
    assert settings["preset"] == "hit-tiny" and settings["resolution"] == 32
    assert len(fid_calls) == 1
    np.testing.assert_allclose(fid_calls[0][0], feats.mean(0))  # the file's statistics are the reference
    grid = np.asarray(Image.open(out / "samples.png"))
    assert grid.shape == (2 * 32, 2 * 32, 3)
    generator = HiTGenerator.from_pretrained(model_dir).eval()
    with torch.no_grad():  # the grid is row-major: its top-right tile is the second sample of --seed 0
        z = torch.randn(4, generator.config.latent_dim, generator=torch.Generator().manual_seed(0))
        second = to_uint8(generator(z))[1].permute(1, 2, 0).numpy().astype(int)
    assert np.abs(grid[:32, 32:].astype(int) - second).max() <= 1
    assert Image.open(out / "interpolation.png").size == (3 * 32, 2 * 32)  # (width = steps, height = rows)
    assert json.loads((out / "eval_gan.json").read_text())["files"]["sample_grid"] == str(out / "samples.png")
    assert "inception_score" in capsys.readouterr().out

    with pytest.raises(ValueError, match="reference"):
        main(["--model", str(model_dir), "--ref-stats", str(tmp_path / "missing.npz")])


@pytest.mark.parametrize("script, report", [("eval_rfid.py", "eval_rfid.json"), ("eval_gan.py", "samples.png")])
def test_eval_scripts_check_their_output_folder_before_any_work(script, report, tmp_path, folder):
    """An earlier report (another model's, in the shared default folder) is not replaced unless --overwrite, and an
    --output-dir that is a file is refused: both at the start (here before --model, which does not exist, is read),
    not after an evaluation whose results would then be lost."""
    main = runpy.run_path(str(ROOT / "scripts" / script), run_name="script")["main"]
    argv = ["--model", str(tmp_path / "no-such-model"), "--data", str(folder), "--no-progress"]
    out = tmp_path / "eval"
    out.mkdir()
    (out / report).write_text("the first model's report")
    with pytest.raises(UsageError, match=f"--output-dir {out} already holds 1 of the .* files .*{report}.*"
                                         f"new folder.*--overwrite"):
        main(argv + ["--output-dir", str(out)])
    assert (out / report).read_text() == "the first model's report"
    with pytest.raises(UsageError, match="--model"):  # asked for: the check passes and the script goes on
        main(argv + ["--output-dir", str(out), "--overwrite"])
    with pytest.raises(UsageError, match=f"--output-dir {out / report} is a file, not a folder"):
        main(argv + ["--output-dir", str(out / report), "--overwrite"])


def test_a_damaged_or_foreign_weights_file_is_one_error_naming_its_option(folder, tmp_path, capsys):
    """Garbage, another network's tensors, a pickled object or a folder given as --inception-weights or
    --lpips-backbone: one `error:` line naming the option, the file, why and the fix; no traceback."""
    from vqhit import cli

    torch.manual_seed(0)
    model_dir = VQHiT.from_preset("vqhit-tiny").save_pretrained(tmp_path / "model")
    main = runpy.run_path(str(ROOT / "scripts" / "eval_rfid.py"), run_name="script")["main"]
    junk, wrong, not_tensors = tmp_path / "junk.pth", tmp_path / "wrong.pth", tmp_path / "list.pth"
    junk.write_text("junk\n")
    torch.save({"a": torch.zeros(2), "features.0.weight": torch.zeros(3)}, wrong)
    torch.save([torch.zeros(2)], not_tensors)
    cases = [(junk, "unreadable as a torch file"), (tmp_path, "it is a folder"),
             (not_tensors, "it holds a list, not a state dict of tensors")]
    for option, off, extra in [("--inception-weights", "--no-lpips", (wrong, "the tensors of another network: "
                                                                       "472 missing, 2 unexpected")),
                               ("--lpips-backbone", "--no-fid", (wrong, "9 of the 10 backbone tensors missing"))]:
        for path, why in [*cases, extra]:
            argv = ["--model", str(model_dir), "--data", str(folder), off, option, str(path), "--num-workers", "0",
                    "--output-dir", str(tmp_path / "out"), "--no-progress"]
            with pytest.raises(SystemExit) as exit_info:
                cli.run(main, argv)
            err = capsys.readouterr().err
            assert exit_info.value.code == 2 and "Traceback" not in err, err
            err = err.splitlines()[-1]  # (after the datasets library's progress line)
            assert err.startswith(f"error: {option} {path}: not a weights file of ") and f"({why}" in err, err
            assert "leave the option out to download it" in err and "weights_path" not in err


def test_a_damaged_ref_stats_file_or_a_folder_is_one_error_naming_the_option(folder, random_inception_weights,
                                                                            tmp_path):
    """Text, a truncated zip, object (pickled) arrays, a bare .npy or a folder as --ref-stats: refused before any
    work, naming --ref-stats and the fix; the file is left as it was."""
    np.savez(tmp_path / "good.npz", mu=np.zeros(3), sigma=np.eye(3))
    good = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "text.npz").write_text("not statistics\n")
    (tmp_path / "truncated.npz").write_bytes(good[: len(good) // 2])
    np.savez(tmp_path / "objects.npz", mu=np.array([{"a": 1}], dtype=object), sigma=np.eye(3))
    np.save(tmp_path / "array.npy", np.zeros(3))
    (tmp_path / "folder").mkdir()
    torch.manual_seed(0)
    model_dir = VQHiT.from_preset("vqhit-tiny").save_pretrained(tmp_path / "model")
    rfid = runpy.run_path(str(ROOT / "scripts" / "eval_rfid.py"), run_name="script")["main"]
    for name, why in [("text.npz", "unreadable: ValueError"), ("truncated.npz", "unreadable: BadZipFile"),
                      ("objects.npz", "unreadable: ValueError Object arrays"),
                      ("array.npy", "it is a single .npy array")]:
        before = (tmp_path / name).read_bytes()
        with pytest.raises(UsageError, match=rf"--ref-stats {tmp_path / name}: not a statistics file \({why}.*\); "
                                             r"pass an \.npz with 'mu' and 'sigma'"):
            rfid(["--model", str(model_dir), "--data", str(folder), "--ref-stats", str(tmp_path / name), "--no-lpips",
                  "--num-workers", "0", "--output-dir", str(tmp_path / "out"), "--no-progress"])
        assert (tmp_path / name).read_bytes() == before
    gan = runpy.run_path(str(ROOT / "scripts" / "eval_gan.py"), run_name="script")["main"]
    model_dir = HiTGenerator.from_preset("hit-tiny").save_pretrained(tmp_path / "gan")
    with pytest.raises(UsageError, match=rf"--ref-stats {tmp_path / 'folder'} is a folder; pass the path of an \.npz"):
        gan(["--model", str(model_dir), "--ref-stats", str(tmp_path / "folder"), "--inception-weights",
             str(random_inception_weights), "--output-dir", str(tmp_path / "out"), "--no-progress"])


@pytest.mark.parametrize("data", ["folder", "builtin:photos-heldout"])
def test_a_split_the_data_does_not_have_is_refused_naming_split(data, folder, tmp_path):
    data = str(folder) if data == "folder" else data
    torch.manual_seed(0)
    model_dir = VQHiT.from_preset("vqhit-tiny").save_pretrained(tmp_path / "model")
    main = runpy.run_path(str(ROOT / "scripts" / "eval_rfid.py"), run_name="script")["main"]
    with pytest.raises(UsageError, match=f"--split validation: {data} has only the split 'train'.*leave --split out"):
        main(["--model", str(model_dir), "--data", data, "--split", "validation", "--no-fid", "--no-lpips",
              "--num-workers", "0", "--output-dir", str(tmp_path / "out"), "--no-progress"])
    assert not (tmp_path / "out").exists()  # no report recording a split the data does not have
