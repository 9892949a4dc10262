"""CLIP score: per-image scores by the standard definition; a tiny random CLIP folder built offline
loads; a missing or foreign folder is refused with what to put there."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.clip_score import ClipScorer, save_tiny_clip


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip", seed=2)  # seed 2: positive cosines


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)) for _ in range(n)]


def test_scores_are_100_times_the_clipped_cosine_of_clip_forward(clip_folder):
    """The definition, through another path of the model: CLIPModel's forward gives logit_scale * cosine
    for every image-text pair; the score of a pair is 100 * max(cosine, 0)."""
    prompts = ["a red circle on a white background", "blue square", "a green triangle, large, top left", "x"]
    pics = images(len(prompts))
    scorer = ClipScorer(clip_folder)
    scores = scorer(pics, prompts)
    assert scores.shape == (4,) and torch.isfinite(scores).all() and (scores >= 0).all()
    assert scores.std() > 0  # different pairs, different scores: the comparison below means something
    inputs = scorer.processor(text=prompts, images=pics, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = scorer.model(**inputs)
    cosine = out.logits_per_image.diagonal() / scorer.model.logit_scale.exp()
    assert torch.allclose(scores, (100 * cosine).clamp(min=0), atol=1e-4), (scores, cosine)


def test_missing_or_foreign_folder_is_refused(tmp_path):
    with pytest.raises(ValueError, match="needs a CLIP model folder"):
        ClipScorer(None)
    with pytest.raises(ValueError, match="no CLIP model at .*config.json missing"):
        ClipScorer(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="does not hold a loadable CLIP model"):
        ClipScorer(tmp_path)


def test_images_and_prompts_must_pair(clip_folder):
    with pytest.raises(ValueError, match="2 images for 1 prompts"):
        ClipScorer(clip_folder)(images(2), ["one"])
