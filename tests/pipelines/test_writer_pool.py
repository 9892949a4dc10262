"""pipelines/writer_pool.py: which writer owns a shard, the bytes a batch carries, the route stage's split
of a block by shard (with stand-in writers that record what they are handed), and the driver's count of
routed rows that says when a shard has reached its writer whole. The writer actors themselves run in the
precompute tests (tests/pipelines/test_precompute.py, tests/pipelines/test_multinode_precompute.py)."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import numpy as np

from pipelines.writer import cache_schema
from pipelines.writer_pool import (ROUTE_BASE_MEMORY, ROUTE_BATCH_BYTES, ROUTE_BATCH_COPIES, RoutedShards, batch_nbytes,
                                   fixed_row_bytes, route_batch, route_batch_rows, route_memory, writer_index)


def test_a_shard_has_one_owner_the_same_in_every_process():
    # crc32, not Python's salted str hash: these values hold in any process, on any node
    assert [writer_index(s, 4) for s in ("shard-00000", "shard-00001", "a", "b")] == [2, 0, 3, 1]
    owners = [writer_index(f"shard-{i:05d}", 3) for i in range(300)]
    assert set(owners) == {0, 1, 2} and min(owners.count(w) for w in range(3)) > 60  # spread over the pool
    assert all(writer_index(f"shard-{i:05d}", 1) == 0 for i in range(10))


def test_batch_bytes_count_buffers_and_object_payloads():
    batch = {"tokens": np.zeros((3, 4), np.int16), "residual": np.zeros((3, 2), np.float32),
             "key": np.array(["ab", "cde", ""], dtype=object), "png": np.array([b"xyz", None, b""], dtype=object)}
    assert batch_nbytes(batch) == 3 * 4 * 2 + 3 * 2 * 4 + 5 + (3 + 8 + 0)


def rows(shard: str, indices: list[int], total: int, header: bool = False) -> dict[str, np.ndarray]:
    n = len(indices) + header
    return {"source_shard": np.array([shard] * n, dtype=object),
            "row_kind": np.array(["sample"] * len(indices) + ["shard"] * header, dtype=object),
            "sample_index": np.array(indices + [-1] * header, np.int64),
            "shard_num_samples": np.full(n, total, np.int64),
            "tokens": np.arange(n * 5, dtype=np.int16).reshape(n, 5)}


def concat(*parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


class RecordingWriter:
    """Stands in for a writer actor handle: `add.remote(parts)` records the parts and returns a ref."""

    def __init__(self, ray):
        self.parts: list[dict[str, np.ndarray]] = []
        self.add = SimpleNamespace(remote=lambda parts: (self.parts.extend(parts), ray.put(None))[1])


def test_route_sends_each_shards_rows_to_its_owner_and_reports_counts(ray_local):
    writers = [RecordingWriter(ray_local) for _ in range(4)]
    # one block mixing three shards: shard-00000 -> writer 2, shard-00001 -> writer 0, a -> writer 3
    block = concat(rows("shard-00001", [0, 1], 3), rows("shard-00000", [4], 5, header=True),
                   rows("a", [0], 1, header=True), rows("shard-00001", [2], 3))
    out = route_batch(block, writers)
    assert list(out["shard"]) == ["a", "shard-00000", "shard-00001"]
    assert list(out["rows"]) == [1, 1, 3]
    assert list(out["num_samples"]) == [1, 5, -1]  # a total only where the block held the shard's header row
    assert writers[1].parts == []
    (to_0,), (to_2,), (to_3,) = writers[0].parts, writers[2].parts, writers[3].parts
    assert set(to_0["source_shard"]) == {"shard-00001"} and list(to_0["sample_index"]) == [0, 1, 2]
    assert list(to_2["row_kind"]) == ["sample", "shard"] and list(to_3["sample_index"]) == [0, -1]
    assert np.array_equal(to_0["tokens"], np.concatenate([block["tokens"][:2], block["tokens"][-1:]]))
    assert list(out["routed_bytes"]) == [batch_nbytes(to_3), batch_nbytes(to_2), batch_nbytes(to_0)]


def test_a_shard_is_whole_once_its_rows_reach_its_header_total():
    routed = RoutedShards(num_writers=4)

    def counts(*entries):
        shards, rows_, totals = zip(*entries)
        return {"shard": np.array(shards, dtype=object), "rows": np.array(rows_), "num_samples": np.array(totals)}

    routed.add(counts(("shard-00000", 2, -1), ("shard-00001", 3, 3)))
    assert routed.take_writers() == [0]  # shard-00001: all 3 rows and its total
    assert routed.take_writers() == []  # asked once per shard
    routed.add(counts(("shard-00000", 2, 5)))  # the total arrives before the last row
    assert routed.take_writers() == []
    routed.add(counts(("shard-00000", 1, -1), ("b", 0, 0)))  # a shard without accepted rows is whole at once
    assert routed.take_writers() == [1, 2]
    assert routed.rows == {"shard-00000": 5, "shard-00001": 3, "b": 0}


def test_route_tasks_and_writer_actors_do_not_import_torch():
    # Every route and writer actor's process imports this module: torch there would cost each
    # of them seconds of start-up CPU and ~180 MB of memory for nothing (none of them runs a model).
    code = "import sys, pipelines.writer_pool; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_route_batches_are_the_encoders_within_a_byte_cap_and_ask_for_their_memory():
    # 1024px HART rows: 9,451 int16 tokens + 32x64x64 fp16 residual = 281,046 B, + width, height (int32)
    # and sample_index (int64); the strings are left out.
    wide = cache_schema(9451, (32, 64, 64), None)
    assert fixed_row_bytes(wide) == 281_046 + 4 + 4 + 8
    assert fixed_row_bytes(cache_schema(10, (16, 8, 8), (16, 384))) == 20 + 2048 + 16 + 16 * 384 * 2 + 16
    narrow = cache_schema(680, (32, 16, 16), None)  # 256px
    # The encoder's batch, unless its rows exceed the byte cap (1024px: 59 of 64 rows).
    assert (route_batch_rows(wide, 64), route_batch_rows(narrow, 64)) == (ROUTE_BATCH_BYTES // 281_062, 64)
    assert route_batch_rows(wide, 64) * fixed_row_bytes(wide) <= ROUTE_BATCH_BYTES
    assert route_memory(wide, 59, 2**27) == ROUTE_BASE_MEMORY + 2**27 + ROUTE_BATCH_COPIES * 59 * fixed_row_bytes(wide)
