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


def test_absolute_makes_local_paths_absolute_and_leaves_uris_alone(tmp_path, monkeypatch):
    from pipelines.storage import absolute

    monkeypatch.chdir(tmp_path)
    assert absolute("runs/cache") == f"{tmp_path}/runs/cache"
    assert absolute("runs/shapes/shard-{000..003}.tar") == f"{tmp_path}/runs/shapes/shard-{{000..003}}.tar"
    assert absolute("file://runs/x") == f"file://{tmp_path}/runs/x" and absolute("/abs/x") == "/abs/x"
    for uri in ("", "s3://bucket/prefix", "http://mlflow:5000", "sqlite:///runs/mlflow.db"):
        assert absolute(uri) == uri


def test_check_store_names_the_setting_and_the_fix(s3_endpoint, s3_strict_endpoint, s3_bucket):
    """One short request per S3 store, each failure one line: what is wrong and which setting or
    variable fixes it. Local paths are not probed."""
    import socket

    from pipelines.storage import check_exists, check_store

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    check_store("runs/anything", "", "output", "x")
    check_store(f"{s3_bucket}/cache", s3_endpoint, "output", "output_endpoint_url")
    with pytest.raises(ValueError, match=r"^output=s3://no-such/c: bucket 'no-such' does not exist at 127.0.0.1"):
        check_store("s3://no-such/c", s3_endpoint, "output", "output_endpoint_url")
    with pytest.raises(ValueError, match=rf"^output=s3://b/c: the S3 endpoint 127.0.0.1:{closed} does not answer "
                                         rf".*; check output_endpoint_url \(now http://127.0.0.1:{closed}\)"):
        check_store("s3://b/c", f"http://127.0.0.1:{closed}", "output", "output_endpoint_url")
    with pytest.raises(ValueError, match="refused access to bucket 'b' .*set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        check_store("s3://b/c", s3_strict_endpoint, "output", "output_endpoint_url")
    with pytest.raises(ValueError, match=rf"^model.init_from={s3_bucket}/llm: not found$"):
        check_exists(f"{s3_bucket}/llm", s3_endpoint, "model.init_from", "run.endpoint_url")


def test_remove_temporaries_takes_only_what_write_bytes_atomic_leaves(tmp_path, s3_bucket, s3_endpoint):
    import pyarrow.fs as pafs

    from pipelines import storage

    local = pafs.LocalFileSystem()
    storage.write_bytes_atomic(local, f"{tmp_path}/kept.json", b"{}")
    for name in (".tmp-0123abcd-kept.json", ".hidden", "tmp-not-ours"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".tmp-0123abcd-deeper").write_bytes(b"x")
    assert storage.remove_temporaries(local, str(tmp_path)) == [f"{tmp_path}/.tmp-0123abcd-kept.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "kept.json", "sub", "tmp-not-ours"]
    assert storage.remove_temporaries(local, str(tmp_path / "missing")) == []
    fs, path = storage.resolve(f"{s3_bucket}/c/.tmp-0123abcd-x", s3_endpoint)
    storage.write_bytes_atomic(fs, path, b"x")  # an object of that name on S3 is not a temporary file
    assert storage.remove_temporaries(fs, path.rsplit("/", 1)[0]) == [] and storage.exists(fs, path)
