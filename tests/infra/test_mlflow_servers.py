"""Start the two MLflow server variants of infra/mlflow/ for real and check what they promise.

Design: `local.sh` is run as written (only port and store folder redirected through its env
knobs) and must serve on 127.0.0.1 and nowhere else. The cluster variant is the exact argument
list of the Deployment in mlflow.yaml, with only what needs a cluster swapped for local stand-ins
(bind address, port, sqlite instead of PostgreSQL, a folder instead of S3), plus the auth config
made from basic_auth.ini.example: requests without credentials must get 401, the admin from the
environment must get in, and the README's user-creation step must produce a working job user.
Both start a real `mlflow server` (tens of seconds on 2 cores), hence `slow`.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from trainer.local_services import free_port, stop_process_group

REPO = Path(__file__).resolve().parents[2]
MLFLOW_BIN = Path(sys.executable).parent / "mlflow"
STARTUP_TIMEOUT_S = 180

pytestmark = pytest.mark.slow


def request(url: str, user: str | None = None, password: str | None = None, body: dict | None = None) -> int:
    headers = {"Content-Type": "application/json"}
    if user is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=90) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


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


def cluster_server_command(port: int, artifacts: Path) -> list[str]:
    """The Deployment's args with only the cluster-bound values swapped for local ones."""
    documents = list(yaml.safe_load_all((REPO / "infra" / "mlflow" / "mlflow.yaml").read_text()))
    (deployment,) = [d for d in documents if d and d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    swaps = {
        "--host=": "--host=127.0.0.1",
        "--port=": f"--port={port}",
        "--workers=": "--workers=1",
        "--artifacts-destination=": f"--artifacts-destination={artifacts}",
    }
    args = []
    for arg in container["args"]:
        prefix = next((p for p in swaps if arg.startswith(p)), None)
        args.append(swaps[prefix] if prefix else arg)
    assert "--app-name=basic-auth" in args
    return [str(MLFLOW_BIN), *args]


def test_cluster_server_arguments_enforce_basic_auth(tmp_path):
    # mlflow's basic-auth app needs its `auth` extra (Flask-WTF), as installed in infra/mlflow/Dockerfile.
    pytest.importorskip("flask_wtf", reason="needs mlflow[auth] (Flask-WTF) in the dev environment")
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    auth_ini = (REPO / "infra" / "mlflow" / "basic_auth.ini.example").read_text()
    assert "REPLACE_WITH_POSTGRES_URI" in auth_ini
    (tmp_path / "basic_auth.ini").write_text(auth_ini.replace("REPLACE_WITH_POSTGRES_URI", f"sqlite:///{tmp_path}/auth.db"))
    admin_password = secrets.token_hex(12)
    env = {
        **os.environ,
        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path}/mlflow.db",  # PostgreSQL in the cluster
        "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini"),
        "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
    }
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(cluster_server_command(port, tmp_path / "artifacts"), env=env, cwd=tmp_path,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(process, base_url, log_path)
        search = base_url + "/api/2.0/mlflow/experiments/search?max_results=1"
        assert request(search) == 401, "requests without credentials must be refused"
        assert request(search, "admin", "wrong-password") == 401
        assert request(search, "admin", admin_password) == 200
        # The README's step: the admin creates the user the Ray jobs log in as.
        job_password = secrets.token_hex(12)
        create_user = (
            "import sys; from mlflow.server import get_app_client; "
            "get_app_client('basic-auth', tracking_uri=sys.argv[1]).create_user(username='hart-ray', password=sys.argv[2])"
        )
        client_env = {**env, "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": admin_password}
        subprocess.run([sys.executable, "-c", create_user, base_url, job_password], env=client_env, check=True, timeout=120)
        created = request(base_url + "/api/2.0/mlflow/experiments/create", "hart-ray", job_password, {"name": "hart"})
        assert created == 200, "the job user must be able to create its experiment"
    finally:
        stop_process_group(process)
