"""Chaos trials (slow, `make chaos`): a worker node of a three-node Ray cluster is removed mid-run.

`ray_cluster` (tests/conftest.py): a CPU-less head running the driver, worker nodes node_a and
node_b; S3 on loopback is the only shared storage. The removal is `Cluster.remove_node` without
grace, as when a machine disappears: its raylet, workers, actors and object-store copies vanish.

Precompute: the node goes once the first shard has committed. The run may finish (Ray retries the
lost tasks, restarts the lost actors, and shards whose rows died with a writer are reported
`incomplete`) or fail; either way, once a replacement node has joined, a rerun must leave every
sample committed exactly once, doing only the shards without a stats marker.

Joint stage: two DDP workers, one per worker node (`STRICT_SPREAD`), checkpoints on S3,
`run.max_failures=1`. Once the step-2 checkpoint is registered a replacement node joins and node_b
goes; Ray Train must restart the worker group on node_a and the new node, restore step 2 and
finish: one MLflow run, every step logged, steps 1-2 never run again, the scheduler at max_steps.
"""

from __future__ import annotations

import re
import threading
import time

import pytest

from hart.training.checkpoint import load_training_state
from jobs.train import run_training
from pipelines import manifest as manifest_lib
from pipelines import shapes, storage
from pipelines.plan import run_precompute
from tests.faults.accounting import assert_exactly_once, visible_junk
from tests.jobs.test_multinode_train import cluster_config as train_config
from tests.jobs.test_multinode_train import logged_steps, on_s3
from tests.pipelines.test_multinode_precompute import cluster_config


def count_markers(cache: str, endpoint: str) -> int:
    fs, base = storage.resolve(cache, endpoint)
    return len([p for p in storage.list_files(fs, f"{base}/{manifest_lib.STATS_DIR}") if p.endswith(".stats.json")])


@pytest.mark.slow
def test_precompute_survives_losing_a_worker_node(ray_cluster, s3_bucket, s3_endpoint):
    num_shards = 12
    uris = shapes.write_shapes_shards(f"{s3_bucket}/raw", 8 * num_shards, num_shards, seed=6, endpoint_url=s3_endpoint)
    cache = f"{s3_bucket}/cache"
    record: dict = {}

    def remove_after_first_commit():
        deadline = time.time() + 240
        while time.time() < deadline and count_markers(cache, s3_endpoint) < 1:
            time.sleep(0.1)
        record["committed_at_removal"] = count_markers(cache, s3_endpoint)
        ray_cluster.remove("node_b")

    remover = threading.Thread(target=remove_after_first_commit)
    remover.start()
    config = cluster_config(uris, s3_endpoint, cache, **{"compute.tokenizer_batch_size": 4, "compute.decode_batch_size": 4})
    try:
        first = run_precompute(config, log=lambda *a: None)
        record["first"] = f"finished: {first.shards_done} done, {len(first.shards_failed)} failed"
    except Exception as error:  # a failed run is allowed: the rerun must finish the job
        record["first"] = f"raised {type(error).__name__}: {str(error)[:200]}"
    remover.join()
    assert 1 <= record["committed_at_removal"] < num_shards, record
    ray_cluster.add("node_b")  # a replacement machine joins, as an autoscaler would bring one
    before_rerun = count_markers(cache, s3_endpoint)
    rerun = run_precompute(config, log=lambda *a: None)
    assert rerun.shards_skipped == before_rerun and rerun.shards_done == num_shards - before_rerun
    assert not rerun.shards_failed
    assert_exactly_once(cache, uris, s3_endpoint)
    assert not visible_junk(cache, s3_endpoint)
    print(f"node_b removed at {record['committed_at_removal']}/{num_shards} commits; first run {record['first']}; "
          f"rerun did {rerun.shards_done}")


@pytest.mark.slow
def test_joint_stage_survives_losing_a_worker_node(train_assets, ray_cluster, s3_bucket, s3_endpoint, mlflow_server, tmp_path):
    max_steps = 16  # long enough that the node goes mid-run, after the add below (a few seconds)
    assets = on_s3(train_assets, s3_bucket, s3_endpoint)
    config = train_config(assets, s3_bucket, s3_endpoint, mlflow_server, tmp_path, f"run.max_steps={max_steps}",
                          "run.checkpoint_every=2", "run.max_failures=1", "run.name=node-loss")
    fs, base = storage.resolve(f"{s3_bucket}/train/{config.run.name}", s3_endpoint)
    record: dict = {}

    def last_registered() -> int:
        """The step of the newest checkpoint Ray Train's controller has recorded (0: none)."""
        snapshot = f"{base}/checkpoint_manager_snapshot.json"
        text = storage.read_bytes(fs, snapshot).decode() if storage.exists(fs, snapshot) else ""
        return max((int(step) for step in re.findall(r"checkpoint_step(\d{8})", text)), default=0)

    def train() -> None:
        try:
            record["outcome"] = run_training(config)
        except Exception as error:  # noqa: BLE001 - reported by the asserts below
            record["error"] = error

    # The run goes on a thread: Ray starts nodes only from the main thread (signal handlers).
    trainer = threading.Thread(target=train)
    trainer.start()
    deadline = time.time() + 300
    while time.time() < deadline and trainer.is_alive() and last_registered() < 2:
        time.sleep(0.2)
    # The replacement machine joins first: Ray Train gives a new worker group 60 s to start, less
    # than a node removed without notice takes to be declared dead.
    ray_cluster.add("node_c")
    record["registered_at_removal"] = last_registered()
    ray_cluster.remove("node_b")
    trainer.join(timeout=600)
    assert "error" not in record, record.get("error")
    outcome = record["outcome"]
    restored = record["registered_at_removal"]
    assert 2 <= restored < max_steps, f"the node went at checkpoint {restored}: nothing was proven"
    assert outcome["final_step"] == max_steps
    local = tmp_path / "last"
    storage.copy_tree(f"s3://{outcome['checkpoint_path']}", str(local), s3_endpoint)
    state = load_training_state(local)
    assert state.step == max_steps and state.meta["mlflow_run_id"] == outcome["run_id"]
    assert state.scheduler["last_epoch"] == max_steps  # no optimizer step repeated or skipped
    num_runs, steps = logged_steps(config)
    assert num_runs == 1 and set(steps) == set(range(1, max_steps + 1)), steps
    # Restored, not restarted: no step up to the checkpoint registered at the removal ran twice.
    assert all(steps.count(step) == 1 for step in range(1, restored + 1)), f"steps before {restored} redone: {sorted(steps)}"
    print(f"joint stage: node_b removed with checkpoint {restored} registered; metric steps logged {sorted(steps)}")
