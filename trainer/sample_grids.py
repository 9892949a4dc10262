"""Sample grids logged during training, on rank 0 with the EMA weights: tokenizer reconstructions
(rows: input, hybrid, discrete) or generations from `tracking.sample_prompts`.
"""

from __future__ import annotations

import copy

import torch

from hart.pixels import to_uint8
from hart.star.generate import generate as generate_star
from hart.text_encoder import PooledTextEncoder
from hart.training.parallelize import is_sharded
from hart.transformer.generate import generate as generate_hart
from trainer import tracking
from trainer.data import run_text_encoder
from trainer.plan import RunPlan
from trainer.stages import Stage

# MLflow artifact folder of the grids `log_samples` writes: tokenizer reconstructions (rows: input,
# hybrid, discrete) and transformer samples of `tracking.sample_prompts`.
GRID_FOLDER = {"tokenizer": "reconstructions", "transformer": "samples"}


def log_samples(plan: RunPlan, stage: Stage, ema, sample_batch, logger, step) -> None:
    """Rank 0: reconstructions (tokenizer) or generations from fixed prompts, with the EMA weights."""
    config = plan.config
    if not logger.enabled or sample_batch is None:
        return
    if is_sharded(stage.model):  # rank-0-only generation cannot run on FSDP2 shards; use the exported model
        return
    model = copy.deepcopy(stage.model)
    ema.copy_to(model)
    model.eval()
    with torch.no_grad():
        if config.stage == "tokenizer":
            images = sample_batch["images"][:8]
            tokens, residual = model.encode(images)
            rows = torch.cat([images, model.decode(tokens, residual), model.decode(tokens)])
            grid = tracking.image_grid(to_uint8(rows), columns=len(images))
            logger.log_image(grid, f"{GRID_FOLDER['tokenizer']}/step_{step:07d}.png")  # rows: input, hybrid, discrete
            return
        encoder = sampling_text_encoder(plan, stage)
        prompts, seed = list(config.tracking.sample_prompts), config.tracking.sample_seed
        if config.model.family == "star":  # STAR reads TextFeatures (with the pooled feature)
            samples = generate_star(model, stage.tokenizer, PooledTextEncoder(encoder), prompts, seed=seed)
        else:
            samples = generate_hart(model, stage.tokenizer, encoder, prompts, seed=seed,
                                    use_diffusion=config.stage != "ar")
    logger.log_image(tracking.image_grid(samples.images_BRR3), f"{GRID_FOLDER['transformer']}/step_{step:07d}.png")


def sampling_text_encoder(plan: RunPlan, stage: Stage):
    """The text encoder generation uses in a run (`run_text_encoder`), built once per run."""
    if stage.text_encoder is None:
        stage.text_encoder = run_text_encoder(plan)
    return stage.text_encoder
