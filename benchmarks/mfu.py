"""GPU training step of `hart-0.7b`: step time and model FLOPs utilisation (MFU), one line per setting.

    python -m benchmarks.mfu [--steps 10] [--warmup 3]
    python -m benchmarks.mfu --preset tiny --device cpu     # the same code on the CPU, as a check

Step = the worker's step: `hart.training.step.train_step` (joint objective: CE + diffusion loss, last-scale
subsampling, bf16 autocast, fused AdamW, clip 2.0) + the EMA update, on random tokens, the objective
wrapped by `hart.training.parallelize.parallelize` as on a worker (world size 1). Settings (`MFU_RUNS`): 256
and 512 px, several batch sizes, activation checkpointing, `parallel.compile`.

MFU = FLOPs counted by `torch.utils.flop_counter.FlopCounterMode` over a real forward + backward /
step time / the device's dense bf16 peak (`PEAK_BF16`). Counted, not estimated: every matmul
and attention call that runs, the diffusion head on its subsampled tokens included. Steady state,
not start-up: see `mfu_run`. Needs no Ray or MLflow (torch, numpy, safetensors and PyYAML suffice);
without a CUDA device the default run prints "skipped". `benchmarks/gpu.py` calls `mfu_run` for its
training rows.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

# Dense bf16 tensor-core peaks, FLOP/s, by a word of the device's name (SXM parts for H100/H200).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def peak_bf16(device_name: str) -> float | None:
    """The dense bf16 peak (FLOP/s) of the first `PEAK_BF16` entry named in `device_name`, else None."""
    return next((v for k, v in PEAK_BF16.items() if k in device_name), None)


# (resolution, batch size, activation checkpointing, torch.compile per block) of each setting. The
# checkpointed settings double the eager batches. Eager peaks on an 80 GB H100: 63 GiB at 256px batch 32
# (so batch 64 cannot fit), 42 GiB at 512px batch 8; weights, gradients, AdamW state and EMA are ~15 GB.
MFU_RUNS = (
    (256, 16, False, False), (256, 32, False, False), (256, 32, False, True), (256, 64, True, False),
    (512, 8, False, False), (512, 8, False, True), (512, 16, True, False),
)


def mfu_run(preset: str, resolution: int, batch_size: int, activation_checkpointing: bool, compile: bool,
            device: torch.device, steps: int, warmup: int, attention: str = "sdpa",
            patch_nums: tuple[int, ...] | None = None) -> dict[str, float]:
    """One setting: the worker's step (train_step + EMA) on random tokens, timed; FLOPs counted.

    `attention` is `ParallelConfig.attention` (sdpa | flex | auto); `patch_nums` replaces the released
    scale list of `resolution` (the CPU smoke run of `benchmarks/gpu.py` passes tiny ones).

    Steady state, not start-up: step i draws its random choices (kept last-scale count, CFG dropout,
    diffusion noise) from seed i % warmup, so the timed steps replay the warm-up steps' shapes. The
    kept count sets the sequence length, and every new length costs once: cuDNN attention (torch's
    first choice on Hopper) builds a plan per shape on the host (~1.3 s for a step of new shapes at
    512px, measured), compile re-specialises. A long run sees each length many times.
    FLOPs are counted, not estimated: `FlopCounterMode` over one eager forward + backward per seed
    (every matmul and attention call that runs, the diffusion head on its subsampled tokens included;
    activation checkpointing's recompute is not counted, as MFU's convention is model FLOPs; its
    settings count the forward at full size and take the backward's share from a quarter batch).
    Tokens are text + image tokens per sample before last-scale subsampling.
    """
    from dataclasses import replace

    from torch.utils.flop_counter import FlopCounterMode

    from hart.config import RELEASED_SCALE_LISTS, TokenizerConfig, transformer_config
    from hart.training.parallelize import ParallelConfig, parallelize
    from hart.tokenizer.quantizer import MultiScaleQuantizer
    from hart.training.step import ExponentialMovingAverage, OptimizerConfig, autocast, build_optimizer, train_step
    from hart.transformer.model import HARTForT2I
    from trainer.objectives import TransformerObjective

    if patch_nums is None:
        patch_nums = RELEASED_SCALE_LISTS[resolution]
    cfg = replace(transformer_config(preset), patch_nums=tuple(patch_nums))
    precision = "bf16" if device.type == "cuda" else "fp32"
    torch.manual_seed(0)
    with device:  # built on the device (fast init); .to() also moves buffers made on the CPU on purpose
        model = HARTForT2I(cfg).to(device)
        model.init_weights()
        quantizer = MultiScaleQuantizer(TokenizerConfig(vocab_size=cfg.vocab_size, z_channels=cfg.token_dim,
                                                        patch_nums=tuple(patch_nums)))
        g = torch.Generator(device=device).manual_seed(0)
        batch = {
            "context": torch.randn(batch_size, cfg.context_token, cfg.context_dim),
            "context_mask": torch.ones(batch_size, cfg.context_token, dtype=torch.bool),
            "tokens": [torch.randint(0, cfg.vocab_size, (batch_size, p * p), generator=g) for p in patch_nums],
            "residual": torch.randn(batch_size, cfg.token_dim, patch_nums[-1], patch_nums[-1]) * 0.1,
        }
    objective = TransformerObjective(model, quantizer, 1.0, 1.0, use_diffusion=True)

    def counted(batch_: dict, seed: int, backward: bool) -> int:
        counter = FlopCounterMode(display=False)
        with counter, torch.set_grad_enabled(backward):
            with autocast(device.type, precision):
                out = objective(batch_, step=0, generator=g.manual_seed(seed))
            if backward:
                out["loss"].float().backward()
        model.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    flops_by_seed = []
    for seed in range(warmup):
        if not activation_checkpointing:
            flops_by_seed.append(counted(batch, seed, backward=True))
            continue
        # The settings that need activation checkpointing cannot be counted with a backward: under the
        # counter's dispatch mode the checkpointed activations stay alive (measured: bs64 at 256px
        # went out of memory while counting, 12 GiB without the counter). The forward is counted at
        # full size without grad; the backward's share comes from a quarter batch, counted whole.
        rows = max(1, batch_size // 4)
        quarter = {k: (v[:rows] if torch.is_tensor(v) else [t[:rows] for t in v]) for k, v in batch.items()}
        share = counted(quarter, seed, backward=True) / counted(quarter, seed, backward=False)
        flops_by_seed.append(round(counted(batch, seed, backward=False) * share))
    trained = parallelize(objective, ParallelConfig(strategy="none", activation_checkpointing=activation_checkpointing,
                                                    compile=compile, attention=attention), device)
    optimizer = build_optimizer(model, OptimizerConfig(fused=device.type == "cuda"))
    ema = ExponentialMovingAverage(model, 0.9999)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_times, ema_times = [], []
    for step in range(steps + warmup):
        sync()
        started = time.perf_counter()
        g.manual_seed(step % warmup)
        train_step(trained, lambda m, b: m(b, step=step, generator=g), [batch], optimizer, step=step,
                   clip_grad_norm=2.0, precision=precision, device_type=device.type)
        sync()
        stepped = time.perf_counter()
        ema.update(model)
        sync()
        step_times.append(time.perf_counter() - started)
        ema_times.append(time.perf_counter() - stepped)
    timed = step_times[warmup:]
    return {
        "step_s": statistics.mean(timed), "ema_s": statistics.mean(ema_times[warmup:]),
        "flops": statistics.mean(flops_by_seed[step % warmup] for step in range(warmup, steps + warmup)),
        "tokens": batch_size * cfg.seq_len(), "images": batch_size, "first_s": sum(step_times[:warmup]),
        "attention": sorted({m.attention_backend for m in model.modules() if hasattr(m, "attention_backend")}),
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan"),
    }


def run_settings(steps: int, warmup: int, preset: str = "hart-0.7b", device_name: str = "cuda",
                 runs=MFU_RUNS) -> None:
    """Each MFU_RUNS setting of `preset`, one line each (an out-of-memory setting says so)."""
    if device_name == "cuda" and not torch.cuda.is_available():
        print("mfu: skipped (no CUDA device on this machine)")
        return
    device = torch.device(device_name)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    peak = peak_bf16(name)
    print(f"mfu: {name}, torch {torch.__version__}, {preset}, dense bf16 peak "
          f"{f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown'}; step = train_step ("
          f"{'bf16 autocast, fused AdamW' if device.type == 'cuda' else 'fp32, AdamW'}, clip 2.0) + EMA update; "
          f"mean of {steps} steps after {warmup} (replaying their shapes)", flush=True)
    for resolution, batch_size, activation_checkpointing, compile in runs:
        label = (f"{preset} {resolution}px bs{batch_size}"
                 f"{' +act-ckpt' if activation_checkpointing else ''}{' +compile' if compile else ''}")
        try:
            r = mfu_run(preset, resolution, batch_size, activation_checkpointing, compile, device, steps, warmup)
        except torch.cuda.OutOfMemoryError:
            print(f"mfu {label}: out of memory", flush=True)
            torch._dynamo.reset()
            torch.cuda.empty_cache()
            continue
        achieved = r["flops"] / r["step_s"] / 1e12
        mfu = f"{100 * achieved * 1e12 / peak:.1f}%" if peak else "n/a"
        print(f"mfu {label}: {r['step_s'] * 1e3:.1f} ms/step (EMA {r['ema_s'] * 1e3:.1f}), "
              f"{r['tokens'] / r['step_s']:,.0f} tokens/s, {r['images'] / r['step_s']:.1f} images/s, "
              f"{r['flops'] / 1e12:.2f} TFLOP/step counted, {achieved:.1f} TFLOP/s, MFU {mfu}, "
              f"peak {r['peak_gib']:.1f} GiB, warm-up {r['first_s']:.1f} s", flush=True)
        torch._dynamo.reset()  # compiled graphs keep the run's model and optimizer alive otherwise
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per setting, replayed by the timed ones")
    parser.add_argument("--preset", default="hart-0.7b", help="transformer preset (`tiny` with --device cpu checks the code)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = parser.parse_args(argv)
    run_settings(args.steps, args.warmup, args.preset, args.device)


if __name__ == "__main__":
    main()
