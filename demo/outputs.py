"""What a finished demo must have left behind, checked step by step.

Design: the demo writes `summary.json` (its config, the settings each step ran with, figures,
MLflow run ids and where every output went) and then calls `check_demo(summary)`, which reads only
that summary and the stores it names: the local disk or the loopback S3 server, and the MLflow
store. It checks plumbing, not quality: every output exists, loads with this project's loaders,
holds what its step wrote in this demo (exports carry the run's last checkpoint, MLflow carries this
evaluation's figures and grid), and agrees in count with the settings of the step that made it (a
`--from-step` rerun checks earlier steps against the settings they ran with). The result is a list
of problems, one line each, prefixed by the step that should have produced the output; empty means
every step did its part. Each step has its own check (`STEP_CHECKS`), so a test can break one
output and see that step's check, and only it, fail.

`make demo` and `make demo-smoke` (the same chain at tiny step counts) both end with this check and
exit non-zero when it finds a problem.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow.parquet as pq
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from demo.figures import CLASSIFIER_MIN_ACCURACY, SAMPLE_TAGS, figure_names
from hart.reference_compat import NOTE_FILE
from hart.tokenizer.model import (
    HybridTokenizer, load_discriminator, reference_differences as tokenizer_differences, split_tokenizer_state,
)
from hart.training.checkpoint import load_training_state
from hart.transformer.checkpoint import reference_differences as transformer_differences
from hart.transformer.model import HARTForT2I
from hart.weights import load_weight_folder
from pipelines import storage
from pipelines.cache import committed_files, read_manifest
from pipelines.shapes import prompts
from trainer.resume import latest_checkpoint
from trainer.sample_grids import GRID_FOLDER
from trainer.tracking import EXPORT_ARTIFACT_PATH, RUN_NAME_TAG

Summary = dict[str, Any]
Problems = list[str]
FINISHED = "FINISHED"  # a run's MLflow status once its job completed


@contextlib.contextmanager
def local_folder(uri: str, endpoint_url: str = "") -> Iterator[Path]:
    """A local path of the folder at `uri`: the folder itself, or a fresh temporary copy of an S3 prefix.

    Always fresh (unlike the precompute actors' cached checkpoint copies): a check must read what is
    there now, not what an earlier run left under the same name.
    """
    if not storage.is_s3(uri):
        yield Path(storage.resolve(uri)[1])
        return
    with tempfile.TemporaryDirectory(prefix="hart-demo-check-") as tmp:
        storage.copy_tree(uri, tmp, endpoint_url)
        yield Path(tmp)


def mlflow_client(summary: Summary):
    return MlflowClient(tracking_uri=summary["where"]["mlflow"])


# --------------------------------------------------------------------------------------
# Pieces shared by the training steps
# --------------------------------------------------------------------------------------


def check_training_run(summary: Summary, key: str, stage: str, steps: int, endpoint_url: str,
                       local_export: Path | None = None) -> Problems:
    """The MLflow run `key` of `summary` finished with metrics, its grid and its exported model (a
    tokenizer's `model/` artifacts, a transformer's logged pyfunc model); its
    last checkpoint is at `steps` and loads; its exported folders (next to the checkpoints, and
    `local_export` if given) load and hold that checkpoint's weights (not an earlier run's)."""
    run_id = summary["where"]["mlflow_runs"].get(key)
    if not run_id:
        return [f"no MLflow run recorded for {key}"]
    client = mlflow_client(summary)
    run = client.get_run(run_id)
    problems = []
    if run.info.status != FINISHED:
        problems.append(f"MLflow run {run_id} has status {run.info.status}, expected {FINISHED}")
    if not run.data.metrics:
        problems.append(f"MLflow run {run_id} has no metrics")
    folder = GRID_FOLDER["tokenizer" if stage == "tokenizer" else "transformer"]
    if not any(a.path.endswith(".png") for a in client.list_artifacts(run_id, folder)):
        problems.append(f"MLflow run {run_id} has no {folder}/*.png grid")
    if stage == "tokenizer" and not client.list_artifacts(run_id, EXPORT_ARTIFACT_PATH):
        problems.append(f"MLflow run {run_id} has no exported model ({EXPORT_ARTIFACT_PATH}/)")
    if stage != "tokenizer" and not (run.outputs and run.outputs.model_outputs):
        problems.append(f"MLflow run {run_id} has no logged model (the registered pyfunc model of its export)")

    root = summary["where"]["checkpoints"]
    name = run.data.tags.get(RUN_NAME_TAG, "")
    fs, path = storage.resolve(root, endpoint_url)
    found = latest_checkpoint(fs, path, name)
    if found is None:
        return problems + [f"run {name!r} has no checkpoint under {root}"]
    checkpoint, meta = found
    if int(meta["step"]) != steps:
        problems.append(f"the last checkpoint of {name!r} is at step {meta['step']}, expected {steps}")
    with local_folder(f"s3://{checkpoint}" if storage.is_s3(root) else checkpoint, endpoint_url) as local:
        state = load_training_state(local)
    # the weights an export must hold: the tokenizer stage's model, a transformer stage's EMA shadow
    trained = state.model if stage == "tokenizer" else state.ema if state.ema is not None else state.model
    exports = [storage.join(root, name, "export")] + ([str(local_export)] if local_export is not None else [])
    for export_uri in exports:
        with local_folder(export_uri, endpoint_url) as export:
            found_problems, models = check_export(export, with_transformer=stage != "tokenizer")
        problems += found_problems
        exported = models.get("tokenizer" if stage == "tokenizer" else "llm")
        if exported is not None and not same_weights(exported.state_dict(), trained):
            problems.append(f"export {export_uri} does not hold the weights of {name!r}'s last checkpoint")
    return problems


def same_weights(exported: dict, trained: dict) -> bool:
    return exported.keys() == trained.keys() and all(
        exported[k].shape == trained[k].shape and torch.equal(exported[k].to(trained[k].dtype), trained[k])
        for k in trained)


def check_export(folder: Path, with_transformer: bool) -> tuple[Problems, dict]:
    """`tokenizer/` (and `llm/` with its EMA weights) load, and each holds the reference-compatibility
    note exactly when its config is one the reference implementation cannot build. Returns the
    problems and the loaded models ("tokenizer", "llm")."""
    if not (folder / "tokenizer").is_dir():
        return [f"export {folder} has no tokenizer/ folder"], {}
    models: dict = {"tokenizer": HybridTokenizer.from_pretrained(folder / "tokenizer")}
    has_discriminator = bool(split_tokenizer_state(load_weight_folder(folder / "tokenizer"))[1])
    discriminator = load_discriminator(folder / "tokenizer") if has_discriminator else None
    expected = {folder / "tokenizer": bool(tokenizer_differences(models["tokenizer"].config, discriminator))}
    if with_transformer:
        if not (folder / "llm").is_dir():
            return [f"export {folder} has no llm/ folder"], models
        models["llm"] = HARTForT2I.from_pretrained(folder / "llm", ema=True)
        expected[folder / "llm"] = bool(transformer_differences(models["llm"].config, models["tokenizer"].config))
    problems = []
    for path, needs_note in expected.items():
        if (path / NOTE_FILE).is_file() != needs_note:
            problems.append(f"{path}: {NOTE_FILE} is {'missing' if needs_note else 'present'}, but the reference "
                            f"implementation {'cannot' if needs_note else 'can'} build this config")
    return problems, models


# --------------------------------------------------------------------------------------
# One check per demo step
# --------------------------------------------------------------------------------------


def check_data(summary: Summary, endpoint_url: str) -> Problems:
    uri, expected = summary["where"]["shards"], summary["steps"]["data"]["num_shards"]
    fs, path = storage.resolve(uri, endpoint_url)
    shards = [p for p in storage.list_files(fs, path) if p.endswith(".tar")]
    return [] if len(shards) == expected else [f"{len(shards)} shard files in {uri}, expected {expected}"]


def check_tokenizer(summary: Summary, endpoint_url: str) -> Problems:
    settings = summary["steps"]["tokenizer"]
    problems = check_training_run(summary, "tokenizer_full", "tokenizer", settings["tokenizer_full_steps"], endpoint_url)
    if settings["tokenizer_hybrid_steps"]:
        problems += check_training_run(summary, "tokenizer_hybrid", "tokenizer", settings["tokenizer_hybrid_steps"],
                                       endpoint_url)
    return problems


def check_precompute(summary: Summary, endpoint_url: str) -> Problems:
    """Committed shards = input shards, and cache rows = samples, each key once."""
    uri, data = summary["where"]["cache"], summary["steps"]["data"]
    manifest = read_manifest(uri, endpoint_url)
    problems = []
    if len(manifest["committed_shards"]) != data["num_shards"]:
        problems.append(f"{len(manifest['committed_shards'])} committed shards in {uri}, expected {data['num_shards']}")
    keys = []
    for file in committed_files(uri, manifest):
        fs, path = storage.resolve(file, endpoint_url)
        keys += pq.read_table(path, columns=["key"], filesystem=fs).column("key").to_pylist()
    if len(keys) != data["num_train_samples"]:
        problems.append(f"{len(keys)} cache rows in {uri}, expected {data['num_train_samples']} (one per sample)")
    if len(set(keys)) != len(keys):
        problems.append(f"{len(keys) - len(set(keys))} duplicated keys in {uri}")
    return problems


def check_joint(summary: Summary, endpoint_url: str) -> Problems:
    # the local export is the one generation reads
    return check_training_run(summary, "joint", "joint", summary["steps"]["joint"]["joint_steps"], endpoint_url,
                              local_export=Path(summary["where"]["export"]))


def check_generate(summary: Summary, endpoint_url: str) -> Problems:
    """One readable PNG per held-out prompt and sample, with and without the head, all of one size."""
    expected = len(prompts("heldout")) * summary["steps"]["evaluate"]["samples_per_prompt"]
    problems, sizes = [], set()
    for tag in SAMPLE_TAGS:
        files = sorted((Path(summary["where"]["samples"]) / tag / "images").glob("*.png"))  # hart-evaluate's layout
        if len(files) != expected:
            problems.append(f"{len(files)} images in samples/{tag}/images, expected {expected}")
        for file in files:
            with Image.open(file) as image:
                image.load()
                sizes.add(image.size)
    if len(sizes) > 1:
        problems.append(f"samples have several sizes: {sorted(sizes)}")
    return problems


def expected_figures(summary: Summary) -> list[str]:
    """The figures the evaluation reports (generation only when the classifier passed on real images)."""
    return figure_names(summary["results"].get("classifier_accuracy_on_real", 0.0) >= CLASSIFIER_MIN_ACCURACY)


def check_evaluate(summary: Summary, endpoint_url: str) -> Problems:
    """Every figure is in the summary and finite, the joint run's `demo/<name>` metrics hold these
    values, and it has this evaluation's grid of held-out samples and hart-evaluate's record of each
    generation (with and without the head): `eval/<tag>/*` metrics that agree with the summary and the
    per-category table at the joint run's last step."""
    results, problems = summary["results"], []
    for name in expected_figures(summary):
        value = results.get(name)
        if value is None:
            problems.append(f"figure {name} is missing from the summary")
        elif not math.isfinite(value):
            problems.append(f"figure {name} is {value}")
    run_id = summary["where"]["mlflow_runs"].get("joint")
    if not run_id:
        return problems  # the joint check reports the missing run
    client = mlflow_client(summary)
    logged = client.get_run(run_id).data.metrics  # the latest value of each metric
    stale = [name for name in expected_figures(summary) if name in results and math.isfinite(results[name])
             and not math.isclose(logged.get(f"demo/{name}", math.nan), results[name], rel_tol=1e-6)]
    if stale:
        problems.append(f"MLflow run {run_id} does not hold this evaluation's figures: {stale}")
    grid = summary["where"]["heldout_grid"]
    if not any(a.path == grid for a in client.list_artifacts(run_id, grid.rsplit("/", 1)[0])):
        problems.append(f"MLflow run {run_id} has no {grid} (this evaluation's held-out samples)")

    for tag in SAMPLE_TAGS:
        if f"eval/{tag}/images" not in logged:
            problems.append(f"MLflow run {run_id} has no eval/{tag}/ metrics (hart-evaluate's figures)")
        figures = {key: results.get(f"generation_{key}_accuracy_{tag}", math.nan) for key in ("colour", "shape", "joint")}
        stale = [key for key, value in figures.items() if math.isfinite(value) and f"eval/{tag}/images" in logged
                 and not math.isclose(logged.get(f"eval/{tag}/{key}_accuracy", math.nan), value, rel_tol=1e-6)]
        if stale:
            problems.append(f"MLflow run {run_id}'s eval/{tag}/ metrics are not this evaluation's: {stale}")
        table = f"eval/{tag}/step-{summary['steps']['joint']['joint_steps']}/per_category.json"
        if not any(a.path == table for a in client.list_artifacts(run_id, table.rsplit("/", 1)[0])):
            problems.append(f"MLflow run {run_id} has no {table} (hart-evaluate's per-category table)")
    return problems


STEP_CHECKS: dict[str, Callable[[Summary, str], Problems]] = {
    "data": check_data, "tokenizer": check_tokenizer, "precompute": check_precompute,
    "joint": check_joint, "generate": check_generate, "evaluate": check_evaluate,
}


def check_demo(summary: Summary, endpoint_url: str = "") -> Problems:
    """All problems with a finished demo's outputs, as 'step: problem' lines (empty: all present)."""
    problems = []
    for step, check in STEP_CHECKS.items():
        try:
            found = check(summary, endpoint_url)
        except Exception as exc:  # noqa: BLE001 - an output that cannot even be read is a finding, not a crash
            found = [f"cannot read its outputs: {type(exc).__name__}: {exc}"]
        problems += [f"{step}: {problem}" for problem in found]
    return problems


__all__ = ["check_demo", "STEP_CHECKS", "check_export", "expected_figures", "local_folder"]
