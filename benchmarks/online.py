"""Benchmark: one joint training run from a token cache and the same run online (no cache).

    python -m benchmarks.online [--samples 512 --shards 16 --steps 40 --warmup 5]

Both runs go through `trainer.driver.run_training` on a local Ray started here (2 CPUs): tiny presets,
one worker with 0.5 CPU, batch 8, the same seed, the tiny shapes corpus written here. The cache is
made first by `pipelines.plan.run_precompute` with the same tokenizer and stage sizes online mode
uses (tokenizer actor 0.5 CPU, decode 0.25). Reported per run, from the metrics the job logs to
MLflow every step (after `--warmup` steps): the median `step_seconds` (the training loop's period,
waiting for data included) and the median and mean `data_wait_share`; and the wall time of the
precompute and of each training job. On 2 CPUs the online tokenizer actor shares the cores with the
training worker, so this is the price of encoding on the training machine's CPUs, not a GPU figure.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

STAGE_SIZES = ["compute.tokenizer_cpus=0.5", "compute.decode_cpus=0.25"]


def run_job(config) -> tuple[float, dict[str, list[float]]]:
    from mlflow.tracking import MlflowClient

    from trainer.driver import run_training

    started = time.perf_counter()
    outcome = run_training(config)
    seconds = time.perf_counter() - started
    client = MlflowClient(tracking_uri=config.tracking.tracking_uri)
    history = {}
    for key in ("step_seconds", "data_wait_share"):
        points = sorted(client.get_metric_history(outcome["run_id"], key), key=lambda m: m.step)
        history[key] = [m.value for m in points]
    return seconds, history


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)

    import ray
    import torch

    from hart.config import tokenizer_config
    from hart.tokenizer.model import HybridTokenizer
    from trainer.config import load_train_config
    from pipelines.config import load_precompute_config
    from pipelines.plan import run_precompute
    from pipelines.shapes import write_shapes_shards

    root = Path(tempfile.mkdtemp(prefix="hart-online-bench-"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        HybridTokenizer(tokenizer_config("tiny")).save_pretrained(root / "tokenizer")
    write_shapes_shards(str(root / "shards"), num_samples=args.samples, num_shards=args.shards)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        started = time.perf_counter()
        summary = run_precompute(load_precompute_config(None, [
            f"input.shards=['{root}/shards/*.tar']", f"output={root}/cache", f"tokenizer.checkpoint={root}/tokenizer",
            "progress=false", *STAGE_SIZES]), log=lambda *a: None)
        precompute_seconds = time.perf_counter() - started
        common = [f"run.storage_path={root / 'runs'}", f"run.max_steps={args.steps}", f"run.checkpoint_every={args.steps}",
                  f"model.tokenizer_checkpoint={root / 'tokenizer'}", "data.batch_size=8", "run.export=false",
                  f"tracking.tracking_uri=sqlite:///{root / 'mlflow.db'}", "tracking.sample_every=0"]
        cache = load_train_config(str(REPO / "jobs/configs/train_tiny.yaml"), "joint",
                                  [*common, "run.name=from-cache", f"data.cache={root / 'cache'}"])
        epochs = -(-args.steps * 8 // summary.samples_written)  # enough passes for the steps (ceil)
        online = load_train_config(str(REPO / "jobs/configs/train_tiny.yaml"), "joint", [
            *common, "run.name=online", f"data.shards=['{root}/shards/*.tar']", "online.enabled=true",
            f"online.epochs={epochs}", *[f"online.{s}" for s in STAGE_SIZES]])
        print(f"{args.samples} samples in {args.shards} shards; precompute {precompute_seconds:.1f} s "
              f"({summary.samples_written} rows); {args.steps} joint steps per run, first {args.warmup} left out")
        for name, config in (("cache", cache), ("online", online)):
            seconds, history = run_job(config)
            steps = history["step_seconds"][args.warmup:]
            shares = history["data_wait_share"][args.warmup:]
            print(f"{name:>6}: job {seconds:.1f} s, median step {statistics.median(steps) * 1000:.0f} ms, "
                  f"data wait median {statistics.median(shares):.1%} mean {statistics.fmean(shares):.1%}")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
