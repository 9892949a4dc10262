"""Real Ray job submission: `ray start --head` on loopback with token auth, then the
precompute job submitted through the Job Submission API, exactly as on a cluster.

The head runs in its own short temp dir (Unix socket paths must stay short) with
`--block`, so terminating that one process stops its cluster without touching any other
Ray instance of the test session.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from trainer.local_services import free_port, stop_process_group
from pipelines.shapes import write_shapes_shards

REPO = Path(__file__).resolve().parents[2]
RAY_BIN = Path(sys.executable).with_name("ray")


@pytest.fixture(scope="module")
def token_auth_head():
    token = secrets.token_hex(16)
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")
    dashboard_port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(RAY_BIN), "start", "--head", "--block", "--port=0", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--num-cpus=2",
         "--include-dashboard=true", f"--temp-dir={temp_dir}", "--disable-usage-stats",
         # every listener on a free port: another Ray instance of the session may hold the defaults
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:
            break  # the server answers (maybe 401): it is up
        except (urllib.error.URLError, ConnectionError, OSError):
            if head.poll() is not None:
                pytest.fail(f"ray start exited early:\n{head.stdout.read().decode(errors='replace')}")
            time.sleep(1)
    else:
        head.kill()
        pytest.fail("the Ray head's dashboard did not come up within 120 s")
    with pytest.MonkeyPatch.context() as patch:  # the client reads the token from the environment
        patch.setenv("RAY_AUTH_MODE", "token")
        patch.setenv("RAY_AUTH_TOKEN", token)
        yield address, token
    # A graceful stop takes this head ~35 s; its processes (GCS, raylet, dashboard, workers) all share
    # its process group and its own temp dir, so after a short grace the group is killed outright.
    stop_process_group(head, grace_s=5)
    survivors = [p.name for p in Path("/proc").iterdir() if p.name.isdigit() and temp_dir in _cmdline(p)]
    assert not survivors, f"processes of the test's Ray head outlived it: {survivors}"


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:  # the process ended meanwhile
        return ""


def test_unauthenticated_request_is_refused(token_auth_head):
    address, _ = token_auth_head
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{address}/api/jobs/", timeout=10)
    assert info.value.code in (401, 403)


@pytest.mark.slow  # a whole precompute job through the Jobs API (make chaos); the refused request stays in make test
def test_precompute_job_submitted_through_the_api(token_auth_head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    address, token = token_auth_head
    shards_dir = tmp_path / "shards"
    write_shapes_shards(str(shards_dir), num_samples=24, num_shards=2, seed=3)
    cache = tmp_path / "cache"
    # The token goes in the Authorization header explicitly: Ray caches its auth mode per process,
    # and an earlier test of the session may have started Ray with auth disabled.
    client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
    entrypoint = (
        f"{sys.executable} -m jobs.precompute --config jobs/configs/precompute.yaml "
        f"--set 'input.shards=[\"{shards_dir}/shard-*.tar\"]' --set output={cache} --set tokenizer.checkpoint=''"
        f" --set text.encoder=''"
    )
    job_id = client.submit_job(
        entrypoint=entrypoint,
        runtime_env={"working_dir": str(REPO),
                     "excludes": [".venv/", ".git/", "runs/", "*.tar", "__pycache__/", ".pytest_cache/"],
                     "env_vars": {"HF_HUB_OFFLINE": "1"}},
        # Ray's default (0): the pipeline's stages and writer reserve 1.96 of the head's 2 CPUs, and
        # the driver's own reservation is not part of `compute.check_resources`' sum.
        entrypoint_num_cpus=0,
    )
    deadline = time.time() + 300
    status = client.get_job_status(job_id)
    while status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) and time.time() < deadline:
        time.sleep(2)
        status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, f"job ended {status}:\n{logs[-4000:]}"
    assert token not in logs  # the auth token never reaches the job's logs
    from pipelines.cache import read_manifest

    assert read_manifest(str(cache))["num_committed_shards"] == 2
    assert "shard-00000" in logs or "shards" in logs.lower()
