"""Progress of long jobs in one line: how far, how long so far, how fast, and when it ends.

Design: training steps and precompute shards both count up to a known total, so one `Progress`
serves both (`jobs.train`'s step lines, `pipelines.plan`'s commit lines). Rates are averages since
the job (or the resumed run) started, not since the last line: a line every few steps would
otherwise swing with each step's data wait. The ETA is the work left at that rate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


def duration(seconds: float | None) -> str:
    """'42s', '3m05s', '2h07m'; '?' when unknown (no rate yet)."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@dataclass
class Progress:
    """`total` units of work, `done_before` of them finished before this process started (a resume)."""

    total: int
    unit: str  # plural noun: "steps", "shards"
    done_before: int = 0
    started: float = field(default_factory=time.perf_counter)

    def rate(self, done: int) -> float:
        """Units per second since the start (0 before any unit)."""
        elapsed = time.perf_counter() - self.started
        return (done - self.done_before) / elapsed if elapsed > 0 else 0.0

    def line(self, done: int, counted: dict[str, int] | None = None) -> str:
        """'25/100 (25%), 12s elapsed, 2.08 steps/s, 33.3 samples/s, ETA 36s': `counted` adds the rate of other
        quantities, each the amount this process has handled since it started (samples, rows...)."""
        elapsed = time.perf_counter() - self.started
        rate = self.rate(done)
        rates = [f"{rate:.3g} {self.unit}/s"]
        rates += [f"{n / elapsed if elapsed > 0 else 0.0:.3g} {name}/s" for name, n in (counted or {}).items()]
        eta = (self.total - done) / rate if rate > 0 else None
        percent = 100 * done / self.total if self.total else 100.0
        return (f"{done}/{self.total} ({percent:.0f}%), {duration(elapsed)} elapsed, {', '.join(rates)}, "
                f"ETA {duration(eta)}")


def show_ray_data_progress(enabled: bool) -> None:
    """Ray Data's own progress output in this process (the driver of a Ray Data job), on or off. Off,
    its one-time hint on how to turn the bars back on is muted too: the jobs print their own progress
    and their `--ray-progress` flag turns these on."""
    import logging

    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = enabled
    logging.getLogger("ray.data._internal.progress").setLevel(logging.INFO if enabled else logging.ERROR)


__all__ = ["Progress", "duration", "show_ray_data_progress"]
