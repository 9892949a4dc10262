"""MLflow helpers: params flattening and redaction, one run per run name (sqlite store).

Run: .venv/bin/pytest tests/trainer/test_tracking.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from trainer import tracking
from trainer.config import load_train_config


def test_flatten_redacts_secrets_but_keeps_counts():
    flat = tracking.flatten_params({
        "storage": {"aws_secret_access_key": "abc123", "access_key_id": "AKIA999", "password": "hunter2",
                    "api_token": "tok-1", "endpoint": "https://alice:pa55@minio.local:9000/bucket",
                    "signed": "s3://b/k?X-Amz-Credential=AKIA999&X-Amz-Signature=f00&part=3"},
        "model": {"context_token": 300, "tokenizer": "hart-1024", "tokens": [1, 2]},
    })
    text = " ".join(flat.values())
    for secret in ("abc123", "AKIA999", "hunter2", "tok-1", "pa55", "f00", "alice"):
        assert secret not in text
    assert flat["model.context_token"] == "300" and flat["model.tokenizer"] == "hart-1024"
    assert flat["storage.signed"].endswith("part=3") and flat["model.tokens"] == "1,2"


def test_train_config_params_are_flat_strings():
    config = load_train_config("jobs/configs/train_tiny.yaml", "joint",
                               ["tracking.tracking_uri=http://bob:s3cret@mlflow:5000"])
    flat = tracking.flatten_params(config.to_dict())
    assert flat["optim.betas"] == "0.9,0.95" and flat["tracking.tracking_uri"] == "http://***@mlflow:5000"
    assert all(isinstance(v, str) and len(v) <= tracking.MAX_PARAM_CHARS for v in flat.values())


def test_open_run_continues_only_the_checkpointed_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id, resumed = tracking.open_run(uri, "exp", "run-a", {"a": "1"})
    again, resumed_again = tracking.open_run(uri, "exp", "run-a", {"a": "1"}, resume_run_id=run_id)
    assert (again, resumed, resumed_again) == (run_id, False, True)
    # same name, no checkpoint to resume: a new run (the old history is not appended to), linked by a tag
    fresh, resumed_fresh = tracking.open_run(uri, "exp", "run-a", {"a": "1"})
    other, _ = tracking.open_run(uri, "exp", "run-b", {"a": "1"})
    assert not resumed_fresh and len({run_id, fresh, other}) == 3
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(fresh).data.tags[tracking.PREVIOUS_RUNS_TAG] == run_id
    assert tracking.PREVIOUS_RUNS_TAG not in client.get_run(other).data.tags
    with pytest.raises(ValueError, match="does not hold"):
        tracking.open_run(uri, "exp", "run-a", {"a": "1"}, resume_run_id="0" * 32)


def test_run_logger_logs_window_means_and_rank0_only(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id, _ = tracking.open_run(uri, "exp", "run-a", {"a": "1"})
    tracking.RunLogger(uri, run_id, enabled=False).log_metrics({"loss": 9.0}, step=1)  # rank 1: nothing
    logger = tracking.RunLogger(uri, run_id, enabled=True)
    client = MlflowClient(tracking_uri=uri)
    for step, (loss, lr, rate) in zip((5, 6, 7), ((0.5, 1e-3, 10.0), (0.6, 2e-3, 20.0), (0.7, 3e-3, 20.0))):
        logger.record({"loss": loss, "lr": lr, "images_per_s": rate}, step=step)
    assert client.get_metric_history(run_id, "loss") == []  # recorded, not written yet
    logger.write()
    logger.record({"loss": 0.8, "lr": 4e-3, "images_per_s": 5.0}, step=8)
    logger.flush()  # writes the open window (step 8) and waits
    history = {key: [(m.step, round(m.value, 6)) for m in client.get_metric_history(run_id, key)]
               for key in ("loss", "lr", "images_per_s")}
    # mean over the window; last lr; rates as the window's total (3 equal steps in 0.1 + 0.05 + 0.05 s)
    assert history == {"loss": [(7, 0.6), (8, 0.8)], "lr": [(7, 0.003), (8, 0.004)], "images_per_s": [(7, 15.0), (8, 5.0)]}
    logger.log_image(tracking.image_grid(np.zeros((3, 4, 4, 3), np.uint8), columns=2), "samples/grid.png")
    assert client.get_run(run_id).data.params == {"a": "1"}
    assert [a.path for a in client.list_artifacts(run_id, "samples")] == ["samples/grid.png"]


def test_a_new_experiment_keeps_its_artifacts_where_it_is_told(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the store's default root would be ./mlruns here
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id, _ = tracking.open_run(uri, "exp", "run-a", {}, artifact_location=str(tmp_path / "artifacts"))
    tracking.RunLogger(uri, run_id, enabled=True).log_text("hello", "notes/a.txt")
    assert (tmp_path / "artifacts" / run_id / "artifacts" / "notes" / "a.txt").read_text() == "hello"
    assert not (tmp_path / "mlruns").exists()
    # an existing experiment keeps its root
    again, _ = tracking.open_run(uri, "exp", "run-b", {}, artifact_location=str(tmp_path / "elsewhere"))
    assert MlflowClient(tracking_uri=uri).get_run(again).info.artifact_uri.startswith(str(tmp_path / "artifacts"))


def test_the_experiment_link_names_the_model_training_view():
    # MLflow 3.17's UI opens a bare #/experiments/<id> in the browser's last view (GenAI when new)
    assert (tracking.experiment_ui_url("http://127.0.0.1:5000/", "7")
            == "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning")
