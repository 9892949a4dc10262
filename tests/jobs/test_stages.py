"""Stage step functions without Ray: every stage's loss falls on a tiny overfit batch from a real cache.

Run: .venv/bin/pytest tests/jobs/test_stages.py -q
"""

from __future__ import annotations

import pytest
import torch

from hart.training import build_optimizer, train_step
from jobs.stages import build_stage, load_compatible_weights
from jobs.train_data import TextFeatures, images_collate
from tests.training_fixtures import tiny_config


@pytest.fixture(scope="module")
def cache_batch(train_assets):
    from pipelines.cache import batch_to_tensors, read_cache_table, read_manifest, table_to_numpy

    manifest = read_manifest(train_assets["cache"])
    table = read_cache_table(train_assets["cache"], columns=["key", "caption", "tokens", "residual"]).slice(0, 8)
    return manifest, batch_to_tensors(table_to_numpy(table), manifest)


def overfit(stage, batch, steps, lr=3e-3):
    optimizer = build_optimizer(stage.model, stage_optim(lr))
    generator = torch.Generator().manual_seed(0)
    losses = []
    for step in range(steps):
        generator.manual_seed(step)
        metrics = train_step(stage.objective, lambda m, b: {k: v for k, v in m(b, step=step, generator=generator).items()
                                                            if k != "reconstructions"},
                             [batch], optimizer, step=step, clip_grad_norm=2.0)
        losses.append(metrics)
    return losses


def stage_optim(lr):
    from hart.training import OptimizerConfig

    return OptimizerConfig(lr=lr, weight_decay=0.0, schedule="constant")


@pytest.mark.parametrize("stage_name,key", [("ar", "ce"), ("diffusion", "diffusion"), ("joint", "loss")])
def test_transformer_stages_overfit(train_assets, cache_batch, tmp_path, stage_name, key):
    manifest, raw = cache_batch
    config = tiny_config(train_assets, stage_name, tmp_path)
    text = TextFeatures(config, manifest, torch.device("cpu"))
    stage = build_stage(config, torch.device("cpu"), text.encoder)
    batch = text.add_context(raw)
    trainable = {n for n, p in stage.model.named_parameters() if p.requires_grad}
    if stage_name == "diffusion":
        assert trainable and all(n.startswith("diffloss.") for n in trainable)
    if stage_name == "ar":
        assert not any(n.startswith("diffloss.") for n in trainable)
    history = overfit(stage, batch, steps=12)
    first, last = history[0][key], sum(h[key] for h in history[-3:]) / 3
    assert last < 0.8 * first, (first, last)
    if stage_name != "diffusion":
        assert {"acc_mean", "acc_scale_0"} <= set(history[-1])


def test_tokenizer_stage_with_gan_overfits(train_assets, tmp_path):
    from pipelines.shapes import render, sample_spec
    import numpy as np

    config = tiny_config(train_assets, "tokenizer", tmp_path, "objective.gan_weight=0.1", "objective.tokenizer_mode=full",
                         "objective.disc_channels=16")
    stage = build_stage(config, torch.device("cpu"))
    assert stage.discriminator is not None
    images = np.stack([np.asarray(render(sample_spec(i))) for i in range(4)])
    batch = images_collate({"image": images, "caption": np.array(["x"] * 4, dtype=object)})
    history = overfit(stage, batch, steps=10)
    assert history[-1]["reconstruction"] < 0.85 * history[0]["reconstruction"]
    assert history[-1]["gan_weight"] > 0  # the adversarial term is active


def test_progressive_start_rebuilds_scale_buffers(train_assets, tmp_path):
    from hart.config import transformer_config
    from hart.transformer import HARTForT2I

    low = HARTForT2I(transformer_config("tiny"))
    high = HARTForT2I(transformer_config({"preset": "tiny", "patch_nums": [1, 2, 3, 4, 6, 8, 10]}))
    rebuilt = load_compatible_weights(high, low.state_dict(), "256px weights")
    assert rebuilt == ["lvl_1L"]
    torch.testing.assert_close(high.head.weight, low.head.weight)
    assert high.lvl_1L.shape[1] > low.lvl_1L.shape[1]
    wider = HARTForT2I(transformer_config({"preset": "tiny", "embed_dim": 128}))
    with pytest.raises(ValueError, match="wrong shapes"):
        load_compatible_weights(wider, low.state_dict(), "mismatched weights")
