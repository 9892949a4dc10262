"""Activation checkpointing settings side by side: memory held by a training step, FLOPs run, step time.

What it measures, per `parallel` setting (`none`; `block`: every block recomputed; `block/2`: every
second block; `op`: every block, keeping its matmul and attention outputs; see
`hart/training/parallelize.py`), on one worker step of a transformer on random tokens (the step of
`benchmarks/step_ops.py`: `t2i_losses` forward + backward, fused AdamW, EMA update):
- held / peak MiB: what the forward leaves alive for the backward, and the step's most at once, counted
  per tensor storage by `StorageTracker` (below: every storage an op creates, until it is freed), so
  the figures hold for a GPU too at the same precision, minus kernel workspaces; measured in fp32
  and under bf16 autocast (the GPU setting). Cross-checked against torch's `MemTracker` on the tiny
  model's forward + backward: peaks within 0.3 MiB of its (13 MiB, none) for none, block and op;
  `MemTracker` itself cannot follow this step, which calls some modules twice.
- FLOP/step: `FlopCounterMode` over the step, recompute included (matmuls and attention; the
  elementwise recompute that `op` still does is not counted, see the step time).
- step ms: fp32 wall time, median over `--rounds`, the settings interleaved within each round so that
  a busy machine slows them alike; read it as ratios to `none`.

Models: `small` (`benchmarks/transformer.py` SMALL_256, batch 4) or `demo` (the demo's transformer,
batch 16), as in `benchmarks/step_ops.py`.

Run: python -m benchmarks.checkpointing [--model small|demo] [--rounds 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.weak import WeakIdKeyDictionary

from benchmarks.step_ops import build, losses, model_config, one_step
from hart.training.parallelize import ParallelConfig

SETTINGS = {
    "none": ParallelConfig(strategy="none"),
    "block": ParallelConfig(strategy="none", activation_checkpointing=True),
    "block/2": ParallelConfig(strategy="none", activation_checkpointing=True, activation_checkpointing_every=2),
    "op": ParallelConfig(strategy="none", activation_checkpointing=True, activation_checkpointing_policy="op"),
}
MIB = 2**20


class StorageTracker(TorchDispatchMode):
    """Bytes of the tensor storages that ops create under it and that are still alive: now and at most.

    Storages alive before it starts (weights, AdamW's state) are not counted, nor are outputs that
    alias an input (views) or ops that write into existing tensors (in-place, `out=`).
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._tracked = WeakIdKeyDictionary()  # storage -> its bytes; an entry leaves when the storage dies

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        schema = getattr(func, "_schema", None)  # higher-order ops (FlexAttention) have none: new outputs
        if schema is not None and (schema.is_mutable or any(r.alias_info is not None for r in schema.returns)):
            return out
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage() not in self._tracked:
                storage = tensor.untyped_storage()
                self._tracked[storage] = storage.nbytes()
                weakref.finalize(storage, self._freed, storage.nbytes())
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
        return out

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes


def memory(built, autocast: bool) -> dict[str, float]:
    """MiB held for the backward at the end of the forward, and the step's peak above what lived before it
    (after a warm-up step, so AdamW's state already exists)."""
    model, quantizer, optimizer, ema, inputs = built
    one_step(model, quantizer, optimizer, ema, inputs, 0, autocast)
    optimizer.zero_grad(set_to_none=True)
    with StorageTracker() as forward:
        out = losses(model, quantizer, inputs, 100, autocast)
    held = forward.live
    del out
    with StorageTracker() as step:
        one_step(model, quantizer, optimizer, ema, inputs, 100, autocast)
    return {"held_mib": held / MIB, "peak_mib": step.peak / MIB}


def counted_flops(built) -> int:
    model, quantizer, optimizer, ema, inputs = built
    counter = FlopCounterMode(display=False)
    with counter:
        one_step(model, quantizer, optimizer, ema, inputs, 100, False)
    return counter.get_total_flops()


def measure(config, batch: int, rounds: int, settings=tuple(SETTINGS)) -> dict[str, dict[str, float]]:
    """Every setting's figures (the module docstring); the same seeded model, inputs and kept count in each."""
    results = {}
    for name in settings:
        figures = {f"fp32_{k}": v for k, v in memory(build(config, SETTINGS[name], batch), False).items()}
        figures.update({f"bf16_{k}": v for k, v in memory(build(config, SETTINGS[name], batch), True).items()})
        figures["flops"] = counted_flops(build(config, SETTINGS[name], batch))
        results[name] = figures
    timed = {name: build(config, SETTINGS[name], batch) for name in settings}
    times = {name: [] for name in settings}
    for name, built in timed.items():  # warm-up
        one_step(*built, 0, False)
    for round_ in range(rounds):
        for name, built in timed.items():
            started = time.perf_counter()
            one_step(*built, 100 + round_, False)
            times[name].append(time.perf_counter() - started)
    for name in settings:
        results[name]["step_s"] = statistics.median(times[name])
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("small", "demo"), default="small")
    parser.add_argument("--batch", type=int, help="default 4 (small), 16 (demo)")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per setting (interleaved)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the least noisy on 2 shared cores)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    torch.set_num_threads(args.threads)
    config = model_config(args.model)
    batch = args.batch or {"small": 4, "demo": 16}[args.model]
    print(f"{args.model} transformer ({len(config.patch_nums)} scales, depth {config.depth}, width {config.embed_dim}), "
          f"batch {batch}, {args.threads} thread(s), torch {torch.__version__}", flush=True)
    results = measure(config, batch, args.rounds)
    base = results["none"]
    print("\n| setting | held for backward, MiB fp32 / bf16 autocast | step peak, MiB fp32 / bf16 autocast "
          "| GFLOP/step (x none) | step ms fp32 (x none) |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['fp32_held_mib']:.1f} / {r['bf16_held_mib']:.1f} | {r['fp32_peak_mib']:.1f} / "
              f"{r['bf16_peak_mib']:.1f} | {r['flops'] / 1e9:.2f} ({r['flops'] / base['flops']:.3f}) | "
              f"{1e3 * r['step_s']:.0f} ({r['step_s'] / base['step_s']:.3f}) |")


if __name__ == "__main__":
    main()
