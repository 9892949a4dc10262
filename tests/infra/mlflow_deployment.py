"""The MLflow Deployment of infra/mlflow/mlflow.yaml as tests run it locally, shared by the tests of
tests/infra that start it (test_mlflow_servers.py with sqlite and a folder, test_mlflow_production.py
with PostgreSQL and S3).

Design: the server is started with the Deployment's own argument list, read from the yaml, with
only what needs a cluster swapped for local values (`deployment_args`); the auth config is the ini
example with its database filled in (`write_auth_config`); the environment is the one the
Deployment sets from its Secrets (`server_env`); the job user is created as infra/README.md says
(`create_user`). Requests are plain urllib with an optional basic-auth header (`request`), so a 401
is seen as a status, not hidden behind a client's retries.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import yaml

REPO = Path(__file__).resolve().parents[2]
MLFLOW_DIR = REPO / "infra" / "mlflow"
ADMIN = "admin"
JOB_USER = "hart-ray"  # the user the Ray jobs log in as (infra/README.md, Secret mlflow-client)
CLIENT_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI")


def deployment_args(port: int, artifacts_destination: str, workers: int | None = None) -> list[str]:
    """The Deployment's container args (what follows `mlflow`) with bind address 127.0.0.1, `port`, the
    artifact destination and, when given, the worker count swapped; everything else as deployed."""
    documents = list(yaml.safe_load_all((MLFLOW_DIR / "mlflow.yaml").read_text()))
    (deployment,) = [d for d in documents if d and d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    swaps = {"--host=": "--host=127.0.0.1", "--port=": f"--port={port}",
             "--artifacts-destination=": f"--artifacts-destination={artifacts_destination}"}
    if workers is not None:
        swaps["--workers="] = f"--workers={workers}"
    args = []
    for arg in container["args"]:
        prefix = next((p for p in swaps if arg.startswith(p)), None)
        args.append(swaps[prefix] if prefix else arg)
    assert args[0] == "server" and "--app-name=basic-auth" in args and "--serve-artifacts" in args
    return args


def write_auth_config(path: Path, database_uri: str) -> Path:
    """basic_auth.ini.example with its database URI filled in, as infra/README.md makes the Secret's file."""
    template = (MLFLOW_DIR / "basic_auth.ini.example").read_text()
    assert "REPLACE_WITH_POSTGRES_URI" in template
    path.write_text(template.replace("REPLACE_WITH_POSTGRES_URI", database_uri))
    return path


def server_env(backend_store_uri: str, auth_config: Path, admin_password: str) -> dict[str, str]:
    """The environment the Deployment gives the server from its Secrets, minus any client settings
    this process has (the server must not log in to itself)."""
    env = {name: value for name, value in os.environ.items() if name not in CLIENT_ENV}
    return {**env, "MLFLOW_BACKEND_STORE_URI": backend_store_uri, "MLFLOW_AUTH_CONFIG_PATH": str(auth_config),
            "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN, "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}


def request(url: str, user: str | None = None, password: str | None = None, body: dict | None = None) -> int:
    """The HTTP status of one GET (or POST of `body` as JSON), with basic auth when `user` is given."""
    headers = {"Content-Type": "application/json"}
    if user is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=90) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


@contextlib.contextmanager
def client_credentials(user: str, password: str) -> Iterator[None]:
    """MLFLOW_TRACKING_USERNAME / _PASSWORD set for the block, as an operator exports them, then restored."""
    saved = {name: os.environ.get(name) for name in CLIENT_ENV[:2]}
    os.environ.update({"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def create_user(base_url: str, admin_password: str, user: str, password: str) -> None:
    """infra/README.md's step, the admin creating the user the Ray jobs log in as, through the client the
    README runs (`get_app_client("basic-auth")`; importing it costs seconds)."""
    from mlflow.server import get_app_client

    with client_credentials(ADMIN, admin_password):
        get_app_client("basic-auth", tracking_uri=base_url).create_user(username=user, password=password)


def create_user_by_rest(base_url: str, admin_password: str, user: str, password: str) -> None:
    """The same step as one POST to the auth API's users/create, the request that client sends."""
    status = request(f"{base_url}/api/2.0/mlflow/users/create", ADMIN, admin_password,
                     {"username": user, "password": password})
    assert status == 200, f"users/create answered {status}"
