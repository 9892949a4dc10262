"""The order in which training reads a token cache: a pure function of (cache contents, seed, pass).

Design (the order first, the placement on ranks second, as MosaicML Streaming does it):
- The committed files, sorted by name, are cut into *blocks* of `BLOCK_ROWS` consecutive rows:
  the row groups the shard writer makes (`pipelines.writer.ROW_GROUP_ROWS`), so a block is one
  Parquet read.
- Pass p visits every block once, in a permutation seeded by (seed, p), and the rows of each block
  in a permutation seeded by (seed, p, block). A batch therefore mixes a few random blocks of
  random source shards; a global row shuffle would make every batch touch every file.
- The *stream* is pass 0, pass 1, ... back to back, and a sample's place in it is one integer: the
  position. Global batch b is positions [b G, (b + 1) G) for the global batch size G; a batch may
  straddle two passes, so no row is dropped at the end of a pass. Rank r of w takes the contiguous
  slice [b G + floor(r G / w), b G + floor((r + 1) G / w)): the global batch is the same rows
  whatever w is (when w does not divide G, slices differ by one row; the trainer weights them).
- A run's position in its stream is the samples it has consumed (`StreamPosition`); a checkpoint
  records it with the cache's `digest`, and a run restored at any world size continues there.

Nothing here depends on Ray, the world size or timing; `pipelines.cache_stream` reads the rows.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.writer import ROW_GROUP_ROWS

BLOCK_ROWS = ROW_GROUP_ROWS


@dataclass(frozen=True)
class Block:
    file: str  # full path or URI of a committed Parquet file
    start: int  # first row of the block in its file
    num_rows: int


@dataclass(frozen=True)
class StreamPosition:
    """Where a run is in its stream: `samples` consumed since the start of pass 0."""

    samples: int
    num_rows: int  # rows of one pass (the cache's)

    @property
    def epoch(self) -> int:
        return self.samples // self.num_rows

    @property
    def in_epoch(self) -> int:
        return self.samples % self.num_rows


class SampleOrder:
    """Every pass's order over the cache's blocks and rows; `rows(start, stop)` maps stream
    positions to (block index, row in block) pairs."""

    def __init__(self, blocks: list[Block], seed: int):
        if not blocks or not sum(b.num_rows for b in blocks):
            raise ValueError("the cache has no rows to train on")
        self.blocks, self.seed = list(blocks), int(seed)
        self.num_rows = sum(b.num_rows for b in blocks)
        self._passes: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def digest(self) -> str:
        """What the order depends on besides seed and pass: the blocks. A checkpoint's position is
        valid only for a cache with the same digest."""
        listed = "\n".join(f"{b.file.rsplit('/', 1)[-1]}:{b.start}:{b.num_rows}" for b in self.blocks)
        return hashlib.sha256(listed.encode()).hexdigest()

    def _pass(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(block index, row in block) of every position of pass `epoch`, as two arrays of num_rows."""
        if epoch not in self._passes:
            if len(self._passes) > 2:  # a reader needs at most the pass it is in and the next
                self._passes.pop(min(self._passes))
            order = list(range(len(self.blocks)))
            random.Random(f"{self.seed}:{epoch}").shuffle(order)  # str seeds hash the same in every process
            block_ids, rows = [], []
            for index in order:
                rng = np.random.default_rng([self.seed, epoch, index])
                block_ids.append(np.full(self.blocks[index].num_rows, index, np.int64))
                rows.append(rng.permutation(self.blocks[index].num_rows))
            self._passes[epoch] = (np.concatenate(block_ids), np.concatenate(rows))
        return self._passes[epoch]

    def rows(self, start: int, stop: int) -> list[tuple[int, int]]:
        """(block index, row in block) of stream positions [start, stop), in position order."""
        out: list[tuple[int, int]] = []
        position = start
        while position < stop:
            epoch, offset = divmod(position, self.num_rows)
            take = min(stop - position, self.num_rows - offset)
            block_ids, rows = self._pass(epoch)
            out += zip(block_ids[offset:offset + take].tolist(), rows[offset:offset + take].tolist())
            position += take
        return out


def rank_slice(batch: int, global_batch: int, rank: int, world_size: int) -> tuple[int, int]:
    """Stream positions [start, stop) of rank `rank`'s part of global batch `batch`."""
    if not 0 <= rank < world_size <= global_batch:
        raise ValueError(f"rank {rank} of {world_size}: needs 0 <= rank < world size <= the global batch {global_batch}")
    first = batch * global_batch
    return first + rank * global_batch // world_size, first + (rank + 1) * global_batch // world_size


def cache_blocks(uri: str, manifest: dict[str, Any], endpoint_url: str = "") -> list[Block]:
    """The blocks of a cache's committed files, from the index's row counts (no file is opened)."""
    from pipelines.cache import committed_files

    files = committed_files(uri, manifest)
    counts = [int(entry["num_rows"]) for entry in manifest["committed_shards"]]
    blocks = []
    for path, count in sorted(zip(files, counts)):
        blocks += [Block(path, start, min(BLOCK_ROWS, count - start)) for start in range(0, count, BLOCK_ROWS)]
    return blocks


__all__ = ["BLOCK_ROWS", "Block", "SampleOrder", "StreamPosition", "cache_blocks", "rank_slice"]
