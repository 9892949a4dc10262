"""Driver-side shard assembly and commit, without Ray: ordering, exactly-once checks, failures."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.writer import ShardAssembler, ShardWriter, cache_schema

SCHEMA = cache_schema(5, (2, 2, 2), None)


def rows(shard, indices, total, statuses=None):
    n = len(indices)
    return {
        "row_kind": np.array(["sample"] * n, dtype=object), "source_shard": np.array([shard] * n, dtype=object),
        "sample_index": np.array(indices, dtype=np.int64), "shard_num_samples": np.full(n, total),
        "key": np.array([f"k{i}" for i in indices], dtype=object),
        "status": np.array(statuses or ["ok"] * n, dtype=object), "shard_info": np.array([""] * n, dtype=object),
        "caption": np.array([f"c{i}" for i in indices], dtype=object), "metadata": np.array([""] * n, dtype=object),
        "notes": np.array([""] * n, dtype=object), "width": np.full(n, 64, np.int32), "height": np.full(n, 64, np.int32),
        "tokens": np.tile(np.arange(5, dtype=np.int16), (n, 1)) + np.array(indices, dtype=np.int16)[:, None],
        "residual": np.ones((n, 2, 2, 2), np.float16) * np.array(indices, dtype=np.float16)[:, None, None, None],
    }


def header(shard, total, error=""):
    info = {"error": error, "source_uri": f"/in/{shard}.tar", "members_ignored": {}, "unsorted_members": 0,
            "truncated": "", "bytes_read": 10, "read_seconds": 0.0}
    return {"row_kind": np.array(["shard"], dtype=object), "source_shard": np.array([shard], dtype=object),
            "sample_index": np.array([-1]), "shard_num_samples": np.array([total]), "status": np.array(["shard"], dtype=object),
            "shard_info": np.array([json.dumps(info)], dtype=object)}


def test_shard_completes_only_when_all_rows_and_header_arrived_in_any_order(tmp_path):
    assembler = ShardAssembler()
    assert assembler.add(rows("a", [2, 0], 3)) == []
    assert assembler.add(header("a", 3)) == []
    assert assembler.add(rows("a", [1], 3, ["too_small"])) == ["a"]
    info, columns, _ = assembler.take("a")
    assert list(columns["sample_index"]) == [0, 1, 2] and assembler.pending() == []
    writer = ShardWriter(str(tmp_path), "", "fp", SCHEMA, {"a": "/in/a.tar"})
    writer.submit("a", info, columns, 0.1)
    assert writer.collect(wait=True) == ["a"]
    writer.close()
    table = pq.read_table(tmp_path / "data" / "part-a.parquet")
    assert table.column("key").to_pylist() == ["k0", "k2"] and table.schema.equals(SCHEMA)
    stats = json.loads((tmp_path / "stats" / "a.stats.json").read_text())
    assert (stats["samples_in"], stats["samples_written"], stats["rejected"]) == (3, 2, {"too_small": 1})


def test_duplicate_rows_are_caught():
    assembler = ShardAssembler()
    assembler.add(header("a", 2))
    assembler.add(rows("a", [0], 2))
    assert assembler.add(rows("a", [0], 2)) == ["a"]  # 2 rows arrived, but index 0 twice
    with pytest.raises(AssertionError, match="not 0..N-1"):
        assembler.take("a")


def test_unreadable_and_unwritable_shards_are_failed_not_fatal(tmp_path):
    (tmp_path / "blocker").write_text("a file where the cache folder should be")
    writer = ShardWriter(str(tmp_path / "blocker" / "cache"), "", "fp", SCHEMA, {})
    assembler = ShardAssembler()
    assembler.add(header("bad", 0, error="ReadError: empty file"))
    writer.submit("bad", *assembler.take("bad"))
    assembler.add(header("ok", 1))
    assert assembler.add(rows("ok", [0], 1)) == ["ok"]
    writer.submit("ok", *assembler.take("ok"))
    assert writer.collect(wait=True) == []
    writer.close()
    assert writer.failed["bad"] == "ReadError: empty file"
    assert writer.failed["ok"].startswith("write failed:")
