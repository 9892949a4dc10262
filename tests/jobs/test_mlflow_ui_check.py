"""`make mlflow-ui-check` (trainer.mlflow_ui_check) without a browser: what it expects the UI to show, read from a store.

The browser checks themselves run with `make mlflow-ui-check` (they need Chromium and playwright).
Run: .venv/bin/pytest tests/jobs/test_mlflow_ui_check.py -q
"""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from trainer import tracking
from jobs.mlflow_ui_check import main
from trainer.mlflow_ui_check import read_expected


def test_expectations_come_from_the_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    trained, _ = tracking.open_run(uri, "hart-demo", "demo-joint", {"stage": "joint"},
                                   artifact_location=str(tmp_path / "artifacts"))
    tracking.log_dataset_input(uri, trained, "shapes", "ab" * 32, str(tmp_path / "cache"))
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


def test_a_missing_store_is_a_setup_error(tmp_path, capsys):
    assert main(["--store", str(tmp_path / "none.db")]) == 2
    assert "no MLflow store at" in capsys.readouterr().out
