"""pipelines/online.py without Ray: the visit plan, the row conversion and its accounting, the ledger,
and the read stage leaving out what a checkpoint consumed (whole visits, and samples of the others)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipelines.config import InputConfig
from pipelines.online import VISIT_COLUMNS, VisitLedger, plan_visits, read_visits_batch, training_rows
from pipelines.shapes import write_shapes_shards
from pipelines.writer import cache_schema

SHARDS = {f"shard-{i}": f"/data/shard-{i}.tar" for i in range(6)}


def test_every_epoch_visits_every_shard_once_in_its_own_seeded_order():
    visits = plan_visits(SHARDS, epochs=3, seed=7)
    assert len(visits) == 18
    epochs = [[v["name"] for v in visits if v["visit"].startswith(f"{e}:")] for e in range(3)]
    assert all(sorted(names) == sorted(SHARDS) for names in epochs)
    assert len({tuple(names) for names in epochs}) == 3  # three different orders
    assert visits == plan_visits(SHARDS, epochs=3, seed=7)
    assert visits != plan_visits(SHARDS, epochs=3, seed=8)
    assert all(v["uri"] == SHARDS[v["name"]] and v["visit"].endswith(":" + v["name"]) for v in visits)


def encoded_block() -> dict[str, np.ndarray]:
    """Tokenizer-stage output: visit a (5 samples: 3 ok, 2 rejected), visit b (2 samples, both rejected
    in this block), and a's header row."""
    kinds = ["sample"] * 7 + ["shard"]
    visits = ["0:a"] * 5 + ["0:b"] * 2 + ["0:a"]
    status = ["ok", "too_small", "ok", "ok", "broken_image", "too_small", "too_small", "shard"]
    n = len(kinds)
    return {
        "row_kind": np.array(kinds, object), "visit": np.array(visits, object), "status": np.array(status, object),
        "source_shard": np.array([v[2:] for v in visits], object), "sample_index": np.array([0, 1, 2, 3, 4, 0, 1, -1]),
        "shard_num_samples": np.array([5] * 5 + [9] * 2 + [5]), "key": np.array([f"k{i}" for i in range(n)], object),
        "caption": np.array(["c"] * n, object), "metadata": np.array([""] * n, object),
        "shard_info": np.array([""] * 7 + ['{"error": ""}'], object),
        "width": np.full(n, 64, np.int32), "height": np.full(n, 64, np.int32),
        "tokens": np.arange(n * 5, dtype=np.int16).reshape(n, 5),
        "residual": np.random.default_rng(0).standard_normal((n, 2, 2, 2)).astype(np.float16),
    }


def test_training_rows_are_cache_rows_of_the_accepted_samples_plus_their_accounting():
    schema = cache_schema(5, (2, 2, 2), None)
    block = encoded_block()
    table = training_rows(block, schema)
    assert table.column_names == schema.names + list(VISIT_COLUMNS)
    assert table.select(schema.names).schema.equals(schema)
    assert table.column("key").to_pylist() == ["k0", "k2", "k3"]
    assert table.column("tokens").to_pylist() == block["tokens"][[0, 2, 3]].tolist()
    residual = np.frombuffer(b"".join(table.column("residual").to_pylist()), "<f2").reshape(3, 2, 2, 2)
    np.testing.assert_array_equal(residual, block["residual"][[0, 2, 3]])
    # visit a's two rejections (samples 1 and 4) ride on its first accepted row; visit b has no row to carry its two
    assert table.column("covers").to_pylist() == [[0, 1, 4], [2], [3]]
    assert table.column("visit").to_pylist() == ["0:a"] * 3 and table.column("visit_samples").to_pylist() == [5] * 3


def batch(visits, covers, samples) -> dict:
    return {"visit": list(visits), "covers": [list(c) for c in covers], "visit_samples": list(samples), "tokens": "kept"}


def test_ledger_marks_a_visit_done_when_all_ranks_together_consumed_its_samples():
    rank0, rank1 = VisitLedger(), VisitLedger()
    first = batch(["0:a", "0:a", "0:b"], [[0, 1, 2], [3], [0]], [6, 6, 4])
    rank0.stage(first)
    assert first == {"tokens": "kept"}  # the visit columns are taken out before the model sees the batch
    rank0.stage(batch(["0:b"], [[1]], [4]))
    rank1.stage(batch(["0:a", "0:a"], [[4], [5]], [6, 6]))
    assert rank0.merge([rank0.counts(), rank1.counts()]) == []  # nothing committed: no optimizer step yet
    rank0.commit()
    rank1.commit()
    assert rank0.counts() == {"0:a": ([0, 1, 2, 3], 6), "0:b": ([0, 1], 4)} and rank0.rejected == 2
    gathered = [rank0.counts(), rank1.counts()]
    assert rank0.merge(gathered) == ["0:a"] and rank1.merge(gathered) == ["0:a"]
    assert rank0.done == rank1.done == {"0:a"} and "0:a" not in rank0.counts()
    assert rank0.state() == rank1.state() == {"done": ["0:a"], "partial": {"0:b": [0, 1]}}
    rank1.stage(batch(["0:a", "0:b"], [[2], [1]], [6, 4]))  # a row of a visit done, one already consumed
    rank1.commit()
    assert rank1.replayed == 2
    restored = VisitLedger.from_state(rank0.state())  # what a checkpoint carries
    assert restored.done == {"0:a"} and restored.counts() == {"0:b": ([0, 1], 0)}
    restored.stage(batch(["0:b", "0:b"], [[2], [3]], [4, 4]))
    restored.commit()
    assert restored.merge([restored.counts()]) == ["0:b"] and restored.replayed == 0


def test_read_stage_skips_the_visits_the_checkpoint_consumed(tmp_path):
    uris = write_shapes_shards(str(tmp_path), num_samples=12, num_shards=3)
    shards = {f"shard-{i:05d}": uri for i, uri in enumerate(uris)}
    visits = plan_visits(shards, epochs=2, seed=0)
    items = pa.Table.from_pylist(visits)
    done = {visits[0]["visit"], visits[4]["visit"]}
    partial = {visits[1]["visit"]: [0, 2]}  # two samples of this visit were consumed
    tables = list(read_visits_batch(items, InputConfig(), progress=lambda: {"done": sorted(done), "partial": partial}))
    read = {v for t in tables for v in t.column("visit").to_pylist()}
    assert read == {v["visit"] for v in visits} - done
    samples = [(v, i) for t in tables for v, i, kind in zip(t.column("visit").to_pylist(), t.column("sample_index").to_pylist(),
                                                           t.column("row_kind").to_pylist()) if kind == "sample"]
    assert len(samples) == 4 * 4 - 2  # four visits of 4 samples each, less the two consumed, plus their header rows
    assert sorted(i for v, i in samples if v == visits[1]["visit"]) == [1, 3]
    assert sum(t.column("row_kind").to_pylist().count("shard") for t in tables) == 4
