"""Training-step benchmark: bare step loop vs the Ray Train job on the same data, and GPU MFU.

What it measures (nothing is estimated unless labelled):
1. `bare`: the joint (or --stage) step of `jobs.stages` + `hart.training.train_step` in a
   plain Python loop over batches already in memory (read from the token cache), tiny preset, CPU.
   Reports median step time, tokens/s and images/s after warm-up steps.
2. `ray`: the same config through `jobs.train.run_training` (TorchTrainer, 1 worker, Ray Data
   ingest from the same cache, MLflow logging to a sqlite file, one checkpoint at the end).
   The worker uses as many torch threads as the bare loop (`scaling.torch_threads`; Ray's
   default for a 0.5-CPU worker would be 1 thread, which is not a wrapper overhead).
   The per-step time comes from the worker's own `step_seconds` metric (data wait included);
   the ratio ray/bare is the wrapper's steady-state overhead (goal <= 1.10). The job's wall
   time, including Ray start-up, dataset planning and the checkpoint, is printed too.
3. `gpu` (only with CUDA): hart-0.7b at 256 and 512 px, bf16 autocast, random tokens, model
   FLOPs utilisation = 6 * trainable params * tokens per step (+ attention) / step time / peak.
   Without a GPU this part prints "skipped".

Run:  python benchmarks/train.py [--steps 30] [--warmup 5] [--cache DIR --tokenizer DIR]
Without --cache a small shapes corpus and cache are made first (precompute pipeline, ~30 s).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks


def make_assets(root: Path) -> tuple[str, str]:
    from hart.config import tokenizer_config
    from hart.tokenizer import HybridTokenizer
    from pipelines.config import load_precompute_config
    from pipelines.plan import run_precompute
    from pipelines.shapes import write_shapes_shards

    torch.manual_seed(0)
    HybridTokenizer(tokenizer_config("tiny")).save_pretrained(root / "tokenizer")
    write_shapes_shards(str(root / "shards"), num_samples=256, num_shards=2)
    config = load_precompute_config(None, [
        f"input.shards=['{root}/shards/*.tar']", f"output={root}/cache", f"tokenizer.checkpoint={root}/tokenizer",
        "progress=false", "compute.tokenizer_cpus=0.25", "text.encoder=minilm", "text.max_length=16",
    ])
    run_precompute(config, log=lambda *a: None)
    return str(root / "cache"), str(root / "tokenizer")


def train_config(args, cache: str, tokenizer: str, work: Path):
    from jobs.train_config import load_train_config

    return load_train_config(str(REPO / "jobs/configs/train_tiny.yaml"), args.stage, [
        f"run.name=bench-{args.stage}-{int(time.time())}", f"run.storage_path={work / 'storage'}",
        f"run.max_steps={args.steps}", f"run.checkpoint_every={args.steps}", "run.log_every=1",
        f"data.cache={cache}", f"model.tokenizer_checkpoint={tokenizer}", f"data.batch_size={args.batch_size}",
        f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}", "tracking.sample_every=0", "run.export=false",
        "precision=fp32", f"scaling.torch_threads={torch.get_num_threads()}",  # same threads as the bare loop
        "tracking.experiment=bench-train",
    ])


def bare_loop(config, cache: str, steps: int, warmup: int) -> list[float]:
    from hart.training import build_optimizer, build_scheduler, train_step
    from jobs.stages import build_stage
    from jobs.train_data import TextFeatures
    from pipelines.cache import batch_to_tensors, read_cache_table, read_manifest, table_to_numpy

    manifest = read_manifest(cache)
    table = read_cache_table(cache)
    batch_size = config.data.batch_size
    device = torch.device("cpu")
    text = TextFeatures(config, manifest, device)
    batches = [text.add_context(batch_to_tensors(table_to_numpy(table.slice(i, batch_size)), manifest))
               for i in range(0, table.num_rows - batch_size + 1, batch_size)]
    stage = build_stage(config, device, text.encoder)
    optimizer = build_optimizer(stage.model, config.optim)
    scheduler = build_scheduler(optimizer, steps, config.optim)
    generator = torch.Generator()
    times = []
    for step in range(steps + warmup):
        batch = batches[step % len(batches)]
        generator.manual_seed(step)
        started = time.perf_counter()
        train_step(stage.objective, lambda m, b: m(b, step=step, generator=generator), [batch], optimizer, step=step,
                   scheduler=scheduler, clip_grad_norm=config.optim.clip_grad_norm, precision=config.precision)
        times.append(time.perf_counter() - started)
    return times[warmup:]


def ray_job(config, warmup: int) -> tuple[list[float], float]:
    import ray
    from mlflow.tracking import MlflowClient

    from jobs import tracking
    from jobs.train import run_training

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    started = time.perf_counter()
    outcome = run_training(config)
    wall = time.perf_counter() - started
    client = MlflowClient(tracking_uri=tracking.resolve_tracking_uri(config.tracking.tracking_uri))
    history = sorted(client.get_metric_history(outcome["run_id"], "step_seconds"), key=lambda m: m.step)
    return [m.value for m in history][warmup:], wall


def gpu_mfu(steps: int, warmup: int) -> None:
    if not torch.cuda.is_available():
        print("gpu: skipped (no CUDA device on this machine)")
        return
    from hart.config import PATCH_NUMS_256, PATCH_NUMS_512, replace, tokenizer_config, transformer_config
    from hart.quantizer import MultiScaleQuantizer
    from hart.training import OptimizerConfig, build_optimizer, train_step
    from hart.transformer import HARTForT2I
    from jobs.stages import TransformerObjective

    device = torch.device("cuda")
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    for resolution, patch_nums, batch_size in ((256, PATCH_NUMS_256, 16), (512, PATCH_NUMS_512, 8)):
        cfg = replace(transformer_config("hart-0.7b"), patch_nums=tuple(patch_nums))
        model = HARTForT2I(cfg).to(device)
        model.init_weights()
        quantizer = MultiScaleQuantizer(replace(tokenizer_config("hart-1024"), patch_nums=tuple(patch_nums))).to(device)
        objective = TransformerObjective(model, quantizer, 1.0, 1.0, use_diffusion=True)
        optimizer = build_optimizer(model, OptimizerConfig(fused=True))
        g = torch.Generator(device=device).manual_seed(0)
        batch = {
            "context": torch.randn(batch_size, cfg.context_token, cfg.context_dim, device=device),
            "context_mask": torch.ones(batch_size, cfg.context_token, dtype=torch.bool, device=device),
            "tokens": [torch.randint(0, cfg.vocab_size, (batch_size, p * p), device=device, generator=g) for p in patch_nums],
            "residual": torch.randn(batch_size, cfg.token_dim, patch_nums[-1], patch_nums[-1], device=device) * 0.1,
        }
        times = []
        for step in range(steps + warmup):
            torch.cuda.synchronize()
            started = time.perf_counter()
            train_step(objective, lambda m, b: m(b, step=step, generator=g), [batch], optimizer, step=step,
                       clip_grad_norm=2.0, precision="bf16", device_type="cuda")
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        step_s = statistics.median(times[warmup:])
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        tokens = batch_size * (cfg.seq_len())
        flops = 6 * params * tokens + 12 * cfg.depth * cfg.embed_dim * batch_size * cfg.seq_len() ** 2
        achieved = flops / step_s / 1e12
        mfu = f"{100 * achieved / peak:.1f}%" if peak else "n/a (unknown peak)"
        print(f"gpu {name} hart-0.7b {resolution}px bs{batch_size}: {step_s * 1e3:.1f} ms/step, "
              f"{tokens / step_s:,.0f} tokens/s, {achieved:.1f} TFLOP/s, MFU {mfu}")
        del model, optimizer, objective
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", default="joint", choices=("ar", "diffusion", "joint"))
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed first steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--cache", help="existing tiny token cache (with text features); default: make one")
    parser.add_argument("--tokenizer", help="tokenizer folder the cache was made with")
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="hart-bench-train-"))
    if args.cache:
        cache, tokenizer = args.cache, args.tokenizer
    else:
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        print("making a 256-sample shapes cache ...", flush=True)
        cache, tokenizer = make_assets(work)
    args.steps += args.warmup  # the Ray job runs warm-up + timed steps too
    config = train_config(args, cache, tokenizer, work)
    args.steps -= args.warmup
    from hart.config import transformer_config

    tokens_per_image = transformer_config(config.model.transformer).num_image_tokens()
    def report_bare(label: str) -> float:
        bare_s = statistics.median(bare_loop(config, cache, args.steps, args.warmup))
        print(f"{label} {args.stage} tiny CPU bs{args.batch_size}: {bare_s * 1e3:.1f} ms/step (median of {args.steps}), "
              f"{args.batch_size * tokens_per_image / bare_s:,.0f} tokens/s, {args.batch_size / bare_s:.1f} images/s "
              f"[load avg {os.getloadavg()[0]:.1f}]", flush=True)
        return bare_s

    print(f"cache {cache} tokenizer {tokenizer}", flush=True)
    bare_before = report_bare("bare  ")
    if not args.skip_ray:
        # bare, Ray, bare again: the two bare runs bracket the Ray run, so a change in machine load shows up
        ray_steps, wall = ray_job(config, args.warmup)
        ray_s = statistics.median(ray_steps)
        print(f"ray    {args.stage} tiny CPU bs{args.batch_size}: {ray_s * 1e3:.1f} ms/step (median of {len(ray_steps)}), "
              f"{args.batch_size * tokens_per_image / ray_s:,.0f} tokens/s; job wall {wall:.1f} s for "
              f"{args.steps + args.warmup} steps incl. start-up and checkpoint [load avg {os.getloadavg()[0]:.1f}]")
        bare_after = report_bare("bare  ")
        bare_s = (bare_before + bare_after) / 2
        print(f"overhead ray/bare per step: {ray_s / bare_s:.3f} (goal <= 1.10; bare runs {bare_before * 1e3:.0f} "
              f"and {bare_after * 1e3:.0f} ms/step)")
    gpu_mfu(steps=10, warmup=3)


if __name__ == "__main__":
    main()
