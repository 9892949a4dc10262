"""Training-step benchmark: bare step loop vs the Ray Train job on the same data, and GPU MFU.

What it measures (nothing is estimated unless labelled):
1. `bare`: the worker's step (`jobs.stages.optimizer_step` + the EMA update, the loss module through
   `hart.parallelize.parallelize` as on a worker) in a plain Python loop over batches already in memory
   (read from the token cache), tiny preset, CPU. Reports the median step period, tokens/s, images/s
   and the process's user and system CPU seconds and minor page faults per step, after warm-up steps.
2. `ray`: the same config through `jobs.train.run_training` (TorchTrainer, 1 worker, Ray Data
   ingest from the same cache, MLflow logging to a sqlite file every `run.log_every` steps as in
   `jobs/configs/train_tiny.yaml`, one checkpoint at the end). Same torch threads in both
   (`scaling.torch_threads` on the worker), compared at each count of `--threads` (default: all
   cores, then 1: on a 2-core machine a 1-thread trainer leaves a core to Ray Data and Ray's own
   processes, a 2-thread one shares both with them). Same scheduling priority too: Ray starts
   workers at niceness +15 by default, so the Ray instance started here gets
   `RAY_worker_niceness=0` (`--ray-worker-niceness 15` measures Ray's default).
   The per-step time is the worker's own `step_seconds` metric: the loop's period, with data wait,
   EMA and logging included; `data_seconds` / `context_seconds` / `compute_seconds` / `ema_seconds` split it. The worker
   logs means over `run.log_every`-step windows (5 in train_tiny.yaml), so the bare loop's per-step
   periods are averaged over the same windows. The ratio ray/bare is the wrapper's steady-state
   overhead (goal <= 1.10), measured one of two ways:
   - `--mode interleave` (default): the Ray job and the bare loop (a child process) run in the same
     minutes and take turns of `--block-seconds` (4 s), the side not running frozen
     (`benchmarks/turns.py`); only windows wholly inside one of their side's turns count. Headline:
     the median over Ray turns of (turn's median window / mean of the bare turns just before and
     after it). Below all cores, the bare loop and the Ray train worker process are pinned to the
     same core(s) (`--no-pin` to not): this VM's two vCPUs differ in speed by 3-6%, measured.
     Why: the host's speed drifts 10-30% over minutes, and repeated runs of whole-run
     comparisons put this ratio anywhere from 0.88 to 1.41.
   - `--mode rounds`: bare, then `--rounds` times (Ray, bare) as whole runs, each Ray run divided by
     the mean of the bare runs on either side, the median of those ratios the headline; with CPU
     accounting (Linux /proc, the driver and every process it started, over the timed steps): CPU
     seconds per step of the train worker (user / system, minor page faults) and of everything else
     (Ray daemons and actors, Ray Data, MLflow). The job's wall time, including Ray start-up,
     dataset planning and the checkpoint, is printed too.
   Besides medians, the 10th percentile of step times (p10) is printed: on a shared machine it is
   the least disturbed figure.
3. `gpu` (only with CUDA): hart-0.7b at 256 and 512 px (`MFU_RUNS`: batch sizes, activation
   checkpointing, `parallel.compile`), bf16 autocast, random tokens, the worker's step + EMA.
   Model FLOPs utilisation = FLOPs counted by `FlopCounterMode` over a real forward + backward /
   step time / the device's dense bf16 peak. Needs no Ray (`--gpu-only`); without a GPU it prints
   "skipped" (`--mfu-preset tiny --mfu-device cpu` runs the same code on the CPU, as a check).

Run:  python benchmarks/train.py [--steps 600] [--warmup 5] [--threads 2,1] [--cache DIR --tokenizer DIR]
      python benchmarks/train.py --mode rounds [--steps 30] [--rounds 3]
      python benchmarks/train.py --gpu-only [--gpu-steps 10]
Without --cache a small shapes corpus and cache are made first (precompute pipeline, ~30 s;
`--num-samples`, 1024 by default: 64 steps per epoch at batch 16. The Ray loop pays its data-stream
restart, ~0.15 s, once per epoch; with the old 256-row cache that came every 4 steps at batch 64
and was ~35 ms of every step).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.turns import (  # noqa: E402
    Turns, command_line, paired_ratios, pin_threads, process_tree, windows_in_turns,
)

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks


def make_assets(root: Path, num_samples: int) -> tuple[str, str]:
    from hart.config import tokenizer_config
    from hart.tokenizer import HybridTokenizer
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


def train_config(args, cache: str, tokenizer: str, work: Path):
    """The Ray job's config (also the bare loop's): `--warmup` + `--steps` steps, one checkpoint at the end."""
    from jobs.train_config import load_train_config

    total = args.warmup + args.steps

    return load_train_config(str(REPO / "jobs/configs/train_tiny.yaml"), args.stage, [
        f"run.name=bench-{args.stage}-{int(time.time())}", f"run.storage_path={work / 'storage'}",
        f"run.max_steps={total}", f"run.checkpoint_every={total}",
        f"data.cache={cache}", f"model.tokenizer_checkpoint={tokenizer}", f"data.batch_size={args.batch_size}",
        f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}", "tracking.sample_every=0", "run.export=false",
        "precision=fp32", f"scaling.torch_threads={args.threads}",  # same threads as the bare loop
        "tracking.experiment=bench-train",
    ])


def bare_loop(config, cache: str, steps: int, warmup: int, on_step=None) -> tuple[list[float], dict[str, float]]:
    """Step periods (s) of the worker's step (`optimizer_step` + EMA update) over in-memory batches, and this
    process's user and system CPU seconds and minor page faults per step. `on_step()` runs after every step."""
    from hart.parallelize import parallelize
    from hart.training import ExponentialMovingAverage, build_optimizer, build_scheduler
    from jobs.stages import build_stage, optimizer_step
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
    objective = parallelize(stage.objective, config.parallel, device)
    optimizer = build_optimizer(stage.model, config.optim)
    scheduler = build_scheduler(optimizer, config.run.max_steps, config.optim)
    ema = ExponentialMovingAverage(stage.model, config.ema_decay)
    generator = torch.Generator()
    times, started = [], resource.getrusage(resource.RUSAGE_SELF)
    last = time.perf_counter()
    for step in range(steps + warmup):
        if step == warmup:
            started = resource.getrusage(resource.RUSAGE_SELF)
        batch = batches[step % len(batches)]
        generator.manual_seed(step)
        optimizer_step(config, stage, objective, None, optimizer, scheduler, None, [batch], step, generator)
        ema.update(stage.model)
        now = time.perf_counter()
        times.append(now - last)
        last = now
        if on_step is not None:
            on_step()
    ended = resource.getrusage(resource.RUSAGE_SELF)
    return times[warmup:], {"user": (ended.ru_utime - started.ru_utime) / steps,
                            "system": (ended.ru_stime - started.ru_stime) / steps,
                            "faults": (ended.ru_minflt - started.ru_minflt) / steps}


def cpu_seconds(pids: list[int], commands: dict[int, str]) -> dict[int, tuple[str, float, float, int]]:
    """{pid: (command, user CPU s, system CPU s, minor page faults)}; `commands` caches the command lines."""
    out, tick = {}, os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if pid not in commands:
                commands[pid] = command_line(pid)
        except OSError:
            continue
        out[pid] = (commands[pid], int(fields[11]) / tick, int(fields[12]) / tick, int(fields[7]))
    return out


class HostSteal:
    """Share of the machine's CPU time that the hypervisor gave to other guests while the block ran
    (`steal` in /proc/stat; None where there is no /proc/stat). On this shared VM it comes in spells
    (47% for minutes, measured): a run inside one is slow for reasons that are not the code's."""

    @staticmethod
    def _read() -> list[int] | None:
        try:
            with open("/proc/stat") as stat:
                return [int(v) for v in stat.readline().split()[1:]]
        except OSError:
            return None

    def __enter__(self) -> "HostSteal":
        self.start, self.share = self._read(), None
        return self

    def __exit__(self, *exc) -> None:
        end = self._read()
        if self.start and end:
            delta = [b - a for a, b in zip(self.start, end)]
            self.share = delta[7] / max(1, sum(delta[:8]))  # user nice system idle iowait irq softirq steal


class CpuSampler:
    """Samples the CPU seconds of this process tree (driver + the Ray processes it started) in a thread.

    The tree is re-listed every `relist_s` (a full /proc scan, ~4 ms); in between only the known
    processes' counters are read (well under 1 ms), so the sampler itself costs < 0.5% of a core.
    """

    def __init__(self, interval_s: float = 0.2, relist_s: float = 2.0):
        import threading

        self.samples: list[tuple[float, dict[int, tuple[str, float]]]] = []
        self.interval_s, self.relist_s, self.stopped = interval_s, relist_s, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        commands: dict[int, str] = {}
        pids, listed = [], 0.0
        while not self.stopped.is_set():
            if time.time() - listed > self.relist_s:  # Ray renames a pooled worker when it becomes an actor
                pids, listed, commands = process_tree(os.getpid()), time.time(), {}
            self.samples.append((time.time(), cpu_seconds(pids, commands)))
            self.stopped.wait(self.interval_s)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join()

    def window(self, start: float, end: float) -> dict[str, float]:
        """Between two wall times: the train worker's user and system CPU seconds and minor page faults,
        and the CPU seconds of everything else."""
        first = min(self.samples, key=lambda s: abs(s[0] - start))
        last = min(self.samples, key=lambda s: abs(s[0] - end))
        used = {"user": 0.0, "system": 0.0, "faults": 0.0, "rest": 0.0, "seconds": last[0] - first[0]}
        for pid, (command, user, system, faults) in last[1].items():
            _, user0, system0, faults0 = first[1].get(pid, (command, 0.0, 0.0, 0))
            if "RayTrainWorker" in command:
                used["user"] += user - user0
                used["system"] += system - system0
                used["faults"] += faults - faults0
            else:
                used["rest"] += user - user0 + system - system0
        return used


BREAKDOWN = ("step_seconds", "data_seconds", "context_seconds", "compute_seconds", "ema_seconds")


def ray_job(config, warmup: int) -> tuple[dict[str, list[float]], float, dict[str, float]]:
    """The worker's timing metrics over the timed steps (one value per `run.log_every`-step window: the
    window's mean, as logged), the job's wall time, and per timed step: the train worker's user and system
    CPU seconds and minor page faults, and the CPU seconds of the rest of the process tree."""
    import ray
    from mlflow.tracking import MlflowClient

    from jobs import tracking
    from jobs.train import run_training

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    started = time.perf_counter()
    with CpuSampler() as sampler:
        outcome = run_training(config)
    wall = time.perf_counter() - started
    client = MlflowClient(tracking_uri=tracking.resolve_tracking_uri(config.tracking.tracking_uri))
    histories, history = {}, []
    for name in BREAKDOWN:
        history = sorted(client.get_metric_history(outcome["run_id"], name), key=lambda m: m.step)
        histories[name] = [m.value for m in history if m.step > warmup]
    # the timed steps were made between the end of the warm-up window and the last window
    start = max(m.timestamp for m in history if m.step <= warmup) / 1e3
    used = sampler.window(start, history[-1].timestamp / 1e3)
    timed = history[-1].step - warmup
    return histories, wall, {name: used[name] / timed for name in ("user", "system", "faults", "rest")}


def windows(times: list[float], size: int) -> list[float]:
    """Means of consecutive `size`-step windows: the statistic the Ray worker logs (`run.log_every`)."""
    return [statistics.mean(times[i : i + size]) for i in range(0, len(times) - size + 1, size)]


# (resolution, batch size, activation checkpointing, torch.compile per block) of the `gpu` part. The
# checkpointed settings double the eager batches. Eager peaks on an 80 GB H100: 63 GiB at 256px batch 32
# (so batch 64 cannot fit), 42 GiB at 512px batch 8; weights, gradients, AdamW state and EMA are ~15 GB.
MFU_RUNS = (
    (256, 16, False, False), (256, 32, False, False), (256, 32, False, True), (256, 64, True, False),
    (512, 8, False, False), (512, 8, False, True), (512, 16, True, False),
)


def mfu_run(preset: str, resolution: int, batch_size: int, activation_checkpointing: bool, compile: bool,
            device: torch.device, steps: int, warmup: int, attention: str = "sdpa",
            patch_nums: tuple[int, ...] | None = None) -> dict[str, float]:
    """One `gpu` setting: the worker's step (train_step + EMA) on random tokens, timed; FLOPs counted.

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
    from torch.utils.flop_counter import FlopCounterMode

    from hart.config import PATCH_NUMS_256, PATCH_NUMS_512, PATCH_NUMS_1024, TokenizerConfig, replace, transformer_config
    from hart.parallelize import ParallelConfig, parallelize
    from hart.quantizer import MultiScaleQuantizer
    from hart.training import ExponentialMovingAverage, OptimizerConfig, autocast, build_optimizer, train_step
    from hart.transformer import HARTForT2I
    from jobs.stages import TransformerObjective

    if patch_nums is None:
        patch_nums = {256: PATCH_NUMS_256, 512: PATCH_NUMS_512, 1024: PATCH_NUMS_1024}[resolution]
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


def gpu_mfu(steps: int, warmup: int, preset: str = "hart-0.7b", device_name: str = "cuda",
            runs=MFU_RUNS) -> None:
    """The `gpu` part: each MFU_RUNS setting of `preset`, one line each (an out-of-memory setting says so)."""
    if device_name == "cuda" and not torch.cuda.is_available():
        print("gpu: skipped (no CUDA device on this machine)")
        return
    device = torch.device(device_name)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    print(f"gpu: {name}, torch {torch.__version__}, {preset}, dense bf16 peak "
          f"{f'{peak:.0f} TFLOP/s' if peak else 'unknown'}; step = train_step ("
          f"{'bf16 autocast, fused AdamW' if device.type == 'cuda' else 'fp32, AdamW'}, clip 2.0) + EMA update; "
          f"mean of {steps} steps after {warmup} (replaying their shapes)", flush=True)
    for resolution, batch_size, activation_checkpointing, compile in runs:
        label = (f"{preset} {resolution}px bs{batch_size}"
                 f"{' +act-ckpt' if activation_checkpointing else ''}{' +compile' if compile else ''}")
        try:
            r = mfu_run(preset, resolution, batch_size, activation_checkpointing, compile, device, steps, warmup)
        except torch.cuda.OutOfMemoryError:
            print(f"gpu {label}: out of memory", flush=True)
            torch._dynamo.reset()
            torch.cuda.empty_cache()
            continue
        achieved = r["flops"] / r["step_s"] / 1e12
        mfu = f"{100 * achieved / peak:.1f}%" if peak else "n/a"
        print(f"gpu {label}: {r['step_s'] * 1e3:.1f} ms/step (EMA {r['ema_s'] * 1e3:.1f}), "
              f"{r['tokens'] / r['step_s']:,.0f} tokens/s, {r['images'] / r['step_s']:.1f} images/s, "
              f"{r['flops'] / 1e12:.2f} TFLOP/step counted, {achieved:.1f} TFLOP/s, MFU {mfu}, "
              f"peak {r['peak_gib']:.1f} GiB, warm-up {r['first_s']:.1f} s", flush=True)
        torch._dynamo.reset()  # compiled graphs keep the run's model and optimizer alive otherwise
        if device.type == "cuda":
            torch.cuda.empty_cache()


def p10(values: list[float]) -> float:
    """10th percentile: the least disturbed steps, a steadier figure than the median on a shared machine."""
    return statistics.quantiles(values, n=10)[0]


def steal_note(steal: HostSteal) -> str:
    return "" if steal.share is None else f", host steal {100 * steal.share:.0f}%"


def compare(args, cache: str, tokenizer: str, work: Path, threads: int) -> None:
    """bare, then `--rounds` x (Ray, bare) at `threads` torch threads; prints step times and ratios.

    Each Ray run is compared with the mean of the two bare runs around it: the machine's speed
    drifts by 10-30% over minutes here, and bracketing cancels the slow part of that drift. The
    headline is the median of the per-round ratios.
    """
    from hart.config import transformer_config

    torch.set_num_threads(threads)
    args.threads = threads
    config = train_config(args, cache, tokenizer, work)
    tokens_per_image = transformer_config(config.model.transformer).num_image_tokens()
    print(f"--- {args.stage} tiny CPU bs{args.batch_size}, {threads} torch thread(s) in the bare loop and the Ray worker, "
          f"Ray worker niceness {os.environ['RAY_worker_niceness']}, {args.rounds} round(s)", flush=True)

    every = config.run.log_every
    if args.warmup % every or args.steps % every:
        raise SystemExit(f"--warmup and --steps must be multiples of run.log_every ({every}): the worker logs "
                         f"{every}-step means")

    def report_bare() -> tuple[float, float, float]:
        with HostSteal() as steal:
            steps, usage = bare_loop(config, cache, args.steps, args.warmup)
        cpu = usage["user"] + usage["system"]
        times = windows(steps, every)
        bare_s = statistics.median(times)
        print(f"bare   {bare_s * 1e3:.1f} ms/step (median of {len(times)} {every}-step means; mean "
              f"{statistics.mean(times) * 1e3:.1f}, p10 {p10(times) * 1e3:.1f}; per-step median "
              f"{statistics.median(steps) * 1e3:.1f}), {args.batch_size * tokens_per_image / bare_s:,.0f} tokens/s, "
              f"{args.batch_size / bare_s:.1f} images/s; CPU {cpu * 1e3:.0f} ms/step (user {usage['user'] * 1e3:.0f}, "
              f"system {usage['system'] * 1e3:.0f}, {usage['faults']:.0f} minor faults) [load avg {os.getloadavg()[0]:.1f}"
              f"{steal_note(steal)}]",
              flush=True)
        return bare_s, p10(times), cpu

    def report_ray(round_index: int) -> tuple[float, float, float]:
        round_config = replace(config, run=replace(config.run, name=f"{config.run.name}-r{round_index}"))  # fresh run
        with HostSteal() as steal:
            histories, wall, cpu = ray_job(round_config, args.warmup)
        ray_steps = histories["step_seconds"]
        ray_s = statistics.median(ray_steps)
        print(f"ray    {ray_s * 1e3:.1f} ms/step (median of {len(ray_steps)} {every}-step means; mean "
              f"{statistics.mean(ray_steps) * 1e3:.1f}, "
              f"p10 {p10(ray_steps) * 1e3:.1f}), {args.batch_size * tokens_per_image / ray_s:,.0f} tokens/s; job wall "
              f"{wall:.1f} s for {args.steps + args.warmup} steps incl. start-up and checkpoint [load avg "
              f"{os.getloadavg()[0]:.1f}{steal_note(steal)}]")
        sums = {name: sum(values) * 1e3 / len(values) for name, values in histories.items()}
        print("ray    means over the timed steps (ms/step): " + ", ".join(f"{name} {value:.1f}" for name, value in sums.items())
              + f"; rest {sums['step_seconds'] - sum(sums[name] for name in BREAKDOWN[1:]):.1f}")
        worker = cpu["user"] + cpu["system"]
        print(f"ray    CPU per timed step: train worker {worker * 1e3:.0f} ms (user {cpu['user'] * 1e3:.0f}, system "
              f"{cpu['system'] * 1e3:.0f}, {cpu['faults']:.0f} minor faults) + everything else (driver, Ray daemons and "
              f"actors, Ray Data) {cpu['rest'] * 1e3:.0f} ms", flush=True)
        return ray_s, p10(ray_steps), worker + cpu["rest"]

    bare_runs = [report_bare()]
    if args.skip_ray:
        return
    ratios = []
    for round_index in range(args.rounds):
        ray_s, ray_p10, ray_cpu = report_ray(round_index)
        bare_runs.append(report_bare())
        before, after = bare_runs[-2], bare_runs[-1]
        ratio = (ray_s / ((before[0] + after[0]) / 2), ray_p10 / ((before[1] + after[1]) / 2),
                 ray_cpu / ((before[2] + after[2]) / 2))
        ratios.append(ratio)
        print(f"round {round_index + 1}: ray/bare median {ratio[0]:.3f} (bare {before[0] * 1e3:.0f} and "
              f"{after[0] * 1e3:.0f} ms/step around it), p10 {ratio[1]:.3f}, CPU {ratio[2]:.3f}", flush=True)
    print(f"overhead ray/bare per step ({threads} thread(s)): median {statistics.median(r[0] for r in ratios):.3f} "
          f"over {len(ratios)} round(s) [{', '.join(f'{r[0]:.3f}' for r in ratios)}] (goal <= 1.10), "
          f"p10 {statistics.median(r[1] for r in ratios):.3f}, CPU {statistics.median(r[2] for r in ratios):.3f}",
          flush=True)


def bare_child(args) -> None:
    """`--bare-child FILE`: the bare loop without end, each step's end (wall clock) appended to FILE; the
    interleaved comparison freezes, resumes and finally kills this process."""
    torch.set_num_threads(args.threads_child)
    args.threads = args.threads_child
    config = train_config(args, args.cache, args.tokenizer, Path(tempfile.mkdtemp(prefix="hart-bench-bare-")))
    with open(args.bare_child, "w", buffering=1) as stamps:
        bare_loop(config, args.cache, 10**9, 0, on_step=lambda: stamps.write(f"{time.time():.6f}\n"))


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
    `--block-seconds` (benchmarks/turns.py: the side not running is frozen). Ray windows are the worker's
    logged `run.log_every`-step means whose whole span (between two log timestamps) lies inside one Ray
    turn; bare windows are as many steps wholly inside one bare turn. Headline: the median, over Ray
    turns, of the turn's median window over the mean of the bare turns just before and after it; the
    ratio of the two sides' pooled medians is printed beside it. Returns the headline."""
    import subprocess

    import ray
    from mlflow.tracking import MlflowClient

    from hart.config import transformer_config
    from jobs import tracking
    from jobs.train import run_training

    torch.set_num_threads(threads)
    args.threads = threads
    config = train_config(args, cache, tokenizer, work)
    every = config.run.log_every
    tokens_per_image = transformer_config(config.model.transformer).num_image_tokens()
    print(f"--- {args.stage} tiny CPU bs{args.batch_size}, {threads} torch thread(s) in the bare loop and the Ray worker, "
          f"Ray worker niceness {os.environ['RAY_worker_niceness']}, interleaved turns of {args.block_seconds:g} s, "
          f"{args.warmup} + {args.steps} Ray steps", flush=True)
    stamps_path = work / f"bare-stamps-{threads}-{int(time.time())}.txt"
    # Below all cores, both loops get the same core: the vCPUs of this VM differ in speed (turns.py).
    cores = os.cpu_count() or 1
    pin = {cores - 1 - i for i in range(threads)} if args.pin and threads < cores else None
    child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--bare-child", str(stamps_path),
                              "--threads-child", str(threads), "--cache", cache, "--tokenizer", tokenizer,
                              "--stage", args.stage, "--batch-size", str(args.batch_size),
                              "--steps", str(args.steps), "--warmup", str(args.warmup)],
                             preexec_fn=(lambda: os.sched_setaffinity(0, pin)) if pin else None)

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
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
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
          f"{os.getloadavg()[0]:.1f}{steal_note(steal)}]", flush=True)
    return headline


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", default="joint", choices=("ar", "diffusion", "joint"))
    parser.add_argument("--mode", default="interleave", choices=("interleave", "rounds"),
                        help="interleave: Ray and bare loop take turns of --block-seconds in the same minutes "
                             "(benchmarks/turns.py); rounds: whole Ray runs between bare runs, with CPU accounting")
    parser.add_argument("--steps", type=int, help="timed steps (default: 600 interleaved, 30 per run in rounds)")
    parser.add_argument("--block-seconds", type=float, default=4.0, help="length of one turn (interleave)")
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="interleave below all cores: do not pin both loops to the same core(s)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed first steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-samples", type=int, default=1024,
                        help="rows of the generated cache; the Ray loop restarts its data stream (~0.15 s) "
                             "once per epoch, num_samples / batch_size steps: a tiny cache inflates that share")
    cores = torch.get_num_threads()
    parser.add_argument("--threads", default=",".join(dict.fromkeys([str(cores), "1"])),
                        help="comma-separated torch thread counts to compare at, each used by both the bare loop and "
                             "the Ray worker (default: all cores, then 1)")
    parser.add_argument("--ray-worker-niceness", type=int, default=0,
                        help="RAY_worker_niceness of the Ray instance started here (Ray's own default is 15)")
    parser.add_argument("--cache", help="existing tiny token cache (with text features); default: make one")
    parser.add_argument("--tokenizer", help="tokenizer folder the cache was made with")
    parser.add_argument("--rounds", type=int, default=3,
                        help="Ray runs per thread count, each between two bare runs; the ratio is their median")
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--gpu-only", action="store_true",
                        help="run only the `gpu` part (needs no Ray: torch, numpy, safetensors and PyYAML suffice)")
    parser.add_argument("--gpu-steps", type=int, default=10, help="timed steps per `gpu` setting (after 3 warm-up)")
    parser.add_argument("--mfu-preset", default="hart-0.7b",
                        help="transformer preset of the `gpu` part (`tiny` with --mfu-device cpu checks the code)")
    parser.add_argument("--mfu-device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--bare-child", help=argparse.SUPPRESS)  # internal: the interleaved bare loop's stamp file
    parser.add_argument("--threads-child", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 600 if args.mode == "interleave" else 30
    if args.bare_child:
        bare_child(args)
        return
    if args.gpu_only:
        gpu_mfu(args.gpu_steps, 3, args.mfu_preset, args.mfu_device)
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

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        print(f"making a {args.num_samples}-sample shapes cache ...", flush=True)
        cache, tokenizer = make_assets(work, args.num_samples)
    print(f"cache {cache} tokenizer {tokenizer}", flush=True)
    for threads in [int(t) for t in args.threads.split(",")]:
        (interleave if args.mode == "interleave" else compare)(args, cache, tokenizer, work, threads)
    gpu_mfu(args.gpu_steps, 3, args.mfu_preset, args.mfu_device)


if __name__ == "__main__":
    main()
