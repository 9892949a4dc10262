"""Online mode: the precompute plan's read -> decode -> tokenize stages feeding training directly.

Design: when storing the cache costs more than re-encoding (at 1024px a cache row is 2.8x the raw
image), the transformer stages can stream WebDataset shards through the same Ray Data stages as
`jobs.precompute` (`pipelines.plan.encoded_rows`: read, decode/crop, tokenizer actors) and hand
the rows to the Ray Train workers; nothing is written. `training_rows` turns each encoded block into
exactly the cache's Arrow rows (`pipelines.writer.rows_to_table`), so a worker collates online rows
with the cache's own collate and sees the same tokens and residuals a cache built with the same
tokenizer holds.

The stream is a list of *visits*: one per (data epoch, shard), `online.epochs` epochs, each epoch
in its own seeded shard order (`plan_visits`). Resume is at shard granularity:
  - every row carries its visit, and `accounts`: 1 for itself plus the samples of the same visit
    the decoder rejected in the same block (so a visit's accounted rows reach its sample count
    exactly when all of it has been trained on);
  - the workers count the rows their optimizer steps consumed (`VisitLedger`); at each checkpoint
    the counts are summed over the ranks and the visits consumed whole are recorded in the
    checkpoint (`progress.json` beside `meta.json`);
  - the read stage asks, before it opens a shard, which visits the latest checkpoint has consumed
    (`read_visits_batch(done_visits=...)`) and skips them. So a resubmitted run, or a worker group
    Ray restarts from a checkpoint, streams only what that checkpoint had not consumed; visits
    consumed in part are streamed again whole (their rows are trained on twice). A visit already
    read in the running stream can never be "done" before it is read, so the lookup never skips
    data of a run that did not restart.
A block whose rows of some visit were all rejected cannot carry their count: that visit is never
recorded as done and is streamed again after a restart (never skipped wrongly). Shards that fail to
read are reported on the worker's log and yield no rows.

Shape legend: B rows of a block.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa

from pipelines.config import InputConfig
from pipelines.shard_source import read_shard_rows
from pipelines.writer import rows_to_table

# Columns online rows carry beside the cache's own (popped by the worker before the model sees a batch).
VISIT_COLUMNS = ("visit", "accounts", "visit_samples")


def visit_id(epoch: int, shard: str) -> str:
    return f"{epoch}:{shard}"


def plan_visits(shards: dict[str, str], epochs: int, seed: int) -> list[dict[str, Any]]:
    """The online stream's items: every shard once per epoch, each epoch in its own seeded order."""
    if epochs < 1:
        raise ValueError(f"online.epochs must be >= 1, got {epochs}")
    names = sorted(shards)
    visits = []
    for epoch in range(epochs):
        order = list(names)
        random.Random(f"{seed}:{epoch}").shuffle(order)  # str seeds hash the same in every process
        visits += [{"name": name, "uri": shards[name], "visit": visit_id(epoch, name)} for name in order]
    return visits


def read_visits_batch(batch: pa.Table, config: InputConfig,
                      done_visits: Callable[[], set[str]] | None = None) -> Iterator[pa.Table]:
    """`map_batches` UDF over visit items: reads each visit's shard (RAW_SCHEMA rows + `visit`),
    skipping visits the latest checkpoint has consumed whole."""
    done = done_visits() if done_visits is not None else set()
    for name, uri, visit in zip(batch.column("name").to_pylist(), batch.column("uri").to_pylist(),
                                batch.column("visit").to_pylist()):
        if visit in done:
            continue
        for table in read_shard_rows(name, uri, config):
            yield table.append_column("visit", pa.array([visit] * len(table), pa.string()))


def training_rows(batch: dict[str, np.ndarray], schema: pa.Schema) -> pa.Table:
    """Encoded rows (tokenizer stage output) -> the accepted samples as cache rows + visit columns."""
    sample = batch["row_kind"] == "sample"
    accepted_mask = sample & (batch["status"] == "ok")
    accepted = np.flatnonzero(accepted_mask)
    for i in np.flatnonzero(~sample):
        info = json.loads(batch["shard_info"][i] or "{}")
        if info.get("error"):
            print(f"[online] shard {batch['source_shard'][i]} ({info.get('source_uri')}) yields no rows: {info['error']}")
    table = rows_to_table(batch, accepted, schema)
    visits = np.asarray(batch["visit"], dtype=object)
    accounts_B = np.ones(len(accepted), np.int32)
    for visit in np.unique(visits[sample & ~accepted_mask]):
        rejected = int(np.sum((visits == visit) & sample & ~accepted_mask))
        carriers = np.flatnonzero(visits[accepted] == visit)
        if len(carriers):  # else the visit cannot be completed (see the module docstring)
            accounts_B[carriers[0]] += rejected
    table = table.append_column("visit", pa.array(visits[accepted].tolist(), pa.string()))
    table = table.append_column("accounts", pa.array(accounts_B, pa.int32()))
    return table.append_column("visit_samples", pa.array(batch["shard_num_samples"][accepted], pa.int64()))


class VisitLedger:
    """One worker's count of the online rows its optimizer steps consumed, per visit.

    `stage(batch)` takes a collated batch's visit columns out (call it for every micro-batch),
    `commit()` counts the staged ones once their optimizer step is done (rows of a step cut short
    by the end of the run are not counted), `merge(counts_of_every_rank)` marks the visits whose
    summed count reached their sample count as done. `replayed` counts rows of visits already done:
    zero unless a skipped visit was streamed again."""

    def __init__(self, done: set[str] | None = None):
        self.done: set[str] = set(done or ())
        self.consumed: Counter = Counter()
        self.samples: dict[str, int] = {}
        self.staged: list[tuple[list[str], list[int], list[int]]] = []
        self.rejected = 0
        self.replayed = 0

    def stage(self, batch: dict[str, Any]) -> None:
        self.staged.append(tuple(list(batch.pop(name)) for name in VISIT_COLUMNS))

    def commit(self) -> None:
        for visits, accounts, samples in self.staged:
            for visit, count, total in zip(visits, accounts, samples):
                if visit in self.done:
                    self.replayed += int(count)
                    continue
                self.consumed[visit] += int(count)
                self.samples[visit] = int(total)
                self.rejected += int(count) - 1
        self.staged = []

    def counts(self) -> dict[str, tuple[int, int]]:
        """What `merge` needs from this rank: visit -> (consumed rows, sample count)."""
        return {visit: (count, self.samples[visit]) for visit, count in self.consumed.items()}

    def merge(self, per_rank: list[dict[str, tuple[int, int]]]) -> list[str]:
        """Sum every rank's `counts()`; visits now consumed whole become done (on every rank, the same
        set: each rank calls this with the same gathered list). Returns the newly done visits."""
        total: Counter = Counter()
        samples: dict[str, int] = {}
        for counts in per_rank:
            for visit, (count, num_samples) in counts.items():
                total[visit] += count
                samples[visit] = num_samples
        newly = sorted(v for v, count in total.items() if count >= samples[v] and v not in self.done)
        for visit in newly:
            self.done.add(visit)
            self.consumed.pop(visit, None)
            self.samples.pop(visit, None)
        return newly

    def state(self) -> dict[str, Any]:
        return {"done": sorted(self.done)}


__all__ = ["VISIT_COLUMNS", "plan_visits", "read_visits_batch", "training_rows", "VisitLedger", "visit_id"]
