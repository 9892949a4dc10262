"""Building the training stages for `trainer.worker` (no Ray here: unit-testable).

Design: every stage produces a `Stage`: the module whose weights are trained, EMA'd,
checkpointed and exported (`model`: the tokenizer or the transformer), a *loss module*
(`objective`, from `trainer.objectives`: what DDP/FSDP wraps), and the frozen helpers (the
tokenizer of the transformer stages, the text encoder, the discriminator, the LPIPS metric).
What the worker does with a stage each step is in `trainer.worker_step` and `trainer.sample_grids`.

Stages (docs/design/training-recipe.md, "Stages"):
- `tokenizer`: hybrid decoder fine-tuning (encoder + codebook frozen, alternating
  continuous/discrete decoding) or full VQVAE training, optional PatchGAN (second
  optimizer, `discriminator` module), optional LPIPS term from local weight files
  (`objective.perceptual_weights`).
- `ar`: transformer with CE only (the diffusion head is frozen and not optimised).
- `diffusion`: residual diffusion head only, on a frozen transformer.
- `joint`: CE + diffusion loss with last-scale subsampling (HART's recipe).

Progressive resolution: `hart.training.start_weights.load_compatible_weights` loads a checkpoint made for another scale
list, rebuilding the buffers derived from patch_nums (`lvl_1L`, the attention mask) and
requiring every parameter to match; with RoPE no parameter depends on the scale list.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hart.scale_grid import check_compatible
from hart.star.model import STARForT2I
from hart.text_encoder import PooledTextEncoder
from hart.tokenizer.discriminator import NLayerDiscriminator
from hart.tokenizer.model import HybridTokenizer
from hart.tokenizer.objective import TokenizerObjectiveConfig, set_trainable
from hart.tokenizer.perceptual import PerceptualLoss
from hart.training import start_weights
from hart.transformer.model import HARTForT2I
from pipelines import storage
from pipelines.tokenize_stage import load_tokenizer
from trainer.config import TrainRunConfig
from trainer.data import run_text_encoder
from trainer.objectives import DiscriminatorObjective, StarObjective, TokenizerObjective, TransformerObjective
from trainer.plan import RunPlan


@dataclass
class Stage:
    name: str
    model: nn.Module  # trained module: EMA, checkpoints and export use its (official) state dict
    objective: nn.Module  # loss module, wrapped by DDP/FSDP; forward(batch, step, generator) -> dict
    tokenizer: nn.Module | None = None  # frozen tokenizer (transformer stages) for samples and export
    text_encoder: Any = None
    discriminator: nn.Module | None = None  # tokenizer stage with GAN
    discriminator_objective: nn.Module | None = None
    frozen: dict[str, Any] = field(default_factory=dict)
    eval_scorer: Any = None  # the feature networks of eval.every_steps, loaded at the first evaluation


# --------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------


def read_start_weights(path: str, endpoint_url: str = "") -> dict[str, torch.Tensor]:
    """`hart.training.start_weights.read_start_weights` of a local path or an s3:// URI (copied to this machine first)."""
    return start_weights.read_start_weights(Path(storage.local_copy(path, endpoint_url)), path)


def load_frozen_tokenizer(plan: RunPlan):
    """The tokenizer the cache was made with (ar/diffusion/joint), frozen, with the run's scale list."""
    config, transformer_cfg = plan.config, plan.transformer
    path = config.model.tokenizer_checkpoint
    if not path:
        raise ValueError(f"stage {config.stage!r} needs model.tokenizer_checkpoint (the tokenizer the cache was made with)")

    # Loaded as precompute loads it: the checkpoint's weights with model.tokenizer's scale list, so a
    # cache made at another resolution of the same tokenizer trains.
    tokenizer = load_tokenizer(config.model.tokenizer_source(), config.run.endpoint_url, where="model.tokenizer")
    check_compatible(transformer_cfg, tokenizer.config, what=f"tokenizer {path} and the transformer")
    return tokenizer


# --------------------------------------------------------------------------------------
# Building a stage
# --------------------------------------------------------------------------------------


def build_stage(plan: RunPlan, device: torch.device, text_encoder: Any = None) -> Stage:
    """Fresh weights (seeded identically on every rank) or `model.init_from`; objectives ready.
    A STAR stage encodes its null condition with the text encoder of the plan's rows."""
    if plan.stage == "tokenizer":
        return _build_tokenizer_stage(plan, device)
    if plan.config.model.family == "star":
        return _build_star_stage(plan, device, text_encoder)
    return _build_transformer_stage(plan, device, text_encoder)


def _build_tokenizer_stage(plan: RunPlan, device: torch.device) -> Stage:
    config, tokenizer_cfg = plan.config, plan.tokenizer
    objective = config.objective
    mode = "decoder_finetune" if objective.tokenizer_mode == "hybrid" else "full"
    if config.parallel.strategy == "fsdp" and (objective.codebook_init or objective.codebook_restart_every):
        raise ValueError("codebook_init / codebook_restart_every re-seed whole codebook rows and need "
                         "parallel.strategy 'ddp' or 'none', not 'fsdp' (sharded parameters)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.model.init_seed)
        tokenizer = HybridTokenizer(tokenizer_cfg)
        discriminator = NLayerDiscriminator(ndf=objective.disc_channels) if objective.gan_weight > 0 else None
    start = config.model.init_from or config.model.tokenizer_checkpoint
    if start:
        start_weights.load_compatible_weights(tokenizer, read_start_weights(start, config.run.endpoint_url), f"tokenizer start weights {start}")
    elif mode == "decoder_finetune":
        warnings.warn("hybrid decoder fine-tuning from random weights: set model.tokenizer_checkpoint", stacklevel=2)
    set_trainable(tokenizer, mode)
    tokenizer.to(device)
    objective_config = TokenizerObjectiveConfig(
        mode=mode, continuous_prob=objective.continuous_prob, gan_weight=objective.gan_weight,
        l1_weight=objective.l1_weight, l2_weight=objective.l2_weight,
        gan_start_step=objective.gan_start_step, perceptual_weight=objective.perceptual_weight,
        vq_warmup_steps=objective.vq_warmup_steps,
    )
    perceptual = build_perceptual(config)
    if perceptual is not None:
        perceptual.to(device)
    stage = Stage("tokenizer", tokenizer, TokenizerObjective(tokenizer, objective_config, discriminator, perceptual))
    stage.frozen["perceptual"] = perceptual
    if discriminator is not None:
        discriminator.to(device)
        stage.discriminator = discriminator
        stage.discriminator_objective = DiscriminatorObjective(discriminator, objective_config)
    return stage


def check_perceptual_weights(config: TrainRunConfig) -> None:
    """Driver-side: every configured LPIPS weight file exists (local paths; nothing is downloaded)."""
    objective = config.objective
    if config.stage != "tokenizer" or objective.perceptual_weight <= 0:
        return
    missing = [path for path in objective.perceptual_weights if not Path(path).is_file()]
    if missing:
        raise ValueError(f"objective.perceptual_weights: file(s) not found: {missing} (local files; nothing is downloaded)")


def build_perceptual(config: TrainRunConfig):
    """The frozen LPIPS metric of the tokenizer stage, or None when objective.perceptual_weight is 0."""
    objective = config.objective
    if objective.perceptual_weight <= 0:
        return None

    check_perceptual_weights(config)
    return PerceptualLoss.from_files(list(objective.perceptual_weights)).requires_grad_(False).eval()


def _build_transformer_stage(plan: RunPlan, device: torch.device, text_encoder: Any) -> Stage:
    config, transformer_cfg = plan.config, plan.transformer
    tokenizer = load_frozen_tokenizer(plan).to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.model.init_seed)
        model = HARTForT2I(transformer_cfg)
        model.init_weights()
    if config.model.init_from:
        rebuilt = start_weights.load_compatible_weights(model, read_start_weights(config.model.init_from, config.run.endpoint_url),
                                          f"start weights {config.model.init_from}")
        if rebuilt:
            print(f"[train] progressive start from {config.model.init_from}: rebuilt {rebuilt} for patch_nums {transformer_cfg.patch_nums}")
    elif config.stage == "diffusion":
        warnings.warn("diffusion stage without model.init_from trains the head on a random frozen transformer", stacklevel=2)
    model.requires_grad_(True)
    if config.stage == "ar":
        model.diffloss.requires_grad_(False)  # unused by CE: keep it out of the optimizer and of DDP
    elif config.stage == "diffusion":
        model.requires_grad_(False)
        model.diffloss.requires_grad_(True)
    model.to(device)
    objective = TransformerObjective(
        model, tokenizer.quantize, ce_weight=config.objective.ce_weight if config.stage != "diffusion" else 0.0,
        diffusion_weight=config.objective.diffusion_weight, use_diffusion=config.stage in ("diffusion", "joint"),
        kept_bucket=config.objective.kept_bucket,
    )
    return Stage(config.stage, model, objective, tokenizer=tokenizer, text_encoder=text_encoder)


def _build_star_stage(plan: RunPlan, device: torch.device, text_encoder: Any) -> Stage:
    """STAR's ar stage: STARForT2I from fresh weights or `model.init_from` (a STAR .pth or a training
    checkpoint), trained by `StarObjective`. Its CFG null condition is the encoding of "" by the
    encoder that made the cache's text features (else `data.text_encoder`), computed once here."""
    config, star_cfg = plan.config, plan.transformer
    tokenizer = load_frozen_tokenizer(plan).to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.model.init_seed)
        model = STARForT2I(star_cfg)
    start = config.model.init_from  # a training checkpoint, or STAR's released .pth (a trainer dict)
    if start:
        start_weights.load_compatible_weights(model, read_start_weights(start, config.run.endpoint_url),
                                              f"start weights {start}")
    model.to(device)
    if text_encoder is None:
        text_encoder = run_text_encoder(plan)
        if hasattr(text_encoder, "to"):
            text_encoder.to(device)
    null = PooledTextEncoder(text_encoder)([""]).to(device)
    objective = StarObjective(model, tokenizer.quantize, null, config.objective.drop_scale_length or None)
    return Stage(config.stage, model, objective, tokenizer=tokenizer, text_encoder=text_encoder)

