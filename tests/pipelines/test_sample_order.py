"""The training stream's order (pipelines/sample_order.py) and its reader (pipelines/cache_stream.py):
each pass is a permutation of the cache, the same for every world size, and a stream started at any
position continues the uninterrupted one exactly; on local files and on S3."""

from __future__ import annotations

import pytest

from pipelines.cache import read_manifest
from pipelines.cache_stream import CacheStream
from pipelines.sample_order import BLOCK_ROWS, SampleOrder, StreamPosition, cache_blocks, rank_slice
from tests.training_fixtures import write_tiny_cache


def keys_of(root: str, seed: int, global_batch: int, world_size: int, batches: int, first_position: int = 0) -> list[list[str]]:
    """Per global batch, the keys of every rank's slice concatenated in rank order."""
    order = SampleOrder(cache_blocks(root, read_manifest(root)), seed)
    streams = [CacheStream(order, ["key"], global_batch, rank, world_size, first_position=first_position)
               for rank in range(world_size)]
    iterators = [iter(stream) for stream in streams]
    out = []
    for _ in range(batches):
        out.append([key for iterator in iterators for key in next(iterator).column("key").to_pylist()])
    for stream in streams:
        stream.close()
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("order") / "cache")
    # 3 files, one of them 3 blocks long (1024 + 1024 + 452 rows): 2,540 rows in 5 blocks
    written = write_tiny_cache(root, {"a": 2 * BLOCK_ROWS + 452, "b": 24, "c": 40})
    return root, [k for shard in written.values() for k in shard["key"]]


def test_each_pass_is_a_permutation_in_blocks_and_passes_differ(cache):
    root, keys = cache
    order = SampleOrder(cache_blocks(root, read_manifest(root)), seed=3)
    assert [b.num_rows for b in order.blocks] == [BLOCK_ROWS, BLOCK_ROWS, 452, 24, 40]
    n = order.num_rows
    first, second = order.rows(0, n), order.rows(n, 2 * n)
    assert len(set(first)) == len(set(second)) == n == len(keys)
    assert first != second and set(first) == set(second)
    # a block's rows are consecutive in a pass (one read per block), shuffled inside it
    runs = [first[0][0]] + [b for (b, _), (prev, _) in zip(first[1:], first) if b != prev]
    assert sorted(runs) == list(range(5))
    assert [r for b, r in first if b == 0] != list(range(BLOCK_ROWS))
    assert order.rows(0, n) == SampleOrder(order.blocks, seed=3).rows(0, n)  # a function of (cache, seed, pass)
    assert order.rows(0, n) != SampleOrder(order.blocks, seed=4).rows(0, n)
    position = StreamPosition(samples=n + 5, num_rows=n)
    assert (position.epoch, position.in_epoch) == (1, 5)


def test_global_batches_are_the_same_rows_at_every_world_size_and_straddle_passes(cache):
    root, keys = cache
    global_batch, batches = 96, 30  # 30 x 96 = 2,880 rows: the stream crosses into pass 1
    one = keys_of(root, 0, global_batch, 1, batches)
    assert keys_of(root, 0, global_batch, 2, batches) == one
    assert keys_of(root, 0, global_batch, 4, batches) == one
    assert keys_of(root, 0, global_batch, 5, batches) == one  # slices of 19 and 20 rows
    stream = [k for batch in one for k in batch]
    assert sorted(stream[:len(keys)]) == sorted(keys)  # pass 0: every key once
    assert len(set(stream[len(keys):])) == len(stream) - len(keys)  # pass 1 started, no key twice in it


def test_a_stream_started_at_a_position_continues_the_uninterrupted_one(cache):
    root, _ = cache
    whole = keys_of(root, 1, 64, 1, 50)
    # restored after 37 batches at another world size: the same batches follow
    assert keys_of(root, 1, 64, 2, 13, first_position=37 * 64) == whole[37:]
    assert [rank_slice(1, 64, r, 3) for r in range(3)] == [(64, 85), (85, 106), (106, 128)]
    with pytest.raises(ValueError, match="rank 3 of 3"):
        rank_slice(0, 64, 3, 3)


def test_the_stream_reads_a_cache_on_s3(s3_env, s3_endpoint):
    root = f"{s3_env}/cache"
    written = write_tiny_cache(root, {"a": 30, "b": 20})
    order = SampleOrder(cache_blocks(root, read_manifest(root, s3_endpoint), s3_endpoint), 0)
    stream = CacheStream(order, ["key", "tokens"], 25, 0, 1, endpoint_url=s3_endpoint)
    batches = iter(stream)
    seen = [k for _ in range(2) for k in next(batches).column("key").to_pylist()]
    stream.close()
    assert sorted(seen) == sorted(k for shard in written.values() for k in shard["key"])
