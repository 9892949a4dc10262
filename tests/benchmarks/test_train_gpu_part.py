"""benchmarks/train.py's `gpu` part, run on the CPU with the tiny preset: CI has no GPU, so this is
what keeps that code path from rotting where no GPU is available."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from hart.config import PATCH_NUMS_256, replace, transformer_config

REPO = Path(__file__).resolve().parents[2]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "benchmarks" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mfu_run_counts_flops_and_activation_checkpointing_estimate_agrees():
    bench = load_benchmark()
    cpu = torch.device("cpu")
    with torch.random.fork_rng(devices=[]):
        plain = bench.mfu_run("tiny", 256, 8, False, False, cpu, steps=2, warmup=2)
        checkpointed = bench.mfu_run("tiny", 256, 8, True, False, cpu, steps=2, warmup=2)
    seq_len = replace(transformer_config("tiny"), patch_nums=tuple(PATCH_NUMS_256)).seq_len()
    assert plain["tokens"] == checkpointed["tokens"] == 8 * seq_len
    assert plain["step_s"] > 0 and plain["ema_s"] > 0 and plain["flops"] > 0
    # Checkpointed settings count the forward at full size and the backward's share on a quarter
    # batch (its own kept count): within a few percent of the exact count, recompute excluded.
    assert abs(checkpointed["flops"] / plain["flops"] - 1) < 0.03, (checkpointed["flops"], plain["flops"])


def test_gpu_part_without_cuda_says_skipped(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    bench = load_benchmark()
    bench.gpu_mfu(steps=1, warmup=1)
    assert capsys.readouterr().out.strip() == "gpu: skipped (no CUDA device on this machine)"
