"""The FID feature network: the same features as torch-fidelity's port of TensorFlow's Inception from
the same weights, the resize TensorFlow 1.x does, and the weights file loaded or refused clearly."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

from pipelines.inception import (
    FEATURE_DIM, load_inception, resize_like_tensorflow1, save_random_inception,
)


REFERENCE = Path(sys.prefix) / "reference" / "torch_fidelity"  # sys.prefix: the virtual environment


def torch_fidelity_inception_module():
    """torch-fidelity's Inception modules, loaded by file without its package `__init__` (which imports
    torchvision, whose PyPI wheels do not load against a CPU torch). `make install` puts the package in
    .venv/reference (--no-deps, off sys.path: installed, torchmetrics would import it and fail)."""
    root = REFERENCE
    if not (root / "feature_extractor_inceptionv3.py").is_file():
        pytest.skip(f"torch-fidelity is not at {root} (make install puts it there)")
    saved = {name: mod for name, mod in sys.modules.items() if name == "torch_fidelity" or name.startswith("torch_fidelity.")}
    package = types.ModuleType("torch_fidelity")
    package.__path__ = [str(root)]
    sys.modules["torch_fidelity"] = package
    try:
        modules = {}
        for name in ("defaults", "deprecations", "helpers", "feature_extractor_base", "interpolate_compat_tensorflow",
                     "feature_extractor_inceptionv3"):
            sub = importlib.util.spec_from_file_location(f"torch_fidelity.{name}", root / f"{name}.py")
            module = importlib.util.module_from_spec(sub)
            sys.modules[sub.name] = module
            sub.loader.exec_module(module)
            modules[name] = module
        return modules
    finally:
        for name in [n for n in sys.modules if n == "torch_fidelity" or n.startswith("torch_fidelity.")]:
            del sys.modules[name]
        sys.modules.update(saved)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_random_inception(tmp_path_factory.mktemp("inception") / "weights-inception-random.pth")


def test_features_equal_torch_fidelity_from_the_same_weights(weights):
    modules = torch_fidelity_inception_module()
    theirs = modules["feature_extractor_inceptionv3"].FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))
    ours = load_inception(weights)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 96, 128), dtype=torch.uint8, generator=g)  # resized to 299 inside
    (expected,) = theirs(images)
    got = ours(images)
    assert got.shape == (3, FEATURE_DIM) and got.dtype == torch.float32
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5), (got - expected).abs().max()
    assert expected.std() > 1e-3  # features that vary: the comparison means something


def test_resize_matches_tensorflow1_bilinear_as_torch_fidelity_ports_it():
    resize = torch_fidelity_inception_module()["interpolate_compat_tensorflow"].interpolate_bilinear_2d_like_tensorflow1x
    g = torch.Generator().manual_seed(1)
    for h, w in ((32, 32), (64, 48), (512, 512), (299, 299), (1024, 700)):
        x = torch.rand(1, 3, h, w, generator=g) * 255
        assert torch.allclose(resize_like_tensorflow1(x, 299), resize(x, size=(299, 299), align_corners=False), atol=1e-3)


def test_weights_missing_or_foreign_are_refused_with_the_file_to_supply(tmp_path):
    with pytest.raises(ValueError, match="weights-inception-2015-12-05-6726825d.pth"):
        load_inception(None)
    with pytest.raises(ValueError, match="not found.*weights-inception-2015-12-05"):
        load_inception(tmp_path / "absent.pth")
    foreign = tmp_path / "foreign.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, foreign)
    with pytest.raises(ValueError, match="not the FID Inception's weights file"):
        load_inception(foreign)
    pickled = tmp_path / "pickled.pth"  # a file that would run code when unpickled is not loaded
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1), "extra": Path("/etc/passwd")}, pickled)
    with pytest.raises(ValueError, match="refusing to load .*not a plain tensor state dict"):
        load_inception(pickled)


def test_input_must_be_uint8_images(weights):
    model = load_inception(weights)
    with pytest.raises(ValueError, match="uint8"):
        model(torch.rand(1, 3, 32, 32))
