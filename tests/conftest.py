"""Shared fixtures and helpers: offline stand-ins for downloaded weights, small image folders made on the spot, a
free port for multi-process tests, and weights far from their initialisation (`nontrivial`)."""
import math
import socket
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn


def random_inception_network():
    """torch-fidelity's FID Inception with its random initialisation: the official weights are never fetched."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    class _Unloaded(fe.FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # keep the random init instead of real weights
            return None

    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}):
        return _Unloaded("random", ["2048", "logits_unbiased"])


@pytest.fixture(scope="session")
def random_inception_weights(tmp_path_factory) -> Path:
    """A random-weight state dict of torch-fidelity's FID Inception, saved like the official file.

    The numbers it gives mean nothing, but they depend on the image: BatchNorm statistics are calibrated on
    one random image, so activations neither vanish nor explode through the 90 layers (with the default
    statistics every image maps to nearly the same features and any FID would be ~0).
    """
    torch.manual_seed(0)
    net = random_inception_network()
    batch_norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in batch_norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: one batch sets the statistics exactly
        bn.train()
    with torch.no_grad():
        net(torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8))  # 299x299 inside: 1 image is plenty
    path = tmp_path_factory.mktemp("inception") / "inception-random.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def random_alexnet_backbone(tmp_path_factory) -> Path:
    """A random torchvision AlexNet `features.*` state dict: LPIPS's offline backbone file, random weights."""
    import torchvision

    with torch.device("meta"):  # names and shapes only; the 58M-parameter classifier is never built
        shapes = {k: v.shape for k, v in torchvision.models.alexnet().state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=generator) * 0.05 for k, shape in shapes.items()
             if k.startswith("features.")}
    path = tmp_path_factory.mktemp("alexnet") / "alexnet-random.pth"
    torch.save(state, path)
    return path


def make_image_folder(folder: Path, counts: dict[str, int], size=(80, 70), seed: int = 0) -> list[Path]:
    """Smooth random RGB PNGs in class sub-folders ({"a": 3, "b": 2}); "" puts files at the top level."""
    rng = np.random.default_rng(seed)
    paths = []
    for label, count in counts.items():
        (folder / label).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            coarse = rng.integers(0, 256, size=(size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
            image = Image.fromarray(coarse).resize(size, Image.BICUBIC)  # smooth, so crops keep structure
            path = folder / label / f"img{i}.png"
            image.save(path)
            paths.append(path)
    return paths


@pytest.fixture(scope="session")
def make_images():
    """The `make_image_folder` function, for tests and module fixtures."""
    return make_image_folder


def free_port() -> int:
    """A TCP port free on this machine now: the rendezvous port of a multi-process test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nontrivial(model: nn.Module, seed: int = 0) -> nn.Module:
    """Weights far from their initialisation, so that a folding or export mistake shows in the output: BatchNorm
    running statistics and affine parameters away from 0 / 1, Linear weights of unit gain, visible positional
    tables."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                m.weight.copy_(1 + 0.3 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.num_features, generator=g))
            elif isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(m.in_features))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
        for name, p in model.named_parameters():
            if name.endswith("pos_embed"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model
