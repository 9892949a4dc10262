"""Online mode: the precompute plan's read -> decode -> tokenize stages feeding training directly.

Design: when storing the cache costs more than re-encoding (at 1024px a cache row is 2.8x the raw
image), the transformer stages can stream WebDataset shards through the same Ray Data stages as
`jobs.precompute` (`pipelines.plan.encoded_rows`: read, decode/crop, tokenizer actors) and hand
the rows to the Ray Train workers; nothing is written. `training_rows` turns each encoded block into
exactly the cache's Arrow rows (`pipelines.writer.rows_to_table`), so a worker collates online rows
with the cache's own collate and sees the same tokens and residuals a cache built with the same
tokenizer holds.

The stream is a list of *visits*: one per (data epoch, shard), `online.epochs` epochs, each epoch
in its own seeded shard order (`plan_visits`). Resume is row-exact:
  - every row carries its visit and `covers`: its own sample index in the shard, plus the indices
    of the samples of the same visit the decoder rejected in the same block (so the indices a visit's
    trained rows cover reach its sample count exactly when all of it has been consumed);
  - the workers record the indices their optimizer steps consumed (`VisitLedger`); at each
    checkpoint the ranks' sets are joined, and the checkpoint records the visits consumed whole and,
    for the visits consumed in part, the indices consumed (`progress.json` beside `meta.json`);
  - the read stage asks, before it opens a shard, what the latest checkpoint has consumed
    (`read_visits_batch(progress=...)`): it skips the visits done and drops the consumed samples of
    the others before they are decoded. So a resubmitted run, or a worker group Ray restarts from a
    checkpoint, trains on every row the checkpoint had not consumed and on none it had. A visit read
    in the running stream cannot be recorded before it is read, so the lookup never drops data of a
    run that did not restart.
A block whose rows of some visit were all rejected cannot carry their indices: that visit is never
recorded as done, and after a restart its uncovered rejected samples are read (and rejected) again;
nothing is trained on twice. Shards that fail to read are reported on the worker's log and yield
no rows. The progress file grows with the rows of the visits in flight at a checkpoint (one integer
per consumed row of those shards), not with the run.

Shape legend: B rows of a block.
"""

from __future__ import annotations

import json
import random
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.config import InputConfig
from pipelines.shard_source import read_shard_rows
from pipelines.writer import rows_to_table

# Columns online rows carry beside the cache's own (popped by the worker before the model sees a batch).
VISIT_COLUMNS = ("visit", "covers", "visit_samples")


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
                      progress: Callable[[], dict[str, Any]] | None = None) -> Iterator[pa.Table]:
    """`map_batches` UDF over visit items: reads each visit's shard (RAW_SCHEMA rows + `visit`),
    skipping the visits the latest checkpoint consumed whole and the samples it consumed of the others
    (`progress()`: {"done": visits, "partial": {visit: sample indices}}, a `VisitLedger.state()`)."""
    state = progress() if progress is not None else {}
    done, partial = set(state.get("done", ())), state.get("partial", {})
    for name, uri, visit in zip(batch.column("name").to_pylist(), batch.column("uri").to_pylist(),
                                batch.column("visit").to_pylist()):
        if visit in done:
            continue
        consumed = pa.array(sorted(partial.get(visit, ())), pa.int64())
        for table in read_shard_rows(name, uri, config):
            if len(consumed):  # header rows stay: they carry the shard's facts
                keep = pc.or_(pc.not_equal(table.column("row_kind"), "sample"),
                              pc.invert(pc.is_in(table.column("sample_index"), value_set=consumed)))
                table = table.filter(keep)
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
    indices = np.asarray(batch["sample_index"], dtype=np.int64)
    covers = [[int(i)] for i in indices[accepted]]
    for visit in np.unique(visits[sample & ~accepted_mask]):
        carriers = np.flatnonzero(visits[accepted] == visit)
        if len(carriers):  # else the visit cannot be completed (see the module docstring)
            covers[carriers[0]] += indices[(visits == visit) & sample & ~accepted_mask].tolist()
    table = table.append_column("visit", pa.array(visits[accepted].tolist(), pa.string()))
    table = table.append_column("covers", pa.array(covers, pa.list_(pa.int64())))
    return table.append_column("visit_samples", pa.array(batch["shard_num_samples"][accepted], pa.int64()))


class VisitLedger:
    """One worker's record of the online samples its optimizer steps consumed, per visit.

    `stage(batch)` takes a collated batch's visit columns out (call it for every micro-batch),
    `commit()` records the staged ones once their optimizer step is done (rows of a step cut short
    by the end of the run are not recorded), `merge(counts_of_every_rank)` joins the ranks' records
    and marks the visits whose covered samples reached their count as done. `replayed` counts rows
    trained on again: rows of a visit done, or whose sample was already consumed (zero when the
    read stage drops what the restored checkpoint consumed)."""

    def __init__(self, done: set[str] | None = None, partial: dict[str, list[int]] | None = None):
        self.done: set[str] = set(done or ())
        self.consumed: dict[str, set[int]] = {visit: set(indices) for visit, indices in (partial or {}).items()}
        self.samples: dict[str, int] = {}
        self.staged: list[tuple[list[str], list[list[int]], list[int]]] = []
        self.rejected = 0
        self.replayed = 0

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "VisitLedger":
        return cls(state.get("done"), state.get("partial"))

    def stage(self, batch: dict[str, Any]) -> None:
        self.staged.append(tuple(list(batch.pop(name)) for name in VISIT_COLUMNS))

    def commit(self) -> None:
        for visits, covers, samples in self.staged:
            for visit, covered, total in zip(visits, covers, samples):
                seen = self.consumed.setdefault(visit, set()) if visit not in self.done else None
                if seen is None or covered[0] in seen:
                    self.replayed += 1
                    continue
                seen.update(int(i) for i in covered)
                self.samples[visit] = int(total)
                self.rejected += len(covered) - 1
        self.staged = []

    def counts(self) -> dict[str, tuple[list[int], int]]:
        """What `merge` needs from this rank: visit -> (consumed sample indices, sample count)."""
        return {visit: (sorted(seen), self.samples.get(visit, 0)) for visit, seen in self.consumed.items()}

    def merge(self, per_rank: list[dict[str, tuple[list[int], int]]]) -> list[str]:
        """Join every rank's `counts()`; visits now consumed whole become done (on every rank, the same
        set: each rank calls this with the same gathered list). Returns the newly done visits."""
        for counts in per_rank:
            for visit, (indices, num_samples) in counts.items():
                if visit in self.done:
                    continue
                self.consumed.setdefault(visit, set()).update(indices)
                self.samples[visit] = max(self.samples.get(visit, 0), num_samples)
        newly = sorted(v for v, seen in self.consumed.items() if self.samples.get(v) and len(seen) >= self.samples[v])
        for visit in newly:
            self.done.add(visit)
            self.consumed.pop(visit, None)
            self.samples.pop(visit, None)
        return newly

    def state(self) -> dict[str, Any]:
        """What a checkpoint records (`progress.json`): visits done, and the consumed samples of the others."""
        return {"done": sorted(self.done), "partial": {v: sorted(seen) for v, seen in sorted(self.consumed.items()) if seen}}


__all__ = ["VISIT_COLUMNS", "plan_visits", "read_visits_batch", "training_rows", "VisitLedger", "visit_id"]
