"""What each Ray Data operator of a finished run spent, as numbers rather than Ray's report text.

Design: `Dataset.get_stats_summary()` (Ray Data's structured form of `Dataset.stats()`) holds, per
operator, the wall and CPU seconds spent producing each of its output blocks (in a task or an actor call), and for the
consumer the seconds its thread sat blocked waiting for the next batch. `operator_seconds` keeps
those sums, keyed by the operator's name, so a job's summary and a benchmark can print where a
run's time went next to the process CPU times they measure themselves. Busy share of a stage =
its task wall seconds / (its workers x the run's seconds); the rest is time its workers waited
for input or for room downstream (Ray Data's backpressure).
"""

from __future__ import annotations

from typing import Any

import ray


def operator_seconds(dataset: ray.data.Dataset) -> dict[str, Any]:
    """{"operators": {name: {"blocks", "wall_s", "cpu_s", "rows"}}, "consumer_blocked_s": float}."""
    summary = dataset.get_stats_summary()
    chain, pending = [], [summary]
    while pending:  # the last operator's summary holds the ones before it as parents
        node = pending.pop()
        chain.append(node)
        pending.extend(node.parents)
    operators: dict[str, dict[str, float]] = {}
    for stats in (stats for node in reversed(chain) for stats in node.operators_stats):
        if stats.wall_time is None:  # the input buffer and other operators that ran no task
            continue
        operators[stats.operator_name] = {
            "blocks": int(stats.wall_time.count),
            "wall_s": float(stats.wall_time.sum),
            "cpu_s": float(stats.cpu_time.sum) if stats.cpu_time else 0.0,
            "rows": int(stats.output_num_rows.sum) if stats.output_num_rows else 0,
        }
    return {"operators": operators, "consumer_blocked_s": float(summary.iter_stats.block_time.get())}
