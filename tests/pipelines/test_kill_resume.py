"""Chaos trial (slow): SIGKILL a running `python -m jobs.precompute`, rerun, check exactly-once.

The job runs in its own process group (driver plus the local Ray it starts); the test kills that
group as soon as the first shard has committed, then reruns the job in-process and checks that
every key of the input appears exactly once and no stray temp file is left visible. The job runs
with the writer's `pause_after_commits=1` test hook: its writer commits one shard and holds the
others, so the kill lands mid-run by construction (without it, shards finished together can all
commit between two polls of the test).
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pipelines import shapes
from pipelines.cache import read_cache_table, read_manifest
from pipelines.config import InputConfig, load_precompute_config
from pipelines.plan import run_precompute
from pipelines.shard_source import read_shard_rows

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def committed_markers(cache) -> int:
    """Stats markers in place (a marker's hidden temporary file before its rename does not count)."""
    stats = cache / "stats"
    return len([n for n in os.listdir(stats) if n.endswith(".stats.json") and not n.startswith(".")]) if stats.exists() else 0


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_is_exactly_once(ray_local, tmp_path):
    uris = shapes.write_shapes_shards(str(tmp_path / "raw"), 240, 8, seed=5)
    cache = tmp_path / "cache"
    overrides = [f"input.shards={json.dumps(uris)}", f"output={cache}", "progress=false",
                 "compute.tokenizer_batch_size=8", "compute.decode_batch_size=8"]
    command = [sys.executable, "-m", "jobs.precompute", "--num-cpus", "2"]
    for item in overrides + ["pause_after_commits=1"]:
        command += ["--set", item]
    env = {**os.environ, "PYTHONPATH": ROOT}
    log_path = tmp_path / "job.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True, stdout=log, stderr=log)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and process.poll() is None:
            if committed_markers(cache):
                break
            time.sleep(0.2)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # the job's own process group: driver + its local Ray
        process.wait()
    committed_before = committed_markers(cache)
    assert committed_before == 1, ("the writer holds every write after its first commit (pause_after_commits=1); "
                                   f"job exit {process.returncode}:\n{log_path.read_bytes()[-3000:].decode(errors='replace')}")
    summary = run_precompute(load_precompute_config(None, overrides))
    assert summary.shards_skipped >= committed_before and summary.shards_done + summary.shards_skipped == 8
    keys = read_cache_table(str(cache)).column("key").to_pylist()
    expected = {k for uri in uris for t in read_shard_rows("x", uri, InputConfig())
                for k in t.column("key").to_pylist() if k}
    assert len(keys) == len(set(keys)) == 240 and set(keys) == expected
    assert read_manifest(str(cache))["num_committed_shards"] == 8
    assert not [name for name in os.listdir(cache / "data") if not name.startswith("part-")]
