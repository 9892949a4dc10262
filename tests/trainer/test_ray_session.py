"""trainer.ray_session: the runtime env of local Ray instances mutes one Ray Train logger, and only that;
their workers run at the driver's priority; jobs go offline for Hugging Face unless the environment
says otherwise."""

from __future__ import annotations

import importlib
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from trainer.ray_session import PLACEMENT_GROUP_CLEANER_LOGGER

REPO = Path(__file__).resolve().parents[2]

# A fresh local instance in its own process: the session's `ray_local` runs without the hook.
SCRIPT = """
import logging, os, sys, ray
os.environ["RAY_TMPDIR"] = sys.argv[1]
from trainer.ray_session import PLACEMENT_GROUP_CLEANER_LOGGER, connect
connect(None, 2, ray_train=True)

@ray.remote(num_cpus=1)
def inside_a_worker():
    torch_before = "torch" in sys.modules
    import torch
    return (logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).getEffectiveLevel(),
            logging.getLogger("ray.train").getEffectiveLevel(), torch_before, torch.get_num_threads(),
            os.nice(0) - DRIVER_NICENESS)

DRIVER_NICENESS = os.nice(0)
print("RESULT", *ray.get(inside_a_worker.remote()))
"""


def test_local_ray_mutes_the_placement_group_cleaner_and_nothing_else():
    """Local instances run without the State API, so Ray Train's PlacementGroupCleaner would warn
    every second (477 lines in one demo). A Ray upgrade that moves its module fails here."""
    importlib.import_module(PLACEMENT_GROUP_CLEANER_LOGGER)
    short = tempfile.mkdtemp(prefix="r", dir="/tmp")  # Ray's socket paths must stay short
    try:
        done = subprocess.run([sys.executable, "-c", SCRIPT, short], cwd=REPO, capture_output=True, text=True,
                              timeout=180)
    finally:
        shutil.rmtree(short, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-2000:]
    muted, other, torch_before, threads, niceness = done.stdout.split("RESULT")[1].split()
    assert int(muted) == logging.ERROR
    assert int(other) <= logging.WARNING  # Ray Train's other warnings still reach the log
    # The hook runs before any task: had it imported torch, torch would have sized its thread pool
    # before Ray set OMP_NUM_THREADS=1 for this 1-CPU task (2 threads here: it happened once).
    assert torch_before == "False" and int(threads) == 1
    # The worker runs at the driver's priority (Ray's default would put it 15 below).
    assert int(niceness) == 0


@pytest.mark.slow  # `make chaos`: a second Ray cluster on the machine, which other tests running beside it would see
def test_a_job_starts_its_own_ray_instead_of_joining_a_running_cluster_and_leaves_home_alone(tmp_path):
    """`ray start` left a cluster running on the machine: a job run by hand starts a private local instance
    and says so, instead of joining that cluster silently (as a plain `ray.init()` would), and writes nothing
    into the user's home; `--address` joins the cluster."""
    import os

    from trainer.local_services import free_port, stop_process_group, wait_for_port
    from pipelines.shapes import write_shapes_shards

    port, home, elsewhere = free_port(), tmp_path / "home", tmp_path / "cluster-home"
    home.mkdir()
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    ray_bin = Path(sys.executable).parent / "ray"
    cluster = subprocess.Popen([str(ray_bin), "start", "--head", "--block", "--num-cpus=1", f"--port={port}",
                                "--include-dashboard=false"], env={**env, "HOME": str(elsewhere), "RAY_AUTH_MODE": "disabled"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_port(cluster, port, "ray start --head", timeout_s=120)
        shards = write_shapes_shards(str(tmp_path / "raw"), 4, 1)
        job = subprocess.run([str(Path(sys.executable).parent / "hart-precompute"), "--set", f"input.shards={shards}",
                              "--set", f"output={tmp_path / 'cache'}", "--set", "compute.tokenizer_actors=1",
                              "--num-cpus", "2"], env={**env, "HOME": str(home)}, cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
        assert job.returncode == 0, job.stderr[-3000:]
        assert "[ray] started a private local Ray instance (2 CPUs)" in job.stdout  # the running one has 1 CPU
        assert sorted(p.relative_to(home).as_posix() for p in home.rglob("*")) == []
        joined = subprocess.run([sys.executable, "-c", "from trainer.ray_session import connect; import ray; "
                                 f"connect('127.0.0.1:{port}'); print(ray.cluster_resources()['CPU'])"],
                                env={**env, "HOME": str(home)}, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert joined.returncode == 0, joined.stderr[-3000:]
        assert f"[ray] joined the Ray cluster at 127.0.0.1:{port}" in joined.stdout and joined.stdout.split()[-1] == "1.0"
    finally:
        stop_process_group(cluster, grace_s=30)
        # `ray start` recorded its address for later `auto` lookups; a killed one does not take it back,
        # and a stale record sends Ray Train's placement-group cleaner in later jobs to a dead GCS.
        current = Path("/tmp/ray/ray_current_cluster")
        if current.exists() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()


def test_offline_models_sets_only_what_the_environment_leaves_unset(monkeypatch):
    import os

    from trainer.ray_session import OFFLINE_MODELS, offline_models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")  # the user's choice wins
    offline_models()
    assert os.environ["HF_HUB_OFFLINE"] == OFFLINE_MODELS["HF_HUB_OFFLINE"] == "1"
    assert os.environ["TRANSFORMERS_OFFLINE"] == "0"
