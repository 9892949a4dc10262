"""trainer/sample_grids.py: the tokenizer's reconstruction grid (rows: input, hybrid, discrete) is drawn
with the EMA weights, and generation uses the text encoder the cache was made with.

Run: .venv/bin/pytest tests/trainer/test_sample_grids.py -q
"""

from __future__ import annotations

import numpy as np
import torch

from hart.pixels import to_uint8
from hart.training.step import ExponentialMovingAverage
from trainer.sample_grids import GRID_FOLDER, log_samples, sampling_text_encoder
from trainer.stages import build_stage
from trainer.data import images_collate
from pipelines.shapes import render, sample_spec
from tests.training_fixtures import tiny_config
from trainer.plan import RunPlan


class RecordingLogger:
    """The rank-0 logger's image interface, recording what it is given."""

    enabled = True

    def __init__(self):
        self.images: list[tuple[np.ndarray, str]] = []

    def log_image(self, image, path):
        self.images.append((image, path))


def test_tokenizer_grid_uses_the_ema_weights(train_assets, tmp_path):
    config = tiny_config(train_assets, "tokenizer", tmp_path)
    stage = build_stage(RunPlan.of(config), torch.device("cpu"))
    images = np.stack([np.asarray(render(sample_spec(i))) for i in range(3)])
    batch = images_collate({"image": images, "caption": np.array(["x"] * 3, dtype=object)})
    ema = ExponentialMovingAverage(stage.model, decay=0.5)
    with torch.no_grad():  # the live weights move away from the EMA's
        for p in stage.model.decoder.parameters():
            p.add_(0.5)
    logger = RecordingLogger()
    log_samples(RunPlan.of(config, manifest={}), stage, ema, batch, logger, step=7)
    (grid, path), = logger.images
    assert path == f"{GRID_FOLDER['tokenizer']}/step_0000007.png"
    assert grid.shape == (3 * 64, 3 * 64, 3) and grid.dtype == np.uint8
    np.testing.assert_array_equal(grid[:64], np.concatenate(list(to_uint8(batch["images"])), axis=1))
    ema_model = build_stage(RunPlan.of(config), torch.device("cpu")).model.eval()
    ema.copy_to(ema_model)
    with torch.no_grad():
        tokens, residual = ema_model.encode(batch["images"])
        hybrid = to_uint8(ema_model.decode(tokens, residual))
    np.testing.assert_array_equal(grid[64:128], np.concatenate(list(hybrid), axis=1))

    silent = RecordingLogger()
    silent.enabled = False  # ranks other than 0
    log_samples(RunPlan.of(config, manifest={}), stage, ema, batch, silent, step=8)
    assert silent.images == []


def test_generation_uses_the_caches_text_encoder(train_assets, tmp_path):
    config = tiny_config(train_assets, "ar", tmp_path, "data.text_encoder=not-an-encoder")
    plan = RunPlan.of(config, manifest={"text": {"encoder": "minilm"}})
    stage = build_stage(plan, torch.device("cpu"))
    encoder = sampling_text_encoder(plan, stage)
    features, mask = encoder(["a red circle"])
    assert features.shape[-1] == 384 and mask.shape[1] == stage.model.config.context_token
    assert sampling_text_encoder(RunPlan.of(config, manifest={}), stage) is encoder  # built once per run
