"""hart/training/parallelize.py on CPU: FSDP2, selective activation checkpointing (per block and per op), channels_last, the compile
error without a compiler, and the plain path without a process group.

The two-process tests start real gloo ranks: this file run as a script is one rank
(`python tests/hart/training/test_parallelize.py RANK INIT_FILE OUT_JSON`). Subprocesses rather than
torch.multiprocessing: pytest imports this file with --import-mode=importlib, so a spawned child could
not unpickle a function defined here. One launch runs every variant (process start-up and the
process group are the slow part on 2 cores); the reference is one plain process on the whole batch.

Run: .venv/bin/python -m pytest -q tests/hart/training/test_parallelize.py
Why one module of this length: the two-process variants share one launch of the gloo ranks, and
splitting them over files would start the ranks once per file.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[3]
if __name__ == "__main__":  # a rank started by the tests below: make `hart` importable
    sys.path.insert(0, str(REPO))

from hart.training.checkpoint import load_training_state, save_training_state  # noqa: E402
from hart.training.parallelize import (  # noqa: E402
    SAVED_OPS, ParallelConfig, apply_activation_checkpointing, full_state_dict, parallelize,
)
from hart.training.step import ExponentialMovingAverage, OptimizerConfig, build_optimizer, train_step  # noqa: E402

WORLD_SIZE = 2
STEPS = 5
BATCH = 8
LR = 1e-2


class Block(nn.Module):
    calls = 0  # forward executions over all instances (checkpoint recomputes included)

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.linear = nn.Linear(width, width)

    def forward(self, x):
        Block.calls += 1
        return torch.tanh(self.linear(self.norm(x)))


class BlockNet(nn.Module):
    """Embedding + 4 residual blocks + head (a block list named `blocks`, like the transformer)."""

    def __init__(self, width: int = 8, depth: int = 4):
        super().__init__()
        self.embedding = nn.Embedding(10, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 10)

    def forward(self, idx_BL):
        x_BLC = self.embedding(idx_BL)
        for block in self.blocks:
            x_BLC = x_BLC + block(x_BLC)
        return self.head(x_BLC)


def ce_loss(model, batch):
    logits = model(batch["x"])
    loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), batch["y"].flatten())
    return {"loss": loss}


def make_batch(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, 10, (BATCH, 5), generator=g)
    return {"x": x, "y": (x * 3 + 1) % 10}


def new_model() -> BlockNet:
    torch.manual_seed(0)  # the same weights on every rank and in the reference
    return BlockNet()


# ------------------------------------------------------------------------------ selective checkpointing


@pytest.mark.parametrize("every, recomputed", [(1, 4), (2, 2), (3, 1), (5, 0)])
def test_checkpointing_every_k_recomputes_those_blocks_with_the_same_gradients(every, recomputed):
    plain = new_model()
    wrapped = copy.deepcopy(plain)
    assert apply_activation_checkpointing(wrapped, every) == recomputed
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    batch = make_batch(0)
    ce_loss(plain, batch)["loss"].backward()
    loss = ce_loss(wrapped, batch)["loss"]
    Block.calls = 0
    loss.backward()
    assert Block.calls == recomputed  # forwards run again during backward = checkpointed blocks
    for (name, p_a), p_b in zip(plain.named_parameters(), wrapped.parameters()):
        torch.testing.assert_close(p_b.grad, p_a.grad, rtol=0, atol=0, msg=name)
    Block.calls = 0
    with torch.no_grad():
        wrapped(batch["x"])
    assert Block.calls == 4  # no recompute machinery without grad (generation with KV caches)


def test_parallelize_applies_checkpointing_every_k_from_the_config():
    model = new_model()
    parallelize(model, ParallelConfig(strategy="none", activation_checkpointing=True,
                                      activation_checkpointing_every=2), torch.device("cpu"))
    patched = ["forward" in vars(block) for block in model.blocks]
    assert patched == [False, True, False, True]  # torchtitan's rule: blocks k-1, 2k-1, ...


def tiny_transformer() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The seeded tiny HART transformer in training mode and one batch of its inputs (context, mask, teacher forcing)."""
    from hart.config import transformer_config
    from hart.transformer.model import HARTForT2I

    cfg = transformer_config("tiny")
    torch.manual_seed(0)
    model = HARTForT2I(cfg)
    model.init_weights()
    model.train()
    g = torch.Generator().manual_seed(1)
    return model, (torch.randn(2, cfg.context_token, cfg.context_dim, generator=g),
                   torch.ones(2, cfg.context_token, dtype=torch.bool),
                   torch.randn(2, cfg.num_image_tokens() - 1, cfg.token_dim, generator=g))


def test_transformer_is_checkpointed_from_outside_with_the_same_gradients():
    model, inputs = tiny_transformer()
    wrapped = copy.deepcopy(model)
    parallelize(wrapped, ParallelConfig(strategy="none", activation_checkpointing=True), torch.device("cpu"))
    assert all("forward" in vars(block) for block in wrapped.blocks)
    for m in (model, wrapped):
        m(*inputs).square().mean().backward()
    for (name, p_a), p_b in zip(model.named_parameters(), wrapped.parameters()):
        if p_a.grad is not None:
            torch.testing.assert_close(p_b.grad, p_a.grad, msg=name)


def test_op_policy_recomputes_no_matmul_or_attention_and_keeps_the_gradients():
    """policy "op": the backward runs exactly the matmuls and attention kernels of an uncheckpointed
    backward (their forward outputs were kept); policy "block" runs each block's forward ones again."""
    from benchmarks.gpu import SavedOpCalls  # the counter the GPU script's check uses

    # default overloads only: an out= matmul writes into a buffer that checkpointing must not keep
    assert torch.ops.aten.mm.default in SAVED_OPS and torch.ops.aten.mm.out not in SAVED_OPS
    model, inputs = tiny_transformer()
    backward_ops, grads = {}, {}
    for policy in ("none", "block", "op"):
        trained = copy.deepcopy(model)
        if policy != "none":
            parallelize(trained, ParallelConfig(strategy="none", activation_checkpointing=True,
                                                activation_checkpointing_policy=policy), torch.device("cpu"))
        loss = trained(*inputs).square().mean()
        with SavedOpCalls() as counter:
            loss.backward()
        backward_ops[policy] = counter.calls
        grads[policy] = [p.grad for p in trained.parameters()]
    in_blocks = SavedOpCalls()  # the matmuls and attention calls of the blocks' forwards alone
    in_blocks.counting = False
    for block in model.blocks:
        block.register_forward_pre_hook(lambda *_: setattr(in_blocks, "counting", True))
        block.register_forward_hook(lambda *_: setattr(in_blocks, "counting", False))
    with in_blocks, torch.no_grad():
        model(*inputs)
    assert in_blocks.calls > 0
    assert backward_ops["op"] == backward_ops["none"]
    assert backward_ops["block"] == backward_ops["none"] + in_blocks.calls  # the blocks' forwards again
    for policy in ("block", "op"):  # fp32 on CPU: recomputed elementwise ops give the same bits
        for (name, _), a, b in zip(model.named_parameters(), grads["none"], grads[policy]):
            assert (a is None) == (b is None), name
            if a is not None:
                torch.testing.assert_close(b, a, rtol=0, atol=0, msg=f"{policy}: {name}")


def test_compile_for_generation_compiles_each_block_and_only_raises_the_recompile_limit():
    from hart.training.parallelize import compile_for_generation

    for before, scales, after in ((8, 10, 24), (100, 14, 100)):
        model = new_model()
        with torch._dynamo.config.patch(recompile_limit=before):
            compile_for_generation(model, scales, torch.device("cpu"))
            assert torch._dynamo.config.recompile_limit == after
        assert all(block._compiled_call_impl is not None for block in model.blocks)
        assert model._compiled_call_impl is None  # blocks only, as in training


def test_config_validation():
    with pytest.raises(ValueError, match="activation_checkpointing_policy must be one of"):
        ParallelConfig(activation_checkpointing_policy="layer")
    with pytest.raises(ValueError, match="activation_checkpointing_policy must be one of"):
        apply_activation_checkpointing(new_model(), 1, "all")
    with pytest.raises(ValueError, match="parallel.mixed_precision must be one of"):
        ParallelConfig(strategy="fsdp", mixed_precision="fp16")
    with pytest.raises(ValueError, match="needs parallel.strategy='fsdp'.*precision: bf16"):
        ParallelConfig(strategy="ddp", mixed_precision="bf16")
    with pytest.raises(ValueError, match="activation_checkpointing_every must be >= 1"):
        ParallelConfig(activation_checkpointing_every=0)
    assert ParallelConfig(strategy="fsdp", mixed_precision="bf16").mixed_precision == "bf16"


def test_order_is_checkpointing_compile_blocks_then_root(monkeypatch):
    """AC -> compile per block -> fully_shard per block (bf16 policy) -> fully_shard root, recorded."""
    import torch.distributed.fsdp as fsdp

    import hart.training.parallelize as par

    events = []
    model = new_model()
    names = {id(m): n or "root" for n, m in model.named_modules()}

    def fake_compile(m):
        for block in par.find_blocks(m):
            events.append(("compile", names[id(block)], "forward" in vars(block)))

    def fake_shard(module, *, mp_policy, reshard_after_forward=None):
        events.append(("shard", names[id(module)], mp_policy.param_dtype, mp_policy.reduce_dtype))

    monkeypatch.setattr(par, "apply_compile", fake_compile)
    monkeypatch.setattr(par, "check_compile_toolchain", lambda device: None)
    monkeypatch.setattr(par, "distributed_ready", lambda: True)
    monkeypatch.setattr(fsdp, "fully_shard", fake_shard)
    config = ParallelConfig(strategy="fsdp", activation_checkpointing=True, compile=True, mixed_precision="bf16")
    parallelize(model, config, torch.device("cpu"))
    bf16, fp32 = torch.bfloat16, torch.float32
    assert events == [
        ("compile", "blocks.0", True), ("compile", "blocks.1", True), ("compile", "blocks.2", True),
        ("compile", "blocks.3", True),  # compile sees the checkpointed forwards
        ("shard", "blocks.0", bf16, fp32), ("shard", "blocks.1", bf16, fp32), ("shard", "blocks.2", bf16, fp32),
        ("shard", "blocks.3", bf16, fp32), ("shard", "root", bf16, fp32),
    ]


# ------------------------------------------------------------------------------ two gloo ranks


class Setup:
    """A model, its loss and its batches, the same in every rank and in the reference."""

    lr = LR
    precision = "fp32"

    def model(self) -> nn.Module:
        return new_model()

    def batch(self, step: int) -> dict:
        return make_batch(step)

    def loss(self, model, batch):
        return ce_loss(model, batch)

    def compute_weight(self, block: nn.Module) -> torch.Tensor:
        return block.linear.weight

    def rows(self, batch: dict, start: int, stop: int) -> dict:
        return {k: (v[start:stop] if torch.is_tensor(v) else [t[start:stop] for t in v]) for k, v in batch.items()}


class TransformerSetup(Setup):
    """The tiny HARTForT2I preset with `t2i_losses` (CE only; no last-scale subsampling, no CFG dropout, no
    diffusion noise: those draw per row from one generator, so half batches would draw other values)."""

    lr = 2e-3

    def __init__(self, precision: str = "fp32"):
        from hart.config import TokenizerConfig, transformer_config
        from hart.tokenizer.quantizer import MultiScaleQuantizer

        self.precision = precision
        self.cfg = transformer_config("tiny")
        torch.manual_seed(1)
        self.quantizer = MultiScaleQuantizer(TokenizerConfig(
            vocab_size=self.cfg.vocab_size, z_channels=self.cfg.token_dim, patch_nums=tuple(self.cfg.patch_nums)))

    def model(self) -> nn.Module:
        from hart.transformer.model import HARTForT2I

        torch.manual_seed(0)
        model = HARTForT2I(self.cfg)
        model.init_weights()
        return model.train()

    def batch(self, step: int) -> dict:
        # One batch at every step: random tokens are not learnable across batches, one batch is (the loss
        # falls, so the later steps' losses depend on the reduced gradients).
        g, cfg = torch.Generator().manual_seed(0), self.cfg
        return {"context": torch.randn(BATCH, cfg.context_token, cfg.context_dim, generator=g),
                "mask": torch.ones(BATCH, cfg.context_token, dtype=torch.bool),
                "tokens": [torch.randint(0, cfg.vocab_size, (BATCH, pn * pn), generator=g) for pn in cfg.patch_nums]}

    def loss(self, model, batch):
        from hart.transformer.objective import t2i_losses

        return t2i_losses(model, self.quantizer, batch["context"], batch["mask"], batch["tokens"], None,
                          use_diffusion=False, subsample_last=False, drop_text_condition=False)

    def compute_weight(self, block: nn.Module) -> torch.Tensor:
        return block.attn.proj.weight


SETUPS = {"blocknet": Setup, "transformer": TransformerSetup, "transformer_bf16": lambda: TransformerSetup("bf16")}

# name -> (setup, ParallelConfig fields, how the rank picks its rows)
VARIANTS = {
    "fp32": ("blocknet", dict(strategy="fsdp", activation_checkpointing=True, activation_checkpointing_every=2), "half"),
    "bf16": ("blocknet", dict(strategy="fsdp", mixed_precision="bf16"), "half"),
    # The check's own check: rank 1 trains on rank 0's rows (rank 0's data counted twice).
    "doubled": ("blocknet", dict(strategy="fsdp"), "rank0_twice"),
    "transformer": ("transformer", dict(strategy="fsdp", activation_checkpointing=True,
                                        activation_checkpointing_every=2), "half"),
    # The transformer casts to fp32 in places (norm inputs, logits), written for autocast: with bf16
    # parameters and no autocast its next matmul sees mixed dtypes. The run's `precision: bf16`
    # (autocast) therefore stays on beside mixed_precision=bf16.
    "transformer_bf16": ("transformer_bf16", dict(strategy="fsdp", mixed_precision="bf16"), "half"),
}


def rank_rows(setup: Setup, batch: dict, rank: int, rows: str) -> dict:
    half = BATCH // WORLD_SIZE
    start = 0 if rows == "rank0_twice" else rank * half
    return setup.rows(batch, start, start + half)


def train(setup: Setup, model: nn.Module, trained: nn.Module, batches) -> tuple[list[float], list[float]]:
    """STEPS optimizer steps: (losses, pre-clip gradient norms); losses are averaged over ranks."""
    import torch.distributed as dist

    optimizer = build_optimizer(model, OptimizerConfig(lr=setup.lr, weight_decay=0.0))
    losses, grad_norms = [], []
    for step, batch in enumerate(batches):
        metrics = train_step(trained, setup.loss, [batch], optimizer, step=step, clip_grad_norm=1.0,
                             precision=setup.precision)
        loss = torch.tensor([metrics["loss"]], dtype=torch.float64)
        if dist.is_initialized():  # the mean over ranks, as logged; one process: its own loss
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        losses.append(float(loss))
        grad_norms.append(metrics["grad_norm"])  # of the reduced gradient: the same on every rank
    return losses, grad_norms


def run_rank(rank: int, init_file: str, out_file: str) -> None:
    """One rank: every variant on a fresh model; rank 0 writes the results."""
    import torch.distributed as dist

    from hart.training.parallelize import full_state_dict

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    results = {}
    try:
        for name, (setup_name, fields, rows) in VARIANTS.items():
            setup = SETUPS[setup_name]()
            model = setup.model()
            trained = parallelize(model, ParallelConfig(**fields), torch.device("cpu"))
            seen = {}
            # a pre-hook runs after FSDP2's own (prepended) all-gather: it sees the weight the block computes with
            hook = model.blocks[1].register_forward_pre_hook(
                lambda m, args: seen.setdefault("compute", str(setup.compute_weight(m).dtype)) and None)
            batches = [rank_rows(setup, setup.batch(step), rank, rows) for step in range(STEPS)]
            losses, grad_norms = train(setup, model, trained, batches)
            hook.remove()
            param = setup.compute_weight(model.blocks[1])
            state = full_state_dict(model)  # a collective; the full tensors land on rank 0 only (cpu_offload)
            results[name] = {
                "losses": losses, "grad_norms": grad_norms, "compute_dtype": seen["compute"],
                "head": state["head.weight"].tolist() if rank == 0 else None,
                "param": [type(param).__name__, str(param.dtype), str(param.grad.dtype)],
                "local_rows": param.to_local().shape[0], "rows": param.shape[0],
            }
    finally:
        dist.destroy_process_group()
    if rank == 0:
        Path(out_file).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("fsdp")
    out = folder / "results.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, __file__, str(rank), str(folder / "store"), str(out)], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(WORLD_SIZE)]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=120)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]
    return json.loads(out.read_text())


def reference(setup_name: str) -> tuple[list[float], list[float], torch.Tensor]:
    """One process, no process group, the whole batch each step: (losses, gradient norms, final head weight)."""
    setup = SETUPS[setup_name]()
    model = setup.model()
    losses, grad_norms = train(setup, model, model, [setup.batch(step) for step in range(STEPS)])
    return losses, grad_norms, model.head.weight.detach()


@pytest.mark.parametrize("variant", ["fp32", "transformer"])
def test_two_fsdp_ranks_give_the_single_process_losses(two_ranks, variant):
    """fp32 FSDP2 (+ checkpointing every 2nd block), each rank on half the batch: rtol 1e-5."""
    losses, grad_norms, head = reference(VARIANTS[variant][0])
    result = two_ranks[variant]
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(losses), rtol=1e-5, atol=0)
    # AdamW with clipping hides a gradient scale error (a sum instead of a mean over ranks) from the
    # losses; the pre-clip norm shows it.
    torch.testing.assert_close(torch.tensor(result["grad_norms"]), torch.tensor(grad_norms), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(result["head"]), head, rtol=1e-5, atol=1e-6)
    assert result["param"] == ["DTensor", "torch.float32", "torch.float32"]
    assert result["local_rows"] == result["rows"] // WORLD_SIZE  # sharded
    assert result["compute_dtype"] == "torch.float32"
    assert max(abs(a - b) for a, b in zip(losses, losses[1:])) > 0.01  # the weights move: later steps test the reduction


@pytest.mark.parametrize("variant", ["bf16", "transformer_bf16"])
def test_bf16_mixed_precision_computes_in_bf16_and_keeps_fp32_masters(two_ranks, variant):
    """MixedPrecisionPolicy(bf16 params, fp32 reduce): losses within rtol 5e-3 of the fp32 single process.

    bf16 keeps 8 significant bits (relative step 7.8e-3); measured deviation over the 5 steps:
    8e-4 (BlockNet), 2e-4 (transformer, with autocast).
    """
    setup_name = VARIANTS[variant][0].replace("_bf16", "")
    losses, _, _ = reference(setup_name)
    result = two_ranks[variant]
    assert result["compute_dtype"] == "torch.bfloat16"
    assert result["param"] == ["DTensor", "torch.float32", "torch.float32"]  # sharded masters and grads stay fp32
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(losses), rtol=5e-3, atol=0)
    assert result["losses"] != losses  # it did compute in bf16


def test_the_comparison_catches_wrong_data_on_one_rank(two_ranks):
    """The check's own check: rank 0's rows on both ranks must fail even the bf16 tolerance (measured: 0.12 off)."""
    losses, _, _ = reference("blocknet")
    doubled = torch.tensor(two_ranks["doubled"]["losses"])
    assert not torch.allclose(doubled, torch.tensor(losses), rtol=5e-3, atol=0)


# ------------------------------------------------------------------ single process: wrappers, channels_last, compile, FSDP2


def test_activation_checkpointing_keeps_keys_and_gradients(tiny_task):
    torch.manual_seed(0)
    model = tiny_task.Net()
    wrapped = copy.deepcopy(model)
    assert apply_activation_checkpointing(wrapped) == 2
    assert list(wrapped.state_dict()) == list(model.state_dict())
    batch = tiny_task.batch()
    tiny_task.loss(model, batch)["loss"].backward()
    tiny_task.loss(wrapped, batch)["loss"].backward()
    for p_a, p_b in zip(model.parameters(), wrapped.parameters()):
        torch.testing.assert_close(p_a.grad, p_b.grad)


def test_parallelize_without_process_group_is_plain(tiny_task):
    model = tiny_task.Net()
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


def test_compile_on_cpu_without_a_compiler_is_a_clear_error(tiny_task):
    import torch._inductor.config as inductor_config
    from torch._inductor.cpp_builder import cpp_compiler_search

    cpp_compiler_search.cache_clear()
    # inductor's own patch(): monkeypatch's undo left `cpp.cxx` deleted, breaking every later CPU compile
    try:
        with inductor_config.patch({"cpp.cxx": ("no-such-c++-compiler",)}):
            with pytest.raises(ValueError, match="parallel.compile on CPU needs a C\\+\\+ compiler"):
                parallelize(tiny_task.Net(), ParallelConfig(compile=True), torch.device("cpu"))
    finally:
        cpp_compiler_search.cache_clear()


def test_fsdp2_single_process_matches_plain_training_and_round_trips(tmp_path, tiny_task):
    """FSDP2 on a 1-process gloo group: same losses as plain training; full state out and back in."""
    import torch.distributed as dist

    from hart.training.parallelize import (
        full_optimizer_state_dict, full_tensors, is_sharded, load_full_optimizer_state_dict, load_full_state_dict,
        shard_like,
    )

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        sharded, plain = tiny_task.Net(), tiny_task.Net()
        plain.load_state_dict(sharded.state_dict())
        wrapped = parallelize(sharded, ParallelConfig(strategy="fsdp"), torch.device("cpu"))
        assert is_sharded(sharded)
        config = OptimizerConfig(lr=1e-2, weight_decay=0.0)
        opt_s, opt_p = build_optimizer(sharded, config), build_optimizer(plain, config)
        ema = ExponentialMovingAverage(sharded, 0.5)
        for step in range(3):
            a = train_step(wrapped, tiny_task.loss, [tiny_task.batch(step)], opt_s, step=step, clip_grad_norm=1.0)
            b = train_step(plain, tiny_task.loss, [tiny_task.batch(step)], opt_p, step=step, clip_grad_norm=1.0)
            ema.update(sharded)
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        model_state, ema_state = full_state_dict(sharded), full_tensors(ema.state_dict())
        optimizer_state = full_optimizer_state_dict(sharded, opt_s)
        torch.testing.assert_close(model_state["head.weight"], plain.head.weight.detach())
        # a fresh sharded copy restored from the full state continues identically
        restored = tiny_task.Net()
        restored_wrapped = parallelize(restored, ParallelConfig(strategy="fsdp"), torch.device("cpu"))
        restored_opt = build_optimizer(restored, config)
        restored_ema = ExponentialMovingAverage(restored, 0.5)
        load_full_state_dict(restored, model_state)
        load_full_optimizer_state_dict(restored, restored_opt, optimizer_state)
        restored_ema.load_state_dict(shard_like(ema_state, restored_ema.shadow))
        a = train_step(wrapped, tiny_task.loss, [tiny_task.batch(9)], opt_s, step=3)
        b = train_step(restored_wrapped, tiny_task.loss, [tiny_task.batch(9)], restored_opt, step=3)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        torch.testing.assert_close(full_tensors(restored_ema.state_dict())["head.weight"], ema_state["head.weight"])
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_rank(int(sys.argv[1]), sys.argv[2], sys.argv[3])
