"""Precompute under faults: SIGKILL the driver at random points, SIGKILL a tokenizer actor mid-run.

Property checked after every trial (tests/faults/accounting.py): the committed key set equals the
input key set (these corpora reject nothing), no key twice, every shard's counters add up, the
manifest agrees, and no partial file is visible as committed (a write killed before its rename
leaves a hidden `.tmp-*` file, which parquet readers skip and the rerun removes).

- Driver kill, fast trial: `python -m jobs.precompute` as a separate driver attached to the test's
  Ray instance (RAY_ADDRESS, as under `ray job submit`), SIGKILLed once the first shard committed
  plus a seeded jitter; Ray reaps the dead driver's writer actors (a write already started may
  still commit, whole); the rerun (in-process) finishes the job.
- Driver kill, slow trials (`-m slow`): the job with its own local Ray in its own process group,
  the whole group SIGKILLed after a seeded number of commits plus jitter, several seeds.
- Actor kill: while `run_precompute` runs in this process, a thread finds the tokenizer actor
  through `ray.util.state.list_actors` and SIGKILLs its process; Ray Data restarts it and retries
  its batches, and the same run must still finish exactly once.

Run: .venv/bin/pytest tests/faults/test_precompute_faults.py -q  (slow trials: -m slow)
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipelines import shapes
from pipelines.config import load_precompute_config
from pipelines.plan import run_precompute
from tests.faults.accounting import assert_exactly_once, visible_junk

ROOT = Path(__file__).resolve().parents[2]


def overrides(uris, cache) -> list[str]:
    return [f"input.shards={json.dumps(uris)}", f"output={cache}", "progress=false",
            "compute.tokenizer_batch_size=4", "compute.decode_batch_size=4"]


def num_committed(cache: Path) -> int:
    stats = cache / "stats"
    return len([n for n in os.listdir(stats) if n.endswith(".stats.json")]) if stats.exists() else 0


def kill_driver_after(command, env, cache: Path, commits: int, jitter_s: float, new_group: bool, timeout_s=300) -> int:
    """Start the job, wait for `commits` shard commits, sleep `jitter_s`, SIGKILL; returns commits seen at the kill."""
    log_path = cache.parent / f"job-{os.getpid()}-{time.time_ns()}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=new_group, stdout=log, stderr=log)
    try:
        deadline = time.time() + timeout_s
        while time.time() < deadline and process.poll() is None and num_committed(cache) < commits:
            time.sleep(0.05)
        time.sleep(jitter_s)
        if process.poll() is not None:
            tail = log_path.read_bytes()[-3000:].decode(errors="replace")
            raise AssertionError(f"the job ended (exit {process.returncode}) before the kill:\n{tail}")
    finally:
        if process.poll() is None:
            if new_group:
                os.killpg(process.pid, signal.SIGKILL)  # driver + the local Ray it started
            else:
                os.kill(process.pid, signal.SIGKILL)  # the driver only; the cluster stays up
        process.wait()
    return num_committed(cache)


def job_command(items: list[str], *extra: str) -> list[str]:
    command = [sys.executable, "-m", "jobs.precompute", *extra]
    for item in items:
        command += ["--set", item]
    return command


def writer_actors_alive() -> int:
    """Shard-writer actors of any job still alive (GCS actor table; the test cluster has no dashboard)."""
    from ray._private import state

    return sum(1 for a in state.actors().values() if a["State"] == "ALIVE" and a["ActorClassName"] == "ShardWriterActor")


@pytest.mark.slow  # `make chaos`; `make test` keeps the rerun (tests/pipelines/test_precompute.py) and the actor kill
def test_driver_sigkill_then_rerun_is_exactly_once(ray_local, tmp_path):
    rng = random.Random(7)
    num_shards = 16
    uris = shapes.write_shapes_shards(str(tmp_path / "raw"), 4 * num_shards, num_shards, seed=7)
    cache = tmp_path / "cache"
    items = overrides(uris, cache)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    kill_driver_after(job_command(items), env, cache, commits=1, jitter_s=rng.uniform(0.0, 0.5), new_group=False)
    # The writer actors belong to the dead driver: Ray reaps them, and a write they had started may
    # still commit meanwhile (marker last, so it is whole). Count once they are gone.
    deadline = time.time() + 60
    while writer_actors_alive() and time.time() < deadline:
        time.sleep(0.1)
    assert not writer_actors_alive(), "the dead driver's writer actors were not reaped"
    at_rerun = num_committed(cache)
    assert at_rerun < num_shards, "the kill should land mid-run"
    summary = run_precompute(load_precompute_config(None, items), log=lambda *a: None)
    assert summary.shards_skipped == at_rerun and summary.shards_done == num_shards - at_rerun and not summary.shards_failed
    assert_exactly_once(str(cache), uris)
    assert not visible_junk(str(cache))
    print(f"driver SIGKILL: {at_rerun}/{num_shards} shards committed when its writers were gone")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_job_group_sigkill_at_random_points(ray_local, tmp_path, seed):
    rng = random.Random(seed)
    uris = shapes.write_shapes_shards(str(tmp_path / "raw"), 60, 10, seed=seed)
    cache = tmp_path / "cache"
    items = overrides(uris, cache)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT)
    commits, jitter = rng.randint(0, 6), rng.uniform(0.0, 1.0)
    at_kill = kill_driver_after(job_command(items, "--num-cpus", "2"), env, cache, commits, jitter, new_group=True)
    assert at_kill <= 10  # 10: killed after the last commit, during the final index compaction: still a valid point
    summary = run_precompute(load_precompute_config(None, items), log=lambda *a: None)
    assert summary.shards_skipped == at_kill and not summary.shards_failed
    assert_exactly_once(str(cache), uris)
    assert not visible_junk(str(cache))
    print(f"seed {seed}: killed after {commits} commits + {jitter:.2f}s; {at_kill}/10 committed at the kill")


def tokenizer_actors(ray) -> list[dict]:
    """Alive Ray Data map actors of this driver's job, read from the GCS actor table.

    (`ray.util.state.list_actors` needs the dashboard, which the test cluster does not run; the
    job filter makes sure we never touch another session's Ray processes.) The only actor pool
    of this plan without a text encoder is the tokenizer stage.
    """
    from ray._private import state

    job_id = ray.get_runtime_context().get_job_id()
    return [a for a in state.actors().values()
            if a["State"] == "ALIVE" and a["JobID"] == job_id and "MapWorker" in a["ActorClassName"] and a["Pid"]]


def actor_killer(ray, cache: Path, after_commits: int, jitter_s: float, record: dict, finished: threading.Event) -> None:
    """Find a tokenizer actor's process (state API) as soon as the pool has one, wait for
    `after_commits` commits, then SIGKILL it; gives up when the run has finished. The trials kill
    right after the lookup (after_commits 0): the tokenizers finish well before the writers commit,
    so waiting for commits could find the actor already gone."""
    deadline = time.time() + 180
    actor = None
    while actor is None and time.time() < deadline and not finished.is_set():
        actors = tokenizer_actors(ray)
        actor = actors[0] if actors else None
        time.sleep(0.05)
    while time.time() < deadline and num_committed(cache) < after_commits and not finished.is_set():
        time.sleep(0.02)
    time.sleep(jitter_s)
    if actor is None or finished.is_set():
        return
    record["committed_at_kill"] = num_committed(cache)
    try:
        os.kill(actor["Pid"], signal.SIGKILL)
    except ProcessLookupError:  # the actor had already exited: no kill happened
        return
    record["pid"], record["actor_id"] = actor["Pid"], actor["ActorID"]


def actor_kill_trial(ray, tmp_path, seed: int, num_shards: int, per_shard: int) -> dict:
    rng = random.Random(seed)
    uris = shapes.write_shapes_shards(str(tmp_path / "raw"), num_shards * per_shard, num_shards, seed=seed)
    cache = tmp_path / "cache"
    record: dict = {}
    finished = threading.Event()
    killer = threading.Thread(target=actor_killer,
                              args=(ray, cache, 0, rng.uniform(0, 0.2), record, finished))
    killer.start()
    try:
        summary = run_precompute(load_precompute_config(None, overrides(uris, cache)), log=lambda *a: None)
    finally:
        finished.set()
        killer.join()
    assert "pid" in record, "no tokenizer actor was found to kill"
    assert record["committed_at_kill"] < num_shards, "the kill landed after the last commit: make the run longer"
    # The same run survived the kill: Ray Data restarted the actor and retried its batches.
    assert summary.shards_done == num_shards and not summary.shards_failed
    assert_exactly_once(str(cache), uris)
    assert not visible_junk(str(cache))
    return record


def test_tokenizer_actor_sigkill_mid_run(ray_local, tmp_path):
    from ray._private import state

    record = actor_kill_trial(ray_local, tmp_path, seed=3, num_shards=12, per_shard=36)
    killed = state.actors(record["actor_id"])
    assert killed["NumRestarts"] >= 1 or killed["State"] == "DEAD", killed  # the kill really happened
    print(f"actor SIGKILL: pid {record['pid']} at {record['committed_at_kill']}/12 commits")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [11, 12, 13])
def test_tokenizer_actor_sigkill_more_seeds(ray_local, tmp_path, seed):
    record = actor_kill_trial(ray_local, tmp_path, seed=seed, num_shards=12, per_shard=36)
    print(f"seed {seed}: actor pid {record['pid']} killed at {record['committed_at_kill']}/12 commits")
