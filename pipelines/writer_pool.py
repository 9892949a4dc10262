"""Shard writers on the workers: cache bytes go from the encoders to storage without the driver.

Design: the last stage of the precompute plan is `route_batch` (in `RouteStage` actors), which splits
each encoded block by source shard and hands every part to the writer actor that owns the shard
(`writer_index`: a stable hash of the shard name modulo the pool size, so all rows of a shard,
and its header row, meet in one actor). Each `ShardWriterActor` runs the same assembler and
commit code as a single writer would (`pipelines.writer`): a shard is written once it is
complete, parquet first, stats marker last. The route stage waits for the actor to accept its
parts, so a writer that falls behind slows the stage in front of it (Ray Data's backpressure)
instead of buffering without bound; an actor accepts a part only while it has fewer than
`max_pending` writes in flight.

What the driver receives: from the route stage, one small row per (block, shard) with counts;
from the actors, the commit records (the shard's stats dict) and failures, asked for when a
shard's last row has been routed (`RoutedShards`) and at the end. Both are O(shards), not O(bytes)
and not O(time): `driver_bytes` and `routed_bytes` in `PrecomputeSummary` measure the two sides
in one run.

Failure model: a writer actor is restarted by Ray when its process or node dies
(`max_restarts=-1`, calls retried), but the rows it had buffered for incomplete shards are gone:
those shards end the run as "incomplete" failures, and the rerun writes them (their names are
deterministic, their stats markers absent). A shard committed by an actor that died before the
driver polled it is found by the final listing of stats markers, which stays the source of truth.
"""

from __future__ import annotations

import pickle
import zlib
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from pipelines.writer import InjectedCrash, ShardAssembler, ShardWriter


# CPUs a route actor reserves: it only slices numpy arrays and waits for its writer, but a non-zero
# amount keeps it off nodes that declare no CPUs (a Ray head node started with num_cpus=0).
ROUTE_CPUS = 0.01
# Memory a route actor's process uses before it holds any rows (unique set size: numpy, pyarrow and
# Ray Data's worker-side modules; nothing this module imports needs torch): ~110 MiB measured in
# a route actor, plus headroom. `route_memory` adds the rows it holds.
ROUTE_BASE_MEMORY = 192 * 2**20
# Most bytes of rows a route actor handles at once. Its input blocks hold up to Ray Data's target
# block size (128 MiB by default: a whole 1024px shard), and it holds one of them whole (Ray Data
# joins a block's chunks into one copy before it cuts batches); in batches, the slices and their
# way to the writer add a few batches, not a few whole blocks (59 rows at 1024px).
ROUTE_BATCH_BYTES = 16 * 2**20
# Copies of a batch a route actor holds at its peak beside the block (the per-shard slices, their
# serialized form on the way to the writer, what the allocator keeps from the batch before): ~2.3
# measured at 1024px rows; Ray Data wants a request of 1.25x the peak.
ROUTE_BATCH_COPIES = 4


def fixed_row_bytes(schema: pa.Schema) -> int:
    """Bytes of a cache row's fixed-width columns (tokens, residual, text features, numbers); the
    strings (key, caption, metadata) are small next to them and left out."""
    total = 0
    for column in schema:
        kind = column.type
        if pa.types.is_fixed_size_list(kind):
            total += kind.list_size * max(1, kind.value_type.bit_width // 8)
        elif pa.types.is_fixed_size_binary(kind):
            total += kind.byte_width
        elif pa.types.is_integer(kind) or pa.types.is_floating(kind):
            total += kind.bit_width // 8
    return total


def route_batch_rows(schema: pa.Schema, encoder_rows: int) -> int:
    """Rows per route batch (Ray Data's `batch_size=`): the last encoder stage's batch (`encoder_rows`;
    a larger batch would make Ray Data wait for several blocks before routing any), at most
    `ROUTE_BATCH_BYTES` of cache rows."""
    return max(1, min(encoder_rows, ROUTE_BATCH_BYTES // max(1, fixed_row_bytes(schema))))


def route_memory(schema: pa.Schema, batch_rows: int, block_bytes: int) -> int:
    """Memory a route actor asks for (Ray's `memory=`): its base, one input block of up to
    `block_bytes` (the dataset's target block size) and a few copies of a batch of `batch_rows`, so
    the request covers what it uses at every row size (Ray Data warns about a stage whose memory
    use exceeds its request)."""
    return ROUTE_BASE_MEMORY + block_bytes + ROUTE_BATCH_COPIES * batch_rows * fixed_row_bytes(schema)


def writer_index(shard: str, num_writers: int) -> int:
    """The writer that owns `shard`: stable across processes (Python's str hash is salted)."""
    return zlib.crc32(shard.encode()) % num_writers


def batch_nbytes(batch: dict[str, np.ndarray]) -> int:
    """Bytes a numpy batch carries: array buffers, plus the payload of object (str/bytes) columns."""
    total = 0
    for column in batch.values():
        if column.dtype == object:
            total += sum(len(v) if isinstance(v, (str, bytes)) else 8 for v in column)
        else:
            total += column.nbytes
    return total


class ShardWriterActor:
    """Assembles and commits the shards routed to it (one `ShardAssembler` + one `ShardWriter`)."""

    def __init__(self, output: str, endpoint_url: str, fingerprint_hash: str, schema, shard_uris: dict[str, str],
                 num_threads: int, max_pending: int, crash_after_commits: int = -1, pause_after_commits: int = -1):
        self.assembler = ShardAssembler()
        self.writer = ShardWriter(output, endpoint_url, fingerprint_hash, schema, shard_uris, num_threads,
                                  crash_after_commits, pause_after_commits)
        self.max_pending = max_pending
        self.outbox: list[dict[str, Any]] = []
        self.failed_sent: set[str] = set()
        self.crashed = ""
        self.node_id = ray.get_runtime_context().get_node_id()

    def add(self, parts: list[dict[str, np.ndarray]]) -> None:
        """Accept parts of shards this actor owns; returns once they are buffered (backpressure point)."""
        if self.crashed:
            return  # the test hook's "killed" writer: it writes nothing more
        for part in parts:
            for shard in self.assembler.add(part):
                self.writer.submit(shard, *self.assembler.take(shard))
        while len(self.writer.futures) >= self.max_pending and not self.crashed:
            self._collect(wait_for_one=True)
        self._collect()

    def poll(self) -> dict[str, Any]:
        """Commits and failures since the last poll; `crashed` set once the test hook fired."""
        self._collect()
        return self._drain()

    def finish(self) -> dict[str, Any]:
        """Wait for every write; shards still buffered are reported as `incomplete`."""
        if not self.crashed:
            self._collect(wait_all=True)
        self.writer.close()
        result = self._drain()
        result["incomplete"] = self.assembler.pending()
        return result

    def _collect(self, wait_for_one: bool = False, wait_all: bool = False) -> None:
        if wait_for_one and self.writer.futures:
            self.writer.futures[0][1].exception()  # block until the oldest write is done
        try:
            for shard in self.writer.collect(wait=wait_all):
                self.outbox.append(self.writer.committed[shard])
        except InjectedCrash as crash:
            self.crashed = str(crash)

    def _drain(self) -> dict[str, Any]:
        failed = {s: e for s, e in self.writer.failed.items() if s not in self.failed_sent}
        self.failed_sent |= set(failed)
        committed, self.outbox = self.outbox, []
        return {"committed": committed, "failed": failed, "crashed": self.crashed, "node_id": self.node_id}


def route_batch(batch: dict[str, np.ndarray], writers: list) -> dict[str, np.ndarray]:
    """Ray Data stage: send each shard's rows to its writer; emit one small row per shard seen."""
    shards = batch["source_shard"]
    names = [str(s) for s in np.unique(shards)]
    by_writer: dict[int, list[dict[str, np.ndarray]]] = {}
    rows, totals, nbytes = [], [], []
    for shard in names:
        index = np.flatnonzero(shards == shard)
        part = {name: column[index] for name, column in batch.items()}
        by_writer.setdefault(writer_index(shard, len(writers)), []).append(part)
        is_sample = part["row_kind"] == "sample"
        rows.append(int(is_sample.sum()))
        totals.append(int(part["shard_num_samples"][~is_sample][0]) if (~is_sample).any() else -1)
        nbytes.append(batch_nbytes(part))
    ray.get([writers[i].add.remote(parts) for i, parts in by_writer.items()])
    return {"shard": np.array(names, dtype=object), "rows": np.array(rows, np.int64),
            "num_samples": np.array(totals, np.int64), "routed_bytes": np.array(nbytes, np.int64)}


class RouteStage:
    """Ray Data actor stage around `route_batch`, one actor per writer. Actors rather than tasks so
    a route runs in a process of its own: task workers are shared with the read and decode stages
    and keep what those allocated, so a task's memory could not match its request (`route_memory`)."""

    def __init__(self, writers: list):
        self.writers = writers

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return route_batch(batch, self.writers)


class RoutedShards:
    """The driver's count of rows routed per shard (from the route stage's small rows): says which
    shards have reached their writer whole, so the driver asks only those writers, once per shard,
    for commit records: the driver's traffic grows with the shard count, not with run time."""

    def __init__(self, num_writers: int):
        self.num_writers = num_writers
        self.rows: dict[str, int] = {}
        self.totals: dict[str, int] = {}
        self.ready: set[str] = set()

    def add(self, batch: dict[str, np.ndarray]) -> None:
        for shard, rows, total in zip(batch["shard"], batch["rows"], batch["num_samples"]):
            self.rows[shard] = self.rows.get(shard, 0) + int(rows)
            if total >= 0:
                self.totals[shard] = int(total)
            if self.rows[shard] == self.totals.get(shard, -1):
                self.ready.add(str(shard))

    def take_writers(self) -> list[int]:
        """Writers owning shards that became whole since the last call."""
        writers = sorted({writer_index(shard, self.num_writers) for shard in self.ready})
        self.ready = set()
        return writers


class WriterPool:
    """The driver's handle on the writer actors: start, poll, finish."""

    def __init__(self, size: int, num_cpus: float, resources: dict[str, float], **actor_kwargs):
        remote = ray.remote(ShardWriterActor).options(
            num_cpus=num_cpus, resources=resources or None, max_restarts=-1, max_task_retries=-1,
            scheduling_strategy="SPREAD")
        self.actors = [remote.remote(**actor_kwargs) for _ in range(size)]
        self.received_bytes = 0  # pickled size of every poll/finish answer the driver got

    def _gather(self, method: str, indices: list[int] | None = None) -> dict[str, Any]:
        actors = self.actors if indices is None else [self.actors[i] for i in indices]
        answers = ray.get([getattr(actor, method).remote() for actor in actors])
        self.received_bytes += sum(len(pickle.dumps(a)) for a in answers)
        merged: dict[str, Any] = {"committed": [], "failed": {}, "crashed": "", "incomplete": [], "writer_node": {}}
        for answer in answers:
            merged["committed"] += answer["committed"]
            merged["writer_node"].update({stats["shard"]: answer["node_id"] for stats in answer["committed"]})
            merged["failed"].update(answer["failed"])
            merged["crashed"] = merged["crashed"] or answer["crashed"]
            merged["incomplete"] += answer.get("incomplete", [])
        if merged["crashed"]:
            raise InjectedCrash(merged["crashed"])
        return merged

    def poll(self, indices: list[int]) -> dict[str, Any]:
        """Commit records of the writers `indices` (all shards' records come back at `finish`)."""
        return self._gather("poll", indices)

    def finish(self) -> dict[str, Any]:
        return self._gather("finish")

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
