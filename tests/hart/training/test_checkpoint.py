"""Tests of hart/training/checkpoint.py: the training-state directory (weights, EMA, optimizer,
scheduler, extra modules and their optimizers, per-rank RNG) written and read back, optimizer-state
flattening, and the versioned meta.json.

Run: .venv/bin/pytest tests/hart/training/test_checkpoint.py -q
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from hart.training.checkpoint import (
    CHECKPOINT_FORMAT_VERSION, flatten_optimizer_state, load_rng_state, load_training_state, read_meta,
    save_rng_state, save_training_state, unflatten_optimizer_state, upgrade_meta,
)
from hart.training.step import (
    ExponentialMovingAverage, OptimizerConfig, build_optimizer, build_scheduler, restore_scheduler, train_step,
)


CONFIG = OptimizerConfig(lr=1e-2, warmup_steps=2)


def trained(tiny_task, steps: int):
    """The tiny network after `steps` seeded steps: (model, AdamW, its warm-up schedule, EMA)."""
    torch.manual_seed(0)
    model = tiny_task.Net()
    optimizer = build_optimizer(model, CONFIG)
    scheduler = build_scheduler(optimizer, 10, CONFIG)
    ema = ExponentialMovingAverage(model, 0.9)
    for step in range(steps):
        train_step(model, tiny_task.loss, [tiny_task.batch(step)], optimizer, step=step, scheduler=scheduler)
        ema.update(model)
    return model, optimizer, scheduler, ema


def test_checkpoint_round_trip(tmp_path, tiny_task):
    model, optimizer, scheduler, ema = trained(tiny_task, steps=3)
    save_training_state(
        tmp_path / "ckpt", meta={"step": 3, "data_epoch": 1, "mlflow_run_id": "abc"}, model=model.state_dict(),
        ema=ema.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
        extra={"disc": {"w": torch.ones(2)}}, extra_optimizers={"disc": optimizer.state_dict()},
    )
    state = load_training_state(tmp_path / "ckpt")
    assert state.step == 3 and state.meta["mlflow_run_id"] == "abc" and state.meta["format_version"] == 1
    # continue both the original and a restored copy: identical trajectories
    restored = tiny_task.Net()
    restored.load_state_dict(state.model)
    restored_opt = build_optimizer(restored, CONFIG)
    restored_sched = build_scheduler(restored_opt, 10, CONFIG)
    restored_opt.load_state_dict(state.optimizer)
    restore_scheduler(restored_opt, restored_sched, state.scheduler)
    for step in range(3, 6):
        a = train_step(model, tiny_task.loss, [tiny_task.batch(step)], optimizer, step=step, scheduler=scheduler)
        b = train_step(restored, tiny_task.loss, [tiny_task.batch(step)], restored_opt, step=step, scheduler=restored_sched)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["lr"] == b["lr"]
    assert torch.equal(state.extra["disc"]["w"], torch.ones(2))
    assert set(state.extra_optimizers["disc"]["state"]) == set(state.optimizer["state"])


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    save_rng_state(tmp_path, rank=0)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    assert load_rng_state(tmp_path, rank=0) and not load_rng_state(tmp_path, rank=1)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert np.random.rand() == expected[2]


def test_meta_versions(tmp_path):
    with pytest.raises(ValueError, match="newer"):
        upgrade_meta({"format_version": 99, "step": 1})
    with pytest.raises(ValueError, match="not a training checkpoint"):
        read_meta(tmp_path)
    assert upgrade_meta({"step": 4})["data_epoch"] == 0  # format 0 (no version) upgrades


def test_every_tensor_and_structure_comes_back_bit_exact(tmp_path, tiny_task):
    """Weights, EMA, AdamW moments and step counters, param groups and scheduler state are read back
    exactly as written; each part has its own file and meta.json carries the format version."""
    model, optimizer, scheduler, ema = trained(tiny_task, steps=2)
    written = optimizer.state_dict()
    save_training_state(tmp_path, meta={"step": 2, "stage": "joint"}, model=model.state_dict(), ema=ema.state_dict(),
                        optimizer=written, scheduler=scheduler.state_dict())
    assert {p.name for p in tmp_path.iterdir()} == {
        "meta.json", "model.safetensors", "ema.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json"}
    assert json.loads((tmp_path / "meta.json").read_text())["format_version"] == CHECKPOINT_FORMAT_VERSION

    state = load_training_state(tmp_path)
    assert state.meta["stage"] == "joint" and state.meta["data_epoch"] == 0  # filled in by upgrade_meta
    for written_part, read_part in ((model.state_dict(), state.model), (ema.state_dict(), state.ema)):
        assert set(read_part) == set(written_part)
        assert all(torch.equal(read_part[k], v) for k, v in written_part.items())
    assert not torch.equal(state.ema["head.weight"], state.model["head.weight"])  # two different files
    assert state.optimizer["param_groups"] == json.loads(json.dumps(written["param_groups"]))  # betas as a list
    assert set(state.optimizer["state"]) == set(written["state"])  # int param ids stay ints
    for param_id, entries in written["state"].items():
        assert set(state.optimizer["state"][param_id]) == set(entries)
        for name, value in entries.items():
            assert torch.equal(state.optimizer["state"][param_id][name], value), (param_id, name)
    assert state.scheduler == scheduler.state_dict()
    assert state.extra == {} and state.extra_optimizers == {}


def test_a_weights_only_checkpoint_has_no_other_parts(tmp_path):
    save_training_state(tmp_path, meta={"step": 7}, model={"w": torch.arange(4.0)})
    state = load_training_state(tmp_path)
    assert state.step == 7 and torch.equal(state.model["w"], torch.arange(4.0))
    assert state.ema is None and state.optimizer is None and state.scheduler is None
    with pytest.raises(ValueError, match="meta must contain 'step'"):
        save_training_state(tmp_path / "other", meta={"data_epoch": 1}, model={"w": torch.zeros(1)})
    (tmp_path / "meta.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(ValueError, match="no 'step'"):
        load_training_state(tmp_path)


def test_optimizer_flattening_keeps_key_types_and_non_tensor_values():
    """Plain optimizers key their state by int, distributed full states by parameter name: both survive,
    with scalars kept in the JSON part and tensors in the flat tensor part."""
    exp_avg, moment = torch.randn(3), torch.rand(2, 2)
    original = {
        "state": {0: {"exp_avg": exp_avg, "step": 5}, "blocks.1.weight": {"momentum_buffer": moment, "lr_scale": 0.5}},
        "param_groups": [{"lr": 0.1, "params": [0, "blocks.1.weight"]}],
    }
    tensors, structure = flatten_optimizer_state(original)
    assert set(tensors) == {"state.0.exp_avg", "state.blocks.1.weight.momentum_buffer"}
    structure = json.loads(json.dumps(structure))  # what optimizer.json holds
    restored = unflatten_optimizer_state(tensors, structure)
    assert list(restored["state"]) == [0, "blocks.1.weight"]
    assert restored["state"][0]["step"] == 5 and restored["state"]["blocks.1.weight"]["lr_scale"] == 0.5
    assert torch.equal(restored["state"][0]["exp_avg"], exp_avg)
    assert torch.equal(restored["state"]["blocks.1.weight"]["momentum_buffer"], moment)
    assert restored["param_groups"] == original["param_groups"]
