"""Precompute on a three-node Ray cluster (`ray_cluster`: a CPU-less head running the driver, two
2-CPU worker nodes), with the loopback S3 server as the only storage the nodes share.

Checked: every sample is committed exactly once; the shard files are written by writer actors on
the worker nodes, and the driver receives counts and commit records only (a few hundred bytes
per shard, while the encoded rows are routed between workers); local paths, which a remote
process could not see, are refused before anything starts. The node-loss trial is in
tests/faults/test_node_loss.py (`make chaos`).
"""

from __future__ import annotations

import json

import pytest

from pipelines import shapes
from pipelines.config import load_precompute_config
from pipelines.plan import run_precompute
from tests.faults.accounting import assert_exactly_once, visible_junk

NUM_SHARDS, NUM_SAMPLES = 6, 48


def cluster_config(uris, endpoint, output, **overrides):
    items = [f"input.shards={json.dumps(uris)}", f"input.endpoint_url='{endpoint}'", f"output={output}",
             "progress=false", "compute.tokenizer_actors=2", "compute.writer_actors=2",
             "compute.tokenizer_batch_size=8", "compute.decode_batch_size=8"]
    return load_precompute_config(None, items + [f"{k}={v}" for k, v in overrides.items()])


def test_workers_write_every_sample_once_and_the_driver_sees_only_records(ray_cluster, s3_bucket, s3_endpoint):
    uris = shapes.write_shapes_shards(f"{s3_bucket}/raw", NUM_SAMPLES, NUM_SHARDS, seed=4, endpoint_url=s3_endpoint)
    cache = f"{s3_bucket}/cache"
    summary = run_precompute(cluster_config(uris, s3_endpoint, cache), log=lambda *a: None)
    assert (summary.shards_done, summary.samples_written) == (NUM_SHARDS, NUM_SAMPLES) and not summary.shards_failed
    assert_exactly_once(cache, uris, s3_endpoint)
    assert not visible_junk(cache, s3_endpoint)
    # Writers ran on the worker nodes (the head has no CPUs), each shard committed by one of them.
    writer_nodes = {ray_cluster.node_name(node): n for node, n in summary.writer_nodes.items()}
    assert set(writer_nodes) <= {"node_a", "node_b"} and sum(writer_nodes.values()) == NUM_SHARDS
    # The encoded rows went worker -> writer; the driver got O(shards) bytes of counts and records.
    per_shard = summary.driver_bytes / NUM_SHARDS
    assert summary.routed_bytes > 5 * summary.driver_bytes and per_shard < 3000, (summary.routed_bytes, summary.driver_bytes)


def test_paths_a_remote_process_cannot_see_are_refused(ray_cluster, s3_bucket, s3_endpoint, tmp_path):
    uris = [f"{s3_bucket}/raw/shard-00000.tar"]
    with pytest.raises(ValueError, match="local path, but this Ray cluster has 3 nodes"):
        run_precompute(cluster_config(uris, s3_endpoint, str(tmp_path / "cache")))
    with pytest.raises(ValueError, match="relative path"):
        run_precompute(cluster_config(uris, s3_endpoint, "runs/cache", shared_filesystem="true"))
    local = shapes.write_shapes_shards(str(tmp_path / "raw"), 2, 1)
    with pytest.raises(ValueError, match="input shard shard-00000"):
        run_precompute(cluster_config(local, "", f"{s3_bucket}/cache-local-input", output_endpoint_url=s3_endpoint))
    assert not (tmp_path / "cache").exists()
