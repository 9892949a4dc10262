"""benchmarks/precompute.py: the cache bytes per sample it prints for the released presets, the bare
decode + encode loop (the baseline of its ratio) on a few tiny shards, and its command-line errors.
The pipeline half needs a local Ray cluster and a workload long enough to amortise its start-up,
so it is left to the benchmark itself.

The expected byte counts are written out by hand from the cache schema (int16 tokens x sum(pn^2),
fp16 residual x z x side x side) with the scale lists typed in literally.
"""

from __future__ import annotations

import sys

import pytest
import torch

from benchmarks import precompute as bench
from pipelines import shapes
from pipelines.config import TokenizerSource


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
        images, _ = bench.bare_loop(uris, TokenizerSource(preset="tiny", seed=0), 64, 4, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert images == 11


def test_bare_loop_counts_nothing_when_every_image_is_rejected(tmp_path):
    uris = shapes.write_shapes_shards(str(tmp_path), 3, 1, image_size=16)
    assert bench.bare_loop(uris, TokenizerSource(preset="tiny", seed=0), 64, 4, torch.device("cpu"))[0] == 0


@pytest.mark.parametrize("flags", [["--device", "tpu"], ["--num-samples", "many"]])
def test_bad_command_lines_are_refused_before_any_work(monkeypatch, flags):
    monkeypatch.setattr(sys, "argv", ["precompute", *flags])
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    assert exit_info.value.code == 2  # argparse's usage error
