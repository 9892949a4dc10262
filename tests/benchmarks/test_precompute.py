"""benchmarks/precompute.py: the cache bytes per sample it prints for the released presets, the bare
decode + encode loop (the baseline of its ratio) on a few tiny shards, how its stage breakdown tells
Ray's processes apart and computes shares, and its command-line errors.
The pipeline half needs a local Ray cluster and a workload long enough to amortise its start-up,
so it is left to the benchmark itself.

The expected byte counts are written out by hand from the cache schema (int16 tokens x sum(pn^2),
fp16 residual x z x side x side) with the scale lists typed in literally.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from benchmarks import precompute as bench
from benchmarks.processes import command_line
from pipelines import shapes
from pipelines.config import ComputeConfig, TokenizerSource
from pipelines.precompute_summary import PrecomputeSummary


@pytest.mark.parametrize("preset, resolution, scales, z", [
    ("tiny", 64, (1, 2, 3, 4, 6, 8), 16),
    ("var-d16-f16", 256, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 32),
    ("hart-512", 512, (1, 2, 3, 4, 6, 9, 13, 18, 24, 32), 32),
    ("hart-1024", 1024, (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64), 32),
])
def test_cache_bytes_per_sample(preset, resolution, scales, z):
    tokens = 2 * sum(p * p for p in scales)
    residual = 2 * z * scales[-1] ** 2
    assert bench.cache_bytes_per_sample(preset) == {"resolution": resolution, "tokens_bytes": tokens,
                                                    "residual_bytes": residual, "total_bytes": tokens + residual}


def test_hart_1024_row_is_the_known_size():
    assert bench.cache_bytes_per_sample("hart-1024")["total_bytes"] == 18_902 + 262_144  # 9,451 tokens, 32x64x64


def test_bare_loop_encodes_every_usable_image_once(tmp_path):
    # 2 shards of 64px shapes (usable) and 1 of 16px ones, below the preprocessing's 32px minimum side
    uris = shapes.write_shapes_shards(str(tmp_path), 11, 2, image_size=64)
    uris += shapes.write_shapes_shards(str(tmp_path), 3, 1, image_size=16, prefix="small")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        # batch 4: two full batches and a remainder of 3, which must be encoded too
        images, _ = bench.bare_loop(uris, TokenizerSource(config="tiny", seed=0), 64, 4, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert images == 11


def test_bare_loop_counts_nothing_when_every_image_is_rejected(tmp_path):
    uris = shapes.write_shapes_shards(str(tmp_path), 3, 1, image_size=16)
    assert bench.bare_loop(uris, TokenizerSource(config="tiny", seed=0), 64, 4, torch.device("cpu"))[0] == 0


@pytest.mark.parametrize("flags", [["--device", "tpu"], ["--num-samples", "many"]])
def test_bad_command_lines_are_refused_before_any_work(monkeypatch, flags):
    monkeypatch.setattr(sys, "argv", ["precompute", *flags])
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    assert exit_info.value.code == 2  # argparse's usage error


@pytest.mark.parametrize("title, role", [
    ("ray::MapBatches(decode_batch)", "decode"),
    ("ray::MapBatches(read_shards_batch)->MapBatches(decode_batch)", "read+decode"),  # a fused operator
    ("ray::MapWorker(MapBatches(TokenizerStage)).submit", "tokenizer actors"),
    ("ray::ShardWriterActor.add", "writer actors"),
    ("ray::IDLE", "idle Ray workers"),
    ("ray::_StatsActor", "Ray Data helper actors"),
])
def test_a_ray_worker_is_told_apart_by_its_title(title, role):
    # A real process whose command line is the title Ray gives a worker running that task or actor.
    proc = subprocess.Popen(["bash", "-c", f'exec -a "{title}" sleep 30'])
    try:
        deadline = time.monotonic() + 10
        while not command_line(proc.pid).startswith("ray::") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert bench.process_role(proc.pid, driver=os.getpid()) == role
        assert bench.process_role(os.getpid(), driver=os.getpid()) == "driver"
    finally:
        proc.kill()
        proc.wait()


def test_breakdown_shares_are_task_seconds_over_workers_times_the_run():
    summary = PrecomputeSummary(operator_seconds={
        "operators": {"MapBatches(decode_batch)": {"blocks": 10, "wall_s": 30.0, "cpu_s": 28.0, "rows": 640},
                      "MapBatches(TokenizerStage)": {"blocks": 10, "wall_s": 120.0, "cpu_s": 110.0, "rows": 640}},
        "consumer_blocked_s": 55.0})
    compute = ComputeConfig(decode_tasks=1, tokenizer_actors=2)
    lines = bench.breakdown_lines(summary, {"decode": 29.0, "tokenizer actors": 112.0, "driver": 4.0}, 100.0, compute)
    decode = next(line for line in lines if line.strip().startswith("decode"))
    tokenizer = next(line for line in lines if line.strip().startswith("tokenizer actors"))
    driver = next(line for line in lines if line.strip().startswith("driver"))
    assert decode.split()[1:6] == ["1", "10", "30.0", "30%", "28.0"] and decode.split()[-1] == "29.0"
    assert tokenizer.split()[2:7] == ["2", "10", "120.0", "60%", "110.0"]  # 120 s of 2 actors x 100 s
    assert "4.0" in driver and "blocked waiting for the next block 55.0 s" in driver


def test_widened_rows_have_a_1024px_rows_size():
    batch = {"row_kind": np.array(["shard", "sample", "sample"], dtype=object), "sample_index": np.array([-1, 0, 1]),
             "tokens": np.zeros((3, 10), np.int16), "residual": np.zeros((3, 16, 8, 8), np.float16)}
    wide = bench.WidenStage()(batch)
    assert wide["tokens"].shape == (3, 9451) and wide["tokens"].dtype == np.int16
    assert wide["residual"].shape == (3, 32, 64, 64) and wide["residual"].dtype == np.float16
    assert wide["tokens"].nbytes + wide["residual"].nbytes == 3 * bench.cache_bytes_per_sample("hart-1024")["total_bytes"]


def test_a_task_worker_between_tasks_keeps_the_role_of_its_last_task():
    proc = subprocess.Popen(["bash", "-c", 'exec -a "ray::IDLE" sleep 30'])
    try:
        deadline = time.monotonic() + 10
        while not command_line(proc.pid).startswith("ray::") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert bench.process_role(proc.pid, os.getpid(), {}) == "idle Ray workers"  # never seen running a task
        assert bench.process_role(proc.pid, os.getpid(), {proc.pid: "decode"}) == "decode"
    finally:
        proc.kill()
        proc.wait()
