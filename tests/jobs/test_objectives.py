"""jobs/objectives.py: the loss modules hold exactly the trained module's parameters (the frozen
helpers stay outside the tree a data-parallel wrapper walks), and return the objective's losses.

Run: .venv/bin/pytest tests/jobs/test_objectives.py -q
"""

from __future__ import annotations

import numpy as np
import torch

from jobs.objectives import DiscriminatorObjective, TokenizerObjective, TransformerObjective
from jobs.stages import build_stage
from jobs.train_data import TextFeatures, images_collate
from pipelines.cache import batch_to_tensors, read_cache_table, read_manifest, table_to_numpy
from tests.training_fixtures import tiny_config


def ids(module):
    return {id(p) for p in module.parameters()}


def test_transformer_objective_holds_the_transformer_only(train_assets, tmp_path):
    manifest = read_manifest(train_assets["cache"])
    table = read_cache_table(train_assets["cache"], columns=["key", "caption", "tokens", "residual"]).slice(0, 4)
    raw = batch_to_tensors(table_to_numpy(table), manifest)
    for stage_name, expected in (("ar", {"ce"}), ("joint", {"ce", "diffusion", "loss"})):
        config = tiny_config(train_assets, stage_name, tmp_path)
        text = TextFeatures(config, manifest, torch.device("cpu"))
        stage = build_stage(config, torch.device("cpu"), text.encoder)
        batch = text.add_context(raw)
        assert isinstance(stage.objective, TransformerObjective)
        assert ids(stage.objective) == ids(stage.model)  # the frozen quantizer is not in the tree
        assert not ids(stage.objective) & ids(stage.tokenizer)
        losses = stage.objective(batch, step=0, generator=torch.Generator().manual_seed(0))
        assert expected <= set(losses) and torch.isfinite(losses["loss"])
        assert ("diffusion" in losses) == (stage_name == "joint")


def test_tokenizer_objectives_keep_generator_and_critic_apart(train_assets, tmp_path):
    config = tiny_config(train_assets, "tokenizer", tmp_path, "objective.gan_weight=0.1", "objective.tokenizer_mode=full",
                         "objective.disc_channels=16", "model.tokenizer_checkpoint=''")
    stage = build_stage(config, torch.device("cpu"))
    assert isinstance(stage.objective, TokenizerObjective) and isinstance(stage.discriminator_objective,
                                                                          DiscriminatorObjective)
    assert ids(stage.objective) == ids(stage.model)  # the critic is frozen inside the generator's loss
    assert ids(stage.discriminator_objective) == ids(stage.discriminator)
    from pipelines.shapes import render, sample_spec

    images = np.stack([np.asarray(render(sample_spec(i))) for i in range(2)])
    batch = images_collate({"image": images, "caption": np.array(["x"] * 2, dtype=object)})
    out = stage.objective(batch, step=0, generator=torch.Generator().manual_seed(0))
    assert out["reconstructions"].shape == batch["images"].shape and torch.isfinite(out["loss"])
    critic = stage.discriminator_objective({"images": batch["images"], "reconstructions": out["reconstructions"]})
    assert torch.isfinite(critic["loss"])
