"""Per-stage model building and losses for `jobs/train.py` (no Ray here: unit-testable).

Design: every stage produces a `Stage`: the module whose weights are trained, EMA'd,
checkpointed and exported (`model`: the tokenizer or the transformer), a *loss module*
(`objective`: an nn.Module whose forward(batch) returns the loss dict of the hart
objective), and the frozen helpers. The loss module is what DDP/FSDP wraps: all gradient
traffic then goes through the wrapper's forward, which plain attribute calls such as
`model.diffloss(...)` would bypass. Frozen helpers (quantizer, text encoder, the LPIPS
metric, and the discriminator inside the generator's loss module) are held outside the module tree
(`_frozen` dicts), so the data-parallel wrapper never waits for gradients they do not get.

Stages (HART_SPEC §4):
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

from hart.training import start_weights
from hart.pixels import to_uint8
from hart.tokenizer.quantizer import MultiScaleQuantizer
from hart.scale_grid import check_compatible
from hart.training.step import train_step
from jobs import tracking
from jobs.train_config import TrainRunConfig, model_configs


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
# Loss modules
# --------------------------------------------------------------------------------------


class TransformerObjective(nn.Module):
    """t2i_losses around the transformer; the quantizer is frozen and kept out of the tree."""

    def __init__(self, model: nn.Module, quantizer: MultiScaleQuantizer, ce_weight: float, diffusion_weight: float,
                 use_diffusion: bool, kept_bucket: int = 0):
        super().__init__()
        self.model = model
        self._frozen = {"quantizer": quantizer}
        self.ce_weight, self.diffusion_weight, self.use_diffusion = ce_weight, diffusion_weight, use_diffusion
        self.kept_bucket = kept_bucket

    def forward(self, batch: dict[str, Any], step: int = 0, generator: torch.Generator | None = None):
        from hart.transformer.objective import t2i_losses

        return t2i_losses(
            self.model, self._frozen["quantizer"], batch["context"], batch["context_mask"], batch["tokens"],
            batch["residual"] if self.use_diffusion else None, ce_weight=self.ce_weight,
            diffusion_weight=self.diffusion_weight, use_diffusion=self.use_diffusion, generator=generator,
            kept_bucket=self.kept_bucket,
        )


class TokenizerObjective(nn.Module):
    """generator_losses around the tokenizer; the discriminator (a critic here) and the LPIPS metric are frozen."""

    def __init__(self, tokenizer: nn.Module, objective_config, discriminator: nn.Module | None,
                 perceptual: nn.Module | None = None):
        super().__init__()
        self.tokenizer = tokenizer
        self.objective_config = objective_config
        self._frozen = {"discriminator": discriminator, "perceptual": perceptual}

    def forward(self, batch: dict[str, Any], step: int = 0, generator: torch.Generator | None = None):
        from hart.tokenizer.objective import generator_losses

        return generator_losses(
            self.tokenizer, batch["images"], self.objective_config, step=step,
            discriminator=self._frozen["discriminator"], perceptual=self._frozen["perceptual"], generator=generator,
        )


class DiscriminatorObjective(nn.Module):
    def __init__(self, discriminator: nn.Module, objective_config):
        super().__init__()
        self.discriminator = discriminator
        self.objective_config = objective_config

    def forward(self, batch: dict[str, Any], step: int = 0, generator: torch.Generator | None = None):
        from hart.tokenizer.objective import discriminator_losses

        return discriminator_losses(
            self.discriminator, batch["images"], batch["reconstructions"], self.objective_config, step=step
        )


# --------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------


def read_start_weights(path: str, endpoint_url: str = "") -> dict[str, torch.Tensor]:
    """`hart.training.start_weights.read_start_weights` of a local path or an s3:// URI (copied to this machine first)."""
    from pipelines import storage

    return start_weights.read_start_weights(Path(storage.local_copy(path, endpoint_url)), path)


def load_frozen_tokenizer(config: TrainRunConfig):
    """The tokenizer the cache was made with (ar/diffusion/joint), frozen, with the run's scale list."""
    from hart.tokenizer.model import HybridTokenizer

    tokenizer_cfg, transformer_cfg = model_configs(config)
    path = config.model.tokenizer_checkpoint
    if not path:
        raise ValueError(f"stage {config.stage!r} needs model.tokenizer_checkpoint (the tokenizer the cache was made with)")
    from pipelines import storage

    # The run's scale list (model.tokenizer's) applies to the checkpoint's weights, as precompute's
    # tokenizer.patch_nums does: a cache made at another resolution of the same tokenizer trains.
    tokenizer = HybridTokenizer.from_pretrained(storage.local_copy(path, config.run.endpoint_url),
                                                patch_nums=tokenizer_cfg.patch_nums)
    check_compatible(transformer_cfg, tokenizer.config, what=f"tokenizer {path} and the transformer")
    return tokenizer.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------
# Building a stage
# --------------------------------------------------------------------------------------


def build_stage(config: TrainRunConfig, device: torch.device, text_encoder: Any = None) -> Stage:
    """Fresh weights (seeded identically on every rank) or `model.init_from`; objectives ready."""
    if config.stage == "tokenizer":
        return _build_tokenizer_stage(config, device)
    return _build_transformer_stage(config, device, text_encoder)


def _build_tokenizer_stage(config: TrainRunConfig, device: torch.device) -> Stage:
    from hart.tokenizer.discriminator import NLayerDiscriminator
    from hart.tokenizer.model import HybridTokenizer
    from hart.tokenizer.objective import TokenizerObjectiveConfig, set_trainable

    tokenizer_cfg, _ = model_configs(config)
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
    from hart.tokenizer.perceptual import PerceptualLoss

    check_perceptual_weights(config)
    return PerceptualLoss.from_files(list(objective.perceptual_weights)).requires_grad_(False).eval()


def _build_transformer_stage(config: TrainRunConfig, device: torch.device, text_encoder: Any) -> Stage:
    from hart.transformer.model import HARTForT2I

    _, transformer_cfg = model_configs(config)
    tokenizer = load_frozen_tokenizer(config).to(device)
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


# --------------------------------------------------------------------------------------
# One step, throughput and sample grids (called by the worker loop in jobs/train.py)
# --------------------------------------------------------------------------------------


def optimizer_step(config, stage: Stage, objective, disc_objective, optimizer, scheduler, disc_optimizer,
                   micro_batches, step, generator) -> dict[str, float]:
    device_type = next(stage.model.parameters()).device.type
    captured: list[dict] = []

    def loss_fn(module, batch):
        out = module(batch, step=step, generator=generator)
        captured.append(out)
        return {k: v for k, v in out.items() if k != "reconstructions"}

    upkeep = codebook_upkeep(config, stage, micro_batches[0]["images"], step) if config.stage == "tokenizer" else {}
    metrics = train_step(objective, loss_fn, micro_batches, optimizer, step=step, scheduler=scheduler,
                         clip_grad_norm=config.optim.clip_grad_norm, precision=config.precision,
                         device_type=device_type, parameters=[p for p in stage.model.parameters() if p.requires_grad])
    if disc_objective is not None:  # PatchGAN side, on the reconstructions just made
        disc_batches = [{"images": b["images"], "reconstructions": out["reconstructions"]}
                        for b, out in zip(micro_batches, captured)]
        disc = train_step(disc_objective, lambda m, b: m(b, step=step), disc_batches, disc_optimizer, step=step,
                          clip_grad_norm=config.optim.clip_grad_norm, precision=config.precision, device_type=device_type)
        metrics.update({f"disc_{k}": v for k, v in disc.items() if k != "lr"})
    return {**metrics, **upkeep}


def codebook_upkeep(config: TrainRunConfig, stage: Stage, images_B3HW: torch.Tensor, step: int) -> dict[str, float]:
    """Tokenizer "full" mode: re-seed the codebook from this batch's latents when the VQ part
    starts (`objective.codebook_init`: step 0, or the end of `vq_warmup_steps`) and its dead
    codes every `codebook_restart_every` steps after that.

    Rank 0's codebook is then broadcast: DDP synchronises gradients only, and each rank's
    batch (hence its re-seeded codes) differs. Returns {"codes_restarted": n} when it acted.
    """
    from hart.training.parallelize import broadcast_from_rank0

    objective = config.objective
    every, start = objective.codebook_restart_every, objective.vq_warmup_steps
    if step == start and objective.codebook_init:
        threshold = None
    elif (every and step > start and (step - start) % every == 0
          and step < objective.codebook_restart_until * config.run.max_steps):
        threshold = objective.codebook_restart_threshold
    else:
        return {}
    quantizer = stage.model.quantize
    with torch.no_grad():
        latent = stage.model.encode_latent(images_B3HW)
    # A CPU generator of its own (restart_codes draws on the CPU), seeded by run seed and step:
    # reruns and resumes re-seed the same codes.
    draws = torch.Generator().manual_seed(config.run.seed * 1_000_003 + step)
    restarted = quantizer.restart_codes(latent, threshold, generator=draws)
    broadcast_from_rank0([quantizer.embedding.weight, quantizer.ema_vocab_hit_SV])
    return {"codes_restarted": float(restarted)}


def throughput(config: TrainRunConfig, micro_batches, seconds: float, world_size: int) -> dict[str, float]:
    """Images and tokens per second of the whole job (this rank's rate times the world size: no extra collective)."""
    tokenizer_cfg, transformer_cfg = model_configs(config)
    images = sum(len(b["caption"]) for b in micro_batches) * world_size
    tokens_per_image = tokenizer_cfg.num_tokens() if config.stage == "tokenizer" else transformer_cfg.num_image_tokens()
    return {"images_per_s": images / seconds, "tokens_per_s": images * tokens_per_image / seconds, "step_seconds": seconds}


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
        from hart.transformer.generate import generate
        import numpy as np

        encoder = sampling_text_encoder(config, stage, manifest)
        images = generate(model, stage.tokenizer, encoder, list(config.tracking.sample_prompts),
                          seed=config.tracking.sample_seed, use_diffusion=config.stage != "ar")
        grid = tracking.image_grid(np.stack([np.asarray(im.convert("RGB")) for im in images]))
        logger.log_image(grid, f"{GRID_FOLDER['transformer']}/step_{step:07d}.png")


def sampling_text_encoder(config, stage: Stage, manifest):
    """The text encoder generation uses in a run: the one the cache's features came from (its manifest),
    else `data.text_encoder`; built once per run."""
    if stage.text_encoder is None:
        from hart.text_encoder import build_text_encoder

        name = (manifest.get("text") or {}).get("encoder") or config.data.text_encoder
        stage.text_encoder = build_text_encoder(name, stage.model.config.context_token)
    return stage.text_encoder


__all__ = [
    "Stage", "build_stage", "read_start_weights", "load_frozen_tokenizer",
    "TransformerObjective", "TokenizerObjective", "DiscriminatorObjective",
    "optimizer_step", "codebook_upkeep", "throughput", "log_samples", "sampling_text_encoder", "GRID_FOLDER",
    "build_perceptual",
    "check_perceptual_weights",
]
