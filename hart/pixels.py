"""Pixels <-> model tensors: the one definition of the image range the models work in.

Design: every model here (tokenizer encoder and decoder, the transformer's samples) works on
float images in [-1, 1], channels first; data arrives and leaves as uint8 RGB, channels last
(decoded shards, PIL images, PNG files, MLflow grids). `to_model` and `to_uint8` are the only two
conversions (`to_pil` is `to_uint8` as PIL images), so precompute, training, generation, evaluation and logging see the same pixels.

Shape legend: B images, H/W sides, 3 RGB channels.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_model(images_BHW3: np.ndarray | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1] (on `device` if given)."""
    x = torch.from_numpy(np.ascontiguousarray(images_BHW3)) if isinstance(images_BHW3, np.ndarray) else images_BHW3
    if device is not None:
        x = x.to(device, non_blocking=True)
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(images_B3HW: torch.Tensor) -> np.ndarray:
    """float (B, 3, H, W) in [-1, 1] -> uint8 numpy (B, H, W, 3), clamped and rounded."""
    array = images_B3HW.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return np.ascontiguousarray(array.permute(0, 2, 3, 1).cpu().numpy())


def to_pil(images_B3HW: torch.Tensor) -> list[Image.Image]:
    """[-1, 1] images -> RGB PIL images."""
    return [Image.fromarray(a) for a in to_uint8(images_B3HW)]


__all__ = ["to_model", "to_uint8", "to_pil"]
