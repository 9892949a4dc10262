"""Start the two MLflow server variants of infra/mlflow/ for real and check what they promise.

Design: `local.sh` is run as written (only port and store folder redirected through its env
knobs) and must serve on 127.0.0.1 and nowhere else. The cluster variant is the exact argument
list of the Deployment in mlflow.yaml, with only what needs a cluster swapped for local stand-ins
(bind address, port, one worker, sqlite instead of PostgreSQL, a folder instead of S3), plus the
auth config made from basic_auth.ini.example (tests/infra/mlflow_deployment.py): requests without
credentials must get 401, the admin from the environment must get in, and the README's
user-creation step must produce a working job user. Both start a real `mlflow server` (tens of
seconds on 2 cores), hence `slow`. The same Deployment on PostgreSQL and S3, with a training run
through it, is tests/infra/test_mlflow_production.py.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import pytest

from tests.infra.mlflow_deployment import (
    ADMIN, JOB_USER, create_user, deployment_args, request, server_env, write_auth_config,
)
from trainer.local_services import MlflowServer, free_port, stop_process_group

REPO = Path(__file__).resolve().parents[2]
MLFLOW_BIN = Path(sys.executable).parent / "mlflow"
STARTUP_TIMEOUT_S = 180

pytestmark = pytest.mark.slow


def wait_healthy(process: subprocess.Popen, base_url: str, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"mlflow server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if request(base_url + "/health") == 200:
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1.0)
    raise AssertionError(f"mlflow server not healthy after {STARTUP_TIMEOUT_S}s:\n{log_path.read_text()[-3000:]}")


def non_loopback_address() -> str | None:
    """An address of this host other than 127.x, to prove the server is not listening there."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))  # no packet is sent; picks the outbound interface
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_local_script_serves_only_on_loopback(tmp_path):
    port = free_port()
    log_path = tmp_path / "server.log"
    env = {**os.environ, "MLFLOW_PORT": str(port), "MLFLOW_RUNS_DIR": str(tmp_path / "runs"), "MLFLOW": str(MLFLOW_BIN)}
    with open(log_path, "w") as log:
        process = subprocess.Popen(["bash", str(REPO / "infra" / "mlflow" / "local.sh")], env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(process, f"http://127.0.0.1:{port}", log_path)
        status = request(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/create", body={"name": "infra-test"})
        assert status == 200
        assert (tmp_path / "runs" / "mlflow.db").is_file(), "the sqlite store must live in the runs folder"
        other = non_loopback_address()
        if other is not None:
            with pytest.raises(OSError):
                socket.create_connection((other, port), timeout=3).close()
    finally:
        stop_process_group(process)


def test_cluster_server_arguments_enforce_basic_auth(tmp_path):
    # mlflow's basic-auth app needs its `auth` extra (Flask-WTF), as installed in infra/mlflow/Dockerfile.
    pytest.importorskip("flask_wtf", reason="needs mlflow[auth] (Flask-WTF) in the dev environment")
    port = free_port()
    admin_password = secrets.token_hex(12)
    env = server_env(f"sqlite:///{tmp_path}/mlflow.db",  # PostgreSQL in the cluster (test_mlflow_production.py)
                     write_auth_config(tmp_path / "basic_auth.ini", f"sqlite:///{tmp_path}/auth.db"), admin_password)
    args = deployment_args(port, str(tmp_path / "artifacts"), workers=1)
    with MlflowServer(args, port, tmp_path / "server.log", env=env, timeout_s=STARTUP_TIMEOUT_S) as server:
        search = server.url + "/api/2.0/mlflow/experiments/search?max_results=1"
        assert request(search) == 401, "requests without credentials must be refused"
        assert request(search, ADMIN, "wrong-password") == 401
        assert request(search, ADMIN, admin_password) == 200
        job_password = secrets.token_hex(12)
        create_user(server.url, admin_password, JOB_USER, job_password)
        created = request(server.url + "/api/2.0/mlflow/experiments/create", JOB_USER, job_password, {"name": "hart"})
        assert created == 200, "the job user must be able to create its experiment"
