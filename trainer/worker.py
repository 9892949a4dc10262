"""A Ray Train worker of `trainer.driver`: build the stage, restore, loop over steps, report checkpoints.

Design: `setup_worker` builds everything a worker holds before its first step and needs no Ray
(the golden loss record and the Ray overhead benchmark call it bare). `train_loop_per_worker`
restores the latest checkpoint Ray hands it (step, data epoch, optimizer/scheduler/EMA/RNG state
and the MLflow run id, written at any world size), then loops over `trainer.worker_step`. From a
cache, the checkpoint also records the position in the run's deterministic stream, and the
restored run continues there at any world size (trainer/batches.py). Online (`online.enabled`), the
checkpoint records the shards consumed whole and the samples consumed of the others
(`progress.json`, joined over the ranks by `trainer.batches.sync_ledger`), and the stream leaves
them out (pipelines/online.py). Steps a crashed run made after its last checkpoint are redone from
that checkpoint (their metrics can then appear twice under the same step number).

Checkpoints are reported every `run.checkpoint_every` steps (a report is a barrier across
workers, so none in between). Rank 0 logs metrics to MLflow every `run.log_every` steps and at
each checkpoint: one row per metric, the mean over the steps since the last write
(`tracking.RunLogger`). Each checkpoint (or every k-th) is also an MLflow logged model, opened by rank 0
before that step's evaluation and marked READY after the report (`trainer.checkpoint_models`). The first
worker of each Ray node samples the node's system metrics into the run from the end of setup to the end
of the loop (`trainer.system_metrics`). Ray touch points are marked `# [ray]`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from hart.training.checkpoint import load_rng_state, load_training_state, save_rng_state, save_training_state
from hart.training.parallelize import (
    full_optimizer_state_dict, full_state_dict, full_tensors, load_full_optimizer_state_dict, load_full_state_dict,
    match_state_layout, parallelize, shard_like,
)
from hart.training.step import ExponentialMovingAverage, build_optimizer, build_scheduler, restore_scheduler
from pipelines import storage
from pipelines.online import VisitLedger
from pipelines.progress import Progress
from trainer import tracking
from trainer.batches import (
    StepLedger, cache_order, cache_steps, global_batch, position_meta, ray_steps, reads_cache_stream,
    restored_position, sync_ledger, timed,
)
from trainer.checkpoint_models import CheckpointModels
from trainer.data import CacheCollate, ImagesCollate, TextFeatures
from trainer.eval_in_training import evaluate_in_training
from trainer.plan import RunPlan
from trainer.resume import PROGRESS_FILE, checkpoint_dir_name
from trainer.sample_grids import log_samples, sampling_text_encoder
from trainer.stages import Stage, build_stage
from trainer.system_metrics import NodeSystemMetrics
from trainer.worker_step import global_losses, optimizer_step, step_seed, throughput


@dataclass
class WorkerSetup:
    """What a worker holds before its first step: `setup_worker`'s result."""

    text: TextFeatures | None  # None for the tokenizer stage (it trains on images, not captions)
    stage: Stage
    objective: torch.nn.Module  # the stage's loss module as `parallelize` wrapped it
    disc_objective: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    disc_optimizer: torch.optim.Optimizer | None
    ema: ExponentialMovingAverage


def setup_worker(plan: RunPlan, device: torch.device, rank: int = 0) -> WorkerSetup:
    """Seed, threads, text features, stage, wrapped loss modules, optimizers, scheduler and EMA, built in
    the order the worker's numerics depend on (the seed first, then every module that draws from it).

    Needs no Ray: `benchmarks/ray_overhead.py`'s bare loop calls it too, so the loop it compares the Ray
    job with is the worker's own setup, not a copy of it.
    """
    config = plan.config
    torch.manual_seed(config.run.seed + rank)
    if config.scaling.torch_threads:
        torch.set_num_threads(config.scaling.torch_threads)
    text = TextFeatures(plan, device) if config.stage != "tokenizer" else None
    stage = build_stage(plan, device, text.encoder if text else None)
    # Wrap first: FSDP2 swaps parameters for DTensors, and the optimizer/EMA must hold those.
    objective = parallelize(stage.objective, config.parallel, device)
    disc_objective = None
    if stage.discriminator_objective is not None:
        disc_objective = parallelize(stage.discriminator_objective, config.parallel, device)
    optimizer = build_optimizer(stage.model, config.optim)
    scheduler = build_scheduler(optimizer, config.run.max_steps, config.optim)
    disc_optimizer = None
    if stage.discriminator is not None:
        disc_optimizer = torch.optim.AdamW(stage.discriminator.parameters(), lr=config.objective.disc_lr,
                                           betas=tuple(config.optim.betas))
    ema = ExponentialMovingAverage(stage.model, config.ema_decay)
    return WorkerSetup(text, stage, objective, disc_objective, optimizer, scheduler, disc_optimizer, ema)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    # What run_worker starts for the length of its loop (the node's system metrics) stops here, a raising step included.
    with contextlib.ExitStack() as until_loop_ends:
        run_worker(loop_config["plan"], until_loop_ends)


def run_worker(plan: RunPlan, until_loop_ends: contextlib.ExitStack) -> None:

    config, manifest = plan.config, plan.manifest
    quiet_report_log()
    context = ray.train.get_context()  # [ray]
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()  # [ray]
    setup = setup_worker(plan, device, rank)
    text, stage, objective, disc_objective = setup.text, setup.stage, setup.objective, setup.disc_objective
    optimizer, scheduler, disc_optimizer, ema = setup.optimizer, setup.scheduler, setup.disc_optimizer, setup.ema
    step, data_epoch, resumed, meta = 0, 0, False, {}
    ledger = VisitLedger() if config.online.enabled else None
    step_ledger = StepLedger(config.data.ledger)
    checkpoint = ray.train.get_checkpoint()  # [ray]
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:  # [ray]
            step, data_epoch, meta = restore(directory, stage, optimizer, scheduler, disc_optimizer, ema,
                                             plan.run_id, rank)
            if ledger is not None and os.path.exists(os.path.join(directory, PROGRESS_FILE)):
                ledger = VisitLedger.from_state(json.loads(Path(directory, PROGRESS_FILE).read_text()))
            step_ledger.restore(directory)
        resumed = True
    logger = tracking.RunLogger(plan.tracking_uri, plan.run_id, enabled=rank == 0)
    models = CheckpointModels(logger.client, plan.run_id, config.run, enabled=logger.enabled)
    until_loop_ends.enter_context(NodeSystemMetrics.of_worker(plan))  # the first worker of each Ray node samples it
    if resumed:  # where the metric history has points of steps redone after this restore (RELIABILITY.md)
        logger.record({"restored_at_step": float(step), "world_size": float(world_size)}, step)
        models.ready(step)  # Ray restored it, so it is persisted (trainer/checkpoint_models.py)
    collate = ImagesCollate() if config.stage == "tokenizer" else CacheCollate(manifest)
    order, position = None, 0
    if reads_cache_stream(config):
        order = cache_order(config, manifest)
        position = restored_position(meta, order.digest, config)
        data_epoch = position // order.num_rows
        steps = cache_steps(config, manifest, order, collate, rank, world_size, position)
    else:
        steps = ray_steps(config, ray.train.get_dataset_shard("train"), collate, world_size, data_epoch)  # [ray]
    if resumed:
        where = f", stream position {position} (pass {data_epoch})" if order is not None else f", data epoch {data_epoch}"
        print(f"[train] rank {rank} of {world_size}: resumed at step {step}{where}")
    generator = torch.Generator(device=device)
    sample_batch = None
    progress = Progress(config.run.max_steps, "steps", done_before=step)
    samples_per_step = global_batch(config)
    last_step_end = time.perf_counter()
    for step_input, data_seconds in timed(steps):
        if step_input is None:  # online: the stream's epochs ended
            raise ValueError(f"the online stream ({config.online.epochs} passes over data.shards) ended at step {step} "
                             f"of run.max_steps {config.run.max_steps}: raise online.epochs (the run resumes from its "
                             f"last checkpoint)")
        micro_batches, weights = step_input
        preparing = time.perf_counter()
        step_ledger.record(step + 1, micro_batches, world_size)
        if ledger is not None:
            for batch in micro_batches:
                ledger.stage(batch)
        micro_batches = [{**b, "images": b["images"].to(device)} if text is None else text.add_context(b)
                         for b in micro_batches]
        context_seconds = time.perf_counter() - preparing  # to the device, captions encoded on this worker
        sample_batch = sample_batch if sample_batch is not None else micro_batches[0]
        generator.manual_seed(step_seed(config.run.seed, rank, step))
        computing = time.perf_counter()
        metrics = optimizer_step(config, stage, objective, disc_objective, optimizer, scheduler, disc_optimizer,
                                 micro_batches, step, generator, weights)
        metrics.update(global_losses(metrics, device))
        ema_started = time.perf_counter()
        ema.update(stage.model)
        step += 1
        position += samples_per_step
        if ledger is not None:
            ledger.commit()
        now = time.perf_counter()
        # step_seconds: the loop's period (previous step's end to this one's), so data wait, logging and
        # everything else the loop does count; data_seconds (waiting for the iterator), context_seconds
        # (device copy, caption encoding), compute_seconds and ema_seconds split it.
        metrics.update(throughput(plan, micro_batches, now - last_step_end, world_size))
        metrics.update(data_seconds=data_seconds, context_seconds=context_seconds, compute_seconds=ema_started - computing,
                       ema_seconds=now - ema_started, data_wait_share=data_seconds / (now - last_step_end),
                       world_size=float(world_size))
        last_step_end = now
        if config.run.fail_at_step and step == config.run.fail_at_step and not resumed:
            raise RuntimeError(f"injected failure at step {step} (run.fail_at_step)")
        logger.record(metrics, step)
        if step % config.run.log_every == 0:
            if rank == 0:  # the window's values, as logged
                losses = " ".join(f"{k}={v:.4g}" for k, v in logger.summary().items()
                                  if k in ("loss", "ce", "diffusion", "lr", "grad_norm"))
                counted = {"samples": (step - progress.done_before) * samples_per_step}
                print(f"[train] step {progress.line(step, counted)} | {losses}", flush=True)
            logger.write()
        if config.tracking.sample_every and step % config.tracking.sample_every == 0 or step == config.run.max_steps:
            log_samples(plan, stage, ema, sample_batch, logger, step)
        checkpointing = step % config.run.checkpoint_every == 0 or step == config.run.max_steps
        model_id = models.open(step) if checkpointing else None  # before the evaluation: its figures go to it
        if config.eval.every_steps and (step % config.eval.every_steps == 0 or step == config.run.max_steps) \
                and logger.enabled:

            evaluate_in_training(config, stage, ema, logger, step, sampling_text_encoder(plan, stage), model_id)
        if checkpointing:
            if ledger is not None:
                logger.record(sync_ledger(ledger), step)
            step_ledger.gather()
            logger.flush()
            stream = position_meta(position, order.digest, config) if order is not None else None
            report_checkpoint(config, stage, optimizer, scheduler, disc_optimizer, ema, metrics, step,
                              position // order.num_rows if order is not None else data_epoch,
                              plan.run_id, rank, ledger, stream, step_ledger, models)
        if step >= config.run.max_steps:
            break
    steps.close()


def quiet_report_log() -> None:
    """Ray Train's workers log every `ray.train.report` at INFO as one `TrainingReport(...)` line holding
    all metrics and the checkpoint object (hundreds of characters each); the job prints its own short
    checkpoint line instead. That logger is named after its module's file, so it is found that way."""

    spec = importlib.util.find_spec("ray.train.v2._internal.execution.context")
    if spec is not None and spec.origin:
        logging.getLogger(spec.origin).setLevel(logging.WARNING)


def restore(directory, stage: Stage, optimizer, scheduler, disc_optimizer, ema, run_id: str,
            rank: int) -> tuple[int, int, dict[str, Any]]:
    """Weights, optimizer, scheduler, EMA, discriminator and RNG from a checkpoint written at any world
    size (full state dicts, resharded here); returns (step, data epoch, meta)."""
    state = load_training_state(directory)
    if state.meta.get("mlflow_run_id") not in (None, run_id):
        raise ValueError(f"checkpoint belongs to MLflow run {state.meta['mlflow_run_id']}, the driver opened {run_id}")
    load_full_state_dict(stage.model, state.model)
    load_full_optimizer_state_dict(stage.model, optimizer, state.optimizer)
    restore_scheduler(optimizer, scheduler, state.scheduler)
    if state.ema is not None:
        ema.load_state_dict(shard_like(state.ema, ema.shadow))
    if stage.discriminator is not None and "discriminator" in state.extra:
        stage.discriminator.load_state_dict(state.extra["discriminator"])
        disc_optimizer.load_state_dict(state.extra_optimizers["discriminator"])
        match_state_layout(disc_optimizer)
    load_rng_state(directory, rank)  # a rank the writing run did not have keeps its seeded generator
    return state.step, int(state.meta["data_epoch"]), state.meta


def report_checkpoint(config, stage: Stage, optimizer, scheduler, disc_optimizer, ema, metrics, step, data_epoch,
                      run_id, rank, ledger: VisitLedger | None = None, stream: dict[str, Any] | None = None,
                      step_ledger: StepLedger | None = None, models: CheckpointModels | None = None) -> None:

    # Gathers are collectives under FSDP2: every rank makes them, rank 0 writes.
    model_state, ema_state = full_state_dict(stage.model), full_tensors(ema.state_dict())
    optimizer_state = full_optimizer_state_dict(stage.model, optimizer)
    with tempfile.TemporaryDirectory(prefix="hart-ckpt-") as directory:
        if rank == 0:
            extra = {"discriminator": full_state_dict(stage.discriminator)} if stage.discriminator is not None else {}
            meta = {"step": step, "data_epoch": data_epoch, "stage": config.stage, "mlflow_run_id": run_id,
                    "run_name": config.run.name, "config": tracking.redact_config(config.to_dict()), "metrics": metrics,
                    **({"data_position": stream} if stream is not None else {})}
            extra_optimizers = {"discriminator": disc_optimizer.state_dict()} if disc_optimizer is not None else {}
            save_training_state(directory, meta=meta, model=model_state, ema=ema_state,
                                optimizer=optimizer_state, scheduler=scheduler.state_dict(), extra=extra,
                                extra_optimizers=extra_optimizers)
            if ledger is not None:
                Path(directory, PROGRESS_FILE).write_text(json.dumps(ledger.state()) + "\n")
            if step_ledger is not None:
                step_ledger.write(directory)
        save_rng_state(directory, rank)
        started, name = time.perf_counter(), checkpoint_dir_name(step)
        ray.train.report({**metrics, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(directory),  # [ray]
                         checkpoint_dir_name=name)
        if models is not None:  # the report returned: the checkpoint is persisted
            models.ready(step, directory)
    if rank == 0:

        print(f"[train] checkpoint at step {step}: {storage.join(config.run.storage_path, config.run.name, name)} "
              f"({time.perf_counter() - started:.1f}s)", flush=True)
