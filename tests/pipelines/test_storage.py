"""`storage.check_reachable`: which paths a cluster of several nodes accepts."""

import pytest

from pipelines.storage import check_reachable


def test_one_node_accepts_every_path():
    check_reachable({"output": "runs/cache", "input": "/data/a.tar"}, num_nodes=1, shared_filesystem=False)


def test_several_nodes_accept_s3_and_declared_shared_absolute_paths():
    check_reachable({"output": "s3://bucket/cache", "tokenizer": ""}, num_nodes=3, shared_filesystem=False)
    check_reachable({"output": "/mnt/fsx/cache", "input": "file:///mnt/fsx/a.tar"}, num_nodes=3, shared_filesystem=True)


@pytest.mark.parametrize("uri", ["/data/cache", "file:///data/cache"])
def test_several_nodes_refuse_undeclared_local_paths(uri):
    with pytest.raises(ValueError, match=r"output=.* is a local path, but this Ray cluster has 2 nodes.*shared_filesystem"):
        check_reachable({"output": uri}, num_nodes=2, shared_filesystem=False)


def test_several_nodes_refuse_relative_paths_even_when_shared():
    with pytest.raises(ValueError, match="relative path"):
        check_reachable({"run.storage_path": "runs/train"}, num_nodes=2, shared_filesystem=True)
