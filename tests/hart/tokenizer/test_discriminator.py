"""Tests of hart/tokenizer/discriminator.py: the PatchGAN critic saved beside the tokenizer.

Covered: the released key names and shapes (`main.{0,2,3,5,6,8,9,11}`), the logit-map size for a
given image size, that each logit sees only its own patch, the GAN initialisation, and the refusals
(no layers, wrong channel count).

Run: .venv/bin/pytest tests/hart/tokenizer/test_discriminator.py -q
"""

from __future__ import annotations

import pytest
import torch

from hart.tokenizer.discriminator import NLayerDiscriminator


def test_released_keys_and_shapes():
    with torch.device("meta"):
        disc = NLayerDiscriminator()
    shapes = {k: tuple(v.shape) for k, v in disc.state_dict().items()}
    convs = {k: v for k, v in shapes.items() if k.endswith("weight") and len(v) == 4}
    assert convs == {
        "main.0.weight": (64, 3, 4, 4), "main.2.weight": (128, 64, 4, 4), "main.5.weight": (256, 128, 4, 4),
        "main.8.weight": (512, 256, 4, 4), "main.11.weight": (1, 512, 4, 4),
    }
    assert {k for k in shapes if k.endswith(".bias") and k.split(".")[1] in {"0", "2", "5", "8", "11"}} == {
        "main.0.bias", "main.11.bias"}  # the hidden convs have none: a BatchNorm follows each
    for index, width in (("3", 128), ("6", 256), ("9", 512)):
        assert {k: v for k, v in shapes.items() if k.startswith(f"main.{index}.")} == {
            f"main.{index}.weight": (width,), f"main.{index}.bias": (width,), f"main.{index}.running_mean": (width,),
            f"main.{index}.running_var": (width,), f"main.{index}.num_batches_tracked": (),
        }


@pytest.mark.parametrize("size, num_layers, side", [(32, 3, 2), (64, 3, 6), (64, 1, 30)])
def test_one_logit_per_patch(size, num_layers, side):
    torch.manual_seed(0)
    disc = NLayerDiscriminator(ndf=8, num_layers=num_layers).eval()
    with torch.no_grad():
        assert disc(torch.randn(2, 3, size, size)).shape == (2, 1, side, side)


def test_each_logit_sees_only_its_patch():
    """One layer: receptive field 16 px. A change in the bottom-right corner leaves the top-left logits alone."""
    torch.manual_seed(0)
    disc = NLayerDiscriminator(ndf=8, num_layers=1).eval()
    images = torch.randn(1, 3, 64, 64)
    changed = images.clone()
    changed[..., 60:, 60:] += 1.0
    with torch.no_grad():
        a, b = disc(images), disc(changed)
    assert torch.equal(a[..., :20, :20], b[..., :20, :20])
    assert not torch.allclose(a[..., -1, -1], b[..., -1, -1])


def test_gan_initialisation():
    torch.manual_seed(0)
    disc = NLayerDiscriminator()
    conv_weights = torch.cat([disc.main[i].weight.flatten() for i in (0, 2, 5, 8, 11)])
    assert abs(float(conv_weights.std()) - 0.02) < 1e-3 and abs(float(conv_weights.mean())) < 1e-3
    assert disc.main[0].bias.abs().sum() == 0 and disc.main[11].bias.abs().sum() == 0
    norm_weights = torch.cat([disc.main[i].weight for i in (3, 6, 9)])
    assert abs(float(norm_weights.mean()) - 1.0) < 5e-3 and 0.01 < float(norm_weights.std()) < 0.03
    assert all(disc.main[i].bias.abs().sum() == 0 for i in (3, 6, 9))


def test_refusals():
    with pytest.raises(ValueError, match="num_layers must be >= 1"):
        NLayerDiscriminator(num_layers=0)
    with pytest.raises(ValueError, match=r"expects images \(B, 3, H, W\)"):
        NLayerDiscriminator(ndf=8)(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"expects images \(B, 3, H, W\)"):
        NLayerDiscriminator(ndf=8)(torch.zeros(3, 32, 32))
