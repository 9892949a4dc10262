"""LPIPS-style perceptual distance on a VGG16 feature trunk, in plain torch (no torchvision).

Design: LPIPS (Zhang et al. 2018, "vgg" variant) compares two images through the ReLU outputs
of the five VGG16 blocks (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3): each feature map is
unit-normalised along channels, the squared difference is weighted per channel by a learned
1x1 conv ("linear head", no bias), averaged over space and summed over the five blocks.

Weights are never downloaded. `PerceptualLoss.from_files(paths)` reads files the user already
has, through `hart.weights`, and matches them strictly:
- the trunk with torchvision's VGG16 key names `features.{0,2,5,...,28}.{weight,bias}` (the
  classifier keys of a full torchvision checkpoint are ignored on purpose: LPIPS never uses them);
- the heads with the LPIPS key names `lin{0..4}.model.1.weight`, shape (1, C, 1, 1).
Both may sit in one file or in two. Without weights the module is randomly initialised, which
is only useful for tests: a random trunk is not a perceptual metric.

`channels` can shrink the trunk widths (tests use a tiny one); the released metric uses
`VGG16_CHANNELS`. `from_files` reads them from the heads' shapes unless given. The network is frozen (requires_grad False) but differentiable w.r.t. its inputs.

Shape legend: B batch, C channels, H/W spatial size.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from hart.weights import load_weight_file, match_state_dict

VGG16_CHANNELS = (64, 128, 256, 512, 512)
# VGG16 conv layers per block; a 2x2 max-pool separates blocks.
VGG16_CONVS_PER_BLOCK = (2, 2, 3, 3, 3)
# LPIPS maps [-1, 1] images to the ImageNet statistics VGG was trained on: (x - shift) / scale.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


class _LinearHead(nn.Module):
    """1x1 conv without bias; the Dropout slot is kept (inactive in eval) so keys read `model.1.weight`."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(p=0.0), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.model(x_BCHW)


class PerceptualLoss(nn.Module):
    def __init__(self, channels: tuple[int, ...] = VGG16_CHANNELS):
        super().__init__()
        if len(channels) != len(VGG16_CONVS_PER_BLOCK):
            raise ValueError(f"channels must list {len(VGG16_CONVS_PER_BLOCK)} block widths, got {channels}")
        self.channels = tuple(channels)
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        # One flat Sequential with torchvision's indices, so its checkpoints load unchanged.
        layers: list[nn.Module] = []
        self.tap_indices: list[int] = []  # index of the ReLU closing each block
        width = 3
        for block, (out_width, num_convs) in enumerate(zip(self.channels, VGG16_CONVS_PER_BLOCK)):
            if block > 0:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            for _ in range(num_convs):
                layers += [nn.Conv2d(width, out_width, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
                width = out_width
            self.tap_indices.append(len(layers) - 1)
        self.features = nn.Sequential(*layers)
        self.lin0, self.lin1, self.lin2, self.lin3, self.lin4 = (_LinearHead(c) for c in self.channels)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_files(
        cls, paths: str | Path | list[str | Path], channels: tuple[int, ...] | None = None
    ) -> "PerceptualLoss":
        """Build and strictly load trunk + heads from one or more local weight files.

        `channels=None` reads the block widths from the heads `lin{i}.model.1.weight` (1, C, 1, 1)
        (VGG16's when the files have no heads; the strict match then names what is missing).
        """
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        if not paths:
            raise ValueError("PerceptualLoss.from_files needs at least one weight file")
        loaded: dict[str, torch.Tensor] = {}
        for path in paths:
            if not Path(path).is_file():
                raise ValueError(f"perceptual weight file not found: {path}")
            for key, value in load_weight_file(path).items():
                if key in loaded:
                    raise ValueError(f"key {key!r} appears in more than one perceptual weight file")
                loaded[key] = value
        if channels is None:
            heads = [loaded.get(f"lin{i}.model.1.weight") for i in range(len(VGG16_CHANNELS))]
            channels = tuple(int(h.shape[1]) for h in heads) if all(h is not None and h.ndim == 4 for h in heads) \
                else VGG16_CHANNELS
        module = cls(channels)
        loaded = {k: v for k, v in loaded.items() if not k.startswith("classifier.")}
        match_state_dict(module.state_dict(), loaded, what=f"perceptual weights {[str(p) for p in paths]}")
        module.load_state_dict(loaded, strict=True)
        return module

    def train(self, mode: bool = True) -> "PerceptualLoss":
        # A fixed metric: never switch to training behaviour (dropout), whatever the parent does.
        return super().train(False)

    def heads(self) -> list[_LinearHead]:
        return [self.lin0, self.lin1, self.lin2, self.lin3, self.lin4]

    def _taps(self, images_B3HW: torch.Tensor) -> list[torch.Tensor]:
        h = (images_B3HW - self.shift.to(images_B3HW.dtype)) / self.scale.to(images_B3HW.dtype)
        taps = []
        for index, layer in enumerate(self.features):
            h = layer(h)
            if index in self.tap_indices:
                taps.append(h)
        return taps

    def forward(self, images_B3HW: torch.Tensor, targets_B3HW: torch.Tensor) -> torch.Tensor:
        """Per-image perceptual distance (B,) between two batches of images in [-1, 1]."""
        if images_B3HW.shape != targets_B3HW.shape or images_B3HW.ndim != 4 or images_B3HW.shape[1] != 3:
            raise ValueError(
                f"perceptual loss needs two (B, 3, H, W) batches of the same shape, got "
                f"{tuple(images_B3HW.shape)} and {tuple(targets_B3HW.shape)}"
            )
        both = self._taps(torch.cat([images_B3HW, targets_B3HW], dim=0))
        B = images_B3HW.shape[0]
        distance_B = images_B3HW.new_zeros(B)
        for feature, head in zip(both, self.heads()):
            # Unit-normalise along channels (eps as LPIPS) so every block counts on the same scale.
            feature = feature / (feature.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
            diff_BCHW = (feature[:B] - feature[B:]).square()
            distance_B = distance_B + head(diff_BCHW).mean(dim=(1, 2, 3))
        return distance_B
