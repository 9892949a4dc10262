"""jobs.local_ray: the runtime env of local Ray instances mutes one Ray Train logger, and only that."""

from __future__ import annotations

import importlib
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from jobs.local_ray import PLACEMENT_GROUP_CLEANER_LOGGER

REPO = Path(__file__).resolve().parents[2]

# A fresh local instance in its own process: the session's `ray_local` runs without the hook.
SCRIPT = """
import logging, sys, ray
from jobs.local_ray import LOCAL_RAY_RUNTIME_ENV, PLACEMENT_GROUP_CLEANER_LOGGER
ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env=LOCAL_RAY_RUNTIME_ENV,
         _temp_dir=sys.argv[1])

@ray.remote(num_cpus=1)
def inside_a_worker():
    torch_before = "torch" in sys.modules
    import torch
    return (logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).getEffectiveLevel(),
            logging.getLogger("ray.train").getEffectiveLevel(), torch_before, torch.get_num_threads())

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
    muted, other, torch_before, threads = done.stdout.split("RESULT")[1].split()
    assert int(muted) == logging.ERROR
    assert int(other) <= logging.WARNING  # Ray Train's other warnings still reach the log
    # The hook runs before any task: had it imported torch, torch would have sized its thread pool
    # before Ray set OMP_NUM_THREADS=1 for this 1-CPU task (2 threads here: it happened once).
    assert torch_before == "False" and int(threads) == 1
