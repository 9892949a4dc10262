"""MLflow's production topology for real, with a training run through it: the Deployment of
infra/mlflow/mlflow.yaml on PostgreSQL 16 (pgserver), artifacts proxied to S3 (moto), basic auth.

Design: one topology for the module (`production`): a PostgreSQL server with the backend store and
the auth database apart (as infra/README.md makes them), a bucket on the session's moto server, and
`mlflow server` started with the Deployment's own argument list (tests/infra/mlflow_deployment.py;
only bind address, port, bucket and worker count swapped) and the environment its Secrets give it;
the job user is created through the auth API as infra/README.md says. Over it, ONE 2-worker training
run of the joint stage logs from rank 0 with the job user's credentials in the tracking URI while
(a) a second process logs another run of the same server, and (b) the tracking server is stopped
once the run has logged a few steps and started again on the same port a few seconds later. Then
the export's registry entry and its objects in the bucket, and the evaluation job attaching its
figures to the training run, are checked against what the server holds.

What a client does while the server is down (mlflow 3.17.2 defaults, measured): every request is
retried by urllib3 on connection errors and on 408/429/5xx, MLFLOW_HTTP_REQUEST_MAX_RETRIES (7) times,
sleeping 0, 4, 8, 16, 32, 64, 120 s between tries (MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR 2, jitter up to
1 s): against a closed port a call raised MlflowException after 247 s. Rank 0's `log_batch` is
asynchronous: it returns at once and MLflow's async logging queue retries (up to 10 batches at once),
so training steps go on during the outage; the worker's flush at each checkpoint waits for the queue,
so the step-N checkpoint is reported only once step N's metrics are stored. Here, with the server
down 13 s and 25 s (two runs on 2 busy cores), the checkpoint after the outage waited 28 s and 40 s:
the outage plus the backoff sleep in progress when the server came back. Nothing is lost or written
twice. The defaults suffice for a restart; an outage longer than the retries fails the queued write
(`wait()` raises), so the checkpoint flush fails the run (`run.max_failures: 0`), its last checkpoint
kept (infra/README.md, "Tested MLflow topology").

Lean enough for `make test`: the server runs with one worker (measured on 2 busy cores, the
Deployment's four took 30 s instead of 28 s to start, and 47 s instead of 28 s of CPU over a start
and a restart: CPU the training run would lose), the run is 24 tiny steps,
the job user is created by one REST request (the README's Python client costs seconds of imports;
tests/infra/test_mlflow_servers.py runs that one), and the evaluation generates 4 held-out prompts.
The restart is triggered by reading the backend store directly, not the busy one-worker server.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import threading
import time
import uuid

import boto3
import pytest
from mlflow.tracking import MlflowClient

from tests.infra.mlflow_deployment import (
    ADMIN, JOB_USER, create_user_by_rest, deployment_args, request, server_env, write_auth_config,
)
from tests.training_fixtures import tiny_config
from trainer.driver import run_training
from trainer.evaluation import EvaluationConfig, run_evaluation
from trainer.local_services import MlflowServer, free_port, postgres_server

pytest.importorskip("pgserver", reason="needs pgserver (the dev extra)")
pytest.importorskip("flask_wtf", reason="needs mlflow[auth] (Flask-WTF), the dev extra")

MAX_STEPS = 24
RESTART_AFTER_STEP = 3  # the server is stopped once the run has this many loss rows
DOWNTIME_S = 2.0  # between the old server's exit and the new one's start
SECOND_JOB_ROWS = 60


@pytest.fixture(scope="module")
def production(tmp_path_factory, s3_endpoint):
    """PostgreSQL + a bucket + the Deployment's `mlflow server` with basic auth, and a job user;
    yields what the test needs to reach them."""
    import tempfile

    root = tmp_path_factory.mktemp("mlflow-production")
    bucket = f"hart-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    # a short folder: the server's unix socket lives in it (108-byte limit on its path)
    with tempfile.TemporaryDirectory(prefix="pg-") as pg_folder, \
            postgres_server(pg_folder, ("mlflow", "mlflow_auth")) as databases:
        admin_password = secrets.token_hex(12)
        env = server_env(databases["mlflow"], write_auth_config(root / "basic_auth.ini", databases["mlflow_auth"]),
                         admin_password)
        env["MLFLOW_S3_ENDPOINT_URL"] = s3_endpoint  # moto; in the cluster the server's IRSA role reaches AWS S3
        port = free_port()
        args = deployment_args(port, f"s3://{bucket}/mlflow/", workers=1)
        with MlflowServer(args, port, root / "server.log", env=env, timeout_s=180) as server:
            job_password = secrets.token_hex(12)
            create_user_by_rest(server.url, admin_password, JOB_USER, job_password)
            yield {"server": server, "bucket": bucket, "endpoint": s3_endpoint, "admin_password": admin_password,
                   "job_uri": f"http://{JOB_USER}:{job_password}@127.0.0.1:{port}", "job_password": job_password,
                   "postgres": pg_folder}


def test_requests_need_credentials(production):
    search = production["server"].url + "/api/2.0/mlflow/experiments/search?max_results=1"
    assert request(search) == 401
    assert request(search, JOB_USER, "wrong-password") == 401
    assert request(search, JOB_USER, production["job_password"]) == 200
    assert request(search, ADMIN, production["admin_password"]) == 200


SECOND_JOB = """
import os, sys, time
import mlflow
mlflow.set_experiment("second-job")
with mlflow.start_run() as run:
    for step in range(int(sys.argv[1])):
        mlflow.log_metric("value", float(step), step=step)  # synchronous: the client retries through an outage
        time.sleep(0.25)
print(run.info.run_id)
"""


def logged_rows(postgres_folder: str, run_name: str, key: str) -> int:
    """Rows of metric `key` of the run named `run_name`, read from the backend store itself: asking the
    tracking server would queue behind the training's own requests on its one worker."""
    import psycopg2

    connection = psycopg2.connect(dbname="mlflow", user="postgres", host=postgres_folder)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM metrics JOIN runs ON metrics.run_uuid = runs.run_uuid "
                           "WHERE runs.name = %s AND metrics.key = %s", (run_name, key))
            return cursor.fetchone()[0]
    except psycopg2.errors.UndefinedTable:
        return 0
    finally:
        connection.close()


def restart_when_logged(server: MlflowServer, postgres_folder: str, run_name: str, seen: dict) -> None:
    """Stop the server once the run `run_name` has RESTART_AFTER_STEP loss rows, start it again on the
    same port DOWNTIME_S later; records the outage's wall-clock bounds (ms) in `seen`."""
    deadline = time.time() + 600
    while time.time() < deadline:
        if logged_rows(postgres_folder, run_name, "loss") >= RESTART_AFTER_STEP:
            seen["stopped_ms"] = int(1000 * time.time())
            server.stop()
            time.sleep(DOWNTIME_S)
            started = time.time()
            server.start()
            seen["started_ms"], seen["start_s"] = int(1000 * time.time()), time.time() - started
            return
        time.sleep(0.2)


def test_training_run_through_postgres_s3_and_a_server_restart(production, train_assets, ray_local, tmp_path):
    uri, server = production["job_uri"], production["server"]
    config = tiny_config(train_assets, "joint", tmp_path, f"tracking.tracking_uri={uri}", "run.name=production",
                         f"run.max_steps={MAX_STEPS}", "run.checkpoint_every=8", "scaling.num_workers=2",
                         "scaling.cpus_per_worker=0.5", "tracking.sample_every=0")
    second = subprocess.Popen([sys.executable, "-c", SECOND_JOB, str(SECOND_JOB_ROWS)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**server.env, "MLFLOW_TRACKING_URI": uri})
    outage: dict = {}
    restarter = threading.Thread(target=restart_when_logged, daemon=True,
                                 args=(server, production["postgres"], config.run.name, outage))
    restarter.start()
    began = time.time()
    try:
        outcome = run_training(config, export_dir=str(tmp_path / "export"))
    finally:
        restarter.join(timeout=300)
        second_out, second_err = second.communicate(timeout=300)
    trained = time.time()
    assert "started_ms" in outage, "the server was not restarted during the run"
    assert second.returncode == 0, second_err[-3000:]

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(outcome["run_id"])
    assert run.info.status == "FINISHED" and outcome["final_step"] == MAX_STEPS
    assert run.data.params["run.name"] == "production" and run.data.params["scaling.num_workers"] == "2"
    assert production["job_password"] not in json.dumps(run.data.params), "credentials must not reach the params"
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in loss) == list(range(1, MAX_STEPS + 1)), "a step missing or written twice"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "lr")) == list(range(1, MAX_STEPS + 1))
    # rows written by the worker while the server was down reached it after the restart
    assert any(m.timestamp >= outage["stopped_ms"] for m in loss), "the run ended before the outage"
    (dataset,) = [d.dataset for d in run.inputs.dataset_inputs]
    assert dataset.name == "cache" and dataset.digest

    # the second job, logging at the same time through the same outage: all of its rows
    second_run = client.get_run(second_out.strip().splitlines()[-1])
    rows = client.get_metric_history(second_run.info.run_id, "value")
    assert sorted(m.step for m in rows) == list(range(SECOND_JOB_ROWS)) and second_run.info.status == "FINISHED"
    assert min(m.timestamp for m in rows) < max(m.timestamp for m in loss), "the two jobs did not overlap"

    # the export registered, its files in the bucket under mlflow/ (the server's --artifacts-destination)
    version = client.get_model_version("hart-joint", str(outcome["model_version"]))
    assert version.run_id == run.info.run_id
    s3 = boto3.client("s3", endpoint_url=production["endpoint"], region_name="us-east-1")
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=production["bucket"], Prefix="mlflow/")
    keys = [item["Key"] for page in pages for item in page.get("Contents", [])]
    experiment_prefix = f"mlflow/{run.info.experiment_id}/"
    assert any(k.startswith(experiment_prefix) and k.endswith("llm/config.json") for k in keys), keys[:20]
    assert any(k.startswith(experiment_prefix) and "/tokenizer/" in k for k in keys), keys[:20]

    # the evaluation job attaches its figures to the training run
    figures = run_evaluation(EvaluationConfig(
        export=str(tmp_path / "export"), prompts="shapes:heldout", protocol="shapes", limit=4,
        out=str(tmp_path / "eval"), cpus_per_actor=0.5, score_batch=4, tracking_uri=uri, run_id=run.info.run_id,
        step=MAX_STEPS))["figures"]
    history = client.get_metric_history(run.info.run_id, "eval/joint_accuracy")
    assert [(m.step, m.value) for m in history] == [(MAX_STEPS, pytest.approx(figures["joint_accuracy"]))]
    print(f"[production] training {trained - began:.0f} s, checks and evaluation {time.time() - trained:.0f} s; "
          f"server down {(outage['started_ms'] - outage['stopped_ms']) / 1000:.1f} s (start-up {outage['start_s']:.1f} s)")
