"""trainer/checkpoint_models.py against a real MLflow sqlite store: which checkpoints become logged models,
one model per step however often a step is opened, READY after the report, weights copied only when asked,
evaluation figures logged against a model and ranked by `search_logged_models`. A training run's models are
tested in tests/jobs/test_train.py.

Run: .venv/bin/pytest tests/trainer/test_checkpoint_models.py -q
"""

from __future__ import annotations

import pytest
from mlflow.entities import LoggedModelStatus

from configuration.loader import config_from_dict
from trainer import tracking
from trainer.checkpoint_models import (
    CHECKPOINT_MODEL_TYPE, COPIED_FILES, CheckpointModels, checkpoint_model_name, logs_model, model_of_step, run_checkpoint_models,
)
from trainer.config import RunSection, load_train_config


def run_section(**fields) -> RunSection:
    return config_from_dict(RunSection, {"name": "tiny", "storage_path": "s3://user:hunter2@bucket/train",
                                         "max_steps": 10, "checkpoint_every": 2, **fields})


@pytest.fixture()
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id, _ = tracking.open_run(uri, "hart", "tiny", {}, artifact_location=str(tmp_path / "artifacts"))
    return uri, run_id, tracking.RunLogger(uri, run_id, enabled=True)


def test_which_checkpoints_become_models():
    assert [s for s in range(2, 11, 2) if logs_model(run_section(), s)] == [2, 4, 6, 8, 10]
    # every 2nd checkpoint (multiples of 4 steps) and the final one, whatever step a run resumes at
    assert [s for s in range(2, 11, 2) if logs_model(run_section(checkpoint_models_every=2), s)] == [4, 8, 10]
    assert not any(logs_model(run_section(checkpoint_models="off"), s) for s in range(2, 11, 2))
    with pytest.raises(ValueError, match="run.checkpoint_models must be one of"):
        run_section(checkpoint_models="weights")
    with pytest.raises(ValueError, match="run.checkpoint_models_every must be >= 1"):
        load_train_config(None, "joint", ["run.checkpoint_models_every=0"])


def test_one_model_per_step_ready_after_the_report(store, tmp_path):
    uri, run_id, logger = store
    models = CheckpointModels(logger.client, run_id, run_section())
    model_id = models.open(4)
    model = logger.client.get_logged_model(model_id)
    assert model.status == LoggedModelStatus.PENDING  # the checkpoint is not written yet
    assert (model.name, model.model_type, model.source_run_id) == ("tiny-step00000004", CHECKPOINT_MODEL_TYPE, run_id)
    # the checkpoint's URI, credentials redacted, and the step: a reference, no weights copied
    assert model.params == {"step": "4", "checkpoint_uri": "s3://***@bucket/train/tiny/checkpoint_step00000004"}
    assert [(o.model_id, o.step) for o in logger.client.get_run(run_id).outputs.model_outputs] == [(model_id, 4)]
    assert models.open(3) is None  # not a checkpoint step of this run

    # a step redone after a restore (another worker process) reuses its model; a restore marks it READY
    again = CheckpointModels(logger.client, run_id, run_section())
    assert again.open(4) == model_id
    again.ready(4, tmp_path)
    again.ready(4, tmp_path)  # READY already: nothing to do
    assert logger.client.get_logged_model(model_id).status == LoggedModelStatus.READY
    assert logger.client.list_logged_model_artifacts(model_id) == []
    assert list(run_checkpoint_models(logger.client, run_id, again.experiment_id)) == [4]
    assert model_of_step(logger.client, run_id, 4).model_id == model_id and model_of_step(logger.client, run_id, 2) is None

    # ranks other than 0 (a disabled logger) and checkpoint_models: off log nothing
    assert CheckpointModels(None, run_id, run_section(), enabled=False).open(6) is None
    assert CheckpointModels(logger.client, run_id, run_section(checkpoint_models="off")).open(6) is None
    assert list(run_checkpoint_models(logger.client, run_id, again.experiment_id)) == [4]


def test_copy_uploads_the_weight_files_only(store, tmp_path):
    _, run_id, logger = store
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    for name in (*COPIED_FILES, "optimizer.safetensors", "rng_rank0.pt"):
        (checkpoint / name).write_bytes(b"x")
    models = CheckpointModels(logger.client, run_id, run_section(checkpoint_models="copy"))
    model_id = models.open(10)
    models.ready(10, checkpoint)
    assert sorted(f.path for f in logger.client.list_logged_model_artifacts(model_id)) == sorted(COPIED_FILES)
    assert logger.client.get_logged_model(model_id).status == LoggedModelStatus.READY


def test_figures_logged_against_checkpoint_models_rank_them(store):
    _, run_id, logger = store
    models = CheckpointModels(logger.client, run_id, run_section())
    dataset = ("shapes:heldout", "cd" * 32)
    for step, accuracy in ((2, 0.25), (4, 0.75), (6, 0.5)):
        logger.log_metrics({"eval/joint_accuracy": accuracy}, step, model_id=models.open(step), dataset=dataset)
        models.ready(step)
    logger.log_metrics({"eval/joint_accuracy": 1.0}, 5, dataset=dataset)  # not a checkpoint: a run metric only
    logger.flush()
    history = logger.client.get_metric_history(run_id, "eval/joint_accuracy")
    assert sorted((m.step, m.value) for m in history) == [(2, 0.25), (4, 0.75), (5, 1.0), (6, 0.5)]
    experiment_id = models.experiment_id
    ranked = logger.client.search_logged_models(
        [experiment_id], order_by=[{"field_name": "metrics.eval/joint_accuracy", "ascending": False,
                                    "dataset_name": dataset[0], "dataset_digest": dataset[1][:36]}])
    assert [m.params["step"] for m in ranked] == ["4", "6", "2"]
    (metric,) = ranked[0].metrics
    assert (metric.key, metric.value, metric.step, metric.dataset_name, metric.dataset_digest) == (
        "eval/joint_accuracy", 0.75, 4, "shapes:heldout", dataset[1][:36])


def test_a_run_name_with_characters_mlflow_refuses_still_names_its_models(store):
    uri, run_id, logger = store
    assert checkpoint_model_name("hart-0.7b-finetune", 2) == "hart-0_7b-finetune-step00000002"
    models = CheckpointModels(logger.client, run_id, run_section(name="hart-0.7b:v1"))
    models.open(2)  # MLflow refuses '.', '/', ':' in a model name: the store takes this one
    assert models.by_step[2].name == "hart-0_7b_v1-step00000002"
