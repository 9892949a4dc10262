"""`make mlflow-ui-check` (trainer.mlflow_ui_check) without a browser: what it expects the UI to show, read from a store.

The browser checks themselves run with `make mlflow-ui-check` (they need Chromium and playwright).
Run: .venv/bin/pytest tests/jobs/test_mlflow_ui_check.py -q
"""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from jobs.mlflow_ui_check import main
from trainer import tracking
from trainer.checkpoint_models import CheckpointModels
from trainer.config import load_train_config
from trainer.mlflow_ui_check import (CheckFailed, CheckpointModelView, check_system_metrics, metric_column_id,
                                     models_viewport, read_expected)
from trainer.system_metrics import NODE_TAG_PREFIX, metric_key


def test_expectations_come_from_the_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    trained, _ = tracking.open_run(uri, "hart-demo", "demo-joint", {"stage": "joint"},
                                   artifact_location=str(tmp_path / "artifacts"))
    tracking.log_dataset_input(uri, trained, "shapes", "ab" * 32, str(tmp_path / "cache"))
    # the evaluation prompt set is an input too, which check (b) leaves out (it names the training data)
    tracking.log_dataset_input(uri, trained, "shapes:heldout", "cd" * 32, "shapes:heldout", context="evaluation")
    unlogged, _ = tracking.open_run(uri, "hart-demo", "demo-tokenizer", {"stage": "tokenizer"})
    client.log_metric(trained, "eval/with_head/colour_accuracy", 0.25, step=10)
    client.log_metric(trained, "loss", 1.0, step=10)
    client.log_table(trained, {"category": ["circle", "square"], "colour_accuracy": [0.5, 0.0]},
                     "eval/with_head/step-10/per_category.json")
    expected = read_expected(client, "hart-demo", max_runs=6)
    assert expected.kind_tag == tracking.MODEL_TRAINING
    # newest first; the tokenizer run logged no input, which check (b) reports
    assert expected.training == [(unlogged, "demo-tokenizer", []), (trained, "demo-joint", [f"shapes ({'ab' * 18})"])]
    assert expected.eval_run == (trained, "demo-joint")
    assert expected.eval_metrics == {"eval/with_head/colour_accuracy": 0.25}
    table = expected.tables["eval/with_head/step-10/per_category.json"]
    assert table["columns"] == ["category", "colour_accuracy"] and [row[0] for row in table["data"]] == ["circle", "square"]
    assert read_expected(client, "hart-demo", max_runs=1).training == [(unlogged, "demo-tokenizer", [])]
    assert expected.checkpoint_models == [] and expected.ranking is None  # check (e) then fails, naming why


def test_models_view_expectations_list_checkpoint_models_with_their_metrics(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id, _ = tracking.open_run(uri, "hart-demo", "demo-joint", {"stage": "joint"},
                                  artifact_location=str(tmp_path / "artifacts"))
    logger = tracking.RunLogger(uri, run_id, enabled=True)
    run = load_train_config(None, "joint", ["run.name=demo-joint", "run.max_steps=6", "run.checkpoint_every=2",
                                            f"run.storage_path={tmp_path}"]).run
    models = CheckpointModels(logger.client, run_id, run)
    dataset = ("shapes:heldout", "cd" * 32)
    for step, fid in ((2, 30.0), (4, 10.0), (6, 20.0)):
        model_id = models.open(step)
        if step != 6:  # the last one was not evaluated: listed, with no metric
            logger.log_metrics({"eval/fid": fid}, step, model_id=model_id, dataset=dataset)
        models.ready(step)
    logger.flush()
    expected = read_expected(logger.client, "hart-demo", max_runs=6)
    ids = {step: models.by_step[step].model_id for step in (2, 4, 6)}
    assert expected.checkpoint_models == [  # newest first
        CheckpointModelView(ids[6], "demo-joint-step00000006", 6, ()),
        CheckpointModelView(ids[4], "demo-joint-step00000004", 4, (("eval/fid", "shapes:heldout", "cd" * 18, 10.0),)),
        CheckpointModelView(ids[2], "demo-joint-step00000002", 2, (("eval/fid", "shapes:heldout", "cd" * 18, 30.0),)),
    ]
    # FID ranks ascending, and only the models that carry it
    assert expected.ranking == (f"eval/fid on shapes:heldout (#{'cd' * 18})",
                                ["demo-joint-step00000004", "demo-joint-step00000002"])
    assert [m.step for m in read_expected(logger.client, "hart-demo", max_runs=2).checkpoint_models] == [6, 4]
    # the UI's column id: `metrics.` + JSON.stringify({metricKey, datasetName, datasetDigest})
    assert metric_column_id("eval/fid", "shapes:heldout", "cd" * 18) == (
        'metrics.{"metricKey":"eval/fid","datasetName":"shapes:heldout","datasetDigest":"' + "cd" * 18 + '"}')
    assert metric_column_id("loss", "", "") == 'metrics.{"metricKey":"loss"}'
    assert models_viewport(expected)["width"] == 2000  # one metric column


def test_a_missing_store_is_a_setup_error(tmp_path, capsys):
    assert main(["--store", str(tmp_path / "none.db")]) == 2
    assert "no MLflow store at" in capsys.readouterr().out


def test_system_metrics_expectations_name_each_tagged_node_and_its_series(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    older, _ = tracking.open_run(uri, "hart-demo", "demo-tokenizer", {"stage": "tokenizer"})
    client.set_tag(older, NODE_TAG_PREFIX + "host-00000000", "ray_node_id=00 ip=127.0.0.1 host=host gpus=not measured")
    trained, _ = tracking.open_run(uri, "hart-demo", "demo-joint", {"stage": "joint"})
    for node in ("host-1a2b3c4d", "host-5e6f7a8b"):
        client.set_tag(trained, NODE_TAG_PREFIX + node, f"ray_node_id={node} ip=127.0.0.1 host=host gpus=not measured")
    for metric in ("cpu_utilization_percentage", "system_memory_usage_megabytes"):
        client.log_metric(trained, metric_key("host-1a2b3c4d", metric), 50.0, step=0)
    expected = read_expected(client, "hart-demo", max_runs=6)
    assert expected.system_run == (trained, "demo-joint")  # the newest training run with node tags
    assert expected.system_nodes == {
        "host-1a2b3c4d": ["system/host-1a2b3c4d/cpu_utilization_percentage",
                          "system/host-1a2b3c4d/system_memory_usage_megabytes"],
        "host-5e6f7a8b": [],  # tagged, no series: check (f) fails naming it, before opening the page
    }
    with pytest.raises(CheckFailed, match=r"nodes \['host-5e6f7a8b'\] are tagged but have no"):
        check_system_metrics(None, "http://unused", expected, timeout_ms=1)
