"""trainer/worker_step.py: a worker's step around train_step, without Ray: the tokenizer's codebook
upkeep through `optimizer_step`, and the job-wide throughput figures.

Run: .venv/bin/pytest tests/trainer/test_worker_step.py -q
"""

from __future__ import annotations

import pytest
import torch

from trainer.stages import build_stage
from trainer.data import images_collate
from trainer.worker_step import throughput
from tests.training_fixtures import tiny_config
from trainer.plan import RunPlan


def test_codebook_upkeep_seeds_and_restarts_codes_through_the_step(train_assets, tmp_path):
    """Full-mode tokenizer: step 0 re-seeds every code from the batch's latents, later steps only dead ones."""
    from pipelines.shapes import render, sample_spec
    import numpy as np

    from hart.training.step import build_optimizer
    from trainer.worker_step import codebook_upkeep, optimizer_step

    config = tiny_config(train_assets, "tokenizer", tmp_path, "objective.tokenizer_mode=full", "objective.codebook_init=true",
                         "objective.codebook_restart_every=2", "run.max_steps=10", "model.tokenizer_checkpoint=''")
    stage = build_stage(RunPlan.of(config), torch.device("cpu"))
    images = np.stack([np.asarray(render(sample_spec(i))) for i in range(4)])
    batch = images_collate({"image": images, "caption": np.array(["x"] * 4, dtype=object)})
    optimizer = build_optimizer(stage.model, config.optim)
    quantizer = stage.model.quantize
    before = quantizer.embedding.weight.detach().clone()
    generator = torch.Generator()
    history = [optimizer_step(config, stage, stage.objective, None, optimizer, None, None, [batch], step, generator)
               for step in range(5)]
    assert history[0]["codes_restarted"] == 256  # the tiny vocabulary, all re-seeded
    assert "codes_restarted" not in history[1] and "codes_restarted" not in history[3]  # every 2 steps only
    assert 0 < history[2]["codes_restarted"] < 256  # only the dead codes: 4 small images use few of 256
    assert (quantizer.embedding.weight.detach() != before).any(1).all()

    with pytest.raises(ValueError, match="tokenizer_mode 'full'"):
        tiny_config(train_assets, "tokenizer", tmp_path, "objective.codebook_init=true")

    # With an autoencoder warm-up the codes are seeded when it ends, and restarts count from there.
    warm = tiny_config(train_assets, "tokenizer", tmp_path, "objective.tokenizer_mode=full", "objective.codebook_init=true",
                       "objective.codebook_restart_every=2", "objective.vq_warmup_steps=2", "run.max_steps=10",
                       "model.tokenizer_checkpoint=''")
    acted = [codebook_upkeep(warm, stage, batch["images"], step).get("codes_restarted") for step in range(6)]
    # Step 4 (warm-up end + 2) checks for dead codes; no forward pass since the re-seed reset the
    # hit counts, so none is dead.
    assert acted == [None, None, 256, None, 0.0, None]
    with pytest.raises(ValueError, match="must be below run.max_steps"):
        tiny_config(train_assets, "tokenizer", tmp_path, "objective.tokenizer_mode=full",
                    "objective.vq_warmup_steps=10", "run.max_steps=10")
    weighted = build_stage(RunPlan.of(tiny_config(train_assets, "tokenizer", tmp_path, "objective.tokenizer_mode=full",
                                       "objective.vq_warmup_steps=3", "objective.l1_weight=0", "objective.l2_weight=2",
                                       "model.tokenizer_checkpoint=''")), torch.device("cpu"))
    objective_config = weighted.objective.objective_config
    assert (objective_config.l1_weight, objective_config.l2_weight, objective_config.vq_warmup_steps) == (0.0, 2.0, 3)
    with pytest.raises(ValueError, match="vq_warmup_steps needs tokenizer_mode 'full'"):
        tiny_config(train_assets, "tokenizer", tmp_path, "objective.vq_warmup_steps=1")
    with pytest.raises(ValueError, match="not 'fsdp'"):
        build_stage(RunPlan.of(tiny_config(train_assets, "tokenizer", tmp_path, "objective.tokenizer_mode=full",
                                "objective.codebook_restart_every=5", "parallel.strategy=fsdp")), torch.device("cpu"))


def test_throughput_counts_the_whole_job(train_assets, tmp_path):
    """Images of every micro-batch times the world size; tokens per image from the stage's model."""
    batches = [{"caption": ["a"] * 4}, {"caption": ["b"] * 4}]
    joint = throughput(RunPlan.of(tiny_config(train_assets, "joint", tmp_path)), batches, seconds=2.0, world_size=3)
    assert joint["images_per_s"] == 8 * 3 / 2.0 and joint["step_seconds"] == 2.0
    assert joint["tokens_per_s"] == joint["images_per_s"] * 130  # the tiny scale list: 130 tokens per image
    tokenizer = throughput(RunPlan.of(tiny_config(train_assets, "tokenizer", tmp_path)), batches, seconds=1.0, world_size=1)
    assert tokenizer["tokens_per_s"] == 8 * 130
