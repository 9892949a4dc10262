"""pipelines/progress.py: one line of how far, how long, how fast and how long still."""

from __future__ import annotations

import time

from pipelines.progress import Progress, duration


def test_duration_reads_like_a_clock():
    assert [duration(s) for s in (0, 42.4, 185, 7620, None, float("inf"))] == ["0s", "42s", "3m05s", "2h07m", "?", "?"]


def test_rates_count_from_the_start_and_a_resume_does_not_inflate_them():
    progress = Progress(total=100, unit="steps", done_before=40, started=time.perf_counter() - 10.0)
    line = progress.line(60, {"samples": 320})  # 20 steps and 320 samples in 10 s
    assert line.startswith("60/100 (60%), 10s elapsed, 2 steps/s, 32 samples/s, ETA 20s"), line
    assert Progress(total=5, unit="shards").line(0).endswith("ETA ?")
