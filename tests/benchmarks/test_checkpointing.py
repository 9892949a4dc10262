"""benchmarks/checkpointing.py: its storage tracker counts what it says, and on the demo's transformer the
settings order as designed (block holds least, op holds less than none at none's matmul FLOPs)."""

from __future__ import annotations

import torch

from benchmarks import checkpointing
from benchmarks.checkpointing import StorageTracker

MIB = 2**20


def test_storage_tracker_counts_new_storages_while_they_live():
    weight = torch.ones(MIB // 4)  # 1 MiB of fp32 alive before: not counted
    with StorageTracker() as tracker:
        a = torch.zeros(MIB // 4)  # 1 MiB
        b = a.view(2, -1)[0]  # a view: the same storage
        a.add_(1)  # in place: nothing new
        weight.mul_(2)
        c = a * 2  # 1 MiB more
        assert tracker.live == 2 * MIB
        del a, b, c
        assert tracker.live == 0
        d = torch.empty(MIB // 8)  # 0.5 MiB
    assert tracker.peak == 2 * MIB and tracker.live == MIB // 2
    del d


def test_demo_transformer_settings():
    from benchmarks.step_ops import model_config

    results = checkpointing.measure(model_config("demo"), batch=2, rounds=1, settings=("none", "block", "op"))
    none, block, op = results["none"], results["block"], results["op"]
    for precision in ("fp32", "bf16"):
        assert 0 < block[f"{precision}_held_mib"] < op[f"{precision}_held_mib"] < none[f"{precision}_held_mib"]
        assert block[f"{precision}_peak_mib"] < none[f"{precision}_peak_mib"]
        assert none[f"{precision}_held_mib"] <= none[f"{precision}_peak_mib"]
    assert op["flops"] == none["flops"] < block["flops"]  # op recomputes no matmul; block recomputes the forward's
    assert all(r["step_s"] > 0 for r in results.values())
