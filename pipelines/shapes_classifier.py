"""A model-free classifier of "shapes" images: which colour and which shape is drawn.

Design: the demo measures prompt following by classifying generated images, so the
classifier must be simple, deterministic and checkable on real dataset images first
(the demo refuses to report generation accuracy if it scores < 98% on real images).

- Background: the median colour of the 2-pixel border (shapes never touch the border).
- Foreground: pixels farther than `threshold` (RGB Euclidean) from the background; the
  largest blob is not needed because images hold one shape.
- Colour: the palette colour nearest to the median foreground pixel.
- Shape: fill ratio of the foreground inside its bounding box (square ~1.0,
  circle ~pi/4 = 0.785, triangle ~0.5), refined by the triangle's signature: its top
  quarter rows are much narrower than its bottom quarter rows.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from pipelines.shapes import COLOURS, SHAPES

_PALETTE_NAMES = tuple(COLOURS)
_PALETTE_RGB = np.array([COLOURS[name] for name in _PALETTE_NAMES], dtype=np.float32)


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {array.shape}")
    return array


def classify(image: Image.Image | np.ndarray, threshold: float = 60.0) -> tuple[str | None, str | None]:
    """(colour, shape) of the single shape in `image`; (None, None) when nothing stands out."""
    rgb_HW3 = _as_array(image)
    border = np.concatenate([rgb_HW3[:2].reshape(-1, 3), rgb_HW3[-2:].reshape(-1, 3),
                             rgb_HW3[:, :2].reshape(-1, 3), rgb_HW3[:, -2:].reshape(-1, 3)])
    background = np.median(border, axis=0)
    mask_HW = np.linalg.norm(rgb_HW3 - background, axis=-1) > threshold
    if mask_HW.sum() < 4:
        return None, None
    foreground = np.median(rgb_HW3[mask_HW], axis=0)
    colour = _PALETTE_NAMES[int(np.argmin(np.linalg.norm(_PALETTE_RGB - foreground, axis=-1)))]

    rows, cols = np.nonzero(mask_HW)
    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
    box = mask_HW[top:bottom + 1, left:right + 1]
    fill = box.mean()
    height = box.shape[0]
    quarter = max(1, height // 4)
    top_width = box[:quarter].sum(1).mean()
    bottom_width = box[-quarter:].sum(1).mean()
    taper = top_width / max(bottom_width, 1e-6)
    if taper < 0.6 and fill < 0.75:
        shape = "triangle"
    elif fill > 0.9:
        shape = "square"
    else:
        shape = "circle"
    assert shape in SHAPES
    return colour, shape


def accuracy(images: list, labels: list[tuple[str, str]]) -> dict[str, float]:
    """Colour, shape and joint accuracy of `classify` over images with (colour, shape) labels."""
    if len(images) != len(labels) or not images:
        raise ValueError("need the same, non-zero number of images and labels")
    predictions = [classify(image) for image in images]
    colour_ok = [p[0] == t[0] for p, t in zip(predictions, labels)]
    shape_ok = [p[1] == t[1] for p, t in zip(predictions, labels)]
    return {
        "colour_accuracy": float(np.mean(colour_ok)),
        "shape_accuracy": float(np.mean(shape_ok)),
        "joint_accuracy": float(np.mean([c and s for c, s in zip(colour_ok, shape_ok)])),
    }
