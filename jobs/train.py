"""Ray Train entry point for the four HART stages: `python -m jobs.train --stage joint --config FILE`.

Design: the only module that calls `ray.train` (touch points marked `# [ray]`). The driver
(`run_training`) checks everything that can be wrong before a worker starts (`preflight`:
storage, cache manifest vs model, text encoder, MLflow), opens or resumes the MLflow run,
and hands a plain-dict config to `TorchTrainer`. Each worker (`train_loop_per_worker`)
builds its stage, wrapped loss module, optimizer and EMA (`setup_worker`, which needs no Ray),
restores the latest checkpoint if Ray has one and loops over `hart.training.step.train_step`.

Resume = resubmit the same `run.name` with the same `run.storage_path` (Train V2 restores the latest
checkpoint of `{storage_path}/{name}`; docs/design/ray.md, "Restore from the run folder"). The
checkpoint holds the step, data epoch, optimizer/scheduler/EMA/RNG state and the MLflow run id, so
the step count and the MLflow run continue and the final step count is the configured one. The
driver reads the same checkpoint first (`jobs.resume.resumable_checkpoint`): no checkpoint means a
new MLflow run, even if an older run of that name exists (its history is never appended to). Steps a
crashed run made after its last checkpoint are redone from that checkpoint (their metrics can then
appear twice under the same step number). From a cache, the checkpoint also records the position in
the run's deterministic stream, and the restored run continues there at any world size
(jobs/train_input.py). Online (`online.enabled`), the checkpoint records the shards consumed whole
and the samples consumed of the others (`progress.json`, joined over the ranks by
`jobs.train_input.sync_ledger`), and the stream leaves them out (pipelines/online.py).
`scaling.num_workers: [min, max]` runs Ray Train V2 elastic: the group restarts from the last
checkpoint at whatever size fits, with the same global batch.

Checkpoints are reported every `run.checkpoint_every` steps (a report is a barrier across
workers, so none in between). Rank 0 logs metrics to MLflow every `run.log_every` steps and at
each checkpoint: one row per metric, the mean over the steps since the last write
(`tracking.RunLogger`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hart.training.checkpoint import load_rng_state, load_training_state, save_rng_state, save_training_state
from configuration.loader import config_from_dict
from hart.training.parallelize import (
    full_optimizer_state_dict, full_state_dict, full_tensors, load_full_optimizer_state_dict, load_full_state_dict,
    match_state_layout, parallelize, shard_like,
)
from hart.training.step import ExponentialMovingAverage, build_optimizer, build_scheduler, restore_scheduler
from jobs import tracking
from jobs.resume import PROGRESS_FILE, resumable_checkpoint
from jobs.sample_grids import log_samples, sampling_text_encoder
from jobs.stages import Stage, build_stage
from jobs.worker_step import global_losses, optimizer_step, step_seed, throughput
from jobs.train_config import TrainRunConfig, load_train_config, with_absolute_paths
from pipelines.online import VisitLedger
from pipelines.progress import Progress, show_ray_data_progress
from jobs.train_data import (
    CacheCollate, ImagesCollate, TextFeatures, check_cache, check_text_encoder, image_dataset,
    list_image_shards, online_dataset, online_precompute_config, prepare_online,
)
from jobs.train_input import (
    StepLedger, cache_order, cache_steps, global_batch, position_meta, ray_steps, reads_cache_stream,
    restored_position, sync_ledger, timed,
)


# ======================================================================================
# Driver
# ======================================================================================


def check_storage(uri: str, endpoint_url: str):
    """(filesystem, path) of the checkpoint root; ValueError if its store does not answer, refuses the
    credentials or has no such bucket (`storage.check_store`), or a local root cannot be made."""
    from pipelines import storage

    storage.check_store(uri, endpoint_url, "run.storage_path", "run.endpoint_url")
    fs, path = storage.resolve(uri, endpoint_url)
    if not storage.is_s3(uri):
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"run.storage_path={uri}: cannot create it ({exc})") from None
    return fs, path


def check_inputs(config: TrainRunConfig) -> None:
    """Every input the run names exists and every S3 store it reads answers, one short request each
    (`storage.check_exists` / `check_store`), so a missing start checkpoint or a bad endpoint is one
    line naming the setting here, not a worker's traceback after the MLflow run exists."""
    from pipelines import storage

    endpoint = config.run.endpoint_url
    named = {"model.tokenizer_checkpoint": config.model.tokenizer_checkpoint, "model.init_from": config.model.init_from}
    if config.eval.every_steps and "clip" in config.eval.metrics:
        named["eval.clip"] = config.eval.clip
    for setting, uri in named.items():
        if uri:
            storage.check_exists(uri, endpoint, setting, "run.endpoint_url")
    reads = {f"data.shards[{i}]": shard for i, shard in enumerate(config.data.shards)} \
        if config.stage == "tokenizer" or config.online.enabled else {"data.cache": config.data.cache}
    storage.check_stores(reads, endpoint, "run.endpoint_url")


def preflight(config: TrainRunConfig) -> dict[str, Any]:
    """All driver-side checks, in the order a user would fix them, before the run's first side effect
    (its MLflow run); returns what the run needs."""
    check_cluster_paths(config)
    fs, path = check_storage(config.run.storage_path, config.run.endpoint_url)
    check_inputs(config)
    facts: dict[str, Any] = {"storage_fs": fs, "storage_path": path, "manifest": None}
    if config.stage == "tokenizer":
        from jobs.stages import check_perceptual_weights

        facts["shards"] = list_image_shards(config)
        check_perceptual_weights(config)
    elif config.online.enabled:
        facts["shards"] = list_image_shards(config)
        facts["manifest"], facts["online"] = prepare_online(config)
        check_text_encoder(config, facts["manifest"])
    else:
        from jobs.stages import load_frozen_tokenizer
        from pipelines.tokenize_stage import weights_hash

        tokenizer_hash = weights_hash(load_frozen_tokenizer(config))
        facts["manifest"] = check_cache(config, tokenizer_hash)
        check_text_encoder(config, facts["manifest"])
    if config.eval.every_steps:
        check_eval_prompts(config)
    uri = tracking.resolve_tracking_uri(config.tracking.tracking_uri)
    params = tracking.flatten_params(config.to_dict())
    facts["tracking_uri"] = uri
    checkpoint_meta = resumable_checkpoint(fs, path, config.run.name)
    facts["resume_step"] = checkpoint_meta["step"] if checkpoint_meta else 0
    facts["run_id"], facts["resumed"] = tracking.open_run(
        uri, config.tracking.experiment, config.run.name, params,
        resume_run_id=checkpoint_meta.get("mlflow_run_id") if checkpoint_meta else None,
        artifact_location=config.tracking.artifact_location,
    )
    log_data_input(config, facts)
    return facts


def check_cluster_paths(config: TrainRunConfig, num_nodes: int | None = None) -> None:
    """On a Ray cluster of several nodes, refuse every path a worker on another node would not see
    (`pipelines.storage.check_reachable`), before anything starts: checkpoints, cache, shards,
    weights, evaluation files, and an MLflow store that is a local file (sqlite:/// or a folder)."""
    from pipelines import storage
    from pipelines.plan import count_alive_nodes

    uri = tracking.resolve_tracking_uri(config.tracking.tracking_uri)
    if uri.startswith("sqlite:///"):
        store = uri.removeprefix("sqlite:///")
    else:  # an http(s) server is reachable from anywhere; a bare path or file:// is a local folder
        store = uri if "://" not in uri or uri.startswith("file://") else ""
    paths = {"run.storage_path": config.run.storage_path, "model.tokenizer_checkpoint": config.model.tokenizer_checkpoint,
             "model.init_from": config.model.init_from, "tracking.tracking_uri": store}
    if config.stage == "tokenizer" or config.online.enabled:
        paths.update({f"data.shards[{i}]": shard for i, shard in enumerate(config.data.shards)})
    else:
        paths["data.cache"] = config.data.cache
    if config.stage != "tokenizer" and "/" in config.data.text_encoder:  # a model folder, not a built-in name
        paths["data.text_encoder"] = config.data.text_encoder
    if config.eval.every_steps:
        paths["eval.clip"] = config.eval.clip
        if not config.eval.prompts.startswith("shapes:"):  # the shapes prompts are built in
            paths["eval.prompts"] = config.eval.prompts
    storage.check_reachable(paths, count_alive_nodes() if num_nodes is None else num_nodes, config.run.shared_filesystem)


def check_eval_prompts(config: TrainRunConfig) -> None:
    """eval.prompts readable, and shapes prompts where the shapes metric scores them: at submission,
    not at the first evaluation step."""
    from pipelines.eval_protocol import read_prompts
    from pipelines.shapes import label_of

    prompts = read_prompts(config.eval.prompts, limit=config.eval.limit)
    if "shapes" in config.eval.metrics:
        for prompt in prompts:
            label_of(prompt.prompt)  # ValueError naming a prompt without a colour and shape word


def log_data_input(config: TrainRunConfig, facts: dict[str, Any]) -> None:
    """What the run reads, as its MLflow dataset input: the token cache (digest: its manifest's
    fingerprint hash), for the tokenizer stage the shard list (digest: a hash of the shard URIs), in
    online mode the shards as encoded (digest: a hash of the fingerprint hash and the shard URIs)."""
    import hashlib

    from pipelines.manifest import fingerprint_hash

    if config.online.enabled:
        name, source = "shards-online", ",".join(config.data.shards)
        listed = "\n".join([fingerprint_hash(facts["manifest"]["fingerprint"]), *sorted(facts["shards"])])
        digest = hashlib.sha256(listed.encode()).hexdigest()
    elif facts["manifest"] is not None:
        name, source = Path(config.data.cache.rstrip("/")).name or "cache", config.data.cache
        digest = fingerprint_hash(facts["manifest"]["fingerprint"])
    else:
        name, source = "shards", ",".join(config.data.shards)
        digest = hashlib.sha256("\n".join(sorted(facts["shards"])).encode()).hexdigest()
    tracking.log_dataset_input(facts["tracking_uri"], facts["run_id"], name, digest, source)


def ingest_options(config: TrainRunConfig):
    """Ray Train's default ingest options (carried over from the DataContext), plus `data.preserve_order`.

    Without it the streaming executor hands out blocks as they finish, so which images form the
    first batch depends on task timing: two runs with the same seed trained on different batches
    (measured: a 400-image tokenizer run differed from step 1).
    """
    import ray.train  # [ray]

    options = ray.train.DataConfig.default_ingest_options()  # [ray]
    options.preserve_order = options.preserve_order or config.data.preserve_order
    return options


def run_training(config: TrainRunConfig, export_dir: str | None = None) -> dict[str, Any]:
    """Preflight, fit, export, register. Returns {run_id, final_step, checkpoint_path, export_dir, model_version}."""
    import ray.data  # [ray]
    import ray.train  # [ray]
    from ray.train.torch import TorchTrainer  # [ray]

    check_cluster_paths(config)  # on the paths as given: a relative one is refused on a cluster of several nodes
    config = with_absolute_paths(config)  # what the workers, checkpoints and MLflow params see
    facts = preflight(config)
    show_ray_data_progress(False)  # [ray] keeps job logs readable: the workers print step lines
    print(f"[train] stage={config.stage} run={config.run.name} mlflow run {facts['run_id']} "
          f"({'resumed at step %d' % facts['resume_step'] if facts['resumed'] else 'new'}) -> {config.run.storage_path}")
    scaling = config.scaling
    if config.stage == "tokenizer":
        dataset = image_dataset(config, facts["shards"])
    elif config.online.enabled:
        if config.online.compute.check_resources:
            from pipelines.plan import check_resources

            workers = (scaling.max_workers * scaling.cpus_per_worker,
                       scaling.max_workers * scaling.gpus_per_worker if scaling.use_gpu else 0.0)
            check_resources(online_precompute_config(config), writers=False, others=workers,
                            others_name="the Ray Train workers (scaling.*)")
        dataset = online_dataset(config, facts["shards"], facts["online"])
    else:
        dataset = None  # each worker reads its slices of the cache itself (jobs/train_input.py)
    resources = {"CPU": scaling.cpus_per_worker, **({"GPU": scaling.gpus_per_worker} if scaling.use_gpu else {})}
    is_s3 = config.run.storage_path.startswith("s3://")
    trainer = TorchTrainer(  # [ray]
        train_loop_per_worker,
        train_loop_config={"config": config.to_dict(), "run_id": facts["run_id"], "tracking_uri": facts["tracking_uri"],
                           "manifest": facts["manifest"]},
        scaling_config=ray.train.ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=scaling.placement_strategy,
                                               elastic_resize_monitor_interval_s=scaling.resize_check_s),
        run_config=ray.train.RunConfig(
            name=config.run.name, storage_path=facts["storage_path"],
            storage_filesystem=facts["storage_fs"] if is_s3 else None,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.run.num_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=config.run.max_failures),
            # Train V2 patches `print` in workers to log through the root logger *and* tee to stdout
            # once Ray has wrapped stdout, so every worker line reached the driver twice.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
        datasets={"train": dataset} if dataset is not None else None,
        dataset_config=ray.train.DataConfig(execution_options=ingest_options(config)),
    )
    try:
        result = trainer.fit()  # [ray]
    except Exception as exc:
        tracking.finish_run(facts["tracking_uri"], facts["run_id"], "FAILED")
        raise RuntimeError(f"training run {config.run.name!r} failed; the last good checkpoint is kept: {exc}") from exc
    outcome = {"run_id": facts["run_id"], "checkpoint_path": result.checkpoint.path if result.checkpoint else None,
               "final_step": int(result.metrics.get("step", 0)) if result.metrics else 0,
               "export_dir": None, "model_version": None}
    if config.run.export and result.checkpoint is not None:
        outcome.update(export_and_register(config, facts, result.checkpoint, export_dir))
    tracking.finish_run(facts["tracking_uri"], facts["run_id"], "FINISHED")
    return outcome


def export_and_register(config: TrainRunConfig, facts: dict[str, Any], checkpoint, export_dir: str | None) -> dict[str, Any]:
    from jobs.export import export_checkpoint, upload_folder
    from pipelines import storage

    # Without --export-dir the export is staged in a temporary folder and lives at `destination` only.
    with tempfile.TemporaryDirectory(prefix="hart-export-") as staging:
        local = export_dir or staging
        with checkpoint.as_directory() as directory:  # [ray]
            export_checkpoint(directory, config, local)
        # The run config travels with the registered model (secrets redacted like the params).
        params = tracking.flatten_params(config.to_dict())
        (Path(local) / "train_config.json").write_text(json.dumps(params, indent=1, sort_keys=True) + "\n")
        destination = storage.join(config.run.storage_path, config.run.name, "export")
        upload_folder(local, destination, config.run.endpoint_url)
        name = config.tracking.registered_model or f"hart-{config.stage}"
        version = tracking.log_export_and_register(facts["tracking_uri"], facts["run_id"], local, name)
    print(f"[train] exported to {destination}; registered {name} version {version}")
    return {"export_dir": export_dir or destination, "model_version": version}


# ======================================================================================
# Worker
# ======================================================================================


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


def setup_worker(config: TrainRunConfig, manifest: dict[str, Any] | None, device: torch.device,
                 rank: int = 0) -> WorkerSetup:
    """Seed, threads, text features, stage, wrapped loss modules, optimizers, scheduler and EMA, built in
    the order the worker's numerics depend on (the seed first, then every module that draws from it).

    Needs no Ray: `benchmarks/ray_overhead.py`'s bare loop calls it too, so the loop it compares the Ray
    job with is the worker's own setup, not a copy of it.
    """
    torch.manual_seed(config.run.seed + rank)
    if config.scaling.torch_threads:
        torch.set_num_threads(config.scaling.torch_threads)
    text = TextFeatures(config, manifest, device) if config.stage != "tokenizer" else None
    stage = build_stage(config, device, text.encoder if text else None, manifest)
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
    import ray.train  # [ray]
    import ray.train.torch  # [ray]

    config = config_from_dict(TrainRunConfig, loop_config["config"])
    quiet_report_log()
    context = ray.train.get_context()  # [ray]
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()  # [ray]
    manifest = loop_config["manifest"]
    setup = setup_worker(config, manifest, device, rank)
    text, stage, objective, disc_objective = setup.text, setup.stage, setup.objective, setup.disc_objective
    optimizer, scheduler, disc_optimizer, ema = setup.optimizer, setup.scheduler, setup.disc_optimizer, setup.ema
    step, data_epoch, resumed, meta = 0, 0, False, {}
    ledger = VisitLedger() if config.online.enabled else None
    step_ledger = StepLedger(config.data.ledger)
    checkpoint = ray.train.get_checkpoint()  # [ray]
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:  # [ray]
            step, data_epoch, meta = restore(directory, stage, optimizer, scheduler, disc_optimizer, ema,
                                             loop_config["run_id"], rank)
            if ledger is not None and os.path.exists(os.path.join(directory, PROGRESS_FILE)):
                ledger = VisitLedger.from_state(json.loads(Path(directory, PROGRESS_FILE).read_text()))
            step_ledger.restore(directory)
        resumed = True
    logger = tracking.RunLogger(loop_config["tracking_uri"], loop_config["run_id"], enabled=rank == 0)
    if resumed:  # where the metric history has points of steps redone after this restore (RELIABILITY.md)
        logger.record({"restored_at_step": float(step), "world_size": float(world_size)}, step)
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
        metrics.update(throughput(config, micro_batches, now - last_step_end, world_size))
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
            log_samples(config, stage, ema, sample_batch, logger, step, manifest)
        if config.eval.every_steps and (step % config.eval.every_steps == 0 or step == config.run.max_steps) \
                and logger.enabled:
            from jobs.train_eval import evaluate_in_training

            evaluate_in_training(config, stage, ema, logger, step, sampling_text_encoder(config, stage, manifest))
        if step % config.run.checkpoint_every == 0 or step == config.run.max_steps:
            if ledger is not None:
                logger.record(sync_ledger(ledger), step)
            step_ledger.gather()
            logger.flush()
            stream = position_meta(position, order.digest, config) if order is not None else None
            report_checkpoint(config, stage, optimizer, scheduler, disc_optimizer, ema, metrics, step,
                              position // order.num_rows if order is not None else data_epoch,
                              loop_config["run_id"], rank, ledger, stream, step_ledger)
        if step >= config.run.max_steps:
            break
    steps.close()


def quiet_report_log() -> None:
    """Ray Train's workers log every `ray.train.report` at INFO as one `TrainingReport(...)` line holding
    all metrics and the checkpoint object (hundreds of characters each); the job prints its own short
    checkpoint line instead. That logger is named after its module's file, so it is found that way."""
    import importlib.util
    import logging

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
                      step_ledger: StepLedger | None = None) -> None:
    import ray.train  # [ray]

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
        started, name = time.perf_counter(), f"checkpoint_step{step:08d}"
        ray.train.report({**metrics, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(directory),  # [ray]
                         checkpoint_dir_name=name)
    if rank == 0:
        from pipelines import storage

        print(f"[train] checkpoint at step {step}: {storage.join(config.run.storage_path, config.run.name, name)} "
              f"({time.perf_counter() - started:.1f}s)", flush=True)


# ======================================================================================
# CLI
# ======================================================================================


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from configuration.cli import HelpFormatter
    from jobs.local_ray import ADDRESS_HELP

    parser = argparse.ArgumentParser(prog="hart-train", formatter_class=HelpFormatter,
                                     description="Train a HART stage with Ray Train (checkpoints + MLflow).")
    parser.add_argument("--stage", choices=("tokenizer", "ar", "diffusion", "joint"),
                        help="the stage to train (default: the config file's `stage`)")
    parser.add_argument("--config", help="run config (.yaml/.toml/.json), e.g. jobs/configs/train_tiny.yaml "
                                         "(default: the built-in defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set run.max_steps=200 --set scaling.num_workers=8")
    parser.add_argument("--export-dir", help="local folder for the exported llm/ + tokenizer/ (default: a temporary "
                                             "folder; the export is also copied to <run.storage_path>/<run.name>/export)")
    parser.add_argument("--address", help=ADDRESS_HELP)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from jobs.local_ray import connect

    args = parse_args(argv)
    try:
        config = load_train_config(args.config, args.stage, args.set)
    except ValueError as exc:
        print(f"hart-train: error: {exc}", file=sys.stderr)
        return 2
    connect(args.address, ray_train=True)
    try:
        outcome = run_training(config, args.export_dir)
    except ValueError as exc:
        print(f"hart-train: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a store that stopped answering after the preflight: one line, not a traceback
        from pipelines.storage import storage_error_line

        line = storage_error_line("hart-train", exc, "run.endpoint_url", config.run.endpoint_url)
        if not line:
            raise
        print(line, file=sys.stderr)
        return 1
    print(f"[train] done: step {outcome['final_step']}, checkpoint {outcome['checkpoint_path']}, "
          f"export {outcome['export_dir']}, model version {outcome['model_version']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
