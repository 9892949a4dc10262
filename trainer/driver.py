"""The training driver: `run_training(config)` checks, fits, exports and registers a run.

Design: everything that can be wrong is checked before a worker starts (`preflight`: storage,
cache manifest vs model, text encoder, MLflow), then the run's MLflow run is opened or resumed and
a plain-dict config goes to Ray Train's `TorchTrainer`, whose workers run `trainer.worker`. After
the fit, the last checkpoint becomes an export (`trainer.export`) registered in MLflow. Ray touch
points are marked `# [ray]`.

Resume = resubmit the same `run.name` with the same `run.storage_path` (Train V2 restores the latest
checkpoint of `{storage_path}/{name}`; docs/design/ray.md, "Restore from the run folder"). The
driver reads the same checkpoint first (`trainer.resume.resumable_checkpoint`): no checkpoint means a
new MLflow run, even if an older run of that name exists (its history is never appended to).
`scaling.num_workers: [min, max]` runs Ray Train V2 elastic: the group restarts from the last
checkpoint at whatever size fits, with the same global batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import ray.data
import ray.train
from ray.train.torch import TorchTrainer

from pipelines import storage
from pipelines.eval_protocol import prompt_set_identity, read_prompts
from pipelines.manifest import fingerprint_hash
from pipelines.plan import check_resources, count_alive_nodes
from pipelines.progress import show_ray_data_progress
from pipelines.shapes import label_of
from pipelines.tokenize_stage import weights_hash
from trainer import tracking
from trainer.config import TrainRunConfig, with_absolute_paths
from trainer.data import (
    check_cache, check_text_encoder, image_dataset, list_image_shards, online_dataset, online_precompute_config,
    prepare_online, text_encoder_name,
)
from trainer.export import export_checkpoint, upload_folder
from trainer.plan import RunPlan
from trainer.resume import resumable_checkpoint
from trainer.stages import check_perceptual_weights, load_frozen_tokenizer
from trainer.worker import train_loop_per_worker


def check_storage(uri: str, endpoint_url: str):
    """(filesystem, path) of the checkpoint root; ValueError if its store does not answer, refuses the
    credentials or has no such bucket (`storage.check_store`), or a local root cannot be made."""

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


def preflight(config: TrainRunConfig) -> RunPlan:
    """All driver-side checks, in the order a user would fix them, before the run's first side effect
    (its MLflow run); returns the run's plan with the facts they established."""
    check_cluster_paths(config)
    fs, path = check_storage(config.run.storage_path, config.run.endpoint_url)
    check_inputs(config)
    plan = RunPlan.of(config)
    if config.stage == "tokenizer":
        plan = plan.with_facts(shards=tuple(list_image_shards(config)))
        check_perceptual_weights(config)
    elif config.online.enabled:
        manifest, online = prepare_online(plan)
        plan = plan.with_facts(shards=tuple(list_image_shards(config)), manifest=manifest, online=online)
        check_text_encoder(plan)
    else:
        tokenizer_hash = weights_hash(load_frozen_tokenizer(plan))
        plan = plan.with_facts(manifest=check_cache(plan, tokenizer_hash))
        check_text_encoder(plan)
    if config.eval.every_steps:
        check_eval_prompts(config)
    uri = tracking.resolve_tracking_uri(config.tracking.tracking_uri)
    checkpoint_meta = resumable_checkpoint(fs, path, config.run.name)
    run_id, _ = tracking.open_run(
        uri, config.tracking.experiment, config.run.name, tracking.flatten_params(config.to_dict()),
        resume_run_id=checkpoint_meta.get("mlflow_run_id") if checkpoint_meta else None,
        artifact_location=config.tracking.artifact_location,
    )
    plan = plan.with_facts(tracking_uri=uri, run_id=run_id, resume_step=checkpoint_meta["step"] if checkpoint_meta else None)
    log_data_input(plan)
    return plan


def check_cluster_paths(config: TrainRunConfig, num_nodes: int | None = None) -> None:
    """On a Ray cluster of several nodes, refuse every path a worker on another node would not see
    (`pipelines.storage.check_reachable`), before anything starts: checkpoints, cache, shards,
    weights, evaluation files, and an MLflow store that is a local file (sqlite:/// or a folder)."""

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

    prompts = read_prompts(config.eval.prompts, limit=config.eval.limit)
    if "shapes" in config.eval.metrics:
        for prompt in prompts:
            label_of(prompt.prompt)  # ValueError naming a prompt without a colour and shape word


def log_data_input(plan: RunPlan) -> None:
    """What the run reads, as its MLflow dataset input: the token cache (digest: its manifest's
    fingerprint hash), for the tokenizer stage the shard list (digest: a hash of the shard URIs), in
    online mode the shards as encoded (digest: a hash of the fingerprint hash and the shard URIs). With
    `eval.every_steps`, also the prompt set its figures are computed on (context "evaluation")."""
    config = plan.config
    if config.online.enabled:
        name, source = "shards-online", ",".join(config.data.shards)
        listed = "\n".join([fingerprint_hash(plan.manifest["fingerprint"]), *sorted(plan.shards)])
        digest = hashlib.sha256(listed.encode()).hexdigest()
    elif plan.manifest is not None:
        name, source = Path(config.data.cache.rstrip("/")).name or "cache", config.data.cache
        digest = fingerprint_hash(plan.manifest["fingerprint"])
    else:
        name, source = "shards", ",".join(config.data.shards)
        digest = hashlib.sha256("\n".join(sorted(plan.shards)).encode()).hexdigest()
    tracking.log_dataset_input(plan.tracking_uri, plan.run_id, name, digest, source)
    if config.eval.every_steps:
        name, digest = prompt_set_identity(config.eval.prompts, read_prompts(config.eval.prompts, limit=config.eval.limit))
        tracking.log_dataset_input(plan.tracking_uri, plan.run_id, name, digest, config.eval.prompts, context="evaluation")


def ingest_options(config: TrainRunConfig):
    """Ray Train's default ingest options (carried over from the DataContext), plus `data.preserve_order`.

    Without it the streaming executor hands out blocks as they finish, so which images form the
    first batch depends on task timing: two runs with the same seed trained on different batches
    (measured: a 400-image tokenizer run differed from step 1).
    """

    options = ray.train.DataConfig.default_ingest_options()  # [ray]
    options.preserve_order = options.preserve_order or config.data.preserve_order
    return options


def run_training(config: TrainRunConfig, export_dir: str | None = None) -> dict[str, Any]:
    """Preflight, fit, export, register. Returns {run_id, final_step, checkpoint_path, export_dir, model_version}."""
    check_cluster_paths(config)  # on the paths as given: a relative one is refused on a cluster of several nodes
    config = with_absolute_paths(config)  # what the workers, checkpoints and MLflow params see
    plan = preflight(config)
    show_ray_data_progress(False)  # [ray] keeps job logs readable: the workers print step lines
    resumed = f"resumed at step {plan.resume_step}" if plan.resume_step is not None else "new"
    print(f"[train] stage={config.stage} run={config.run.name} mlflow run {plan.run_id} ({resumed}) -> "
          f"{config.run.storage_path}")
    scaling = config.scaling
    if config.stage == "tokenizer":
        dataset = image_dataset(plan)
    elif config.online.enabled:
        if config.online.compute.check_resources:
            workers = (scaling.max_workers * scaling.cpus_per_worker,
                       scaling.max_workers * scaling.gpus_per_worker if scaling.use_gpu else 0.0)
            check_resources(online_precompute_config(plan), writers=False, others=workers,
                            others_name="the Ray Train workers (scaling.*)")
        dataset = online_dataset(plan)
    else:
        dataset = None  # each worker reads its slices of the cache itself (trainer/batches.py)
    resources = {"CPU": scaling.cpus_per_worker, **({"GPU": scaling.gpus_per_worker} if scaling.use_gpu else {})}
    storage_fs, storage_path = storage.resolve(config.run.storage_path, config.run.endpoint_url)
    trainer = TorchTrainer(  # [ray]
        train_loop_per_worker,
        train_loop_config={"plan": plan},
        scaling_config=ray.train.ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=scaling.placement_strategy,
                                               elastic_resize_monitor_interval_s=scaling.resize_check_s),
        run_config=ray.train.RunConfig(
            name=config.run.name, storage_path=storage_path,
            storage_filesystem=storage_fs if storage.is_s3(config.run.storage_path) else None,
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
        tracking.finish_run(plan.tracking_uri, plan.run_id, "FAILED")
        raise RuntimeError(f"training run {config.run.name!r} failed; the last good checkpoint is kept: {exc}") from exc
    outcome = {"run_id": plan.run_id, "checkpoint_path": result.checkpoint.path if result.checkpoint else None,
               "final_step": int(result.metrics.get("step", 0)) if result.metrics else 0,
               "export_dir": None, "model_version": None}
    if config.run.export and result.checkpoint is not None:
        outcome.update(export_and_register(plan, result.checkpoint, export_dir, outcome["final_step"]))
    tracking.finish_run(plan.tracking_uri, plan.run_id, "FINISHED")
    return outcome


def export_and_register(plan: RunPlan, checkpoint, export_dir: str | None, step: int = 0) -> dict[str, Any]:
    """Export the checkpoint next to the run's checkpoints (and to `export_dir`), log it from the run
    and register it: a transformer stage's export as the pyfunc model of `trainer.served_model` at
    `step`, with the run's text encoder by reference and `tracking.served_protocol`."""
    config = plan.config
    # Without --export-dir the export is staged in a temporary folder and lives at `destination` only.
    with tempfile.TemporaryDirectory(prefix="hart-export-") as staging:
        local = export_dir or staging
        with checkpoint.as_directory() as directory:  # [ray]
            export_checkpoint(directory, plan, local)
        # The run config travels with the registered model (secrets redacted like the params).
        params = tracking.flatten_params(config.to_dict())
        (Path(local) / "train_config.json").write_text(json.dumps(params, indent=1, sort_keys=True) + "\n")
        destination = storage.join(config.run.storage_path, config.run.name, "export")
        upload_folder(local, destination, config.run.endpoint_url)
        name = config.tracking.registered_model or f"hart-{config.stage}"
        version = tracking.log_export_and_register(plan.tracking_uri, plan.run_id, local, name,
                                                   text_encoder=text_encoder_name(plan),
                                                   protocol=config.tracking.served_protocol, step=step)
    print(f"[train] exported to {destination}; registered {name} version {version}")
    return {"export_dir": export_dir or destination, "model_version": version}
