"""What a training worker does each step around the pure `hart.training.step.train_step`
(called by the worker loop in trainer/worker.py; no Ray here, so it is unit-testable).

`step_seed`: the seed of a rank's generator at a step; `optimizer_step`: the stage's step, plus the PatchGAN discriminator's step on the reconstructions
just made; `codebook_upkeep`: the tokenizer's codebook re-seeding in "full" mode; `global_losses`:
the losses of the whole global batch, not rank 0's slice; `throughput`: images and tokens per
second of the whole job.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from hart.training.parallelize import broadcast_from_rank0
from hart.training.step import train_step
from trainer.config import TrainRunConfig
from trainer.plan import RunPlan
from trainer.stages import Stage


def step_seed(run_seed: int, rank: int, step: int) -> int:
    """The seed of `rank`'s generator at `step` (the objectives' random draws: CFG dropout, diffusion
    timesteps): a function of the run, rank and step only, so a resumed run redraws the same values."""
    return hash((run_seed, rank, step)) % (2**63)


def optimizer_step(config, stage: Stage, objective, disc_objective, optimizer, scheduler, disc_optimizer,
                   micro_batches, step, generator, weights=None) -> dict[str, float]:
    """`weights`: the micro-batches' loss weights when their sizes differ (trainer/batches.py)."""
    device_type = next(stage.model.parameters()).device.type
    captured: list[dict] = []

    def loss_fn(module, batch):
        out = module(batch, step=step, generator=generator)
        captured.append(out)
        return {k: v for k, v in out.items() if k != "reconstructions"}

    upkeep = codebook_upkeep(config, stage, micro_batches[0]["images"], step) if config.stage == "tokenizer" else {}
    metrics = train_step(objective, loss_fn, micro_batches, optimizer, step=step, scheduler=scheduler,
                         clip_grad_norm=config.optim.clip_grad_norm, precision=config.precision,
                         device_type=device_type, parameters=[p for p in stage.model.parameters() if p.requires_grad],
                         weights=weights)
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


LOSS_METRICS = ("loss", "ce", "diffusion")


def global_losses(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    """The losses of the global batch: each rank's mean over its equal slice, averaged over the ranks
    (one small all-reduce). What rank 0 logs is then the same quantity at every world size."""
    present = [name for name in LOSS_METRICS if name in metrics]
    if not present or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return {}
    values = torch.tensor([metrics[name] for name in present], dtype=torch.float32, device=device)
    dist.all_reduce(values)
    return dict(zip(present, (values / dist.get_world_size()).tolist()))


def throughput(plan: RunPlan, micro_batches, seconds: float, world_size: int) -> dict[str, float]:
    """Images and tokens per second of the whole job (this rank's rate times the world size: no extra collective)."""
    images = sum(len(b["caption"]) for b in micro_batches) * world_size
    tokens_per_image = plan.grid.num_tokens
    return {"images_per_s": images / seconds, "tokens_per_s": images * tokens_per_image / seconds, "step_seconds": seconds}
