"""Ray Train's overhead per training step: the Ray job against the worker's own step in a bare loop.

    python -m benchmarks.ray_overhead [--steps 600] [--warmup 5] [--threads 2,1] [--cache DIR --tokenizer DIR]

Both sides run the joint stage, tiny preset, CPU, batch 16, from the same token cache:
- `bare`: the worker's setup (`trainer.worker.setup_worker`: stage, wrapped loss module, optimizer,
  scheduler, EMA) and step (`trainer.worker_step.optimizer_step` + the EMA update) in a plain Python loop over
  batches already in memory. No Ray, no data stream, no logging.
- `ray`: the same config through `trainer.driver.run_training` (TorchTrainer, 1 worker, the cache stream of trainer/batches.py,
  MLflow logging to a sqlite file every `run.log_every` steps as in `jobs/configs/train_tiny.yaml`, a
  checkpoint at the end). Its per-step time is the worker's own `step_seconds` metric: the loop's
  period, data wait, EMA and logging included; `data_seconds` / `context_seconds` /
  `compute_seconds` / `ema_seconds` split it.
Same torch threads on both sides, compared at each count of `--threads` (default: all cores, then
1; on 2 cores a 1-thread trainer leaves a core to Ray Data and Ray's own processes). Same scheduling
priority too: Ray starts workers at niceness +15 by default, so the Ray instance started here gets
`RAY_worker_niceness=0` (`--ray-worker-niceness 15` measures Ray's default).

Method: interleaved turns (`benchmarks/turns.py`). The Ray job and the bare loop (a child process)
run in the same minutes and take turns of `--block-seconds` (4 s), the side not running frozen with
SIGSTOP. Only `run.log_every`-step windows lying wholly inside one of their side's turns count (the
worker logs means over such windows, so the bare loop's step periods are averaged over the same
windows). Headline: the median over Ray turns of (the turn's median window / the mean of the bare
turns just before and after it); goal <= 1.10. Below all cores, the bare loop and the Ray train worker
process are pinned to the same core(s) (`--no-pin` to not). The 10th percentile of windows (p10), the
least disturbed figure on a shared machine, and the host's steal share are printed beside it.

Why this method and not whole runs one after the other: the shared VM's speed drifts 10-30% over
minutes, more than the overhead measured. Bracketed whole runs (bare, Ray, bare, ...) put single
rounds' ratios anywhere from 0.88 to 1.41 and medians of six runs from 0.975 to 1.165, so their
figures could not say whether the goal was met. Turns put both sides in the same minutes, and the
method checks itself: two identical bare loops in turns, pinned to one core, give 0.986-1.005.

Without `--cache` a `--num-samples`-row shapes cache (1024 by default: 64 steps per epoch at batch 16)
is made first with the precompute pipeline (~30 s).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.processes import HostSteal, command_line, pin_threads, process_tree
from benchmarks.turns import Turns, paired_ratios, windows_in_turns
from trainer.plan import RunPlan

REPO = Path(__file__).resolve().parents[1]
BREAKDOWN = ("step_seconds", "data_seconds", "context_seconds", "compute_seconds", "ema_seconds")


def make_assets(root: Path, num_samples: int) -> tuple[str, str]:
    from hart.config import tokenizer_config
    from hart.tokenizer.model import HybridTokenizer
    from pipelines.config import load_precompute_config
    from pipelines.plan import run_precompute
    from pipelines.shapes import write_shapes_shards

    torch.manual_seed(0)
    HybridTokenizer(tokenizer_config("tiny")).save_pretrained(root / "tokenizer")
    write_shapes_shards(str(root / "shards"), num_samples=num_samples, num_shards=2)
    config = load_precompute_config(None, [
        f"input.shards=['{root}/shards/*.tar']", f"output={root}/cache", f"tokenizer.checkpoint={root}/tokenizer",
        "progress=false", "compute.tokenizer_cpus=0.25", "text.encoder=minilm", "text.max_length=16",
    ])
    run_precompute(config, log=lambda *a: None)
    return str(root / "cache"), str(root / "tokenizer")


def add_asset_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-samples", type=int, default=1024, help="rows of the shapes cache made when no --cache")
    parser.add_argument("--cache", help="existing tiny token cache with text features; default: make one")
    parser.add_argument("--tokenizer", help="tokenizer folder the cache was made with")


def local_training_assets(args, prefix: str) -> tuple[Path, str, str]:
    """The jobs' local Ray (2 CPUs, workers at the driver's priority) and (work folder, cache, tokenizer): the
    `--cache` given, else a `--num-samples` shapes cache made here. For the benchmarks that run Ray
    Train jobs on the tiny cache (benchmarks/train_input.py, benchmarks/elastic_loss.py)."""
    from trainer.ray_session import connect

    os.environ.setdefault("RAY_worker_niceness", "0")
    connect(None, num_cpus=2, ray_train=True)
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix=prefix))
    cache, tokenizer = (args.cache, args.tokenizer) if args.cache else make_assets(work, args.num_samples)
    return work, cache, tokenizer


def train_config(args, cache: str, tokenizer: str, work: Path):
    """The Ray job's config (also the bare loop's): `--warmup` + `--steps` steps, one checkpoint at the end."""
    from trainer.config import load_train_config

    total = args.warmup + args.steps

    return load_train_config(str(REPO / "jobs/configs/train_tiny.yaml"), args.stage, [
        f"run.name=bench-{args.stage}-{int(time.time())}", f"run.storage_path={work / 'storage'}",
        f"run.max_steps={total}", f"run.checkpoint_every={total}",
        f"data.cache={cache}", f"model.tokenizer_checkpoint={tokenizer}", f"data.batch_size={args.batch_size}",
        f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}", "tracking.sample_every=0", "run.export=false",
        "precision=fp32", f"scaling.torch_threads={args.threads}",  # same threads as the bare loop
        "tracking.experiment=bench-train",
    ])


def bare_loop(config, cache: str, steps: int, on_step=None) -> None:
    """`steps` of the worker's step over the cache's batches held in memory, calling `on_step()` after each.

    Setup and step are the worker's own (`trainer.worker.setup_worker`, `optimizer_step` + the EMA update,
    each step's generator seeded as the worker seeds it); only the data source differs.
    """
    from trainer.worker_step import optimizer_step, step_seed
    from trainer.worker import setup_worker
    from pipelines.cache import batch_to_tensors, read_cache_table, read_manifest, table_to_numpy

    manifest = read_manifest(cache)
    setup = setup_worker(RunPlan.of(config, manifest=manifest), torch.device("cpu"))
    table = read_cache_table(cache)
    batch_size = config.data.batch_size
    batches = [setup.text.add_context(batch_to_tensors(table_to_numpy(table.slice(i, batch_size)), manifest))
               for i in range(0, table.num_rows - batch_size + 1, batch_size)]
    generator = torch.Generator()
    for step in range(steps):
        generator.manual_seed(step_seed(config.run.seed, 0, step))
        optimizer_step(config, setup.stage, setup.objective, setup.disc_objective, setup.optimizer, setup.scheduler,
                       setup.disc_optimizer, [batches[step % len(batches)]], step, generator)
        setup.ema.update(setup.stage.model)
        if on_step is not None:
            on_step()


def bare_child(args) -> None:
    """`--bare-child FILE`: the bare loop without end, each step's end (wall clock) appended to FILE; the
    interleaved comparison freezes, resumes and finally kills this process."""
    args.threads = args.threads_child  # setup_worker sets torch's threads from the config
    config = train_config(args, args.cache, args.tokenizer, Path(tempfile.mkdtemp(prefix="hart-bench-bare-")))
    with open(args.bare_child, "w", buffering=1) as stamps:
        bare_loop(config, args.cache, 10**9, on_step=lambda: stamps.write(f"{time.time():.6f}\n"))


def p10(values: list[float]) -> float:
    """10th percentile: the least disturbed steps, a steadier figure than the median on a shared machine."""
    return statistics.quantiles(values, n=10)[0]


def pin_train_worker(root: int, cpus: set[int], pinned: dict[int, int], stop: threading.Event) -> None:
    """Pin the Ray train worker process under `root` to `cpus`, all its threads, re-applied every 0.5 s
    until `stop` (a thread started before a pass keeps its old mask otherwise); `pinned` gets
    {pid: most threads pinned in one pass}."""
    workers: list[int] = []
    while not stop.wait(0.5):
        if not workers:  # a pooled Ray worker is renamed when it becomes the train worker actor
            workers = [pid for pid in process_tree(root) if "RayTrainWorker" in command_line(pid)]
        for pid in workers:
            pinned[pid] = max(pinned.get(pid, 0), pin_threads(pid, cpus))


def ray_windows_in_turns(turns: Turns, histories: dict, warmup: int, every: int):
    """The worker's logged `every`-step windows after `warmup` that lie wholly inside one Ray turn (between
    two log timestamps): ({turn: [step_seconds]}, [the same windows from the log timestamps], {metric:
    mean ms over them})."""
    history = histories["step_seconds"]
    by_turn: dict[int, list[float]] = {}
    by_log_time, counted = [], set()
    for previous, current in zip(history, history[1:]):
        if previous.step < warmup or current.step - previous.step != every:
            continue
        turn = turns.inside("ray", previous.timestamp / 1e3, current.timestamp / 1e3)
        if turn is not None:
            by_turn.setdefault(turn, []).append(current.value)
            by_log_time.append((current.timestamp - previous.timestamp) / 1e3 / every)
            counted.add(current.step)
    split = {name: statistics.mean(m.value for m in values if m.step in counted) * 1e3
             for name, values in histories.items()} if counted else {}
    return by_turn, by_log_time, split


def interleave(args, cache: str, tokenizer: str, work: Path, threads: int) -> float:
    """The Ray job and the bare loop (a child process) in the same minutes, taking turns of
    `--block-seconds` (the side not running is frozen). Ray windows are the worker's
    logged `run.log_every`-step means whose whole span (between two log timestamps) lies inside one Ray
    turn; bare windows are as many steps wholly inside one bare turn. Headline: the median, over Ray
    turns, of the turn's median window over the mean of the bare turns just before and after it; the
    ratio of the two sides' pooled medians is printed beside it. Returns the headline."""
    import ray
    from mlflow.tracking import MlflowClient

    from hart.config import transformer_config
    from trainer import tracking
    from trainer.driver import run_training

    torch.set_num_threads(threads)
    args.threads = threads
    config = train_config(args, cache, tokenizer, work)
    every = config.run.log_every
    tokens_per_image = transformer_config(config.model.transformer).num_image_tokens()
    print(f"--- {args.stage} tiny CPU bs{args.batch_size}, {threads} torch thread(s) in the bare loop and the Ray worker, "
          f"Ray worker niceness {os.environ['RAY_worker_niceness']}, interleaved turns of {args.block_seconds:g} s, "
          f"{args.warmup} + {args.steps} Ray steps", flush=True)
    stamps_path = work / f"bare-stamps-{threads}-{int(time.time())}.txt"
    # Below all cores, both loops get the same core: a VM's vCPUs can differ in speed (turns.py).
    cores = os.cpu_count() or 1
    pin = {cores - 1 - i for i in range(threads)} if args.pin and threads < cores else None
    child = subprocess.Popen([sys.executable, "-m", "benchmarks.ray_overhead", "--bare-child", str(stamps_path),
                              "--threads-child", str(threads), "--cache", cache, "--tokenizer", tokenizer,
                              "--stage", args.stage, "--batch-size", str(args.batch_size),
                              "--steps", str(args.steps), "--warmup", str(args.warmup)],
                             cwd=REPO, preexec_fn=(lambda: os.sched_setaffinity(0, pin)) if pin else None)

    def stamps() -> list[float]:
        return [float(line) for line in stamps_path.read_text().split()] if stamps_path.exists() else []

    deadline = time.time() + 600
    while len(stamps()) < args.warmup:  # the bare side warms up alone, then waits frozen for its turns
        if child.poll() is not None or time.time() > deadline:
            raise SystemExit(f"the bare-loop child exited with {child.returncode} before {args.warmup} steps")
        time.sleep(0.2)
    me = os.getpid()

    def ray_side() -> list[int]:  # every process this driver started except itself and the bare loop's
        bare = set(process_tree(child.pid))
        return [pid for pid in process_tree(me) if pid != me and pid not in bare]

    sides = {"ray": ray_side, "bare": lambda: process_tree(child.pid)}
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    config = replace(config, run=replace(config.run, name=f"{config.run.name}-interleaved-{threads}"))
    pinned: dict[int, int] = {}
    stop_pinning = threading.Event()
    pinner = threading.Thread(target=pin_train_worker, args=(me, pin, pinned, stop_pinning), daemon=True)
    if pin:
        pinner.start()
    try:
        with HostSteal() as steal, Turns(sides, args.block_seconds) as turns:
            turns.start("ray")
            outcome = run_training(config)
            turns.stop()
    finally:
        stop_pinning.set()
        child.kill()
        child.wait()
    if pin:
        pinner.join()
        if not pinned:
            raise SystemExit("found no Ray train worker process to pin")
    client = MlflowClient(tracking_uri=tracking.resolve_tracking_uri(config.tracking.tracking_uri))
    histories = {name: sorted(client.get_metric_history(outcome["run_id"], name), key=lambda m: m.step)
                 for name in BREAKDOWN}
    ray_by_turn, by_log_time, split = ray_windows_in_turns(turns, histories, args.warmup, every)
    bare_by_turn = windows_in_turns(turns, "bare", stamps(), every)
    ray_windows = [v for values in ray_by_turn.values() for v in values]
    bare_windows = [v for values in bare_by_turn.values() for v in values]
    counts = {side: sum(turn.side == side for turn in turns.turns) for side in ("ray", "bare")}
    if len(ray_windows) < 3 or len(bare_windows) < 3:
        raise SystemExit(f"too few windows inside turns (ray {len(ray_windows)}, bare {len(bare_windows)}): "
                         f"raise --steps or --block-seconds")
    ray_s, bare_s = statistics.median(ray_windows), statistics.median(bare_windows)
    print(f"ray    {ray_s * 1e3:.1f} ms/step (median of {len(ray_windows)} {every}-step means inside {len(ray_by_turn)} of "
          f"its {counts['ray']} turns; from the log timestamps {statistics.median(by_log_time) * 1e3:.1f}; p10 "
          f"{p10(ray_windows) * 1e3:.1f}), {args.batch_size * tokens_per_image / ray_s:,.0f} tokens/s, "
          f"{args.batch_size / ray_s:.1f} images/s", flush=True)
    print("ray    means over the counted windows (ms/step): " + ", ".join(f"{k} {v:.1f}" for k, v in split.items())
          + f"; rest {split['step_seconds'] - split['data_seconds'] - split['compute_seconds'] - split['ema_seconds']:.1f}")
    print(f"bare   {bare_s * 1e3:.1f} ms/step (median of {len(bare_windows)} {every}-step means inside {len(bare_by_turn)} of "
          f"its {counts['bare']} turns; p10 {p10(bare_windows) * 1e3:.1f}), "
          f"{args.batch_size * tokens_per_image / bare_s:,.0f} tokens/s, {args.batch_size / bare_s:.1f} images/s", flush=True)
    if pin:
        print(f"both loops pinned to CPU {sorted(pin)} (bare loop process; Ray train worker process, "
              f"{max(pinned.values())} threads); Ray's other processes unpinned", flush=True)
    paired = paired_ratios(ray_by_turn, bare_by_turn, a_first=True)
    quartiles = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
    headline = statistics.median(paired)
    print(f"overhead ray/bare per step ({threads} thread(s), interleaved): {headline:.3f} (median over {len(paired)} Ray "
          f"turns of turn / bare turns around it; quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f}) (goal <= 1.10); "
          f"pooled medians {ray_s / bare_s:.3f}, p10 {p10(ray_windows) / p10(bare_windows):.3f} [load avg "
          f"{os.getloadavg()[0]:.1f}{steal.note()}]", flush=True)
    return headline


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", default="joint", choices=("ar", "diffusion", "joint"))
    parser.add_argument("--steps", type=int, default=600, help="timed Ray steps per thread count")
    parser.add_argument("--block-seconds", type=float, default=4.0, help="length of one turn")
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="below all cores: do not pin both loops to the same core(s)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed first steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-samples", type=int, default=1024,
                        help="rows of the generated cache")
    cores = torch.get_num_threads()
    parser.add_argument("--threads", default=",".join(dict.fromkeys([str(cores), "1"])),
                        help="comma-separated torch thread counts to compare at, each used by both the bare loop and "
                             "the Ray worker (default: all cores, then 1)")
    parser.add_argument("--ray-worker-niceness", type=int, default=0,
                        help="RAY_worker_niceness of the Ray instance started here (Ray's own default is 15)")
    parser.add_argument("--cache", help="existing tiny token cache (with text features); default: make one")
    parser.add_argument("--tokenizer", help="tokenizer folder the cache was made with")
    parser.add_argument("--bare-child", help=argparse.SUPPRESS)  # internal: the interleaved bare loop's stamp file
    parser.add_argument("--threads-child", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bare_child:
        bare_child(args)
        return
    torch.manual_seed(0)
    # Ray starts its worker processes 15 nice levels below the driver unless told otherwise; on a shared
    # machine that alone slows the worker against every other process, which is scheduling, not wrapper
    # overhead. Same priority as the bare loop by default; --ray-worker-niceness 15 shows Ray's default.
    os.environ.setdefault("RAY_worker_niceness", str(args.ray_worker_niceness))
    work = Path(tempfile.mkdtemp(prefix="hart-bench-train-"))
    if args.cache:
        cache, tokenizer = args.cache, args.tokenizer
    else:
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        print(f"making a {args.num_samples}-sample shapes cache ...", flush=True)
        cache, tokenizer = make_assets(work, args.num_samples)
    print(f"cache {cache} tokenizer {tokenizer}", flush=True)
    for threads in [int(t) for t in args.threads.split(",")]:
        interleave(args, cache, tokenizer, work, threads)


if __name__ == "__main__":
    main()
