"""benchmarks/transformer.py's segment-attention part, on the tiny preset: it also runs in the GPU
part (bf16, hart-0.7b), which CI cannot run, so this keeps the shared code from rotting."""

from __future__ import annotations

import pytest
import torch

from benchmarks import transformer as bench
from hart.config import transformer_config


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16])
def test_segment_attention_benchmark_times_both_implementations(autocast_dtype):
    config = transformer_config("tiny")
    result = bench.bench_segment_attention(config, 2, torch.device("cpu"), repeats=3, autocast_dtype=autocast_dtype)
    assert result["segments"] == len(config.patch_nums) + 1  # the text, then one per scale
    assert result["tokens"] == config.context_token + sum(p * p for p in config.patch_nums)
    assert result["segmented_ms"] > 0 and result["sliced_ms"] > 0 and result["ratio"] > 0
