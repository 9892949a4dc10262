"""The joint stage on a three-node Ray cluster (`ray_cluster`: a CPU-less head running the driver,
worker nodes node_a and node_b): two DDP workers, one per node (`STRICT_SPREAD`), with the
checkpoints, the token cache and the tokenizer weights on the loopback S3 server and MLflow behind
its HTTP server, the only things the nodes share (slow: `make chaos`; the refusal of paths only
one machine sees is tested without a cluster in tests/jobs/test_train_preflight.py). The same run
checks that each node that hosted a worker recorded its system metrics into the run (a sample every
second; trainer/system_metrics.py). The node-loss trial is in tests/faults/test_node_loss.py.
"""

from __future__ import annotations

import socket

import pytest
from mlflow.tracking import MlflowClient

from trainer import tracking
from trainer.driver import run_training
from pipelines import storage
from tests.training_fixtures import tiny_config
from trainer.system_metrics import METRIC_PREFIX, NODE_METRICS, NODE_TAG_PREFIX, NodeIdentity, metric_key


def on_s3(train_assets, bucket: str, endpoint: str) -> dict:
    """The session's tokenizer folder and token cache, copied to the bucket."""
    storage.copy_tree(train_assets["tokenizer"], f"{bucket}/tokenizer", endpoint)
    storage.copy_tree(train_assets["cache"], f"{bucket}/cache", endpoint)
    return {**train_assets, "tokenizer": f"{bucket}/tokenizer", "cache": f"{bucket}/cache"}


def cluster_config(assets, bucket, endpoint, tracking_uri, tmp_path, *overrides):
    return tiny_config(assets, "joint", tmp_path, f"run.storage_path={bucket}/train", f"run.endpoint_url={endpoint}",
                       f"tracking.tracking_uri={tracking_uri}", "scaling.num_workers=2", "scaling.cpus_per_worker=1",
                       "scaling.placement_strategy=STRICT_SPREAD", "run.export=false", "tracking.sample_every=0",
                       *overrides)


def logged_steps(config) -> tuple[int, list[int]]:
    client = MlflowClient(tracking_uri=config.tracking.tracking_uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{tracking.RUN_NAME_TAG}` = '{config.run.name}'")
    return len(runs), [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")] if runs else []


@pytest.mark.slow
def test_two_workers_on_two_nodes_with_s3_only(train_assets, ray_cluster, s3_bucket, s3_endpoint, mlflow_server, tmp_path):
    assets = on_s3(train_assets, s3_bucket, s3_endpoint)
    config = cluster_config(assets, s3_bucket, s3_endpoint, mlflow_server, tmp_path, "run.name=two-nodes",
                            "tracking.system_metrics_interval_s=1")
    outcome = run_training(config)
    assert outcome["final_step"] == 4 and outcome["checkpoint_path"].startswith(f"{s3_bucket.removeprefix('s3://')}/train/")
    num_runs, steps = logged_steps(config)
    assert num_runs == 1 and sorted(steps) == [1, 2, 3, 4]
    # one series per metric for each node that hosted a worker (they share an IP: Ray Train's local ranks would
    # count them as one node); none for the head, which hosts none
    run = MlflowClient(tracking_uri=config.tracking.tracking_uri).get_run(outcome["run_id"])
    nodes = {NodeIdentity(socket.gethostname(), node.node_id, "").name: node.node_id
             for node in ray_cluster.nodes.values()}
    assert {key.split("/")[1] for key in run.data.metrics if key.startswith(METRIC_PREFIX)} == set(nodes)
    for name, node_id in nodes.items():
        assert all(metric_key(name, metric) in run.data.metrics for metric in NODE_METRICS), name
        assert run.data.tags[NODE_TAG_PREFIX + name].startswith(f"ray_node_id={node_id} ")
