"""PatchGAN discriminator used for the tokenizer's adversarial loss
(docs/design/tokenizer.md, "PatchGAN discriminator").

Design: the taming-transformers / pix2pix "NLayerDiscriminator" that HART ships beside the
tokenizer (`disc.*` keys of the released `tokenizer/` folder). It is one `nn.Sequential` named
`main`, so its state-dict keys are `main.{0,2,3,5,6,8,9,11}` for the released shape
(ndf 64, 3 layers, BatchNorm):

    0 conv 4x4/2 (3 -> ndf, bias)            1 LeakyReLU(0.2)
    2 conv 4x4/2 (ndf -> 2 ndf, no bias)     3 BatchNorm   4 LeakyReLU
    5 conv 4x4/2 (2 ndf -> 4 ndf, no bias)   6 BatchNorm   7 LeakyReLU
    8 conv 4x4/1 (4 ndf -> 8 ndf, no bias)   9 BatchNorm  10 LeakyReLU
   11 conv 4x4/1 (8 ndf -> 1, bias)          -> one logit per overlapping patch

The output is a map of logits (B, 1, H', W'), one per receptive-field patch; the hinge losses in
`hart/tokenizer/objective.py` average over it. Initialisation follows the usual GAN recipe:
conv weights N(0, 0.02), BatchNorm weights N(1, 0.02) and zero bias.

Shape legend: B batch, C channels, H/W spatial size.
"""

from __future__ import annotations

import torch
from torch import nn


class NLayerDiscriminator(nn.Module):
    def __init__(self, in_channels: int = 3, ndf: int = 64, num_layers: int = 3):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.in_channels, self.ndf, self.num_layers = in_channels, ndf, num_layers
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ndf, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        mult = 1
        for n in range(1, num_layers + 1):
            prev, mult = mult, min(2**n, 8)
            # The last hidden conv keeps the resolution (stride 1); the others halve it.
            stride = 2 if n < num_layers else 1
            layers += [
                # No bias: the following BatchNorm has its own shift.
                nn.Conv2d(ndf * prev, ndf * mult, kernel_size=4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        if images_BCHW.ndim != 4 or images_BCHW.shape[1] != self.in_channels:
            raise ValueError(
                f"discriminator expects images (B, {self.in_channels}, H, W), got {tuple(images_BCHW.shape)}"
            )
        return self.main(images_BCHW)
