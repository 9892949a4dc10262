"""pipelines.shapes_classifier: right on real corpus images, and still right when edges wobble
the way a small decoder's reconstructions do (the case a bounding-box fill rule got wrong)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipelines import shapes_classifier
from pipelines.shapes import encode_image, render, sample_spec


def real(split: str, count: int, seed: int = 0):
    specs = [sample_spec(i, seed, split) for i in range(count)]
    images = [Image.open(io.BytesIO(encode_image(render(s), "jpg"))).convert("RGB") for s in specs]
    return images, [(s.colour, s.shape) for s in specs], specs


def wobble(image: Image.Image, amplitude: float, rng: np.random.Generator) -> Image.Image:
    """Displace every pixel by a smooth random field (about `amplitude` px, varying over ~8 px)."""
    rgb = np.asarray(image)
    H, W, _ = rgb.shape
    fields = []
    for _ in range(2):
        coarse = rng.normal(0, amplitude, (H // 8 + 1, W // 8 + 1)).astype(np.float32)
        fields.append(np.asarray(Image.fromarray(coarse, mode="F").resize((W, H), Image.BICUBIC)))
    y, x = np.mgrid[0:H, 0:W]
    ys = np.clip(np.round(y + fields[0]), 0, H - 1).astype(int)
    xs = np.clip(np.round(x + fields[1]), 0, W - 1).astype(int)
    return Image.fromarray(rgb[ys, xs])


def bbox_fill(image: Image.Image) -> float:
    rgb = np.asarray(image, dtype=np.float32)
    background = np.median(np.concatenate([rgb[:2].reshape(-1, 3), rgb[-2:].reshape(-1, 3)]), axis=0)
    mask = np.linalg.norm(rgb - background, axis=-1) > 60
    rows, cols = np.nonzero(mask)
    return float(mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1].mean())


@pytest.mark.parametrize("split,seed", [("train", 0), ("train", 1), ("heldout", 0)])
def test_real_images_are_classified(split, seed):
    images, labels, _ = real(split, 300, seed)
    scores = shapes_classifier.accuracy(images, labels)
    assert scores["joint_accuracy"] >= 0.99, scores


def test_wobbly_edges_keep_their_shape():
    images, labels, specs = real("heldout", 240)
    rng = np.random.default_rng(0)
    wobbly = [wobble(image, 1.5, rng) for image in images]
    scores = shapes_classifier.accuracy(wobbly, labels)
    assert scores["shape_accuracy"] >= 0.95 and scores["colour_accuracy"] >= 0.99, scores
    squares = [i for i, s in enumerate(specs) if s.shape == "square"]
    square_scores = shapes_classifier.accuracy([wobbly[i] for i in squares], [labels[i] for i in squares])
    assert square_scores["shape_accuracy"] >= 0.9, square_scores
    # these are the squares a "bounding-box fill > 0.9" rule calls circles
    assert np.mean([bbox_fill(wobbly[i]) < 0.9 for i in squares]) > 0.3


def test_blank_and_bad_inputs():
    assert shapes_classifier.classify(Image.new("RGB", (64, 64), (128, 128, 128))) == (None, None)
    with pytest.raises(ValueError, match="RGB"):
        shapes_classifier.classify(np.zeros((64, 64)))
    with pytest.raises(ValueError, match="same, non-zero"):
        shapes_classifier.accuracy([], [])


def test_templates_have_the_foregrounds_area():
    images, _, _ = real("heldout", 6)
    rgb = np.asarray(images[0], dtype=np.float32)
    mask = np.linalg.norm(rgb - rgb[0, 0], axis=-1) > 60
    for name, template in shapes_classifier.templates(mask).items():
        assert abs(template.sum() / mask.sum() - 1) < 0.1, name
