"""Fixtures of the fault trials: reuse the training-job assets and MLflow server of tests/jobs.

`train_assets` (session: tiny tokenizer folder, shapes shards, token cache made by the real
precompute) and `mlflow_server` (a real `mlflow server` on loopback) are imported, not copied,
so both test folders exercise the same inputs; `tiny_config` builds the tiny training config.
"""

from tests.jobs.conftest import mlflow_server, train_assets  # noqa: F401  (pytest fixtures)
