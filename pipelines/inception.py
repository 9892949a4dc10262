"""The FID feature network: Inception v3 as TensorFlow's 2015-12-05 graph, loaded from a user's file.

FID and KID are only comparable across papers when every run uses the same network, weights and
resize. The standard is TensorFlow's `pool_3` features of the 2015-12-05 Inception graph, which
torch-fidelity and torchmetrics (through torch-fidelity) port to PyTorch; their weights file is
`weights-inception-2015-12-05-6726825d.pth`. This module is that network with the same parameter
names, so the same file loads here, strictly:

- images arrive as uint8 (B, 3, H, W) and are resized to 299x299 the way TensorFlow 1.x's
  `resize_bilinear` does it (no half-pixel offset: source = destination * in/out), then mapped to
  [-1, 1] by (x - 128) / 128;
- the blocks are torchvision's Inception v3 blocks with the FID graph's differences: average pools
  exclude the padding, and the last block pools with a max, not an average;
- the output is the 2048-d average-pooled feature (`pool_3`), in float32.

Why not torch-fidelity itself: its package imports torchvision at import time (whose PyPI wheels
are CUDA builds that cannot load against a CPU torch) and it unpickles weight files without the
weights-only guard. Here weights go through `hart.weights` (safetensors or
`weights_only=True`). `tests/pipelines/test_inception.py` checks that this network and
torch-fidelity's produce the same features from the same random weights.

Nothing is downloaded: the user names the file (`--inception PATH`); a missing file is an error
that says where to get it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

INPUT_SIZE = 299
FEATURE_DIM = 2048
WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_HELP = (
    f"the FID Inception weights ({WEIGHTS_NAME}, 95 MB: the TensorFlow 2015-12-05 graph as ported by torch-fidelity, "
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + WEIGHTS_NAME + ")"
)


class Conv(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3, TensorFlow's), ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x):  # the FID graph's pools leave the padding out of the average
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class MixedA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | pool-1x1."""

    def __init__(self, in_ch: int, pool_ch: int):
        super().__init__()
        self.branch1x1 = Conv(in_ch, 64, 1)
        self.branch5x5_1 = Conv(in_ch, 48, 1)
        self.branch5x5_2 = Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = Conv(in_ch, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, padding=1)
        self.branch_pool = Conv(in_ch, pool_ch, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool(x)),
        ], 1)


class ReduceB(nn.Module):
    """35x35 -> 17x17: 3x3/2 | 1x1-3x3-3x3/2 | max pool/2."""

    def __init__(self, in_ch: int):
        super().__init__()
        self.branch3x3 = Conv(in_ch, 384, 3, stride=2)
        self.branch3x3dbl_1 = Conv(in_ch, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class MixedC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (c7 channels inside)."""

    def __init__(self, in_ch: int, c7: int):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = Conv(in_ch, 192, 1)
        self.branch7x7_1 = Conv(in_ch, c7, 1)
        self.branch7x7_2 = Conv(c7, c7, **row)
        self.branch7x7_3 = Conv(c7, 192, **col)
        self.branch7x7dbl_1 = Conv(in_ch, c7, 1)
        self.branch7x7dbl_2 = Conv(c7, c7, **col)
        self.branch7x7dbl_3 = Conv(c7, c7, **row)
        self.branch7x7dbl_4 = Conv(c7, c7, **col)
        self.branch7x7dbl_5 = Conv(c7, 192, **row)
        self.branch_pool = Conv(in_ch, 192, 1)

    def forward(self, x):
        dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            self.branch7x7dbl_5(self.branch7x7dbl_4(dbl)),
            self.branch_pool(_avg_pool(x)),
        ], 1)


class ReduceD(nn.Module):
    """17x17 -> 8x8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max pool/2."""

    def __init__(self, in_ch: int):
        super().__init__()
        self.branch3x3_1 = Conv(in_ch, 192, 1)
        self.branch3x3_2 = Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = Conv(in_ch, 192, 1)
        self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

    def forward(self, x):
        seven = self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))
        return torch.cat([
            self.branch3x3_2(self.branch3x3_1(x)),
            self.branch7x7x3_4(seven),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class MixedE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs; `max_pool`: the graph's last block pools with a max."""

    def __init__(self, in_ch: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = Conv(in_ch, 320, 1)
        self.branch3x3_1 = Conv(in_ch, 384, 1)
        self.branch3x3_2a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = Conv(in_ch, 448, 1)
        self.branch3x3dbl_2 = Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = Conv(in_ch, 192, 1)

    def forward(self, x):
        three = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(three), self.branch3x3_2b(three),
            self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
            self.branch_pool(pooled),
        ], 1)


def resize_like_tensorflow1(x_BCHW: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize as TensorFlow 1.x's `resize_bilinear(align_corners=False)`: source coordinate =
    destination * in/out (no half-pixel centres), neighbours clamped at the far edge."""
    def axis(n_in: int):  # float32 coordinates, as TensorFlow computes them
        src = torch.arange(size, dtype=torch.float32) * torch.tensor(n_in / size, dtype=torch.float32)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo, hi, (src - lo).to(x_BCHW.dtype)

    (top, bottom, wy), (left, right, wx) = axis(x_BCHW.shape[2]), axis(x_BCHW.shape[3])
    rows = x_BCHW[:, :, top] + (x_BCHW[:, :, bottom] - x_BCHW[:, :, top]) * wy[:, None]
    return rows[..., left] + (rows[..., right] - rows[..., left]) * wx


class InceptionFeatures(nn.Module):
    """uint8 images (B, 3, H, W) -> FID features (B, 2048), float32. `num_features` is what
    torchmetrics' FID/KID read from a custom feature module."""

    num_features = FEATURE_DIM

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = Conv(80, 192, 3)
        self.Mixed_5b = MixedA(192, 32)
        self.Mixed_5c = MixedA(256, 64)
        self.Mixed_5d = MixedA(288, 64)
        self.Mixed_6a = ReduceB(288)
        self.Mixed_6b = MixedC(768, 128)
        self.Mixed_6c = MixedC(768, 160)
        self.Mixed_6d = MixedC(768, 160)
        self.Mixed_6e = MixedC(768, 192)
        self.Mixed_7a = ReduceD(768)
        self.Mixed_7b = MixedE(1280, max_pool=False)
        self.Mixed_7c = MixedE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, 1008)  # the graph's logits: in the weights file, unused for FID

    @torch.no_grad()
    def forward(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        if images_B3HW.dtype != torch.uint8 or images_B3HW.dim() != 4 or images_B3HW.shape[1] != 3:
            raise ValueError(f"expected uint8 images (B, 3, H, W), got {images_B3HW.dtype} {tuple(images_B3HW.shape)}")
        x = resize_like_tensorflow1(images_B3HW.float(), INPUT_SIZE)
        x = (x - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3)).float()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_inception(path: str | Path | None, device: torch.device | str = "cpu") -> InceptionFeatures:
    """The feature network with the user's weights (strict keys), in eval mode on `device`."""
    from hart.weights import load_weight_file

    if not path:
        raise ValueError(f"FID/KID need {WEIGHTS_HELP}; pass its path (--inception PATH)")
    if not Path(path).is_file():
        raise ValueError(f"Inception weights not found at {path}: put {WEIGHTS_HELP} there")
    model = InceptionFeatures()
    state = load_weight_file(path)
    missing = sorted(set(model.state_dict()) - set(state) - {k for k in model.state_dict() if k.endswith("num_batches_tracked")})
    unexpected = sorted(set(state) - set(model.state_dict()))
    if missing or unexpected:
        raise ValueError(f"{path} is not the FID Inception's weights file ({len(missing)} keys missing, e.g. "
                         f"{missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]}): expected {WEIGHTS_HELP}")
    model.load_state_dict(state, strict=False)  # only num_batches_tracked may be absent (not used in eval)
    return model.to(device).eval().requires_grad_(False)


def save_random_inception(path: str | Path, seed: int = 0) -> Path:
    """A stand-in weights file with random weights, in the layout of the real one (tests, benchmarks)."""
    torch.manual_seed(seed)
    model = InceptionFeatures()
    for module in model.modules():
        if isinstance(module, nn.Conv2d):  # He init: the signal keeps its scale through 40-odd layers
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        if isinstance(module, nn.BatchNorm2d):  # statistics that keep activations in a sane range
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.1, 0.1)
    torch.save(model.state_dict(), path)
    return Path(path)
