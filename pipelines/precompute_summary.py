"""What a precompute run did: `PrecomputeSummary`, the counts, bytes and timings `run_precompute` returns.

Design: a plain mutable record the driver fills as commit records arrive (`add_stats` once per
committed shard), printed by hart-precompute as a two-column table and read field by field by the
benchmarks and tests. Rates are derived (properties), never stored.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class PrecomputeSummary:
    shards_total: int = 0
    shards_skipped: int = 0  # already committed before this run
    shards_done: int = 0
    shards_failed: dict[str, str] = field(default_factory=dict)
    shards_left: int = 0  # pending shards not attempted (input.max_shards)
    samples_in: int = 0
    samples_written: int = 0
    rejected: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    members_ignored: Counter = field(default_factory=Counter)
    unsorted_members: int = 0
    truncated_shards: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    startup_seconds: float = 0.0  # from the start of the run to the first batch reaching the writer
    startup_samples: int = 0  # sample rows in that first batch (already encoded during start-up)
    # Driver-side split of the start-up, in order: listing (input shards, path check), setup
    # (tokenizer load + weight hash), manifest (header write or check, index read, marker listing), planning
    # (resource check, writer actors, lazy plan), first_batch (Ray executor and actor start,
    # read/decode/encode/route of the first block).
    startup_phases: dict[str, float] = field(default_factory=dict)
    ray_stats: str = ""  # Ray Data's per-operator timing report of this run
    operator_seconds: dict[str, Any] = field(default_factory=dict)  # the same, as numbers (`pipelines.operator_stats`)
    # Bytes of encoded rows the route stage handed to the writer actors (what a driver-side writer
    # would have received), and bytes the driver actually received (route counts + commit records).
    routed_bytes: int = 0
    driver_bytes: int = 0
    writer_nodes: Counter = field(default_factory=Counter)  # Ray node id -> shards its writers committed

    @property
    def images_per_second(self) -> float:
        return self.samples_in / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_images_per_second(self) -> float:
        steady = self.seconds - self.startup_seconds
        return (self.samples_in - self.startup_samples) / steady if steady > 0 else 0.0

    def table(self) -> str:
        rows = [
            ("shards total", self.shards_total), ("shards done", self.shards_done),
            ("shards skipped (committed before)", self.shards_skipped),
            ("shards failed", len(self.shards_failed)), ("shards left (max_shards)", self.shards_left),
            ("samples in", self.samples_in), ("samples written", self.samples_written),
            ("samples rejected", sum(self.rejected.values())),
        ]
        rows += [(f"  rejected: {reason}", n) for reason, n in sorted(self.rejected.items())]
        rows += [(f"  note: {note}", n) for note, n in sorted(self.notes.items())]
        rows += [(f"  member ignored: {reason}", n) for reason, n in sorted(self.members_ignored.items())]
        rows += [("unsorted members", self.unsorted_members), ("truncated shards", self.truncated_shards),
                 ("bytes read", self.bytes_read), ("bytes written", self.bytes_written),
                 ("seconds", f"{self.seconds:.1f}"), ("  of which start-up", f"{self.startup_seconds:.1f}"),
                 *[(f"    {phase}", f"{seconds:.2f}") for phase, seconds in self.startup_phases.items()],
                 ("images/s", f"{self.images_per_second:.1f}"), ("images/s after start-up", f"{self.steady_images_per_second:.1f}")]
        width = max(len(name) for name, _ in rows)
        lines = [f"{name:<{width}}  {value}" for name, value in rows]
        lines += [f"FAILED shard {name}: {error}" for name, error in sorted(self.shards_failed.items())]
        return "\n".join(lines)

    def add_stats(self, stats: dict[str, Any]) -> None:
        self.shards_done += 1
        self.samples_in += stats["samples_in"]
        self.samples_written += stats["samples_written"]
        self.rejected.update(stats["rejected"])
        self.notes.update(stats["notes"])
        self.members_ignored.update(stats["members_ignored"])
        self.unsorted_members += stats["unsorted_members"]
        self.truncated_shards += bool(stats["truncated"])
        self.bytes_read += stats["bytes_read"]
        self.bytes_written += stats["bytes_written"]


__all__ = ["PrecomputeSummary"]
