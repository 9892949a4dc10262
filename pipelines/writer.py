"""Driver-side writer: assembles whole shards from the stream and commits each exactly once.

Design (why one writer on the driver): exactly-once per shard is simplest when one party sees
all rows of a shard before writing any of it. The read stage tags every row with its shard, its
index and the shard's sample count, and adds one header row per shard; this module buffers rows
per shard while the driver iterates `Dataset.iter_batches`, and when a shard is complete (header
seen, every index 0..N-1 present once) hands it to a small thread pool that
  1. writes `data/part-<shard>.parquet` (temp file + rename locally, one PUT on S3), then
  2. writes `stats/<shard>.stats.json` last: the commit marker.
A crash before step 2 leaves the shard uncommitted, and the rerun rewrites the same file name,
so there is never a duplicate or a missing sample, and a reader that trusts the commit markers never
sees a partial shard. Pixels never reach the driver (the tokenizer stage drops them), so the
driver only carries the cache bytes themselves (about 18 KB per 256px sample); at very large
scale the same assembler can run in several writer actors, routing shards by name.

Shape legend: B rows, L tokens, z/h/w residual shape, T/D text feature shape.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import manifest as manifest_lib
from pipelines import storage

# Rows per Parquet row group of a cache file: one read of the training stream (pipelines.sample_order).
ROW_GROUP_ROWS = 1024


class InjectedCrash(RuntimeError):
    """Raised by the `crash_after_commits` test hook."""


# How long the `pause_after_commits` test hook holds a write: longer than a kill trial needs to see the
# held commits and kill the job, and bounded, so a job nobody kills still finishes.
PAUSE_HOOK_SECONDS = 300.0


@dataclass
class _ShardBuffer:
    parts: list[dict[str, np.ndarray]] = field(default_factory=list)
    num_sample_rows: int = 0
    header: dict[str, Any] | None = None
    first_seen: float = field(default_factory=time.perf_counter)


class ShardAssembler:
    """Buffers numpy batches per shard and says when a shard has all its rows."""

    def __init__(self) -> None:
        self.buffers: dict[str, _ShardBuffer] = defaultdict(_ShardBuffer)

    def add(self, batch: dict[str, np.ndarray]) -> list[str]:
        """Add one batch; return the shards it completed."""
        shards = batch["source_shard"]
        completed = []
        for shard in np.unique(shards):
            rows = np.flatnonzero(shards == shard)
            buffer = self.buffers[shard]
            kinds = batch["row_kind"][rows]
            header_rows = rows[kinds == "shard"]
            sample_rows = rows[kinds == "sample"]
            if len(header_rows):
                assert buffer.header is None and len(header_rows) == 1, f"shard {shard}: header row seen twice"
                i = header_rows[0]
                buffer.header = {"num_samples": int(batch["shard_num_samples"][i]), "status": str(batch["status"][i]),
                                 **json.loads(batch["shard_info"][i])}
            if len(sample_rows):
                buffer.parts.append({name: column[sample_rows] for name, column in batch.items()})
                buffer.num_sample_rows += len(sample_rows)
            if buffer.header is not None and buffer.num_sample_rows == buffer.header["num_samples"]:
                completed.append(str(shard))
            assert buffer.header is None or buffer.num_sample_rows <= buffer.header["num_samples"], f"shard {shard}: too many rows"
        return completed

    def take(self, shard: str) -> tuple[dict[str, Any], dict[str, np.ndarray] | None, float]:
        """Remove a complete shard: (header, rows sorted by sample_index or None, seconds since first row)."""
        buffer = self.buffers.pop(shard)
        assert buffer.header is not None
        if not buffer.parts:
            return buffer.header, None, time.perf_counter() - buffer.first_seen
        columns = {name: np.concatenate([part[name] for part in buffer.parts]) for name in buffer.parts[0]}
        order = np.argsort(columns["sample_index"], kind="stable")
        columns = {name: column[order] for name, column in columns.items()}
        indices = columns["sample_index"]
        # Exactly-once invariant: indices are exactly 0..N-1, each once.
        assert np.array_equal(indices, np.arange(buffer.header["num_samples"])), f"shard {shard}: sample indices are not 0..N-1"
        return buffer.header, columns, time.perf_counter() - buffer.first_seen

    def pending(self) -> list[str]:
        return sorted(self.buffers)


def cache_schema(num_tokens: int, residual_shape: tuple[int, ...] | None, text_shape: tuple[int, int] | None) -> pa.Schema:
    """Physical Arrow/Parquet types of the cache (readable by pyarrow, pandas and duckdb); no residual
    column when `residual_shape` is None (token-only caches)."""
    fields = [
        ("key", pa.string()), ("caption", pa.string()),
        ("tokens", pa.list_(pa.int16(), num_tokens)),
    ]
    if residual_shape is not None:
        fields.append(("residual", pa.binary(int(np.prod(residual_shape)) * 2)))
    fields += [
        ("width", pa.int32()), ("height", pa.int32()),
        ("source_shard", pa.string()), ("sample_index", pa.int64()), ("metadata", pa.string()),
    ]
    if text_shape is not None:
        fields += [("text_features", pa.binary(text_shape[0] * text_shape[1] * 2)),
                   ("text_mask", pa.list_(pa.bool_(), text_shape[0]))]
    return pa.schema(fields)


def rows_to_table(columns: dict[str, np.ndarray], accepted: np.ndarray, schema: pa.Schema) -> pa.Table:
    """Accepted rows -> the cache's Arrow table (physical types documented in the manifest)."""
    tokens_BL = np.ascontiguousarray(columns["tokens"][accepted], dtype=np.int16)
    num_rows, num_tokens = tokens_BL.shape
    arrays = {
        "key": pa.array(columns["key"][accepted].tolist(), pa.string()),
        "caption": pa.array(columns["caption"][accepted].tolist(), pa.string()),
        "tokens": pa.FixedSizeListArray.from_arrays(pa.array(tokens_BL.reshape(-1), pa.int16()), num_tokens),
        "width": pa.array(columns["width"][accepted], pa.int32()),
        "height": pa.array(columns["height"][accepted], pa.int32()),
        "source_shard": pa.array(columns["source_shard"][accepted].tolist(), pa.string()),
        "sample_index": pa.array(columns["sample_index"][accepted], pa.int64()),
        "metadata": pa.array(columns["metadata"][accepted].tolist(), pa.string()),
    }
    if "residual" in schema.names:
        residual = np.ascontiguousarray(columns["residual"][accepted], dtype="<f2")
        arrays["residual"] = _fixed_binary(residual, int(np.prod(residual.shape[1:])) * 2)
    if "text_features" in schema.names:
        features = np.ascontiguousarray(columns["text_features"][accepted], dtype="<f2")
        mask_BT = np.ascontiguousarray(columns["text_mask"][accepted], dtype=bool)
        arrays["text_features"] = _fixed_binary(features, int(np.prod(features.shape[1:])) * 2)
        arrays["text_mask"] = pa.FixedSizeListArray.from_arrays(pa.array(mask_BT.reshape(-1), pa.bool_()), mask_BT.shape[1])
    assert all(len(a) == num_rows for a in arrays.values())
    table = pa.table({name: arrays[name] for name in schema.names})  # the schema's column order
    assert table.schema.equals(schema), f"cache rows do not match the cache schema:\n{table.schema}\nvs\n{schema}"
    return table


def _fixed_binary(array: np.ndarray, width: int) -> pa.Array:
    """Rows of a C-contiguous array as fixed_size_binary(width) values, without a copy per row."""
    buffer = pa.py_buffer(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    return pa.Array.from_buffers(pa.binary(width), len(array), [None, buffer])


class ShardWriter:
    """Commits complete shards on a small thread pool; counts everything for the summary."""

    def __init__(self, output: str, endpoint_url: str, fingerprint_hash: str, schema: pa.Schema,
                 shard_uris: dict[str, str], num_threads: int = 2, crash_after_commits: int = -1,
                 pause_after_commits: int = -1):
        self.output = output
        self.endpoint_url = endpoint_url
        self.fingerprint_hash = fingerprint_hash
        self.schema = schema
        self.shard_uris = shard_uris
        self.crash_after_commits = crash_after_commits
        self.pause_after_commits = pause_after_commits
        self.pool = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="shard-writer")
        self.futures: list[tuple[str, Future]] = []
        self.committed: dict[str, dict[str, Any]] = {}
        self.failed: dict[str, str] = {}
        self.num_started = 0

    def submit(self, shard: str, header: dict[str, Any], columns: dict[str, np.ndarray] | None, seconds: float) -> None:
        if header["error"]:
            self.failed[shard] = header["error"]
            return
        crash = self.num_started == self.crash_after_commits
        pause = 0 <= self.pause_after_commits <= self.num_started
        self.num_started += 1
        self.futures.append((shard, self.pool.submit(self._commit, shard, header, columns, seconds, crash, pause)))

    def collect(self, wait: bool = False) -> list[str]:
        """Finished commits since the last call; waits for all if asked. A shard whose write fails
        (e.g. a storage error) is recorded as failed, not fatal; the crash test hook re-raises."""
        done, still = [], []
        for shard, future in self.futures:
            if not (wait or future.done()):
                still.append((shard, future))
                continue
            error = future.exception()
            if isinstance(error, InjectedCrash):
                raise error
            if error is not None:
                self.failed[shard] = f"write failed: {type(error).__name__}: {error}"
            else:
                self.committed[shard] = future.result()  # only the driver thread touches `committed`
                done.append(shard)
        self.futures = still
        return done

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def _commit(self, shard: str, header: dict[str, Any], columns: dict[str, np.ndarray] | None,
                seconds: float, crash: bool, pause: bool = False) -> dict[str, Any]:
        if pause:
            time.sleep(PAUSE_HOOK_SECONDS)  # the `pause_after_commits` test hook: nothing of this shard written yet
        started = time.perf_counter()
        rejected: Counter = Counter()
        notes: Counter = Counter()
        if columns is not None:
            statuses = columns["status"]
            accepted = np.flatnonzero(statuses == "ok")
            rejected.update(str(s) for s in statuses if s != "ok")
            notes.update(n for joined in columns["notes"][accepted] if joined for n in str(joined).split(","))
            table = rows_to_table(columns, accepted, self.schema)
        else:
            accepted = np.zeros(0, dtype=np.int64)
            table = self.schema.empty_table()
        if header["truncated"]:
            notes["truncated_tar"] += 1
        fs, base = storage.resolve(self.output, self.endpoint_url)
        relative = manifest_lib.data_file(shard)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd", compression_level=1, row_group_size=ROW_GROUP_ROWS)
        payload = sink.getvalue().to_pybytes()
        storage.write_bytes_atomic(fs, f"{base}/{relative}", payload)
        if crash:
            raise InjectedCrash(f"crash_after_commits: stopping after writing {relative} and before its stats marker")
        stats = {
            "shard": shard, "source_uri": self.shard_uris.get(shard, header.get("source_uri", "")),
            "fingerprint_hash": self.fingerprint_hash, "file": relative,
            "samples_in": int(header["num_samples"]), "samples_written": int(len(accepted)),
            "rejected": dict(sorted(rejected.items())), "notes": dict(sorted(notes.items())),
            "members_ignored": header.get("members_ignored", {}), "unsorted_members": header.get("unsorted_members", 0),
            "truncated": header["truncated"], "bytes_read": int(header.get("bytes_read", 0)),
            "bytes_written": len(payload), "read_seconds": header.get("read_seconds", 0.0),
            "seconds": round(seconds + time.perf_counter() - started, 4), "committed_at": manifest_lib.now(),
        }
        assert stats["samples_in"] == stats["samples_written"] + sum(rejected.values()), "a sample was lost"
        manifest_lib.write_json(self.output, manifest_lib.stats_file(shard), stats, self.endpoint_url)
        return stats
