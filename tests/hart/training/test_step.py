"""Unit tests of hart/training/step.py, hart/training/checkpoint.py and hart/training/parallelize.py (no Ray, no process group).

Run: .venv/bin/pytest tests/hart/training/test_step.py -q
"""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from hart.training.checkpoint import (
    load_rng_state, load_training_state, read_meta, save_rng_state, save_training_state, upgrade_meta,
)
from hart.training.parallelize import ParallelConfig, apply_activation_checkpointing, full_state_dict, parallelize
from hart.training.step import (
    ExponentialMovingAverage, NonFiniteLossError, OptimizerConfig, build_optimizer, build_scheduler,
    lr_factor, parameter_groups, restore_scheduler, train_step,
)


class TinyNet(nn.Module):
    """Embedding + blocks + head: enough structure for the param-group and wrapper rules."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(10, 8)
        self.pos_start = nn.Parameter(torch.zeros(1, 1, 8))
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8)) for _ in range(2))
        self.head = nn.Linear(8, 10)
        self.register_buffer("counter", torch.zeros(3))

    def forward(self, idx_BL):
        x_BLC = self.embedding(idx_BL) + self.pos_start
        for block in self.blocks:
            x_BLC = x_BLC + block(x_BLC)
        return self.head(x_BLC)


def ce_loss(model, batch):
    logits = model(batch["x"])
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), batch["y"].flatten())
    return {"loss": loss, "ce": loss.detach()}


def make_batch(seed=0, size=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 10, (size, 5), generator=g)
    return {"x": x, "y": (x + 1) % 10}


def test_parameter_groups_follow_var_rule():
    groups = parameter_groups(TinyNet(), weight_decay=0.05)
    decay = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    no_decay = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    assert decay == {"blocks.0.1.weight", "blocks.1.1.weight", "head.weight"}
    # 1-D params (biases, LayerNorm), the embedding table and the named positional parameter
    assert {"embedding.weight", "pos_start", "head.bias", "blocks.0.0.weight", "blocks.0.1.bias"} <= no_decay


def test_frozen_parameters_are_left_out():
    model = TinyNet()
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


def test_scheduler_resume_is_exact():
    config = OptimizerConfig(lr=1e-2, warmup_steps=3, end_ratio=0.0)
    model = TinyNet()
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, 20, config)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    fresh_optimizer = build_optimizer(TinyNet(), config)
    fresh = build_scheduler(fresh_optimizer, 20, config)
    fresh.load_state_dict(state)
    assert fresh.get_last_lr() == scheduler.get_last_lr()


def test_train_step_overfits_and_reports():
    torch.manual_seed(0)
    model = TinyNet()
    config = OptimizerConfig(lr=3e-2, weight_decay=0.0)
    optimizer = build_optimizer(model, config)
    batch = make_batch()
    losses = [train_step(model, ce_loss, [batch], optimizer, step=s, clip_grad_norm=1.0)["loss"] for s in range(30)]
    assert losses[-1] < 0.3 * losses[0]
    metrics = train_step(model, ce_loss, [batch], optimizer, step=30)
    assert {"loss", "ce", "grad_norm", "lr"} <= set(metrics)


def test_gradient_accumulation_matches_full_batch():
    torch.manual_seed(0)
    model_a = TinyNet()
    model_b = copy.deepcopy(model_a)
    config = OptimizerConfig(lr=1e-2, weight_decay=0.0)
    opt_a, opt_b = build_optimizer(model_a, config), build_optimizer(model_b, config)
    full = make_batch(size=8)
    halves = [{k: v[:4] for k, v in full.items()}, {k: v[4:] for k, v in full.items()}]
    metrics_a = train_step(model_a, ce_loss, [full], opt_a, step=0)
    metrics_b = train_step(model_b, ce_loss, halves, opt_b, step=0)
    assert metrics_a["grad_norm"] == pytest.approx(metrics_b["grad_norm"], rel=1e-5)
    for p_a, p_b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(p_a, p_b, rtol=1e-5, atol=1e-6)


def test_clipping_limits_the_update():
    model = TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)

    def big_loss(m, batch):
        return {"loss": 1000.0 * ce_loss(m, batch)["loss"]}

    before = [p.detach().clone() for p in model.parameters()]
    metrics = train_step(model, big_loss, [make_batch()], optimizer, step=0, clip_grad_norm=0.5)
    assert metrics["grad_norm"] > 0.5  # reported before clipping
    update_sq = sum(float((p.detach() - b).square().sum()) for p, b in zip(model.parameters(), before))
    assert math.sqrt(update_sq) == pytest.approx(0.5, rel=1e-4)  # SGD lr 1: update norm == clipped norm


def test_non_finite_loss_stops_before_the_update():
    model = TinyNet()
    optimizer = build_optimizer(model, OptimizerConfig())
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def nan_loss(m, batch):
        return {"loss": ce_loss(m, batch)["loss"] * float("nan")}

    with pytest.raises(NonFiniteLossError, match="step 17"):
        train_step(model, nan_loss, [make_batch()], optimizer, step=17)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key])


def test_bf16_autocast_step_runs_on_cpu():
    model = TinyNet()
    optimizer = build_optimizer(model, OptimizerConfig())
    metrics = train_step(model, ce_loss, [make_batch()], optimizer, step=0, precision="bf16")
    assert math.isfinite(metrics["loss"])
    with pytest.raises(ValueError, match="precision"):
        train_step(model, ce_loss, [make_batch()], optimizer, step=0, precision="int8")


def test_ema_tracks_and_copies():
    model = TinyNet()
    ema = ExponentialMovingAverage(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model.counter.fill_(7)
    ema.update(model)
    target = TinyNet()
    ema.copy_to(target)
    for (name, p_model), p_ema in zip(model.named_parameters(), target.parameters()):
        torch.testing.assert_close(p_ema, p_model - 0.5, msg=name)  # halfway between old and new
    assert torch.equal(target.counter, torch.full((3,), 7.0))  # buffers copied, not averaged
    assert set(ema.state_dict()) == set(model.state_dict())


def test_ema_update_is_one_lerp_per_parameter_bit_for_bit():
    """The multi-tensor update equals per-entry lerp_/copy_ exactly, over several updates."""
    torch.manual_seed(0)
    model = TinyNet()
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


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    config = OptimizerConfig(lr=1e-2, warmup_steps=2)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, 10, config)
    ema = ExponentialMovingAverage(model, 0.9)
    for step in range(3):
        train_step(model, ce_loss, [make_batch(step)], optimizer, step=step, scheduler=scheduler)
        ema.update(model)
    save_training_state(
        tmp_path / "ckpt", meta={"step": 3, "data_epoch": 1, "mlflow_run_id": "abc"}, model=model.state_dict(),
        ema=ema.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
        extra={"disc": {"w": torch.ones(2)}}, extra_optimizers={"disc": optimizer.state_dict()},
    )
    state = load_training_state(tmp_path / "ckpt")
    assert state.step == 3 and state.meta["mlflow_run_id"] == "abc" and state.meta["format_version"] == 1
    # continue both the original and a restored copy: identical trajectories
    restored = TinyNet()
    restored.load_state_dict(state.model)
    restored_opt = build_optimizer(restored, config)
    restored_sched = build_scheduler(restored_opt, 10, config)
    restored_opt.load_state_dict(state.optimizer)
    restore_scheduler(restored_opt, restored_sched, state.scheduler)
    for step in range(3, 6):
        a = train_step(model, ce_loss, [make_batch(step)], optimizer, step=step, scheduler=scheduler)
        b = train_step(restored, ce_loss, [make_batch(step)], restored_opt, step=step, scheduler=restored_sched)
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


def test_activation_checkpointing_keeps_keys_and_gradients():
    torch.manual_seed(0)
    model = TinyNet()
    wrapped = copy.deepcopy(model)
    assert apply_activation_checkpointing(wrapped) == 2
    assert list(wrapped.state_dict()) == list(model.state_dict())
    batch = make_batch()
    ce_loss(model, batch)["loss"].backward()
    ce_loss(wrapped, batch)["loss"].backward()
    for p_a, p_b in zip(model.parameters(), wrapped.parameters()):
        torch.testing.assert_close(p_a.grad, p_b.grad)


def test_parallelize_without_process_group_is_plain():
    model = TinyNet()
    trained = parallelize(model, ParallelConfig(strategy="ddp"), torch.device("cpu"))
    assert trained is model
    assert set(full_state_dict(model)) == set(model.state_dict())
    with pytest.raises(ValueError, match="strategy"):
        ParallelConfig(strategy="tp")


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x_B3HW):
        return self.conv_out(torch.nn.functional.silu(self.conv_in(x_B3HW)))


def mse_loss(model, batch):
    loss = nn.functional.mse_loss(model(batch["x"]), batch["x"])
    return {"loss": loss}


def test_channels_last_trains_like_nchw_and_resumes_in_its_layout(tmp_path):
    """parallel.channels_last: conv weights in channels_last, a step close to NCHW's, and a resumed run
    that continues exactly, with AdamW's moments back in the parameters' layout (checkpoints are contiguous)."""
    from hart.training.parallelize import load_full_optimizer_state_dict

    torch.manual_seed(0)
    plain = ConvNet()
    fast = copy.deepcopy(plain)
    parallelize(fast, ParallelConfig(strategy="none", channels_last=True), torch.device("cpu"))
    assert fast.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not fast.conv_in.weight.is_contiguous()
    config = OptimizerConfig(lr=1e-2, warmup_steps=0)
    batches = [{"x": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(i))} for i in range(6)]
    runs = {}
    for name, model in (("plain", plain), ("fast", fast)):
        optimizer = build_optimizer(model, config)
        runs[name] = (optimizer, [train_step(model, mse_loss, [b], optimizer, step=i)["loss"] for i, b in enumerate(batches[:3])])
    torch.testing.assert_close(runs["fast"][1], runs["plain"][1], rtol=1e-5, atol=1e-6)

    optimizer = runs["fast"][0]
    save_training_state(tmp_path / "ckpt", meta={"step": 3, "data_epoch": 0}, model=full_state_dict(fast),
                        ema=None, optimizer=optimizer.state_dict(), scheduler={}, extra={}, extra_optimizers={})
    state = load_training_state(tmp_path / "ckpt")
    restored = ConvNet()
    parallelize(restored, ParallelConfig(strategy="none", channels_last=True), torch.device("cpu"))
    restored.load_state_dict(state.model)
    restored_optimizer = build_optimizer(restored, config)
    load_full_optimizer_state_dict(restored, restored_optimizer, state.optimizer)
    moments = restored_optimizer.state[restored.conv_in.weight]["exp_avg"]
    assert moments.stride() == restored.conv_in.weight.stride()
    for i, b in enumerate(batches[3:], start=3):
        a = train_step(fast, mse_loss, [b], optimizer, step=i)["loss"]
        c = train_step(restored, mse_loss, [b], restored_optimizer, step=i)["loss"]
        assert a == c
    with pytest.raises(ValueError, match="channels_last"):
        ParallelConfig(strategy="fsdp", channels_last=True)


def test_compile_on_cpu_without_a_compiler_is_a_clear_error():
    import torch._inductor.config as inductor_config
    from torch._inductor.cpp_builder import cpp_compiler_search

    cpp_compiler_search.cache_clear()
    # inductor's own patch(): monkeypatch's undo left `cpp.cxx` deleted, breaking every later CPU compile
    try:
        with inductor_config.patch({"cpp.cxx": ("no-such-c++-compiler",)}):
            with pytest.raises(ValueError, match="parallel.compile on CPU needs a C\\+\\+ compiler"):
                parallelize(TinyNet(), ParallelConfig(compile=True), torch.device("cpu"))
    finally:
        cpp_compiler_search.cache_clear()


def test_fsdp2_single_process_matches_plain_training_and_round_trips(tmp_path):
    """FSDP2 on a 1-process gloo group: same losses as plain training; full state out and back in."""
    import torch.distributed as dist

    from hart.training.parallelize import (
        full_optimizer_state_dict, full_tensors, is_sharded, load_full_optimizer_state_dict, load_full_state_dict,
        shard_like,
    )

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        sharded, plain = TinyNet(), TinyNet()
        plain.load_state_dict(sharded.state_dict())
        wrapped = parallelize(sharded, ParallelConfig(strategy="fsdp"), torch.device("cpu"))
        assert is_sharded(sharded)
        config = OptimizerConfig(lr=1e-2, weight_decay=0.0)
        opt_s, opt_p = build_optimizer(sharded, config), build_optimizer(plain, config)
        ema = ExponentialMovingAverage(sharded, 0.5)
        for step in range(3):
            a = train_step(wrapped, ce_loss, [make_batch(step)], opt_s, step=step, clip_grad_norm=1.0)
            b = train_step(plain, ce_loss, [make_batch(step)], opt_p, step=step, clip_grad_norm=1.0)
            ema.update(sharded)
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        model_state, ema_state = full_state_dict(sharded), full_tensors(ema.state_dict())
        optimizer_state = full_optimizer_state_dict(sharded, opt_s)
        torch.testing.assert_close(model_state["head.weight"], plain.head.weight.detach())
        # a fresh sharded copy restored from the full state continues identically
        restored = TinyNet()
        restored_wrapped = parallelize(restored, ParallelConfig(strategy="fsdp"), torch.device("cpu"))
        restored_opt = build_optimizer(restored, config)
        restored_ema = ExponentialMovingAverage(restored, 0.5)
        load_full_state_dict(restored, model_state)
        load_full_optimizer_state_dict(restored, restored_opt, optimizer_state)
        restored_ema.load_state_dict(shard_like(ema_state, restored_ema.shadow))
        a = train_step(wrapped, ce_loss, [make_batch(9)], opt_s, step=3)
        b = train_step(restored_wrapped, ce_loss, [make_batch(9)], restored_opt, step=3)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        torch.testing.assert_close(full_tensors(restored_ema.state_dict())["head.weight"], ema_state["head.weight"])
    finally:
        dist.destroy_process_group()
