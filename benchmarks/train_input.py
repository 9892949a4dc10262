"""What the training input costs a ~100 ms step: the data-wait share, and the time from restore to first batch.

    python -m benchmarks.train_input [--steps 150] [--cache DIR --tokenizer DIR]

The joint stage, tiny preset, batch 16, one worker at one torch thread (about 100 ms a step on a
2-core CPU host), through `trainer.driver.run_training` as a user runs it, MLflow logging every step:
1. `--steps` steps from the start; the worker's per-step `data_seconds` (time blocked on the input)
   and `step_seconds` (the loop's period) give the data-wait share (sum of waits / sum of periods,
   the first `--warmup` steps left out) and the median and 95th-percentile wait;
2. the same run resubmitted for 20 more steps: the first step's `data_seconds` after the restore is
   the time from a restored checkpoint to the first batch (the stream opened at the checkpoint's position).
It reads only the job's metrics, so the same command measures any version of the trainer: run it in
another checkout (`PYTHONPATH=<checkout> python -m benchmarks.train_input` from that folder) to
compare before and after, on the same machine in the same minutes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from benchmarks.ray_overhead import add_asset_flags, local_training_assets


def run(args, cache: str, tokenizer: str, work: Path, name: str, steps: int):
    from trainer.driver import run_training
    from trainer.config import load_train_config

    repo = Path(__file__).resolve().parents[1]
    config = load_train_config(str(repo / "jobs/configs/train_tiny.yaml"), "joint", [
        f"run.name={name}", f"run.storage_path={work / 'storage'}", f"run.max_steps={steps}",
        f"run.checkpoint_every={args.steps}", "run.log_every=1", f"data.cache={cache}",
        f"model.tokenizer_checkpoint={tokenizer}", "data.batch_size=16", "precision=fp32",
        f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}", "tracking.sample_every=0", "run.export=false",
        "scaling.torch_threads=1", "tracking.experiment=bench-input",
    ])
    outcome = run_training(config)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=config.tracking.tracking_uri)
    history = {}
    for metric in ("data_seconds", "step_seconds"):
        points = {}
        for m in client.get_metric_history(outcome["run_id"], metric):
            points.setdefault(m.step, []).append(m.value)  # a restored run logs its own rows after the first run's
        history[metric] = points
    return history


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=5)
    add_asset_flags(parser)
    args = parser.parse_args(argv)
    work, cache, tokenizer = local_training_assets(args, "hart-bench-input-")
    name = f"input-{int(time.time())}"
    first = run(args, cache, tokenizer, work, name, args.steps)
    resumed = run(args, cache, tokenizer, work, name, args.steps + 20)
    timed = range(args.warmup + 1, args.steps + 1)
    waits = [first["data_seconds"][s][0] for s in timed]
    periods = [first["step_seconds"][s][0] for s in timed]
    share = sum(waits) / sum(periods)
    cut = sorted(waits)[int(0.95 * (len(waits) - 1))]
    restore_wait = resumed["data_seconds"][args.steps + 1][-1]
    print("| steps | median step | data-wait share | median / p95 wait | restore to first batch |")
    print("|---|---|---|---|---|")
    print(f"| {len(periods)} | {1000 * statistics.median(periods):.1f} ms | {100 * share:.2f}% | "
          f"{1000 * statistics.median(waits):.2f} / {1000 * cut:.2f} ms | {1000 * restore_wait:.0f} ms |")
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
