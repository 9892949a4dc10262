"""How the jobs reach Ray: a private local instance unless told to join a cluster.

`connect(address, num_cpus)` is what every entry point calls. With no `--address` and no
RAY_ADDRESS it starts a local instance of its own (`address="local"`) that stops with the job: a
plain `ray.init()` would silently join whatever cluster `ray start` left running on the machine
(it finds it through /tmp/ray). Joining a cluster is explicit: `--address auto|HOST:PORT|ray://...`
or RAY_ADDRESS, as `ray job submit` sets it. A local instance runs without token authentication
(RAY_AUTH_MODE=disabled unless the environment sets it): it lives only as long as the job, and with
authentication Ray would write a token into the user's home (~/.ray) and warn about it on every run.

Local instances run without the dashboard, so without the State API. Ray Train's detached
PlacementGroupCleaner asks that API every second whether the controller lives, and without it
logs "Failed to query Ray Train Controller actor state" each time (477 lines in one `make demo`).
What it guards against (a dead controller's placement group left behind) cannot outlive a local
instance, which stops with its driver, so its warnings alone are muted, by a worker setup hook,
in the instances of jobs that run Ray Train (`connect(..., ray_train=True)`).

A local instance's workers run at the driver's priority (RAY_worker_niceness=0 unless the
environment sets it). Ray's default, niceness 15 for every worker, suits a cluster node where the
raylet must stay responsive under load; in a private instance the workers are the job itself, and
at 15 any other process on the machine, however small its share, takes their CPU first: the job
then runs slower than the same work in one plain process (`benchmarks/precompute.py`,
`benchmarks/ray_overhead.py` compare the two at equal priority).

Jobs that load models run offline (`offline_models`, called by every job's `main` (precompute, train,
generate, evaluate) and by the demo's chain before its `ray.init`): every model is a local file or folder (`hart.text_encoder` loads with
`local_files_only`), and HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE keep any other Hugging Face hub
request from reaching the network, in the job's process and in the workers of a local instance it
starts (they inherit its environment). The environment's own values win: the Makefile, the
container image and the cluster's runtime env set them too. Nothing here sets a variable at import.

The hook runs in every Ray worker before any task, so this module imports nothing heavy: a hook
that imported torch made each worker's torch take all cores (2 threads on this machine, not the
OMP_NUM_THREADS=1 that Ray sets when a 1-CPU task starts), which slowed the demo's tokenizer
stage by 30% and changed its numbers.
"""

from __future__ import annotations

import logging
import os

import ray

PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
LOCAL_RAY_RUNTIME_ENV = {"worker_process_setup_hook": "trainer.ray_session.quiet_placement_group_cleaner"}


def quiet_placement_group_cleaner() -> None:
    """`worker_process_setup_hook`: mute the PlacementGroupCleaner's logger (only that one)."""
    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)


OFFLINE_MODELS = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def offline_models() -> None:
    """Set OFFLINE_MODELS where the environment leaves them unset (module doc); before Ray starts."""
    for name, value in OFFLINE_MODELS.items():
        os.environ.setdefault(name, value)


def without_token_auth() -> None:
    """A private local instance runs without Ray's token authentication unless RAY_AUTH_MODE is set
    (module doc); read by the raylet that the next `ray.init(address="local")` starts."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")


ADDRESS_HELP = ("Ray cluster to join: auto (the cluster `ray start` runs here), HOST:PORT or ray://HOST:10001; "
                "default: $RAY_ADDRESS if set, else a private local Ray instance that stops with the job")


def connect(address: str | None, num_cpus: int | None = None, ray_train: bool = False) -> None:
    """Join `address` (or $RAY_ADDRESS), else start a private local instance with `num_cpus` CPUs (None: all);
    nothing when this process is connected already (a test's or the demo's Ray). Says which on stdout.
    `ray_train`: the job runs Ray Train, whose cleaner's warnings the local instance mutes (module doc);
    other jobs start without that hook, since a runtime env keeps Ray from using the workers it
    started with the node for their tasks (measured: ~8 s more CPU in precompute's start-up)."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address)
        print(f"[ray] joined the Ray cluster at {address}", flush=True)
        return
    without_token_auth()
    os.environ.setdefault("RAY_worker_niceness", "0")  # read by the raylet this call starts (module doc)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
             runtime_env=LOCAL_RAY_RUNTIME_ENV if ray_train else None)
    print(f"[ray] started a private local Ray instance ({ray.cluster_resources().get('CPU', 0):g} CPUs); "
          f"--address or RAY_ADDRESS joins a cluster instead", flush=True)
