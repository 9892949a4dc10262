"""Tests of hart/tokenizer/perceptual.py: the LPIPS-style distance on a VGG16 trunk.

Covered: strict loading from user files (trunk with torchvision's VGG16 names, heads with LPIPS names,
in one file or two; classifier keys ignored; widths read from the heads) built offline as random
stand-ins, every refusal (missing keys, a key in two files, no file, a missing file, bad input
shapes), and the distance itself: zero for identical images, positive otherwise, symmetric, linear
in the heads, frozen yet differentiable with respect to the images.

Run: .venv/bin/pytest tests/hart/tokenizer/test_perceptual.py -q
"""

from __future__ import annotations

import pytest
import torch

from hart.tokenizer.perceptual import PerceptualLoss
from hart.weights import save_weight_file

TINY_VGG = (4, 8, 8, 16, 16)


def natural_images(batch: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    p = torch.rand(batch, 3, 3, generator=g)
    images = torch.sin(3 * (p[..., 0, None, None] + 0.5) * xs + 4 * p[..., 1, None, None] * ys + 6 * p[..., 2, None, None])
    return images.clamp(-1, 1)


def test_perceptual_from_file(tmp_path):
    torch.manual_seed(0)
    source = PerceptualLoss(TINY_VGG)
    state = source.state_dict()
    trunk = {k: v for k, v in state.items() if k.startswith("features.")}
    heads = {k: v.abs() for k, v in state.items() if k.startswith("lin")}  # LPIPS heads are >= 0
    save_weight_file({**trunk, "classifier.0.weight": torch.zeros(2, 2)}, tmp_path / "vgg16.pth")
    save_weight_file(heads, tmp_path / "lpips_heads.safetensors")
    metric = PerceptualLoss.from_files([tmp_path / "vgg16.pth", tmp_path / "lpips_heads.safetensors"], TINY_VGG)
    assert all(torch.equal(metric.state_dict()[k], v) for k, v in {**trunk, **heads}.items())

    images = natural_images(2)
    assert torch.allclose(metric(images, images), torch.zeros(2))
    assert (metric(images, images.flip(-1)) > 0).all()
    with pytest.raises(ValueError, match="missing keys.*lin4.model.1.weight"):
        PerceptualLoss.from_files(tmp_path / "vgg16.pth", TINY_VGG)


def test_perceptual_trunk_uses_torchvision_vgg16_keys():
    with torch.device("meta"):
        metric = PerceptualLoss()
    convs = {k: tuple(v.shape) for k, v in metric.state_dict().items() if k.startswith("features.") and k.endswith("weight")}
    indices = sorted(int(k.split(".")[1]) for k in convs)
    assert indices == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert convs["features.0.weight"] == (64, 3, 3, 3) and convs["features.28.weight"] == (512, 512, 3, 3)
    assert {k: tuple(v.shape) for k, v in metric.state_dict().items() if k.startswith("lin")} == {
        f"lin{i}.model.1.weight": (1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))
    }


@pytest.fixture
def weight_files(tmp_path):
    """A random tiny trunk (torchvision names) and non-negative heads (LPIPS names), in one file and split."""
    torch.manual_seed(0)
    state = PerceptualLoss(TINY_VGG).state_dict()
    state = {k: v.abs() if k.startswith("lin") else v for k, v in state.items()}
    save_weight_file(state, tmp_path / "lpips_all.safetensors")
    save_weight_file({k: v for k, v in state.items() if k.startswith("features.")}, tmp_path / "trunk.safetensors")
    save_weight_file({k: v for k, v in state.items() if k.startswith("lin")}, tmp_path / "heads.pth")
    return state, tmp_path


def test_widths_are_read_from_the_heads_and_one_file_equals_two(weight_files):
    state, folder = weight_files
    single = PerceptualLoss.from_files(folder / "lpips_all.safetensors")  # no channels given
    split = PerceptualLoss.from_files([str(folder / "trunk.safetensors"), str(folder / "heads.pth")])
    assert single.channels == split.channels == TINY_VGG
    images, targets = natural_images(2, seed=1), natural_images(2, seed=2)
    assert torch.equal(single(images, targets), split(images, targets))
    assert all(torch.equal(single.state_dict()[k], v) for k, v in state.items())


def test_loading_refusals(weight_files, tmp_path):
    _, folder = weight_files
    with pytest.raises(ValueError, match="more than one perceptual weight file"):
        PerceptualLoss.from_files([folder / "lpips_all.safetensors", folder / "heads.pth"])
    with pytest.raises(ValueError, match="not found"):
        PerceptualLoss.from_files([folder / "trunk.safetensors", folder / "absent.pth"])
    with pytest.raises(ValueError, match="at least one"):
        PerceptualLoss.from_files([])
    with pytest.raises(ValueError, match="wrong shapes"):  # heads of the tiny trunk against VGG16 widths
        PerceptualLoss.from_files(folder / "lpips_all.safetensors", channels=(8, 8, 8, 16, 16))
    with pytest.raises(ValueError, match="5 block widths"):
        PerceptualLoss((4, 8))


def test_distance_properties(weight_files):
    _, folder = weight_files
    metric = PerceptualLoss.from_files(folder / "lpips_all.safetensors")
    a, b = natural_images(3, seed=1), natural_images(3, seed=2)
    ab = metric(a, b)
    assert ab.shape == (3,) and (ab > 0).all()
    torch.testing.assert_close(metric(b, a), ab)  # symmetric
    assert (metric(a, a + 0.01 * (b - a)) < ab).all()  # a small step away is closer than the whole way
    with torch.no_grad():
        for head in metric.heads():
            head.model[1].weight.mul_(3.0)
    torch.testing.assert_close(metric(a, b), 3 * ab)  # linear in the heads
    with pytest.raises(ValueError, match=r"two \(B, 3, H, W\) batches"):
        metric(a, b[:2])
    with pytest.raises(ValueError, match=r"two \(B, 3, H, W\) batches"):
        metric(a[:, :1], b[:, :1])


def test_frozen_but_differentiable_and_never_in_training_mode():
    metric = PerceptualLoss(TINY_VGG)
    assert not any(p.requires_grad for p in metric.parameters())
    metric.train()
    assert not metric.training and not any(m.training for m in metric.modules())
    images = natural_images(2).requires_grad_(True)
    metric(images, natural_images(2, seed=3)).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
