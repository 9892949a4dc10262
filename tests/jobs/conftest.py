"""Fixtures of the training-job tests (tests/jobs).

- `tiny_lpips_weights`: a tiny LPIPS metric (VGG trunk widths 4..16) written as two local files
  the way users bring the real ones: the trunk with torchvision's `features.*` keys (plus an
  unused classifier key, as a full torchvision checkpoint has) and the heads `lin{i}.model.1.weight`.
"""

from __future__ import annotations

import pytest
import torch

TINY_VGG = (4, 8, 8, 16, 16)


@pytest.fixture
def tiny_lpips_weights(tmp_path) -> list[str]:
    from hart.tokenizer.perceptual import PerceptualLoss
    from hart.weights import save_weight_file

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state = PerceptualLoss(TINY_VGG).state_dict()
    trunk = {k: v for k, v in state.items() if k.startswith("features.")}
    heads = {k: v.abs() for k, v in state.items() if k.startswith("lin")}  # LPIPS heads are >= 0
    paths = [tmp_path / "lpips" / "vgg16.pth", tmp_path / "lpips" / "lpips_vgg.safetensors"]
    save_weight_file({**trunk, "classifier.0.weight": torch.zeros(2, 2)}, paths[0])
    save_weight_file(heads, paths[1])
    return [str(p) for p in paths]
