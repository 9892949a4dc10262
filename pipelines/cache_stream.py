"""One training rank's reader of a token cache, in the run's deterministic order, from any position.

Design: Ray Data's `streaming_split` hands each finished block to whichever rank has taken the
fewest rows, so which rank trains on which row depends on timing and on the world size, and Ray
2.60's open-source iterator has no saved state or offset to resume from. Training reads the cache
here instead: each rank computes its slice of every global batch from `pipelines.sample_order`
(a pure function of the cache, the seed and the pass), reads the row groups that slice touches
straight from the Parquet files (local or S3, through `pipelines.storage`), and starts at the
position its checkpoint recorded. No coordinator, no data shuffled between processes.

A background thread reads ahead `prefetch` global batches (and collates them: `transform`), so the
training loop waits only when reading falls behind; the few most recent blocks stay in
memory, since consecutive batches of a rank mostly fall in the same block. Each rank reads every
block its slices touch: with slices smaller than a block, the ranks together read a block once
each, so reads grow with the world size while the bytes trained on do not (a rank's slice per
batch is about G / w rows of a 1024-row block). A read error is raised in the training loop, where Ray
Train's failure handling restores the last checkpoint.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.sample_order import Block, SampleOrder, rank_slice

_DONE = object()


class CacheStream:
    """The rank's part of the global batches that start at stream position `first_position`, one
    pyarrow table per batch (rows in stream order), endless; iterate it once, `close()` to stop the
    reader thread. `transform(table)`, when given, runs on the reader thread too (the trainer's
    collate), and the stream yields what it returns."""

    def __init__(self, order: SampleOrder, columns: list[str], global_batch: int, rank: int, world_size: int,
                 first_position: int = 0, endpoint_url: str = "", prefetch: int = 4, cached_blocks: int = 8,
                 transform: Callable[[pa.Table], Any] | None = None):
        rank_slice(0, global_batch, rank, world_size)  # ValueError now for a rank outside the world
        self.order, self.columns, self.endpoint_url = order, list(columns), endpoint_url
        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size
        self.first_position, self.next_batch = first_position, 0
        self.cached_blocks, self.transform = cached_blocks, transform
        self._blocks: OrderedDict[int, pa.Table] = OrderedDict()
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read_ahead, name="cache-stream", daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:  # unblock a put on a full queue
                self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)

    def batch_table(self, batch: int) -> pa.Table:
        """The rank's rows of global batch `batch` (counted from `first_position`), in stream order."""
        start, stop = rank_slice(batch, self.global_batch, self.rank, self.world_size)
        pairs = self.order.rows(self.first_position + start, self.first_position + stop)
        tables = []
        for block_index, row in pairs:  # runs of the same block are read as one take
            if tables and tables[-1][0] == block_index:
                tables[-1][1].append(row)
            else:
                tables.append((block_index, [row]))
        return pa.concat_tables([self._block(index).take(pa.array(rows)) for index, rows in tables])

    def _block(self, index: int) -> pa.Table:
        if index in self._blocks:
            self._blocks.move_to_end(index)
            return self._blocks[index]
        table = read_block(self.order.blocks[index], self.columns, self.endpoint_url)
        self._blocks[index] = table
        if len(self._blocks) > self.cached_blocks:
            self._blocks.popitem(last=False)
        return table

    def _read_ahead(self) -> None:
        try:
            while not self._stop.is_set():
                table = self.batch_table(self.next_batch)
                self.next_batch += 1
                item = self.transform(table) if self.transform is not None else table
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # handed to the training loop, which raises it
            self._queue.put(exc)


def read_block(block: Block, columns: list[str], endpoint_url: str = "") -> pa.Table:
    """Rows [start, start + num_rows) of a cache file: the row groups that hold them, sliced."""
    fs, path = storage.resolve(block.file, endpoint_url)
    with fs.open_input_file(path) as handle:
        parquet = pq.ParquetFile(handle)
        groups, first, row = [], None, 0
        for index in range(parquet.metadata.num_row_groups):
            size = parquet.metadata.row_group(index).num_rows
            if row + size > block.start and row < block.start + block.num_rows:
                groups.append(index)
                first = row if first is None else first
            row += size
        if row < block.start + block.num_rows:
            raise ValueError(f"cache file {block.file} has {row} rows; the cache index lists at least "
                             f"{block.start + block.num_rows}")
        table = parquet.read_row_groups(groups, columns=columns)
    return table.slice(block.start - first, block.num_rows)


__all__ = ["CacheStream", "read_block"]
