"""The README's `ray job submit` command, run for real against a token-auth Ray head on loopback.

Design: a `ray start --head --block` on 127.0.0.1 with RAY_AUTH_MODE=token stands in for the
cluster head (its own short temp dir, its own process group, stopped at the end). The job is
submitted with the Ray CLI exactly as infra/README.md documents it (`--working-dir .
--runtime-env infra/ray/runtime_env.yaml`, token read from a file through RAY_AUTH_TOKEN_PATH), and
the job reports what it sees: the runtime env's variables, and which local-state folders were
(not) uploaded. Without the token the same command must be refused. `slow`: a Ray head takes
tens of seconds to start on 2 cores.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from trainer.local_services import free_port, stop_process_group

REPO = Path(__file__).resolve().parents[2]
RAY_BIN = Path(sys.executable).with_name("ray")

pytestmark = pytest.mark.slow

# What the submitted job prints: its environment and which paths its working dir holds.
PROBE = (
    "import json, os; print('PROBE ' + json.dumps({"
    "'MLFLOW_TRACKING_URI': os.environ.get('MLFLOW_TRACKING_URI'), 'HF_HUB_OFFLINE': os.environ.get('HF_HUB_OFFLINE'), "
    "'paths': {p: os.path.exists(p) for p in ['.venv', 'runs', '.git', 'jobs', 'infra/ray/runtime_env.yaml']}}))"
)


@pytest.fixture(scope="module")
def token_head(tmp_path_factory):
    token = secrets.token_hex(16)
    token_file = tmp_path_factory.mktemp("token") / "hart_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    temp_dir = tempfile.mkdtemp(prefix="ri", dir="/tmp")  # Ray's socket paths must stay short
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(RAY_BIN), "start", "--head", "--block", "--port=0", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={port}", "--num-cpus=1", "--include-dashboard=true",
         f"--temp-dir={temp_dir}", "--disable-usage-stats",
         # Other Ray instances on this machine (parallel tests) hold the fixed default agent ports.
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(address + "/api/version", timeout=5).close()
            break
        except urllib.error.HTTPError:
            break  # answering with 401 means it is up
        except OSError:
            if head.poll() is not None or time.monotonic() > deadline:
                os.killpg(head.pid, signal.SIGKILL) if head.poll() is None else None
                pytest.fail("the token-auth Ray head did not come up")
            time.sleep(1.0)
    yield address, token_file
    stop_process_group(head, grace_s=60)
    shutil.rmtree(temp_dir, ignore_errors=True)


def submit(address: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [str(RAY_BIN), "job", "submit", "--address", address, "--working-dir", ".",
               "--runtime-env", "infra/ray/runtime_env.yaml", "--", sys.executable, "-c", PROBE]
    deadline = time.monotonic() + 120
    while True:
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        # The head's job agent comes up some seconds after the dashboard answers: retry only that.
        if "No available agent" not in result.stderr or time.monotonic() > deadline:
            return result
        time.sleep(3.0)


def client_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")}
    env["HOME"] = str(home)  # an empty home: no ~/.ray/auth_token fallback from this machine
    return {**env, **extra}


def test_readme_submit_command_with_token_file(token_head, tmp_path):
    address, token_file = token_head
    result = submit(address, client_env(tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file)))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    (line,) = [line for line in output.splitlines() if line.startswith("PROBE ")]
    seen = json.loads(line.removeprefix("PROBE "))
    runtime_env = yaml.safe_load((REPO / "infra" / "ray" / "runtime_env.yaml").read_text())
    assert seen["MLFLOW_TRACKING_URI"] == runtime_env["env_vars"]["MLFLOW_TRACKING_URI"]
    assert seen["HF_HUB_OFFLINE"] == "1"
    assert seen["paths"] == {".venv": False, "runs": False, ".git": False, "jobs": True, "infra/ray/runtime_env.yaml": True}
    assert token_file.read_text() not in output, "the token must not appear in job output"


def test_submit_without_token_is_refused(token_head, tmp_path):
    address, _ = token_head
    result = submit(address, client_env(tmp_path, RAY_AUTH_MODE="token"))
    assert result.returncode != 0
    assert "PROBE " not in result.stdout
