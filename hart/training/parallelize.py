"""Applying parallelism to a built model from the outside: memory format, activation checkpointing, compile,
DDP/FSDP2.

Design: the only module in `hart/` that touches `torch.distributed`. Model files stay
single-device; a job builds the model, then calls `parallelize(model, config, device)`.
The order follows torchtitan: attention kernel choice -> activation checkpointing ->
torch.compile (per block) -> data parallel wrapper. DDP is the default (HART-0.7B fits on one GPU); FSDP2
(`fully_shard` per transformer block, then at the root) is for the large presets.

FSDP2 the torchtitan way: every block is its own `fully_shard` unit (its parameters are all-gathered
just before its forward and freed after it, so peak memory holds one block's full weights, not the
model's), and the root comes last so it owns only what no block owns (embeddings, heads, norms).
`mixed_precision="bf16"` gives every unit `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`,
torchtitan's default: the sharded parameters (the optimizer's and the EMA's view) stay fp32 master
weights, the all-gathered copies the forward and backward compute with are bf16 (half the all-gather
bytes and activation memory), and gradients are reduce-scattered in fp32 so averaging over many ranks
loses no precision. It is FSDP-only: DDP keeps one full fp32 replica per rank and gets bf16 compute
from autocast (the run's `precision` setting) instead. Keep `precision: bf16` on beside it for the
transformer: it casts some activations to fp32 on purpose (norm and head inputs, written for autocast),
and without autocast the next matmul would meet bf16 weights with fp32 inputs and raise
(tests/hart/training/test_parallelize.py trains it both ways against one fp32 process).

Activation checkpointing is selective by block: `activation_checkpointing_every=k` recomputes every
k-th block in backward (torchtitan's "selective, layer" mode: blocks k-1, 2k-1, ...; k=1 is all of
them) and keeps the others' activations, trading memory for less recompute. It is applied from the
outside for every model, the transformer included, by replacing the chosen blocks' `forward` on the
instance. `activation_checkpointing_policy` says what a chosen block recomputes: "block" recomputes
all of it (least memory); "op" (torchtitan's "selective, op" mode) keeps the outputs of its matmuls
and attention kernels (`SAVED_OPS`) and recomputes only the cheap ops between them (norms, AdaLN
modulation, activations, RoPE, casts), so the backward repeats none of the forward's matmul and
attention FLOPs, for roughly the memory of their outputs. Where the elementwise work dominates a
block's activation memory (fp32 norm and modulation intermediates under autocast), that is most of
the saving at none of the matmul recompute (benchmarks/checkpointing.py). With the SDPA kernels
(`attention: sdpa`) this holds in eager and compiled blocks (tested on CPU; `benchmarks/gpu.py`
checks it on a GPU). FlexAttention runs as a compiled function, which the policy cannot look
into from an eager block: there the flex forward is recomputed in backward. Inside a compiled
block (`parallel.compile`) dynamo traces flex's higher-order op, which `SAVED_OPS` names; that
combination has not been measured (FlexAttention has no CPU backward).

Neither activation checkpointing nor compile changes state-dict keys (both patch the
blocks in place). Compile on CPU needs a C++ compiler (inductor); without one `parallelize`
raises a ValueError before the first step (tested on CPU with gcc 12, torch 2.13). Blocks are the first `nn.ModuleList` named `blocks` anywhere in the tree
(the transformer's); modules without one (the tokenizer) get root-level treatment only.

Order on a worker: parallelize, *then* build the optimizer and the EMA (FSDP2 replaces the
parameters with DTensors in place; the EMA shadow is then sharded the same way).
State dicts for checkpoints are always *full* (unsharded, CPU) so a checkpoint written
by N GPUs under FSDP2 can be read by 1 CPU process and exported to the official layout.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

STRATEGIES = ("none", "ddp", "fsdp")
CHECKPOINTING_POLICIES = ("block", "op")
ATTENTION_CHOICES = ("sdpa", "flex", "auto")
MIXED_PRECISIONS = ("none", "bf16")


@dataclass(frozen=True)
class ParallelConfig:
    """How the model is wrapped on each worker."""

    strategy: str = "ddp"  # "none" | "ddp" | "fsdp" (FSDP2 fully_shard); "ddp" falls back to none at world size 1
    activation_checkpointing: bool = False  # recompute blocks in backward (which ones: the next field)
    # With activation_checkpointing: recompute every k-th block (blocks k-1, 2k-1, ...), keep the
    # others' activations. 1 = every block; 2 = half of them (about half the recompute, more memory).
    activation_checkpointing_every: int = 1
    # What a checkpointed block recomputes: "block" = everything; "op" = only the ops between its
    # matmuls and attention kernels, whose outputs are kept (module docstring).
    activation_checkpointing_policy: str = "block"
    compile: bool = False  # torch.compile each block (and the root when there are no blocks)
    find_unused_parameters: bool = False  # DDP: needed when a stage leaves params out of the loss
    # Conv weights (4-D parameters) in torch.channels_last: the convolutions then run without layout
    # reorders (demo tokenizer step on CPU: 0.78x the time, BENCHMARKS.md). Changes the conv
    # algorithms, so losses match NCHW to ~1e-7, not bit for bit. Checkpoints are written contiguous.
    channels_last: bool = False
    # Training attention kernel of the transformer: "sdpa" (one SDPA call per scale), "flex" (one
    # FlexAttention call over the whole block-causal mask; CUDA only, FlexAttention has no CPU backward),
    # "auto" (flex on CUDA, sdpa elsewhere). The default stays "sdpa" until flex's backward and speed
    # have been measured on a GPU.
    attention: str = "sdpa"
    # FSDP2 mixed precision: "bf16" = MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) on every
    # fully_shard unit (fp32 master weights stay in the shards; see the module docstring). fsdp only:
    # DDP gets bf16 compute from the run's `precision` (autocast). Keep precision bf16 with it (the
    # transformer's fp32 casts need autocast).
    mixed_precision: str = "none"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"parallel.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"parallel.attention must be one of {ATTENTION_CHOICES}, got {self.attention!r}")
        if self.channels_last and self.strategy == "fsdp":
            raise ValueError("parallel.channels_last is not supported with parallel.strategy='fsdp' (untested "
                             "with sharded conv weights); use ddp for the tokenizer")
        if self.activation_checkpointing_every < 1:
            raise ValueError(f"parallel.activation_checkpointing_every must be >= 1 (1 = every block), "
                             f"got {self.activation_checkpointing_every}")
        if self.activation_checkpointing_policy not in CHECKPOINTING_POLICIES:
            raise ValueError(f"parallel.activation_checkpointing_policy must be one of {CHECKPOINTING_POLICIES}, "
                             f"got {self.activation_checkpointing_policy!r}")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(f"parallel.mixed_precision must be one of {MIXED_PRECISIONS}, got {self.mixed_precision!r}")
        if self.mixed_precision != "none" and self.strategy != "fsdp":
            raise ValueError(f"parallel.mixed_precision={self.mixed_precision!r} is FSDP2's MixedPrecisionPolicy and "
                             f"needs parallel.strategy='fsdp' (got {self.strategy!r}); with ddp or none, set "
                             f"mixed_precision='none' and use precision: bf16 (autocast) instead")


def distributed_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if distributed_ready() else 1


def find_blocks(model: nn.Module, block_attribute_name: str = "blocks") -> nn.ModuleList | None:
    """The first `nn.ModuleList` named `blocks` in the module tree (the model may sit inside a loss module)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] == block_attribute_name:
            return module
    return None


def _saved_ops() -> frozenset:
    """The ops whose outputs the "op" policy keeps: matmuls and every fused attention kernel (the ones
    this torch build has: the CPU flash kernel, the CUDA flash / memory-efficient / cuDNN ones, and
    FlexAttention's higher-order op). Default overloads only: an `out=` overload writes into a buffer
    that checkpointing must not keep (it would find the cached tensor mutated)."""
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention")
    ops = {getattr(aten, name).default for name in names if hasattr(aten, name)}
    if hasattr(torch.ops.higher_order, "flex_attention"):
        ops.add(torch.ops.higher_order.flex_attention)
    return frozenset(ops)


SAVED_OPS = _saved_ops()


def _keep_matmuls(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    """Selective checkpointing policy: keep SAVED_OPS' outputs, recompute everything else."""
    return CheckpointPolicy.MUST_SAVE if func in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: nn.Module, every: int = 1, policy: str = "block") -> int:
    """Recompute every `every`-th block in backward; returns the number of checkpointed blocks (0 without blocks).

    Blocks `every-1, 2*every-1, ...` are checkpointed (torchtitan's selective-layer rule; `every=1`:
    all). `policy` "block" recomputes the whole block, "op" only what lies between its matmuls and
    attention kernels (module docstring). Each chosen block's `forward` is replaced on the instance
    (not wrapped in a new module), so state-dict keys stay the official ones, and FSDP2's hooks, which
    run on the block's `__call__`, stay outside the recomputed region (the parameters are all-gathered
    before the recompute runs). Only training forwards with grad are checkpointed; generation (no
    grad, KV caches that a recompute would append to twice) runs the plain forward.
    """
    if every < 1:
        raise ValueError(f"parallel.activation_checkpointing_every must be >= 1, got {every}")
    if policy not in CHECKPOINTING_POLICIES:
        raise ValueError(f"parallel.activation_checkpointing_policy must be one of {CHECKPOINTING_POLICIES}, "
                         f"got {policy!r}")
    blocks = find_blocks(model)
    if blocks is None:
        return 0
    # A fresh pair of selective-checkpoint contexts per checkpointed call (they hold that call's saved outputs).
    options = {"context_fn": functools.partial(create_selective_checkpoint_contexts, _keep_matmuls)} \
        if policy == "op" else {}
    chosen = [block for index, block in enumerate(blocks) if (index + 1) % every == 0]
    for block in chosen:
        inner = block.forward

        def checkpointed_forward(*args, _inner=inner, _block=block, **kwargs):
            if not (_block.training and torch.is_grad_enabled()):
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **options, **kwargs)

        block.forward = checkpointed_forward
    return len(chosen)


def resolve_attention(choice: str, device: torch.device) -> str:
    """The training attention kernel for `choice` on `device` ("auto": flex on CUDA, sdpa elsewhere)."""
    if choice == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    if choice == "flex" and device.type != "cuda":
        raise ValueError(f"parallel.attention=flex trains on CUDA only (FlexAttention has no backward on "
                         f"{device.type}); use sdpa or auto")
    return choice


def apply_attention(model: nn.Module, choice: str, device: torch.device) -> str | None:
    """Set the training attention kernel on the modules that have one (the transformer); returns it,
    or None for a model without attention (the tokenizer)."""
    holders = [module for module in model.modules() if hasattr(module, "attention_backend")]
    if not holders:
        return None
    backend = resolve_attention(choice, device)
    for module in holders:
        module.attention_backend = backend
    return backend


def apply_compile(model: nn.Module) -> None:
    """Compile per block (small graphs, fast recompiles), or the root when there are no blocks.

    `nn.Module.compile` works in place and keeps state-dict keys (no `_orig_mod.` prefix).
    """
    blocks = find_blocks(model)
    for module in blocks if blocks is not None else [model]:
        module.compile()


def compile_for_generation(model: nn.Module, scale_count: int, device: torch.device) -> None:
    """Compile per block for sampling `scale_count` scales: one compiled step per scale.

    Each scale's step has its own shapes (query length, KV-cache length), so every block compiles once
    per scale on the first call (and again for another batch size). Dynamo's recompile limit (8 per
    code object by default) would silently send the later scales of a 10- or 14-scale run back to
    eager, so it is raised (process-wide; never lowered) to cover two batch sizes of every scale.
    """
    check_compile_toolchain(device)
    apply_compile(model)
    limit = 2 * scale_count + 4
    if torch._dynamo.config.recompile_limit < limit:
        torch._dynamo.config.recompile_limit = limit


def check_compile_toolchain(device: torch.device) -> None:
    """torch.compile's CPU backend (inductor) builds C++ kernels: fail here, not mid-step, without a compiler."""
    if device.type != "cpu":
        return
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as exc:  # noqa: BLE001 - torch raises InvalidCxxCompiler (and may change the type)
        raise ValueError(
            f"parallel.compile on CPU needs a C++ compiler for torch inductor (g++ or clang++ on PATH, or "
            f"$CXX): {exc}; install one, or run without compile (parallel.compile=false; no --compile)"
        ) from None


def parallelize(model: nn.Module, config: ParallelConfig, device: torch.device) -> nn.Module:
    """Return the module to train (possibly a wrapper); `model` itself is modified in place.

    Keep a reference to the original `model` for EMA, checkpoints and export: DDP's
    wrapper adds a `module.` prefix to the keys; FSDP2 shards in place and keeps them.
    """
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    apply_attention(model, config.attention, device)
    if config.activation_checkpointing:
        apply_activation_checkpointing(model, config.activation_checkpointing_every,
                                       config.activation_checkpointing_policy)
    if config.compile:
        check_compile_toolchain(device)
        apply_compile(model)
    if config.strategy == "none" or not distributed_ready():
        return model
    if config.strategy == "ddp":
        if world_size() == 1:
            return model
        device_ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(
            model, device_ids=device_ids, broadcast_buffers=False,
            find_unused_parameters=config.find_unused_parameters,
        )
    apply_fsdp(model, config.mixed_precision)
    return model


def apply_fsdp(model: nn.Module, mixed_precision: str = "none") -> None:
    """FSDP2 in place: `fully_shard` each block, then the root (which then owns only the rest).

    Blocks first: a `fully_shard` call takes the parameters not already owned by a unit below it,
    so the root last keeps each block a separate all-gather. Every unit gets the same
    `MixedPrecisionPolicy`, so all compute sees one parameter dtype.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mixed_precision not in MIXED_PRECISIONS:
        raise ValueError(f"parallel.mixed_precision must be one of {MIXED_PRECISIONS}, got {mixed_precision!r}")
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if mixed_precision == "bf16" else MixedPrecisionPolicy())
    blocks = find_blocks(model)
    if blocks is not None:
        for index, block in enumerate(blocks):
            # torchtitan: the last block stays gathered after its forward, since the backward starts
            # with it and would all-gather it again at once. The root's default is the same.
            fully_shard(block, mp_policy=policy, reshard_after_forward=index < len(blocks) - 1)
    fully_shard(model, mp_policy=policy)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict (gathers FSDP2 shards: a collective, call it on every rank)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return state


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of full_state_dict: load full CPU weights into a plain or FSDP2-sharded model (strict)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(state, strict=True)


def is_sharded(model: nn.Module) -> bool:
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def full_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gather DTensor entries (e.g. an EMA shadow kept sharded like FSDP2 params) into CPU tensors."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu() for k, v in state.items()}


def shard_like(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full tensors -> DTensors placed like `reference`'s entries (plain entries pass through)."""
    out = {}
    for key, value in state.items():
        ref = reference.get(key)
        if ref is not None and hasattr(ref, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor

            out[key] = distribute_tensor(value.to(ref.device, ref.dtype), ref.device_mesh, ref.placements)
        else:
            out[key] = value
    return out


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Optimizer state with full tensors: plain `state_dict()`, or gathered (FQN keys) under FSDP2."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        match_state_layout(optimizer)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def match_state_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give loaded per-parameter state (AdamW's moments) its parameter's memory layout.

    Checkpoints hold contiguous tensors and `Optimizer.load_state_dict` keeps that layout, so with
    channels-last parameters the moments would come back NCHW: correct, but every update would then
    mix layouts (slower; fused kernels expect one). Values are unchanged.
    """
    for param, param_state in optimizer.state.items():
        for key, value in param_state.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                param_state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def broadcast_from_rank0(tensors: list[torch.Tensor]) -> None:
    """Overwrite `tensors` on every rank with rank 0's values (in place); no-op without a process group.

    For state a rank changes outside the optimizer step (codebook restarts): DDP only
    synchronises gradients, so such a change must be copied to the other ranks explicitly.
    """
    if not distributed_ready():
        return
    for tensor in tensors:
        dist.broadcast(tensor.data, src=0)


__all__ = [
    "ParallelConfig", "parallelize", "full_state_dict", "load_full_state_dict", "is_sharded", "full_tensors",
    "shard_like", "full_optimizer_state_dict", "load_full_optimizer_state_dict",
    "apply_activation_checkpointing", "CHECKPOINTING_POLICIES", "SAVED_OPS", "apply_compile", "compile_for_generation", "apply_fsdp", "MIXED_PRECISIONS", "match_state_layout", "check_compile_toolchain", "broadcast_from_rank0", "world_size",
    "distributed_ready",
]
