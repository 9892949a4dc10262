"""Sample grids logged during training, on rank 0 with the EMA weights: tokenizer reconstructions
(rows: input, hybrid, discrete) or generations from `tracking.sample_prompts`.
"""

from __future__ import annotations

import torch

from hart.pixels import to_uint8
from trainer import tracking
from trainer.stages import Stage


# MLflow artifact folder of the grids `log_samples` writes: tokenizer reconstructions (rows: input,
# hybrid, discrete) and transformer samples of `tracking.sample_prompts`.
GRID_FOLDER = {"tokenizer": "reconstructions", "transformer": "samples"}


def log_samples(config, stage: Stage, ema, sample_batch, logger, step, manifest) -> None:
    """Rank 0: reconstructions (tokenizer) or generations from fixed prompts, with the EMA weights."""
    if not logger.enabled or sample_batch is None:
        return
    from hart.training.parallelize import is_sharded

    if is_sharded(stage.model):  # rank-0-only generation cannot run on FSDP2 shards; use the exported model
        return
    import copy

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
        encoder = sampling_text_encoder(config, stage, manifest)
        if config.model.family == "star":
            grid = tracking.image_grid(_star_samples(config, stage, model, encoder))
            logger.log_image(grid, f"{GRID_FOLDER['transformer']}/step_{step:07d}.png")
            return
        from hart.transformer.generate import generate

        samples = generate(model, stage.tokenizer, encoder, list(config.tracking.sample_prompts),
                           seed=config.tracking.sample_seed, use_diffusion=config.stage != "ar")
        grid = tracking.image_grid(samples.images_BRR3)
        logger.log_image(grid, f"{GRID_FOLDER['transformer']}/step_{step:07d}.png")


def _star_samples(config, stage: Stage, model, encoder):
    """STAR's sampler on the sample prompts: uint8 images (B, H, W, 3)."""
    from hart.star.generate import generate
    from hart.text_encoder import PooledTextEncoder

    features = PooledTextEncoder(encoder)  # STAR reads TextFeatures (with the pooled feature)
    return generate(model, stage.tokenizer, features, list(config.tracking.sample_prompts),
                    seed=config.tracking.sample_seed).images_BRR3


def sampling_text_encoder(config, stage: Stage, manifest):
    """The text encoder generation uses in a run (`run_text_encoder`), built once per run."""
    if stage.text_encoder is None:
        from trainer.data import run_text_encoder

        stage.text_encoder = run_text_encoder(config, manifest)
    return stage.text_encoder
