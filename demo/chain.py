"""The demo's step chain (`run(DemoConfig)`), the services its data and runs live on, and its summary.

Steps (each is the real job's function with its typed config, in-process on one local Ray instance):
  1. data        procedural "shapes" corpus as WebDataset shards (pipelines.shapes), plus a
                 held-out split whose (colour, shape, background) prompts training never sees
  2. tokenizer   Ray Train `tokenizer` stage (`trainer.driver.run_training`): a VQVAE from scratch
                 ("full" mode), which starts as a plain autoencoder (`vq_warmup_steps`), then seeds
                 its codebook from the warmed-up latents and trains with discrete/continuous
                 alternation; optionally (`--tokenizer-hybrid-steps`) HART's hybrid decoder fine-tune
  3. precompute  Ray Data pre-tokenization into the token + residual cache (+ MiniLM text features)
                 (`pipelines.plan.run_precompute`); a shard that fails fails the demo
  4. joint       Ray Train `joint` stage: transformer CE + residual diffusion loss
  5. generate    images for the held-out prompts, with and without the residual diffusion head
  6. evaluate    tokenizer PSNR (hybrid vs discrete-only) on held-out images; prompt following
                 (colour / shape accuracy) by `pipelines.shapes_classifier`, which is first
                 validated on real held-out images (it must score >= 98% there); steps 5 and 6
                 run through hart-evaluate's `trainer.evaluation.run_evaluation`, whose figures,
                 per-category table and grid go to the joint run as `eval/with_head/...` and
                 `eval/without_head/...` (`demo.figures`)
Each step's config is its recipe (`demo.config.recipe`) with this demo's values set by dotted key
(`recipe_config`), checked by the config's own types. Everything is tracked in MLflow (embedded
default: sqlite store `runs/mlflow.db`); the summary says where caches, checkpoints, samples and
runs are, and prints the link that opens the runs in the MLflow UI's model-training view. With the
same seed both training stages train on the same batches (the tokenizer stage keeps Ray Data's
block order, `data.preserve_order`; the joint stage reads the cache in the run's fixed order), so
two demo runs differ only by what their settings change. The chain ends by checking that each step
left its outputs (`demo.outputs`); its summary lists what is missing.

`storage="s3"` runs the same chain against a local S3-compatible server (moto, loopback) for
shards, caches and checkpoints and an `mlflow server` process on loopback, both started and
stopped here (`trainer.local_services`): the cluster code path on one machine. Before the servers
stop, everything the bucket holds (shards, cache, checkpoints, MLflow artifacts) is copied to
`<workdir>/s3-copy/`, and the summary names the MLflow store and the `make mlflow-ui` line that
serve those copies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import ray

from configuration.loader import apply_overrides, config_from_dict
from demo.config import STEP_SETTINGS, STEPS, DemoConfig, demo_tokenizer, demo_transformer, recipe
from demo.figures import CLASSIFIER_MIN_ACCURACY, SAMPLE_TAGS, evaluate, log_figures, psnr_verdict
from demo.outputs import check_demo
from hart.config import transformer_config
from pipelines import storage
from pipelines.config import PrecomputeConfig
from pipelines.plan import run_precompute
from pipelines.shapes import write_shapes_shards
from trainer.config import TrainRunConfig
from trainer.driver import run_training
from trainer.ray_session import LOCAL_RAY_RUNTIME_ENV, offline_models, without_token_auth
from trainer.tracking import DEFAULT_TRACKING_URI, experiment_ui_url

S3_BUCKET = "hart-demo"
MLFLOW_UI = "http://127.0.0.1:5000"  # where `make mlflow-ui` serves the UI
S3_COPY = "s3-copy"  # <workdir>/s3-copy: what the loopback S3 server held, copied out before it stops
Config = TypeVar("Config")


@dataclass(frozen=True)
class Services:
    """Where this demo's data and runs live, and what stays after it (paths are absolute)."""

    root: str  # data root: shards, cache and checkpoints below it
    tracking_uri: str
    endpoint: str  # S3 endpoint ("" for local storage)
    artifact_location: str  # MLflow artifact root of a new experiment ("" = the server decides)
    mlflow_store: Path  # the sqlite file that holds the runs once the demo has exited
    mlflow_artifacts: Path | None  # where the artifacts are after exit, if not where the store recorded them
    s3_copy: Path | None = None  # local copy of the bucket (s3 only)


def shown(path: Path) -> str:
    """A path as a user types it: relative to the working directory when inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def mlflow_ui_command(services: Services) -> str:
    """The `make mlflow-ui` line that serves this demo's runs (the Makefile's default store is the jobs' default)."""
    command = "make mlflow-ui"
    if services.mlflow_store != Path.cwd() / DEFAULT_TRACKING_URI.removeprefix("sqlite:///"):
        command += f" MLFLOW_STORE={shown(services.mlflow_store)}"
    if services.mlflow_artifacts is not None:
        command += f" MLFLOW_ARTIFACTS={shown(services.mlflow_artifacts)}"
    return command


def experiment_link(tracking_uri: str, run_id: str) -> str:
    """The `make mlflow-ui` link to the experiment of `run_id`, in the UI's model-training view (the UI
    alone when the run cannot be read: the outputs check reports that)."""
    from mlflow.tracking import MlflowClient  # as trainer.tracking: MLflow imported where it is used

    try:
        return experiment_ui_url(MLFLOW_UI, MlflowClient(tracking_uri=tracking_uri).get_run(run_id).info.experiment_id)
    except Exception:  # noqa: BLE001 - a missing run is the outputs check's finding, not a crash here
        return MLFLOW_UI


@contextlib.contextmanager
def demo_services(config: DemoConfig, workdir: Path):
    """Yields `Services`; for s3 starts moto + an mlflow server on loopback and, before stopping
    them, copies everything the bucket holds to `<workdir>/s3-copy` (the servers keep nothing)."""
    if config.storage == "local":
        store = workdir.parent
        yield Services(root=str(workdir), tracking_uri=f"sqlite:///{store / 'mlflow.db'}", endpoint="",
                       artifact_location=str(store / "mlartifacts"), mlflow_store=store / "mlflow.db",
                       mlflow_artifacts=None)
        return
    # S3 storage only: boto3 and the loopback servers (moto) are not needed by a local demo.
    import boto3

    from trainer.local_services import mlflow_server, s3_server

    with s3_server(verbose=True) as endpoint:
        # The server logs every request (werkzeug, INFO): ~6,800 lines per demo, mostly the tokenizer's
        # shard reads, which buried the demo's own progress output. Warnings and errors still show.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        # moto accepts any credentials; these are placeholders for the local fake server only.
        os.environ.update({"AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=S3_BUCKET)
        store = workdir / "mlflow-server"
        store.mkdir(parents=True, exist_ok=True)
        # --serve-artifacts: runs record `mlflow-artifacts:/` URIs that the server maps onto the bucket's
        # mlflow/ prefix, so after the demo `mlflow ui --artifacts-destination <copy>/mlflow` serves them.
        with mlflow_server(f"sqlite:///{store / 'mlflow.db'}", store / "server.log",
                           ("--artifacts-destination", f"s3://{S3_BUCKET}/mlflow", "--serve-artifacts")) as uri:
            copy = workdir / S3_COPY
            try:
                yield Services(root=f"s3://{S3_BUCKET}/demo", tracking_uri=uri, endpoint=endpoint, artifact_location="",
                               mlflow_store=store / "mlflow.db", mlflow_artifacts=copy / "mlflow", s3_copy=copy)
            finally:
                try:
                    storage.copy_tree(f"s3://{S3_BUCKET}", str(copy), endpoint)
                    print(f"[demo] copied the loopback S3 bucket to {shown(copy)} before stopping its server", flush=True)
                except Exception as exc:  # noqa: BLE001 - stopping the servers matters more than the copy
                    print(f"[demo] WARNING: could not copy the S3 bucket out ({type(exc).__name__}: {exc}); "
                          f"its contents are lost with the server", flush=True)


def step(title: str):
    print(f"\n{'=' * 78}\n[demo] {title}\n{'=' * 78}", flush=True)


def recipe_config(config: type[Config], name: str, sets: dict) -> Config:
    """Config type `config` from recipe `name` with `sets` (dotted keys -> values) applied; each value goes
    through as JSON, so it arrives with its own type and the config's checks see it as a file's value."""
    data = apply_overrides(recipe(name), [f"{key}={json.dumps(value)}" for key, value in sets.items()])
    return config_from_dict(config, data)


def stage_config(name: str, run_name: str, services: Services, sets: dict) -> TrainRunConfig:
    """The TrainRunConfig of recipe `name` for this demo: the recipe, this demo's storage and MLflow
    servers, then `sets` (dotted keys: the flags' values and paths)."""
    here = {"run.name": run_name, "run.storage_path": f"{services.root}/train", "run.endpoint_url": services.endpoint,
            "tracking.tracking_uri": services.tracking_uri, "tracking.artifact_location": services.artifact_location}
    return recipe_config(TrainRunConfig, name, {**here, **sets})


def train_stage(name: str, run_name: str, services: Services, export_dir: Path, sets: dict) -> dict:
    return run_training(stage_config(name, run_name, services, sets), str(export_dir))


def precompute_config(services: Services, cache: str, export: Path, context_token: int) -> PrecomputeConfig:
    """The precompute recipe on this demo's shards and store, writing `cache` with the tokenizer of `export`
    and text features as long as the transformer's context."""
    return recipe_config(PrecomputeConfig, "precompute", {
        "input.shards": [f"{services.root}/shapes/shard-*.tar"], "input.endpoint_url": services.endpoint,
        "output": cache, "tokenizer.checkpoint": str(export / "tokenizer"), "text.max_length": context_token})


def precompute(config: PrecomputeConfig) -> None:
    """Step 3 (Ray is running): the cache, the summary table, and an error naming any shard that failed."""
    summary = run_precompute(config)
    print("\n" + summary.table(), flush=True)
    if summary.shards_failed:
        raise RuntimeError(f"precompute: {len(summary.shards_failed)} shard(s) failed: "
                           f"{', '.join(sorted(summary.shards_failed))}")


def run(config: DemoConfig, temporary: bool = False) -> dict:
    """The six steps, then the outputs check; returns the summary (its "problems" list is empty when
    every step produced its outputs). `temporary`: the workdir and its store go when the check passes."""
    started = time.time()
    workdir = Path(config.workdir).resolve()
    start = STEPS.index(config.from_step)
    if start > 0 and config.storage == "s3":
        raise ValueError("--from-step needs local storage: an S3 demo's bucket lived on a loopback server that "
                         "stopped with it (its copy in <workdir>/s3-copy is not read back)")
    if start == 0 and workdir.exists():
        shutil.rmtree(workdir)  # a full demo starts clean; its MLflow store keeps history
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"[demo] workdir {workdir}", flush=True)
    previous = json.loads((workdir / "runs.json").read_text()) if start > 0 and (workdir / "runs.json").exists() else {}
    recorded = json.loads((workdir / "steps.json").read_text()) if start > 0 and (workdir / "steps.json").exists() else {}
    settings = {step: recorded.get(step) or {name: getattr(config, name) for name in names}
                for step, names in STEP_SETTINGS.items()}  # a workdir without steps.json: the current values

    def record(step_name: str) -> None:
        settings[step_name] = {name: getattr(config, name) for name in STEP_SETTINGS[step_name]}
        (workdir / "steps.json").write_text(json.dumps(settings, indent=1))

    timings: dict[str, float] = {}
    # Each demo starts clean, so its runs get fresh names: reusing a name would resume (append to)
    # the MLflow run of an earlier demo whose checkpoints were just deleted.
    tag = time.strftime("%Y%m%d-%H%M%S")
    with demo_services(config, workdir) as services:
        root, endpoint = services.root, services.endpoint
        # The environment of the local instance's workers is this process's, set before they start.
        offline_models()
        without_token_auth()
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True,
                 runtime_env=LOCAL_RAY_RUNTIME_ENV)
        runs = dict(previous)
        export = workdir / "export"
        if start <= 0:
            tick = time.time()
            step(f"1/6 data: {config.num_train_samples} shapes samples in {config.num_shards} shards -> {root}/shapes")
            write_shapes_shards(f"{root}/shapes", config.num_train_samples, config.num_shards, config.seed,
                                endpoint_url=endpoint)
            record("data")
            timings["data"] = time.time() - tick
        if start <= 1:
            tick = time.time()
            step(f"2/6 tokenizer: VQVAE {config.tokenizer_full_steps} steps ({config.tokenizer_vq_warmup_steps} "
                 f"autoencoder warm-up), then {config.tokenizer_hybrid_steps} hybrid decoder fine-tune steps")
            common = {"data.shards": [f"{root}/shapes/shard-*.tar"], "data.batch_size": config.tokenizer_batch_size,
                      "run.seed": config.seed, "scaling.torch_threads": config.tokenizer_threads}
            full_export = workdir / "export-full" if config.tokenizer_hybrid_steps else export
            runs["tokenizer_full"] = train_stage(
                "tokenizer_full", f"demo-{tag}-tokenizer-full", services, full_export,
                {**common, "run.max_steps": config.tokenizer_full_steps, "optim.lr": config.tokenizer_lr,
                 "objective.vq_warmup_steps": config.tokenizer_vq_warmup_steps})["run_id"]
            if config.tokenizer_hybrid_steps:
                runs["tokenizer_hybrid"] = train_stage(
                    "tokenizer_hybrid", f"demo-{tag}-tokenizer-hybrid", services, export,
                    {**common, "run.max_steps": config.tokenizer_hybrid_steps, "model.tokenizer": demo_tokenizer(),
                     "model.init_from": str(full_export / "tokenizer"), "optim.lr": config.tokenizer_lr / 2})["run_id"]
            timings["tokenizer"] = time.time() - tick
            (workdir / "runs.json").write_text(json.dumps(runs))
            record("tokenizer")

        transformer = demo_transformer() if config.transformer == "demo" else config.transformer
        cache = f"{root}/cache/shapes"
        if start <= 2:
            tick = time.time()
            step(f"3/6 precompute: Ray Data tokenizer pool -> {cache}")
            precompute(precompute_config(services, cache, export, transformer_config(transformer).context_token))
            timings["precompute"] = time.time() - tick
        if start <= 3:
            tick = time.time()
            step(f"4/6 joint: transformer + residual diffusion head, {config.joint_steps} steps")
            runs["joint"] = train_stage(
                "joint", f"demo-{tag}-joint", services, export,
                {"model.transformer": transformer, "model.tokenizer_checkpoint": str(export / "tokenizer"),
                 "data.cache": cache, "data.batch_size": config.joint_batch_size, "run.max_steps": config.joint_steps,
                 "run.seed": config.seed, "optim.lr": config.joint_lr,
                 "scaling.torch_threads": config.joint_threads})["run_id"]
            timings["joint"] = time.time() - tick
            (workdir / "runs.json").write_text(json.dumps(runs))
            record("joint")

        tick = time.time()
        step("5/6 + 6/6 generate held-out prompts and evaluate (hart-evaluate)")
        results = evaluate(export, config, workdir, services.tracking_uri, runs["joint"],
                           settings["joint"]["joint_steps"])
        record("evaluate")
        ray.shutdown()
        # named per invocation, so a rerun of this step cannot pass its check on an earlier run's grid
        grid = f"demo/heldout_with_head-{tag}.png"
        log_figures(services.tracking_uri, runs["joint"], results, workdir / "samples", grid)
        timings["generate+evaluate"] = time.time() - tick

        summary = {"config": dataclasses.asdict(config), "steps": settings, "results": results, "timings_s": timings,
                   "where": {"shards": f"{root}/shapes", "cache": cache, "checkpoints": f"{root}/train",
                             "export": str(export), "samples": str(workdir / "samples"),
                             "mlflow": services.tracking_uri, "mlflow_runs": runs, "heldout_grid": grid}}
        tick = time.time()
        step("check: every step's outputs")
        summary["problems"] = check_demo(summary, endpoint)  # while an S3 demo's servers still run
        timings["check"] = time.time() - tick
        ui_url = experiment_link(services.tracking_uri, runs["joint"])
    results["seconds_total"] = time.time() - started
    summary["after_exit"] = {"mlflow_store": str(services.mlflow_store),
                             "mlflow_ui": "" if temporary else mlflow_ui_command(services), "mlflow_ui_url": ui_url}
    if services.s3_copy is not None:
        summary["after_exit"]["s3_copy"] = str(services.s3_copy)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary)
    return summary


def print_summary(summary: dict) -> None:
    r = summary["results"]
    lines = [
        "", "=" * 78, "HART demo summary", "=" * 78,
        f"tokenizer PSNR on held-out images: hybrid {r['tokenizer_psnr_hybrid']:.2f} dB vs "
        f"discrete-only {r['tokenizer_psnr_discrete']:.2f} dB: {psnr_verdict(r)}",
        f"shape/colour classifier on real held-out images: {r['classifier_accuracy_on_real']:.1%} "
        f"(must be >= {CLASSIFIER_MIN_ACCURACY:.0%} to score generated images)",
        f"the classifier on tokenizer reconstructions (the ceiling for generation): discrete colour "
        f"{r['reconstruction_colour_accuracy_discrete']:.1%}, shape {r['reconstruction_shape_accuracy_discrete']:.1%}; "
        f"hybrid colour {r['reconstruction_colour_accuracy_hybrid']:.1%}, shape {r['reconstruction_shape_accuracy_hybrid']:.1%}",
    ]
    for tag in SAMPLE_TAGS:
        if f"generation_colour_accuracy_{tag}" not in r:
            lines.append(f"generation ({tag.replace('_', ' ')}): not scored, the classifier is below "
                         f"{CLASSIFIER_MIN_ACCURACY:.0%} on real images")
            continue
        lines.append(f"generation ({tag.replace('_', ' ')}): colour {r[f'generation_colour_accuracy_{tag}']:.1%}, "
                     f"shape {r[f'generation_shape_accuracy_{tag}']:.1%}, both {r[f'generation_joint_accuracy_{tag}']:.1%}")
    lines.append("targets: colour >= 90%, shape >= 70% (with the head)")
    lines.append("")
    where, after = summary["where"], summary["after_exit"]
    copy, bucket = after.get("s3_copy"), f"s3://{S3_BUCKET}/"
    for key, value in where.items():
        if copy and isinstance(value, str) and value.startswith(bucket):
            value = f"{value}  (copy: {copy}/{value[len(bucket):]})"
        elif copy and key == "mlflow":
            value = f"{value}  (stopped; runs in {after['mlflow_store']}, artifacts in {copy}/mlflow)"
        lines.append(f"{key:12s} {value}")
    if copy:
        lines += ["", "The loopback S3 and MLflow servers stopped with the demo; before that, everything the bucket held "
                      f"(shards, cache, checkpoints, MLflow artifacts) was copied to {copy}/."]
    lines.append("timings     " + ", ".join(f"{k} {v:.0f}s" for k, v in summary["timings_s"].items())
                 + f"; total {r['seconds_total']:.0f}s")
    problems = summary["problems"]
    lines.append(f"outputs     {'every step produced its outputs' if not problems else f'{len(problems)} PROBLEMS:'}")
    lines += [f"  - {problem}" for problem in problems]
    if after["mlflow_ui"]:
        lines.append(f"MLflow UI:  {after['mlflow_ui']}, then open {after.get('mlflow_ui_url', MLFLOW_UI)}")
    else:
        lines.append("MLflow:     the store lives in the temporary workdir, removed when every check passes "
                     "(--workdir keeps it)")
    print("\n".join(lines), flush=True)


__all__ = ["Services", "S3_BUCKET", "MLFLOW_UI", "S3_COPY", "demo_services", "mlflow_ui_command", "experiment_link",
           "recipe_config", "stage_config", "precompute_config", "precompute", "run", "print_summary"]
