"""What a training worker trains on, step by step: micro-batches, the stream position, the step ledger.

Design (no Ray here; `trainer/worker.py` hands in Ray Data's split where one is used):
- The global batch G = data.batch_size x data.grad_accumulation x the largest world size
  (`scaling.num_workers`, or its max when elastic) is fixed for the run. A rank of a world of w
  trains about G / w rows per optimizer step, in ceil(ceil(G / w) / batch_size) micro-batches, the
  same count on every rank (FSDP2 gathers parameters once per forward on all ranks): gradient
  accumulation makes up for missing ranks, so an elastic run that shrinks keeps its batch, and the
  learning-rate schedule, which counts optimizer steps of G samples, stays keyed by samples seen.
  When w does not divide G, slices and micro-batches differ by a row, and each micro-batch's loss is
  weighted by its rows (`micro_weights`) so that the ranks' averaged gradient is the global batch's.
- Transformer stages from a cache read `pipelines.cache_stream.CacheStream`: the run's order is a
  function of the cache, `run.seed` and the pass only (`pipelines.sample_order`), each rank takes its
  slice of each global batch, and the stream starts at the position the restored checkpoint recorded
  (`position_meta`: samples consumed and the cache's digest). No row of a pass is trained on twice or
  skipped across restores, resubmissions and resizes.
- The tokenizer stage (images) and online mode (encoded shards) read Ray Data's split of the
  trainer's dataset: rows go to ranks as blocks finish. Online resume is row-exact by sample: each
  checkpoint records what the ranks consumed (`sync_ledger` joins their `pipelines.online.VisitLedger`s)
  and the restored stream leaves it out.
- The ledger (`data.ledger`, off by default: for tests and audits of short runs): the keys of every
  optimizer step, gathered from the ranks at each checkpoint and stored in it with the ledger of the
  checkpoint it was restored from (`LEDGER_FILE`). The final checkpoint's ledger is, step by step in
  global batch order, what its weights were trained on; steps lost with a failure never reach it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

import torch.distributed as dist

from pipelines.cache_stream import CacheStream
from pipelines.online import VisitLedger
from pipelines.sample_order import SampleOrder, cache_blocks
from trainer.config import TrainRunConfig
from trainer.data import cache_columns

LEDGER_FILE = "ledger.jsonl"


def global_batch(config: TrainRunConfig) -> int:
    return config.data.batch_size * config.data.grad_accumulation * config.scaling.max_workers


def micro_batches_per_step(config: TrainRunConfig, world_size: int) -> int:
    """Micro-batches per optimizer step on every rank of a world of `world_size`."""
    largest_slice = -(-global_batch(config) // world_size)
    return -(-largest_slice // config.data.batch_size)


def micro_weights(sizes: list[int], world_size: int, total: int) -> list[float]:
    """Loss weights of a rank's micro-batches of `sizes` rows: averaged over the micro-batches and then
    over the ranks (DDP's mean), they give every row of the global batch of `total` the same weight."""
    return [size * len(sizes) * world_size / total for size in sizes]


def reads_cache_stream(config: TrainRunConfig) -> bool:
    return config.stage != "tokenizer" and not config.online.enabled


# --------------------------------------------------------------------------------------
# Position
# --------------------------------------------------------------------------------------


def cache_order(config: TrainRunConfig, manifest: dict[str, Any]):
    return SampleOrder(cache_blocks(config.data.cache, manifest, config.run.endpoint_url), config.run.seed)


def position_meta(samples: int, digest: str, config: TrainRunConfig) -> dict[str, Any]:
    """What a checkpoint records of the stream: samples consumed, the cache digest, the global batch."""
    return {"samples": samples, "cache_digest": digest, "global_batch": global_batch(config)}


def restored_position(meta: dict[str, Any], digest: str, config: TrainRunConfig) -> int:
    """Samples consumed at a checkpoint (0 without one). ValueError when the checkpoint was made on
    another cache: its position would point into a different order."""
    position = meta.get("data_position")
    if position is None or config.run.ignore_data_position:
        return 0
    if position["cache_digest"] != digest:
        raise ValueError(f"run {config.run.name!r}: its checkpoint was made reading another cache (digest "
                         f"{position['cache_digest'][:12]}..., data.cache {config.data.cache} has {digest[:12]}...): "
                         f"the stream position would point into a different order; train from the same cache, or "
                         f"start a new run.name (model.init_from the checkpoint)")
    return int(position["samples"])


# --------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------


def cache_steps(config: TrainRunConfig, manifest: dict[str, Any], order, collate, rank: int, world_size: int,
                first_position: int) -> Iterator[tuple[list[dict[str, Any]], list[float]]]:
    """(micro-batches, their loss weights) of every optimizer step from stream position `first_position`
    on (endless)."""
    count, total = micro_batches_per_step(config, world_size), global_batch(config)

    def split(table):  # on the stream's reader thread: the loop waits only for what is not read yet
        bounds = [i * table.num_rows // count for i in range(count + 1)]  # sizes differ by at most one row
        sizes = [stop - start for start, stop in zip(bounds, bounds[1:])]
        if not min(sizes):
            raise ValueError(f"{table.num_rows} rows a rank cannot fill {count} micro-batches: raise data.batch_size "
                             f"(global batch {total} over {world_size} workers)")
        return [collate(table.slice(start, size)) for start, size in zip(bounds, sizes)], \
            micro_weights(sizes, world_size, total)

    stream = CacheStream(order, cache_columns(manifest), total, rank, world_size, first_position=first_position,
                         endpoint_url=config.run.endpoint_url, transform=split)
    try:
        yield from stream
    finally:
        stream.close()


def ray_steps(config: TrainRunConfig, shard, collate, world_size: int,
              data_epoch: int) -> Iterator[tuple[list[dict[str, Any]], None] | None]:
    """(micro-batches, None: equal weights) of every optimizer step from Ray Data's split, epoch after
    epoch; each epoch is one execution of the dataset, and its rows that do not fill a step are
    dropped. Online mode yields None when its stream ends."""
    count = micro_batches_per_step(config, world_size)
    while True:
        micro_batches, steps_before = [], 0
        for batch in shard.iter_torch_batches(batch_size=config.data.batch_size, collate_fn=collate,  # [ray]
                                              drop_last=True, prefetch_batches=2):
            micro_batches.append(batch)
            if len(micro_batches) == count:
                steps_before += 1
                yield micro_batches, None
                micro_batches = []
        if not steps_before:
            raise ValueError(f"data epoch {data_epoch} gave no full step: each worker needs at least "
                             f"batch_size * micro-batches per step = {config.data.batch_size * count} rows")
        if config.online.enabled:
            # Online mode streams all its epochs once: a second pass would re-encode what it just trained on.
            yield None  # the caller raises with the step it reached
            return
        data_epoch += 1


def timed(steps: Iterator) -> Iterator[tuple[Any, float]]:
    """(item, seconds blocked waiting for it) of an iterator."""
    while True:
        waiting = time.perf_counter()
        try:
            item = next(steps)
        except StopIteration:
            return
        yield item, time.perf_counter() - waiting


# --------------------------------------------------------------------------------------
# Ledger
# --------------------------------------------------------------------------------------


class StepLedger:
    """Keys of every optimizer step (when `enabled`), kept in checkpoints cumulatively."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.entries: list[dict[str, Any]] = []  # the restored checkpoint's ledger, then every gathered step
        self.pending: list[tuple[int, list[str]]] = []  # this rank's steps since the last checkpoint

    def restore(self, directory: str) -> None:
        path = Path(directory, LEDGER_FILE)
        if self.enabled and path.is_file():
            self.entries = [json.loads(line) for line in path.read_text().splitlines() if line]

    def record(self, step: int, micro_batches: list[dict[str, Any]], world_size: int) -> None:
        if not self.enabled:
            return
        keys: list[str] = []
        for batch in micro_batches:
            if "visit" in batch:  # online rows: the key within its data epoch
                keys += [f"{visit.split(':', 1)[0]}/{key}" for visit, key in zip(batch["visit"], batch["key"])]
            else:
                keys += list(batch["key"])
        self.pending.append((step, keys))
        self.world_size = world_size

    def gather(self) -> None:
        """Every rank at a checkpoint: the ranks' pending steps join `entries`, each step's keys in rank
        order (= global batch order)."""
        if not self.enabled:
            return

        gathered = [self.pending]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self.pending)
        for index, (step, _) in enumerate(self.pending):
            keys = [key for rank_steps in gathered for key in rank_steps[index][1]]
            self.entries.append({"step": step, "world_size": len(gathered), "keys": keys})
        self.pending = []

    def write(self, directory: str) -> None:
        if self.enabled:
            Path(directory, LEDGER_FILE).write_text("".join(json.dumps(e) + "\n" for e in self.entries))


def sync_ledger(ledger: VisitLedger) -> dict[str, float]:
    """Online mode, at a checkpoint (every rank): join the ranks' consumed samples, so every rank
    records the same progress; returns the run's totals for the metrics."""
    local = {"counts": ledger.counts(), "rejected": ledger.rejected, "replayed": ledger.replayed}
    gathered = [local]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
    ledger.merge([g["counts"] for g in gathered])
    return {"online_visits_done": float(len(ledger.done)),
            "online_rejected_samples": float(sum(g["rejected"] for g in gathered)),
            "online_replayed_rows": float(sum(g["replayed"] for g in gathered))}


def read_ledger(checkpoint: str) -> list[dict[str, Any]]:
    """The ledger a checkpoint folder holds: one {step, world_size, keys} per optimizer step."""
    path = Path(checkpoint, LEDGER_FILE)
    if not path.is_file():
        raise ValueError(f"{checkpoint} has no {LEDGER_FILE}: the run was trained without data.ledger")
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def audit_ledger(entries: list[dict[str, Any]], keys: list[str]) -> dict[str, Any]:
    """Check a cache-mode ledger against the cache's keys: steps 1..n each once, and in the stream the
    steps make, each pass holds every key exactly once (the last pass: no key twice). Returns
    {"steps", "passes", "problems"}; `problems` is empty when the ledger proves exactly-once input."""
    problems = []
    steps = [e["step"] for e in entries]
    if steps != list(range(1, len(steps) + 1)):
        problems.append(f"steps are not 1..{len(steps)} once each: {steps}")
    stream = [key for e in entries for key in e["keys"]]
    expected, size = set(keys), len(keys)
    passes = [stream[i:i + size] for i in range(0, len(stream), size)]
    for index, seen in enumerate(passes):
        duplicates = len(seen) - len(set(seen))
        if duplicates:
            problems.append(f"pass {index}: {duplicates} keys trained on twice")
        foreign = set(seen) - expected
        if foreign:
            problems.append(f"pass {index}: {len(foreign)} keys not in the cache")
        if len(seen) == size and set(seen) != expected:
            problems.append(f"pass {index}: {len(expected - set(seen))} keys of the cache never trained on")
    return {"steps": len(steps), "passes": len(passes), "problems": problems}


def audit_online_ledger(entries: list[dict[str, Any]], keys: list[str]) -> dict[str, Any]:
    """Check an online-mode ledger (keys recorded as `<data epoch>/<key>`) against the shards' accepted
    keys: steps 1..n once each, no key twice within a data epoch, none foreign. Epochs are streamed
    side by side at their boundaries, so an epoch's completeness is reported (`complete`), not required.
    Returns {"steps", "epochs": {epoch: keys trained}, "complete": [epochs with every key], "problems"}."""
    problems = []
    steps = [e["step"] for e in entries]
    if steps != list(range(1, len(steps) + 1)):
        problems.append(f"steps are not 1..{len(steps)} once each: {steps}")
    per_epoch: dict[str, list[str]] = {}
    for entry in entries:
        for tagged in entry["keys"]:
            epoch, key = tagged.split("/", 1)
            per_epoch.setdefault(epoch, []).append(key)
    expected = set(keys)
    for epoch, seen in sorted(per_epoch.items()):
        if len(seen) != len(set(seen)):
            problems.append(f"data epoch {epoch}: {len(seen) - len(set(seen))} keys trained on twice")
        if set(seen) - expected:
            problems.append(f"data epoch {epoch}: {len(set(seen) - expected)} keys not in the shards")
    complete = sorted(e for e, seen in per_epoch.items() if set(seen) == expected)
    return {"steps": len(steps), "epochs": {e: len(v) for e, v in per_epoch.items()}, "complete": complete,
            "problems": problems}


__all__ = ["LEDGER_FILE", "StepLedger", "audit_ledger", "audit_online_ledger", "cache_order", "cache_steps", "global_batch",
           "micro_batches_per_step", "micro_weights", "position_meta", "ray_steps", "read_ledger", "reads_cache_stream",
           "restored_position", "sync_ledger", "timed"]
