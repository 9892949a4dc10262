"""benchmarks/load.py: the memory report it makes from the sampler's samples (peaks of the total,
the driver and the largest worker, and the per-quarter peaks that show growth), on samples written
out here and on a real sampler of this process, and its command-line errors. The precompute and
trainer halves run on a local Ray cluster over hundreds of shards, so they are left to the
benchmark itself."""

from __future__ import annotations

import os
import time

import psutil
import pytest

from benchmarks import load as bench
from benchmarks.processes import MemorySampler

MIB = 2**20


def sampler_with(samples: list[tuple[float, dict[str, int]]]) -> MemorySampler:
    sampler = MemorySampler({})
    sampler.samples = [(t, {name: mib * MIB for name, mib in values.items()}) for t, values in samples]
    return sampler


def test_report_of_a_run_with_workers_coming_and_going():
    sampler = sampler_with([
        (0.0, {"driver": 100, "worker-1": 50}),                    # first quarter: total 150
        (3.0, {"driver": 120, "worker-1": 10, "worker-2": 300}),  # second: 430, the peak
        (6.0, {"driver": 110}),                                    # third: 110
        (9.0, {"driver": 80, "worker-1": 20}),                     # fourth: 100 ...
        (10.0, {"driver": 90, "worker-1": 25}),                    # ... and 115 (the end belongs to it)
    ])
    assert bench.memory_report(sampler) == {
        "memory_samples": 5, "peak_total_mib": 430, "peak_driver_mib": 120, "peak_single_worker_mib": 300,
        "peak_total_by_quarter_mib": [150, 430, 110, 115]}


def test_quarters_without_samples_report_zero_and_one_sample_is_the_first_quarter():
    gap = bench.memory_report(sampler_with([(0.0, {"driver": 10}), (10.0, {"driver": 40})]))
    assert gap["peak_total_by_quarter_mib"] == [10, 0, 0, 40]
    single = bench.memory_report(sampler_with([(5.0, {"driver": 64})]))
    assert single["peak_total_by_quarter_mib"] == [64, 0, 0, 0]
    assert single["peak_single_worker_mib"] == 0  # no process but the driver


def test_report_of_a_real_sampler_of_this_process():
    with MemorySampler({"driver": os.getpid()}, every_s=0.02) as sampler:
        time.sleep(0.15)
    report = bench.memory_report(sampler)
    assert report["memory_samples"] == len(sampler.samples) >= 3
    rss_mib = psutil.Process().memory_info().rss / MIB
    assert report["peak_driver_mib"] == report["peak_total_mib"] == pytest.approx(rss_mib, rel=0.2)
    assert max(report["peak_total_by_quarter_mib"]) == report["peak_total_mib"]


@pytest.mark.parametrize("argv", [["--num-shards", "many"], ["--no-such-flag"]])
def test_bad_command_lines_are_refused_before_ray_starts(argv):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
