"""benchmarks/mfu.py on the CPU with the tiny preset: CI has no GPU, so this is what keeps its code
path (and `benchmarks/gpu.py`'s training rows, which call `mfu_run`) from rotting."""

from __future__ import annotations

import pytest
import torch

from benchmarks import mfu
from configuration.loader import replace
from hart.config import PATCH_NUMS_256, transformer_config


def test_mfu_run_counts_flops_and_activation_checkpointing_estimate_agrees():
    cpu = torch.device("cpu")
    with torch.random.fork_rng(devices=[]):
        plain = mfu.mfu_run("tiny", 256, 8, False, False, cpu, steps=2, warmup=2)
        checkpointed = mfu.mfu_run("tiny", 256, 8, True, False, cpu, steps=2, warmup=2)
    seq_len = replace(transformer_config("tiny"), patch_nums=tuple(PATCH_NUMS_256)).seq_len()
    assert plain["tokens"] == checkpointed["tokens"] == 8 * seq_len
    assert plain["step_s"] > 0 and plain["ema_s"] > 0 and plain["flops"] > 0
    # Checkpointed settings count the forward at full size and the backward's share on a quarter
    # batch (its own kept count): within a few percent of the exact count, recompute excluded.
    assert abs(checkpointed["flops"] / plain["flops"] - 1) < 0.03, (checkpointed["flops"], plain["flops"])


def test_peak_is_looked_up_by_a_word_of_the_device_name():
    assert mfu.peak_bf16("NVIDIA H100 80GB HBM3") == 989e12
    assert mfu.peak_bf16("NVIDIA A100-SXM4-80GB") == 312e12
    assert mfu.peak_bf16("CPU") is None


def test_cpu_run_prints_one_line_per_setting(capsys):
    with torch.random.fork_rng(devices=[]):
        mfu.run_settings(steps=1, warmup=1, preset="tiny", device_name="cpu", runs=((256, 2, False, False),))
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("mfu: CPU, torch") and "dense bf16 peak unknown" in lines[0]
    assert len(lines) == 2 and lines[1].startswith("mfu tiny 256px bs2: ") and "MFU n/a" in lines[1], lines


def test_without_cuda_the_default_run_says_skipped(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    mfu.main(["--steps", "1", "--warmup", "1"])
    assert capsys.readouterr().out.strip() == "mfu: skipped (no CUDA device on this machine)"
