"""Load trial: precompute many shards on a 2-CPU local Ray with bounded memory, then train from the cache without stalls.

What it measures (nothing estimated):
1. Precompute of `--num-shards` shapes shards (`--per-shard` samples each) through
   `pipelines.plan.run_precompute` on `ray.init(num_cpus=2)` started here. A sampler thread
   (`benchmarks.processes.MemorySampler`) reads the RSS of this driver and of every process descended
   from it (GCS, raylet, Ray Data workers and actors) every `--interval` s. Reported: peak total RSS,
   peak driver RSS, peak of the largest single worker, and the peak total in each quarter of the
   run: memory is bounded
   when the last quarter's peak is not above the first's by more than a little (no growth with
   shards processed). RSS counts pages of the shared object store in every process that maps
   them, so the total is an upper bound of real use.
2. Input stall of the trainer: the tiny AR step (`hart.transformer.objective.t2i_losses` + AdamW on
   `HARTForT2I(tiny)`) fed by `pipelines.cache_stream.CacheStream` collating with `CacheCollate`,
   the same reader, order and collate as `jobs.train`. Per step: seconds blocked waiting for the next
   batch vs seconds of the step itself, after `--warmup` steps. Goal: wait < 5% of step time.
   (Context features are random tensors of the right shape: the text encoder is not data input.)

Run:  python -m benchmarks.load [--num-shards 200 --per-shard 16 --steps 60]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.processes import MemorySampler, tree_by_pid


def memory_report(sampler: MemorySampler) -> dict:
    """Peaks of the driver, of the largest single worker and of the total, overall and per quarter of the run."""
    totals = [(t, sum(values.values())) for t, values in sampler.samples]
    start, end = totals[0][0], totals[-1][0]
    quarters = [0, 0, 0, 0]
    for t, total in totals:
        index = min(3, int(4 * (t - start) / max(end - start, 1e-9)))
        quarters[index] = max(quarters[index], total)
    workers = [rss for _, values in sampler.samples for name, rss in values.items() if name != "driver"]
    mib = 2**-20
    return {"memory_samples": len(sampler.samples), "peak_total_mib": round(max(total for _, total in totals) * mib),
            "peak_driver_mib": round(sampler.peak().get("driver", 0) * mib),
            "peak_single_worker_mib": round(max(workers, default=0) * mib),
            "peak_total_by_quarter_mib": [round(q * mib) for q in quarters]}


def precompute_load(root: Path, num_shards: int, per_shard: int, interval: float) -> dict:
    from pipelines.config import load_precompute_config
    from pipelines.plan import run_precompute
    from pipelines.shapes import write_shapes_shards

    started = time.perf_counter()
    write_shapes_shards(str(root / "raw"), num_shards * per_shard, num_shards, seed=0)
    print(f"[load] wrote {num_shards} shards x {per_shard} samples in {time.perf_counter() - started:.1f}s", flush=True)
    config = load_precompute_config(None, [f"input.shards=['{root}/raw/*.tar']", f"output={root}/cache", "progress=false"])
    with MemorySampler(tree_by_pid(os.getpid()), every_s=interval) as sampler:
        summary = run_precompute(config, log=lambda line: print(f"[load] {line}", flush=True))
    assert not summary.shards_failed and summary.samples_written == num_shards * per_shard, summary.table()
    return {"shards": summary.shards_done, "samples": summary.samples_written, "seconds": round(summary.seconds, 1),
            "images_per_s": round(summary.images_per_second, 1), **memory_report(sampler)}


def trainer_stall(cache: str, steps: int, warmup: int, batch_size: int) -> dict:
    import torch

    from hart.config import tokenizer_config, transformer_config
    from hart.transformer.objective import t2i_losses
    from hart.tokenizer.model import HybridTokenizer
    from hart.transformer.model import HARTForT2I
    from trainer.data import CacheCollate
    from pipelines.cache import read_manifest
    from pipelines.cache_stream import CacheStream
    from pipelines.sample_order import SampleOrder, cache_blocks

    manifest = read_manifest(cache)
    torch.manual_seed(0)
    quantizer = HybridTokenizer(tokenizer_config("tiny")).quantize  # same preset/seed as the cache (weights unused)
    config = transformer_config("tiny")
    model = HARTForT2I(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    order = SampleOrder(cache_blocks(cache, manifest), seed=0)
    stream = CacheStream(order, ["key", "caption", "tokens", "residual"], batch_size, rank=0, world_size=1,
                         transform=CacheCollate(manifest))  # pass after pass, as jobs.train reads
    waits, computes = [], []
    iterator = iter(stream)
    for step in range(steps + warmup):
        began = time.perf_counter()
        batch = next(iterator)
        got = time.perf_counter()
        context = torch.randn(batch_size, config.context_token, config.context_dim)
        mask = torch.ones(batch_size, config.context_token, dtype=torch.bool)
        losses = t2i_losses(model, quantizer, context, mask, batch["tokens"], batch["residual"])
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        done = time.perf_counter()
        if step >= warmup:
            waits.append(got - began)
            computes.append(done - got)
    stream.close()
    total_wait, total_step = sum(waits), sum(waits) + sum(computes)
    return {"steps": steps, "batch_size": batch_size, "median_step_s": round(statistics.median(computes), 4),
            "median_wait_s": round(statistics.median(waits), 5), "max_wait_s": round(max(waits), 4),
            "wait_fraction": round(total_wait / total_step, 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-shards", type=int, default=200)
    parser.add_argument("--per-shard", type=int, default=16, help="samples per shard (64px shapes)")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between memory samples")
    parser.add_argument("--steps", type=int, default=60, help="measured training steps")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workdir", help="keep data here (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory(prefix="hart-load-") as temporary:
        root = Path(args.workdir or temporary)
        root.mkdir(parents=True, exist_ok=True)
        results = {"precompute": precompute_load(root, args.num_shards, args.per_shard, args.interval)}
        print(f"[load] precompute: {json.dumps(results['precompute'])}", flush=True)
        results["trainer"] = trainer_stall(str(root / "cache"), args.steps, args.warmup, args.batch_size)
        print(f"[load] trainer: {json.dumps(results['trainer'])}", flush=True)
    ray.shutdown()
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
