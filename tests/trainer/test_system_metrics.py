"""Per-node system metrics (trainer/system_metrics.py) against a sqlite MLflow store, without Ray: node
names, the choice of each node's first worker (three real gloo ranks, subprocesses), one series per
node, the last sample taken at stop, steps continued by a restarted recorder, the setting's
validation, and a store error that ends the sampling but not the caller. On a Ray cluster:
tests/jobs/test_multinode_train.py.

Run: .venv/bin/pytest tests/trainer/test_system_metrics.py -q
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from trainer.config import load_train_config
from trainer.system_metrics import (
    NODE_METRICS, NODE_TAG_PREFIX, NodeIdentity, NodeSystemMetrics, first_worker_of_its_node, metric_key,
)

NODE_A = NodeIdentity("worker-a.cluster.local", "1a2b3c4d" + "0" * 48, "10.0.0.1")
NODE_B = NodeIdentity("worker-a.cluster.local", "9f8e7d6c" + "0" * 48, "10.0.0.1")  # a second Ray node, same host


def new_run(tmp_path) -> tuple[str, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    return uri, client.create_run(client.create_experiment("system-metrics")).info.run_id


def steps(uri: str, run_id: str, node: NodeIdentity, metric: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, metric_key(node.name, metric)))


def test_node_names_are_readable_and_keep_two_ray_nodes_of_one_host_apart():
    assert NODE_A.name == "worker-a-1a2b3c4d" and NODE_B.name == "worker-a-9f8e7d6c"
    assert NodeIdentity("pod name+x", "abcdef0123", "").name == "pod_name_x-abcdef01"


RANK = """
import sys
import torch.distributed as dist
from trainer.system_metrics import NodeIdentity, first_worker_of_its_node
rank, world_size, init_file, node_id = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
print(first_worker_of_its_node(NodeIdentity("host", node_id, "")))
dist.destroy_process_group()
"""


def test_the_first_worker_of_each_ray_node_is_chosen(tmp_path):
    assert first_worker_of_its_node(NODE_A)  # no process group: a single worker
    node_of_rank = ["aaaa", "bbbb", "aaaa"]  # ranks 0 and 2 share a node
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    procs = [subprocess.Popen([sys.executable, "-c", RANK, str(rank), "3", str(tmp_path / "store"), node_id],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank, node_id in enumerate(node_of_rank)]
    try:
        outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [out.strip().splitlines()[-1] for out in outputs] == ["True", "True", "False"], outputs


def test_each_node_logs_its_series_and_a_last_sample_at_stop(tmp_path):
    uri, run_id = new_run(tmp_path)
    with NodeSystemMetrics(uri, run_id, 1.0, NODE_A):
        time.sleep(2.5)  # two or three samples, then one at stop
        with NodeSystemMetrics(uri, run_id, 1.0, NODE_B):
            pass  # shorter than the interval: the sample taken at stop is its only one
    for metric in NODE_METRICS:
        sampled = steps(uri, run_id, NODE_A, metric)
        assert len(sampled) >= 3 and sampled == list(range(len(sampled))), (metric, sampled)
        assert len(steps(uri, run_id, NODE_B, metric)) == 1, metric
    tags = MlflowClient(tracking_uri=uri).get_run(run_id).data.tags
    assert tags[NODE_TAG_PREFIX + NODE_B.name] == (f"ray_node_id={NODE_B.ray_node_id} ip=10.0.0.1 "
                                                   f"host=worker-a.cluster.local gpus=not measured")
    # a restarted worker group continues after the run's highest system/ step
    last = max(steps(uri, run_id, NODE_A, "cpu_utilization_percentage"))
    with NodeSystemMetrics(uri, run_id, 1.0, NODE_A):
        pass
    assert max(steps(uri, run_id, NODE_A, "cpu_utilization_percentage")) == last + 1


def test_off_not_the_first_worker_or_no_run_records_nothing(tmp_path):
    uri, run_id = new_run(tmp_path)
    for recorder in (NodeSystemMetrics(uri, run_id, 0, NODE_A), NodeSystemMetrics(uri, run_id, 1.0, None),
                     NodeSystemMetrics(uri, "", 1.0, NODE_A)):
        with recorder:
            assert not recorder.enabled and recorder.thread is None
    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert not run.data.metrics and not any(key.startswith(NODE_TAG_PREFIX) for key in run.data.tags)


def test_a_store_error_ends_the_sampling_with_a_warning_not_the_caller(tmp_path, caplog):
    uri, run_id = new_run(tmp_path)
    recorder = NodeSystemMetrics(uri, run_id, 1.0, NODE_A).start()
    MlflowClient(tracking_uri=uri).delete_run(run_id)  # logging into a deleted run is refused
    with caplog.at_level(logging.WARNING, logger="trainer.system_metrics"):
        recorder.stop()
    assert recorder.failed and f"system metrics of node {NODE_A.name} stopped" in caplog.text


@pytest.mark.parametrize("interval, valid", [(0, True), (1, True), (2.5, True), (0.5, False), (-1, False)])
def test_the_interval_is_off_or_at_least_a_second(interval, valid):
    load = lambda: load_train_config("jobs/configs/train_tiny.yaml", "joint",  # noqa: E731
                                     [f"tracking.system_metrics_interval_s={interval}"])
    if valid:
        assert load().tracking.system_metrics_interval_s == interval
    else:
        with pytest.raises(ValueError, match="tracking.system_metrics_interval_s must be 0"):
            load()
