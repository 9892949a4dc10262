"""Chaos trial (slow): SIGKILL a running `python -m jobs.precompute`, rerun, check exactly-once.

The job runs in its own process group (driver plus the local Ray it starts); the test kills that
group as soon as the first shard has committed, then reruns the job in-process and checks that
every key of the input appears exactly once and no stray temp file is left visible.
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


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_is_exactly_once(ray_local, tmp_path):
    uris = shapes.write_shapes_shards(str(tmp_path / "raw"), 240, 8, seed=5)
    cache = tmp_path / "cache"
    overrides = [f"input.shards={json.dumps(uris)}", f"output={cache}", "progress=false",
                 "compute.tokenizer_batch_size=8", "compute.decode_batch_size=8"]
    command = [sys.executable, "-m", "jobs.precompute", "--num-cpus", "2"]
    for item in overrides:
        command += ["--set", item]
    env = {**os.environ, "PYTHONPATH": ROOT}
    process = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and process.poll() is None:
            stats = os.listdir(cache / "stats") if (cache / "stats").exists() else []
            if stats:
                break
            time.sleep(0.2)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # the job's own process group: driver + its local Ray
        process.wait()
    committed_before = len(os.listdir(cache / "stats"))
    assert 1 <= committed_before < 8, "the kill should land mid-run"
    summary = run_precompute(load_precompute_config(None, overrides))
    assert summary.shards_skipped >= committed_before and summary.shards_done + summary.shards_skipped == 8
    keys = read_cache_table(str(cache)).column("key").to_pylist()
    expected = {k for uri in uris for t in read_shard_rows("x", uri, InputConfig())
                for k in t.column("key").to_pylist() if k}
    assert len(keys) == len(set(keys)) == 240 and set(keys) == expected
    assert read_manifest(str(cache))["num_committed_shards"] == 8
    assert not [name for name in os.listdir(cache / "data") if not name.startswith("part-")]
