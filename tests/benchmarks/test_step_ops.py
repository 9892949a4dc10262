"""benchmarks/step_ops.py: the two model choices, the step it profiles (build + one worker step), and
the operator counting of `measure` on a one-block tiny transformer (the benchmark's own models take
seconds per step on a CPU, so the command-line run at size is left to the benchmark)."""

from __future__ import annotations

import argparse
import sys

import pytest

import torch

from benchmarks import step_ops as bench
from benchmarks.transformer import SMALL_256
from configuration.loader import replace
from hart.config import TOKENIZER_PRESETS, transformer_config
from hart.training.parallelize import ParallelConfig

ONE_BLOCK = replace(transformer_config("tiny"), depth=1)


def args(top: int = 5) -> argparse.Namespace:
    return argparse.Namespace(steps=1, bf16_steps=1, top=top, batch=1)


def test_model_choices():
    assert bench.model_config("small") is SMALL_256
    demo = bench.model_config("demo")
    # the transformer `make demo` trains: the tiny tokenizer's scales, depth 4, width 128
    assert demo.patch_nums == TOKENIZER_PRESETS["tiny"].patch_nums
    assert (demo.depth, demo.embed_dim) == (4, 128)


def test_build_matches_the_config_and_batch():
    model, quantizer, optimizer, ema, (tokens, residual, context, mask) = bench.build(ONE_BLOCK, ParallelConfig(strategy="none"), batch=3)
    assert len(model.blocks) == 1
    assert quantizer.vocab_size == ONE_BLOCK.vocab_size and tuple(quantizer.patch_nums) == ONE_BLOCK.patch_nums
    assert [t.shape for t in tokens] == [(3, p * p) for p in ONE_BLOCK.patch_nums]
    side = ONE_BLOCK.patch_nums[-1]
    assert residual.shape == (3, ONE_BLOCK.token_dim, side, side)
    assert context.shape == (3, ONE_BLOCK.context_token, ONE_BLOCK.context_dim) and mask.shape == (3, ONE_BLOCK.context_token)
    assert optimizer.defaults["fused"] is True  # one optimizer op per step, as on a GPU


def test_one_step_trains_the_model_and_moves_the_ema():
    model, quantizer, optimizer, ema, inputs = bench.build(ONE_BLOCK, ParallelConfig(strategy="none"), batch=2)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    shadow_before = {k: v.clone() for k, v in ema.shadow.items()}
    bench.one_step(model, quantizer, optimizer, ema, inputs, step=0, autocast=False)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "the optimizer step left every weight as it was"
    moved = [k for k in ema.param_names if not torch.equal(ema.shadow[k], shadow_before[k])]
    assert moved and set(moved) <= set(changed)  # the average follows the trained weights only


def test_measure_counts_top_level_operators_reproducibly():
    first = bench.measure(ONE_BLOCK, compiled=False, autocast=False, args=args(top=5))
    again = bench.measure(ONE_BLOCK, compiled=False, autocast=False, args=args(top=5))
    # the profiled step has a fixed seed: same shapes, same operators, on every run
    assert (first["aten_ops"], first["all_aten_events"], first["top"]) == \
        (again["aten_ops"], again["all_aten_events"], again["top"])
    names = [name for name, _ in first["top"]]
    counts = [count for _, count in first["top"]]
    assert len(first["top"]) == 5 and all(name.startswith("aten::") for name in names)
    assert counts == sorted(counts, reverse=True)
    assert sum(counts) <= first["aten_ops"] <= first["all_aten_events"]  # top-level calls are a subset of all


def test_more_blocks_and_autocast_dispatch_more_operators():
    base = bench.measure(ONE_BLOCK, compiled=False, autocast=False, args=args(top=1000))
    deeper = bench.measure(replace(ONE_BLOCK, depth=2), compiled=False, autocast=False, args=args(top=1000))
    assert deeper["aten_ops"] > base["aten_ops"]
    bf16 = bench.measure(ONE_BLOCK, compiled=False, autocast=True, args=args(top=1000))
    casts = lambda result: dict(result["top"]).get("aten::to", 0)  # noqa: E731
    assert casts(bf16) > casts(base)  # the autocast flag reaches the step: its casts are counted


@pytest.mark.parametrize("settings", ["eager-fp16", "compiled", "eager-fp32,fast-bf16"])
def test_unknown_settings_are_a_usage_error(monkeypatch, settings):
    monkeypatch.setattr(sys, "argv", ["step_ops", "--settings", settings])
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    assert exit_info.value.code == 2
