"""Evaluation inside a training run: `eval.every_steps` (and the last step) on rank 0.

The same pieces as `hart-evaluate`, in process: the first `eval.limit` prompts of `eval.prompts`
become seeded generation groups (`pipelines.eval_protocol.groups`), a copy of the model with the EMA
weights generates them (`pipelines.eval_stages.generate_group`), `ScoreImages` scores them (shapes
prompt following, CLIP score) and `summarize` folds the figures, which go to the run's MLflow
history as `<eval.name>/<figure>` at the training step, with a grid of the images. The figures carry
the prompt set as their dataset (`prompt_set_identity`, also the run's input with context "evaluation"),
and at a checkpoint step the checkpoint's logged model (trainer/checkpoint_models.py), so the
experiment's Models view ranks checkpoints by them. It runs on rank 0
only, between steps, so the other ranks wait for it at their next collective: keep `eval.limit`
small (16 shapes prompts take ~1 s on the demo model on a CPU).

Resume: a step whose figures the run already holds (logged before a failure, then replayed from an
earlier checkpoint) is not evaluated again, so the history keeps one value per step.
"""

from __future__ import annotations

import copy
import dataclasses
import io

import numpy as np
import torch
from PIL import Image

from hart.training.parallelize import is_sharded
from pipelines.eval_protocol import PROTOCOLS, groups, prompt_set_identity, read_prompts
from pipelines.eval_stages import ScoreImages, generate_group, summarize
from trainer import tracking


def already_logged(logger, name: str, step: int) -> bool:
    history = logger.client.get_metric_history(logger.run_id, f"{name}/images")
    return any(m.step == step for m in history)


def evaluate_in_training(config, stage, ema, logger, step: int, encoder, model_id: str | None = None) -> dict | None:
    """Figures of this step's EMA model on the eval prompts (None where nothing ran: other ranks,
    logging off, or a step already logged), logged against `model_id` (the logged model of this step's
    checkpoint) where given. FSDP runs are refused at config time (rank 0 alone cannot generate from shards)."""
    section = config.eval
    if not logger.enabled or already_logged(logger, section.name, step):
        return None
    assert not is_sharded(stage.model), "eval.every_steps with FSDP is refused by TrainRunConfig"
    # the ar stage trains no residual head: its samples are the tokens' (as log_samples draws them)
    protocol = dataclasses.replace(PROTOCOLS[section.protocol], use_diffusion=config.stage != "ar")
    prompts = read_prompts(section.prompts, limit=section.limit)
    rows = groups(prompts, protocol)
    model = copy.deepcopy(stage.model)
    ema.copy_to(model)
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        images = [row for group in rows for row in generate_group(model, stage.tokenizer, encoder, group, protocol, device)]
    del model
    if getattr(stage, "eval_scorer", None) is None:  # feature networks load once per run
        stage.eval_scorer = ScoreImages(list(section.metrics), clip=section.clip or None, device=str(device))
    batch = {key: np.array([row[key] for row in images], dtype=object) for key in ("id", "prompt", "category", "png")}
    scored = stage.eval_scorer(batch)
    scored_rows = [{key: scored[key][i] for key in scored} for i in range(len(images))]
    result = summarize(scored_rows, [row["id"] for row in images])
    logger.log_metrics({f"{section.name}/{key}": value for key, value in result["figures"].items()}, step,
                       model_id=model_id, dataset=prompt_set_identity(section.prompts, prompts))
    grid = np.stack([np.asarray(Image.open(io.BytesIO(row["png"])).convert("RGB")) for row in images[:16]])
    logger.log_image(tracking.image_grid(grid), f"{section.name}/step_{step:07d}.png")
    return result["figures"]
