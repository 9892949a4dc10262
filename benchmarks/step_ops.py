"""Operator counts of one training step: the CPU proxy of the GPU profile's elementwise overhead.

What it measures: `torch.profiler` over one worker step of a transformer on random tokens: the
`t2i_losses` forward + backward, a fused AdamW step (as on a GPU) and the EMA update.
Models: `small` = the small 256px preset (`benchmarks/transformer.py` SMALL_256: 10 scales, depth 4,
width 256; batch 4), `demo` = the transformer `make demo` trains (`demo.config.demo_transformer`:
the tiny preset's 6 scales, depth 4, width 128; batch 16, the demo's joint batch).
It counts the aten operators dispatched per step: the top-level calls (those not made from inside
another aten op: roughly the kernel launches of a GPU step, where fused and multi-tensor ops are one
launch) and all `aten::` events (nested ones included), the top operators by count, and the step's
wall time (median over timed steps; one process, so compare runs of this script on the same
machine as ratios). Settings: eager and `parallel.compile` (per-block torch.compile), each in fp32
and under bf16 autocast. Counts do not depend on the machine; times do (and bf16 times on a CPU
without bf16 units mean nothing for a GPU).

Run: python -m benchmarks.step_ops [--model small|demo] [--steps 6] [--batch B] [--threads 1] [--top 12]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch

from benchmarks.transformer import SMALL_256, make_inputs
from hart.config import TokenizerConfig, transformer_config
from hart.training.parallelize import ParallelConfig, parallelize
from hart.tokenizer.quantizer import MultiScaleQuantizer
from hart.transformer.objective import t2i_losses
from hart.training.step import ExponentialMovingAverage, OptimizerConfig, build_optimizer
from hart.transformer.model import HARTForT2I


def model_config(name: str):
    if name == "small":
        return SMALL_256
    from demo.config import demo_transformer  # the demo's own definition (demo/config.py imports no Ray)

    return transformer_config(demo_transformer())


def build(config, parallel: ParallelConfig, batch: int):
    """The seeded model (parallelized on the CPU by `parallel`), its quantizer, fused AdamW, EMA and inputs."""
    torch.manual_seed(0)
    model = HARTForT2I(config)
    model.init_weights()
    quantizer = MultiScaleQuantizer(TokenizerConfig(ch=32, patch_nums=config.patch_nums,
                                                    vocab_size=config.vocab_size, z_channels=config.token_dim))
    parallelize(model, parallel, torch.device("cpu"))
    # fused AdamW (one op per step) as on a GPU (benchmarks/mfu.py), not the CPU's per-parameter loop
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-4, fused=True))
    ema = ExponentialMovingAverage(model, 0.999)
    tokens, residual, context, mask = make_inputs(config, batch, torch.device("cpu"))
    return model, quantizer, optimizer, ema, (tokens, residual, context, mask)


def losses(model, quantizer, inputs, step: int, autocast: bool) -> dict[str, torch.Tensor]:
    """The step's forward: `t2i_losses` in training mode, seeded by `step` (the kept count, noise)."""
    tokens, residual, context, mask = inputs
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return t2i_losses(model.train(), quantizer, context, mask, tokens, residual,
                          generator=torch.Generator().manual_seed(step))


def one_step(model, quantizer, optimizer, ema, inputs, step: int, autocast: bool) -> None:
    out = losses(model, quantizer, inputs, step, autocast)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    optimizer.step()
    ema.update(model)


def measure(config, compiled: bool, autocast: bool, args) -> dict:
    model, quantizer, optimizer, ema, inputs = build(config, ParallelConfig(strategy="none", compile=compiled),
                                                     args.batch)
    for step in range(2):  # warm-up (compiles)
        one_step(model, quantizer, optimizer, ema, inputs, step, autocast)
    # Same seed for the profiled step in every setting: the kept last-scale count (hence shapes) is equal.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        one_step(model, quantizer, optimizer, ema, inputs, 100, autocast)
    # Top-level aten calls: those not made by another aten op. Python code and autograd dispatch these;
    # a composite op's inner calls (a CPU foreach's per-tensor loop, an unfused rms_norm) are not
    # counted, since on a GPU the fused or multi-tensor kernel behind them is one or a few launches.
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    counts = collections.Counter(e.name for e in events
                                 if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    nested = len(events)
    times = []
    for step in range(args.bf16_steps if autocast else args.steps):
        started = time.perf_counter()
        one_step(model, quantizer, optimizer, ema, inputs, 100 + step, autocast)
        times.append(time.perf_counter() - started)
    return {"aten_ops": sum(counts.values()), "all_aten_events": nested, "top": counts.most_common(args.top),
            "step_s": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per fp32 setting, after 2 warm-up steps")
    parser.add_argument("--bf16-steps", type=int, default=1,
                        help="timed steps per bf16 setting (a CPU without bf16 units runs them ~10x slower: their time "
                             "says nothing about a GPU, their op counts do)")
    parser.add_argument("--model", choices=("small", "demo"), default="small")
    parser.add_argument("--batch", type=int, help="default 4 (small), 16 (demo)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the least noisy on 2 shared cores)")
    parser.add_argument("--top", type=int, default=12, help="operators listed per setting")
    parser.add_argument("--settings", default="eager-fp32,eager-bf16,compiled-fp32,compiled-bf16",
                        help="comma-separated subset of eager|compiled - fp32|bf16")
    args = parser.parse_args()
    settings = args.settings.split(",")
    unknown = sorted(set(settings) - {f"{m}-{p}" for m in ("eager", "compiled") for p in ("fp32", "bf16")})
    if unknown:
        parser.error(f"--settings: unknown {unknown}; each is eager|compiled - fp32|bf16")
    torch.set_num_threads(args.threads)
    config = model_config(args.model)
    args.batch = args.batch or {"small": 4, "demo": 16}[args.model]
    print(f"{args.model} transformer ({len(config.patch_nums)} scales, depth {config.depth}, width {config.embed_dim}), "
          f"batch {args.batch}, "
          f"{args.threads} thread(s), torch {torch.__version__}")
    rows = []
    for setting in settings:
        mode, precision = setting.split("-")
        result = measure(config, mode == "compiled", precision == "bf16", args)
        rows.append((setting, result))
        print(f"\n{setting}: {result['aten_ops']} top-level aten calls per step ({result['all_aten_events']} aten "
              f"events with nested ones), median step {1e3 * result['step_s']:.0f} ms")
        for name, count in result["top"]:
            print(f"  {count:6d}  {name}")
    print("\n| setting | top-level aten calls / step | all aten events / step | step (ms) |\n|---|---|---|---|")
    for setting, result in rows:
        print(f"| {setting} | {result['aten_ops']} | {result['all_aten_events']} | {1e3 * result['step_s']:.0f} |")


if __name__ == "__main__":
    main()
