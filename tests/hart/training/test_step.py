"""Unit tests of hart/training/step.py: parameter groups, LR schedule, the train step, EMA (no Ray, no process group).

Checkpoints are tested in test_checkpoint.py, wrappers and sharding in test_parallelize.py; the
tiny network they share is the `tiny_task` fixture (tests/hart/conftest.py).

Run: .venv/bin/pytest tests/hart/training/test_step.py -q
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from hart.training.step import (
    ExponentialMovingAverage, NonFiniteLossError, OptimizerConfig, build_optimizer, build_scheduler,
    lr_factor, parameter_groups, train_step,
)


def test_parameter_groups_follow_var_rule(tiny_task):
    groups = parameter_groups(tiny_task.Net(), weight_decay=0.05)
    decay = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    no_decay = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    assert decay == {"blocks.0.1.weight", "blocks.1.1.weight", "head.weight"}
    # 1-D params (biases, LayerNorm), the embedding table and the named positional parameter
    assert {"embedding.weight", "pos_start", "head.bias", "blocks.0.0.weight", "blocks.0.1.bias"} <= no_decay


def test_frozen_parameters_are_left_out(tiny_task):
    model = tiny_task.Net()
    model.head.requires_grad_(False)
    names = {n for g in parameter_groups(model, 0.1) for n in g["names"]}
    assert "head.weight" not in names and "head.bias" not in names


def test_lr_schedule_shapes():
    config = OptimizerConfig(lr=1.0, warmup_steps=10, warmup_start_ratio=0.0, end_ratio=0.1, plateau_fraction=0.0)
    factors = [lr_factor(s, 110, config) for s in range(111)]
    assert factors[0] == 0.0 and factors[5] == pytest.approx(0.5) and factors[10] == pytest.approx(1.0)
    assert factors[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))  # monotone decay after warmup
    cosine = OptimizerConfig(lr=1.0, schedule="cosine", end_ratio=0.0)
    assert lr_factor(50, 100, cosine) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="schedule"):
        OptimizerConfig(schedule="step")


def test_scheduler_resume_is_exact(tiny_task):
    config = OptimizerConfig(lr=1e-2, warmup_steps=3, end_ratio=0.0)
    model = tiny_task.Net()
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, 20, config)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    fresh_optimizer = build_optimizer(tiny_task.Net(), config)
    fresh = build_scheduler(fresh_optimizer, 20, config)
    fresh.load_state_dict(state)
    assert fresh.get_last_lr() == scheduler.get_last_lr()


def test_train_step_overfits_and_reports(tiny_task):
    torch.manual_seed(0)
    model = tiny_task.Net()
    config = OptimizerConfig(lr=3e-2, weight_decay=0.0)
    optimizer = build_optimizer(model, config)
    batch = tiny_task.batch()
    losses = [train_step(model, tiny_task.loss, [batch], optimizer, step=s, clip_grad_norm=1.0)["loss"] for s in range(30)]
    assert losses[-1] < 0.3 * losses[0]
    metrics = train_step(model, tiny_task.loss, [batch], optimizer, step=30)
    assert {"loss", "ce", "grad_norm", "lr"} <= set(metrics)


def test_gradient_accumulation_matches_full_batch(tiny_task):
    torch.manual_seed(0)
    model_a = tiny_task.Net()
    model_b = copy.deepcopy(model_a)
    config = OptimizerConfig(lr=1e-2, weight_decay=0.0)
    opt_a, opt_b = build_optimizer(model_a, config), build_optimizer(model_b, config)
    full = tiny_task.batch(size=8)
    halves = [{k: v[:4] for k, v in full.items()}, {k: v[4:] for k, v in full.items()}]
    metrics_a = train_step(model_a, tiny_task.loss, [full], opt_a, step=0)
    metrics_b = train_step(model_b, tiny_task.loss, halves, opt_b, step=0)
    assert metrics_a["grad_norm"] == pytest.approx(metrics_b["grad_norm"], rel=1e-5)
    for p_a, p_b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(p_a, p_b, rtol=1e-5, atol=1e-6)


def test_weighted_micro_batches_of_unequal_sizes_match_the_full_batch(tiny_task):
    """Micro-batches of 3 and 5 rows, each weighted by its rows (size x count / total), give the full
    batch's loss and update: what a rank with an uneven slice of the global batch does."""
    from trainer.batches import micro_weights

    torch.manual_seed(0)
    model_a = tiny_task.Net()
    model_b = copy.deepcopy(model_a)
    config = OptimizerConfig(lr=1e-2, weight_decay=0.0)
    opt_a, opt_b = build_optimizer(model_a, config), build_optimizer(model_b, config)
    full = tiny_task.batch(size=8)
    parts = [{k: v[:3] for k, v in full.items()}, {k: v[3:] for k, v in full.items()}]
    metrics_a = train_step(model_a, tiny_task.loss, [full], opt_a, step=0)
    metrics_b = train_step(model_b, tiny_task.loss, parts, opt_b, step=0, weights=micro_weights([3, 5], 1, 8))
    assert metrics_a["loss"] == pytest.approx(metrics_b["loss"], rel=1e-5)
    for p_a, p_b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(p_a, p_b, rtol=1e-5, atol=1e-6)


def test_clipping_limits_the_update(tiny_task):
    model = tiny_task.Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)

    def big_loss(m, batch):
        return {"loss": 1000.0 * tiny_task.loss(m, batch)["loss"]}

    before = [p.detach().clone() for p in model.parameters()]
    metrics = train_step(model, big_loss, [tiny_task.batch()], optimizer, step=0, clip_grad_norm=0.5)
    assert metrics["grad_norm"] > 0.5  # reported before clipping
    update_sq = sum(float((p.detach() - b).square().sum()) for p, b in zip(model.parameters(), before))
    assert math.sqrt(update_sq) == pytest.approx(0.5, rel=1e-4)  # SGD lr 1: update norm == clipped norm


def test_non_finite_loss_stops_before_the_update(tiny_task):
    model = tiny_task.Net()
    optimizer = build_optimizer(model, OptimizerConfig())
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def nan_loss(m, batch):
        return {"loss": tiny_task.loss(m, batch)["loss"] * float("nan")}

    with pytest.raises(NonFiniteLossError, match="step 17"):
        train_step(model, nan_loss, [tiny_task.batch()], optimizer, step=17)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key])


def test_bf16_autocast_step_runs_on_cpu(tiny_task):
    model = tiny_task.Net()
    optimizer = build_optimizer(model, OptimizerConfig())
    metrics = train_step(model, tiny_task.loss, [tiny_task.batch()], optimizer, step=0, precision="bf16")
    assert math.isfinite(metrics["loss"])
    with pytest.raises(ValueError, match="precision"):
        train_step(model, tiny_task.loss, [tiny_task.batch()], optimizer, step=0, precision="int8")


def test_ema_tracks_and_copies(tiny_task):
    model = tiny_task.Net()
    ema = ExponentialMovingAverage(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model.counter.fill_(7)
    ema.update(model)
    target = tiny_task.Net()
    ema.copy_to(target)
    for (name, p_model), p_ema in zip(model.named_parameters(), target.parameters()):
        torch.testing.assert_close(p_ema, p_model - 0.5, msg=name)  # halfway between old and new
    assert torch.equal(target.counter, torch.full((3,), 7.0))  # buffers copied, not averaged
    assert set(ema.state_dict()) == set(model.state_dict())


def test_ema_update_is_one_lerp_per_parameter_bit_for_bit(tiny_task):
    """The multi-tensor update equals per-entry lerp_/copy_ exactly, over several updates."""
    torch.manual_seed(0)
    model = tiny_task.Net()
    ema = ExponentialMovingAverage(model, decay=0.9)
    reference = {k: v.clone() for k, v in ema.shadow.items()}
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        for name, value in model.state_dict().items():
            if name in trained:
                reference[name].lerp_(value.float(), 1.0 - 0.9)
            else:
                reference[name].copy_(value)
    assert all(torch.equal(ema.shadow[k], reference[k]) for k in reference)
