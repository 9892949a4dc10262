"""Does a resized run learn like an uninterrupted one? Loss curves against the noise between two seeds.

    python -m benchmarks.elastic_loss [--steps 90] [--cache DIR --tokenizer DIR]

The joint stage, tiny preset, global batch 16 (batch 8), a constant learning rate, on a `--num-samples`
shapes cache, local Ray:
- `seed 0`: 2 workers throughout;
- `seed 1`: the same with run.seed 1 (another data order and noise draws): the run-to-run noise;
- `resized`: seed 0, restored at another world size twice: 2 workers to step steps/3, 1 worker
  (2 micro-batches a step) to 2 steps/3, 2 workers to the end; each change restores the last
  checkpoint at the new size, as Ray Train's elastic restart does.
Printed: each curve as the mean loss of consecutive 10-step windows (the logged loss is the global
batch's, averaged over ranks), and the mean absolute difference per step of `resized` and `seed 1`
from `seed 0`. The resized run is within noise when its difference is no larger than the seeds'.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from benchmarks.ray_overhead import add_asset_flags, local_training_assets


def run(cache: str, tokenizer: str, work: Path, name: str, seed: int, schedule: list[tuple[int, int]]) -> list[float]:
    """Train through `schedule` [(workers, until step), ...] under one run name; the loss per step."""
    from mlflow.tracking import MlflowClient

    from trainer.driver import run_training
    from trainer.config import load_train_config

    repo = Path(__file__).resolve().parents[1]
    outcome = None
    for workers, until in schedule:
        config = load_train_config(str(repo / "jobs/configs/train_tiny.yaml"), "joint", [
            f"run.name={name}", f"run.storage_path={work / 'storage'}", f"run.max_steps={until}", f"run.seed={seed}",
            "run.checkpoint_every=10", "run.log_every=1", f"data.cache={cache}", f"model.tokenizer_checkpoint={tokenizer}",
            "data.batch_size=8", f"data.grad_accumulation={2 // workers}", f"scaling.num_workers={workers}",
            "scaling.cpus_per_worker=0.5", "scaling.torch_threads=1", "precision=fp32", "optim.warmup_steps=0",
            # a constant rate: the resized run's submissions stop at different run.max_steps, which a
            # decaying schedule reads (a run resized by Ray Train keeps its max_steps and its schedule)
            "optim.schedule=constant",
            f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}", "tracking.sample_every=0", "run.export=false",
            "tracking.experiment=bench-elastic",
        ])
        outcome = run_training(config)
    history = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}").get_metric_history(outcome["run_id"], "loss")
    last = {m.step: m.value for m in sorted(history, key=lambda m: (m.step, m.timestamp))}
    return [last[s] for s in sorted(last)]


def windows(values: list[float], size: int = 10) -> list[float]:
    return [sum(values[i:i + size]) / len(values[i:i + size]) for i in range(0, len(values), size)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=90)
    add_asset_flags(parser)
    args = parser.parse_args(argv)
    work, cache, tokenizer = local_training_assets(args, "hart-bench-elastic-")
    stamp, third = int(time.time()), args.steps // 3
    curves = {
        "seed 0": run(cache, tokenizer, work, f"seed0-{stamp}", 0, [(2, args.steps)]),
        "seed 1": run(cache, tokenizer, work, f"seed1-{stamp}", 1, [(2, args.steps)]),
        "resized": run(cache, tokenizer, work, f"resized-{stamp}", 0, [(2, third), (1, 2 * third), (2, args.steps)]),
    }
    print(f"loss, mean of 10-step windows ({args.steps} steps; resized: 2 workers, then 1 from step {third + 1}, "
          f"2 again from step {2 * third + 1}):")
    for name, curve in curves.items():
        print(f"  {name:8s} " + " ".join(f"{v:.3f}" for v in windows(curve)))
    for name in ("seed 1", "resized"):
        gap = sum(abs(a - b) for a, b in zip(curves[name], curves["seed 0"])) / args.steps
        print(f"mean |loss - seed 0's| per step, {name}: {gap:.4f}")
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
