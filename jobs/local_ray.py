"""The runtime env of the local Ray instances this repo starts (no --address, no RAY_ADDRESS).

They run without the dashboard, so without the State API. Ray Train's detached
PlacementGroupCleaner asks that API every second whether the controller lives, and without it
logs "Failed to query Ray Train Controller actor state" each time (477 lines in one `make demo`).
What it guards against (a dead controller's placement group left behind) cannot outlive a local
instance, which stops with its driver, so its warnings alone are muted, by a worker setup hook.

The hook runs in every Ray worker before any task, so this module imports nothing heavy: a hook
that imported torch made each worker's torch take all cores (2 threads on this machine, not the
OMP_NUM_THREADS=1 that Ray sets when a 1-CPU task starts), which slowed the demo's tokenizer
stage by 30% and changed its numbers.
"""

from __future__ import annotations

import logging

PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
LOCAL_RAY_RUNTIME_ENV = {"worker_process_setup_hook": "jobs.local_ray.quiet_placement_group_cleaner"}


def quiet_placement_group_cleaner() -> None:
    """`worker_process_setup_hook`: mute the PlacementGroupCleaner's logger (only that one)."""
    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)
