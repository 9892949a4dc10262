"""Benchmark: the Ray Data pre-tokenization pipeline vs a bare single-process loop, same shards.

    python -m benchmarks.precompute                      # 2-core CPU, tiny tokenizer, 64px shapes
    python -m benchmarks.precompute --runs 3                                  # the ratio's median of 3
    python -m benchmarks.precompute --row-size 1024 --num-samples 4000 --num-shards 8   # 1024px-sized rows
    python -m benchmarks.precompute --preset var-d16-f16 --image-size 256 --device cuda --num-samples 4096

Measures in one run, on the same shards and the same tokenizer weights:
  (a) `pipelines.plan.run_precompute` end to end (planning, actor start-up, read, decode, encode,
      parquet commit) in the local Ray instance hart-precompute starts (`trainer.ray_session.connect`,
      already running when the clock starts; workers at the driver's priority), with the shipped job config
      `jobs/configs/precompute.yaml` (its `compute` section is what a user gets; on `--device cuda`
      the GPU sizing from that file's header), only input/output/tokenizer/batch size set here,
      plus any `--set` overrides, and
  (b) a bare loop in this process: read tar -> decode/crop (`prepare_image`) -> `encode_images`
      in batches (no writing), with `--threads` torch intra-op threads (default: all CPUs),
and prints images/s of both and the ratio a/b (goal: >= 0.9 on a 2-core CPU with the tiny
tokenizer at 16,000 images, median of 3 runs; >= 0.9 on a GPU at 256px with the released preset). The bare loop runs before and
after the pipeline and the better of the two is used, so background load penalises the pipeline,
not the baseline; the same `--batch-size` goes to both. The 1-minute load average is printed next
to each number because a shared machine makes them noisy, and the pipeline's start-up is split
into its driver-side phases (`PrecomputeSummary.startup_phases`). It also prints the cache bytes per sample of the released presets at
256/512/1024px, computed from the cache schema (int16 tokens + fp16 residual), and the measured
parquet bytes per sample of this run, and the bytes per sample that reached the driver process
(route counts + commit records) next to the encoded bytes routed between workers.

Where the pipeline's time goes, printed for every run: per stage, Ray Data's task wall seconds
(`PrecomputeSummary.operator_seconds`) and their share of (workers x run), which leaves the time
its workers waited for input or for room downstream, next to the CPU seconds psutil counts for
the processes in that role (`benchmarks.processes.CpuSampler`: Ray workers are told apart by their
`ray::<task>` titles); then the writer actors, the driver (and the seconds it sat blocked waiting
for the next block), idle and starting workers, Ray Data's helper actors and Ray's own processes.
`--runs N` repeats (bare, pipeline, bare) N times and prints the medians.

`--row-size 1024` measures the data plane's share at 1024px row sizes without a 1024px encoder:
after the (tiny) tokenizer both loops replace each row's tokens and residual by stand-ins of a
1024px HART row's size (9,451 int16 tokens + 32x64x64 fp16, random bits: `benchmarks.data_plane`),
and the pipeline routes and writes them through the real route stage and writer actors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np
import ray
import torch

from benchmarks import data_plane
from benchmarks.processes import CpuSampler, command_line, process_tree
from hart.config import TOKENIZER_PRESETS
from trainer.ray_session import connect
from pipelines import manifest as manifest_lib
from pipelines import shapes, shard_source
from pipelines.config import InputConfig, PreprocessConfig, TokenizerSource, load_precompute_config
from pipelines.decode import Rejected, prepare_caption, prepare_image
from pipelines.plan import add_route_stage, drain_to_writers, encoded_rows, prepare, run_precompute
from pipelines.precompute_summary import PrecomputeSummary
from pipelines.shard_source import read_shard_rows
from pipelines.tokenize_stage import encode_images, load_tokenizer
from pipelines.writer import cache_schema
from pipelines.writer_pool import ROUTE_BASE_MEMORY, ROUTE_CPUS, WriterPool


def bare_loop(uris: list[str], source: TokenizerSource, resolution: int, batch_size: int, device: torch.device,
              wide_rows: bool = False) -> tuple[int, float]:
    """Decode + encode every sample in this process; returns (images, seconds). `wide_rows`: also make
    each batch's 1024px-sized stand-in rows (`WidenStage`), as the pipeline's widened plan does."""
    model = load_tokenizer(source).to(device)
    config = PreprocessConfig()

    def encode(images: list[np.ndarray], seed: int) -> None:
        tokens_BL, _ = encode_images(model, np.stack(images), device)
        if wide_rows:
            wide_tokens_residual(tokens_BL.shape[0], seed)
    started = time.perf_counter()
    num_images, pending = 0, []
    for uri in uris:
        for table in read_shard_rows("bench", uri, InputConfig()):
            for image, caption in zip(table.column("image_bytes").to_pylist(), table.column("caption_bytes").to_pylist()):
                if image is None:
                    continue
                try:
                    prepare_caption(caption, config)
                    pending.append(prepare_image(image, config, resolution)[0])
                except Rejected:
                    continue
                if len(pending) == batch_size:
                    encode(pending, num_images)
                    num_images, pending = num_images + len(pending), []
    if pending:
        encode(pending, num_images)
        num_images += len(pending)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return num_images, time.perf_counter() - started


def wide_tokens_residual(num_rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and residual of `num_rows` 1024px HART rows (9,451 int16 tokens, 32x64x64 fp16), random
    bits as in `benchmarks.data_plane`: the bytes a 1024px tokenizer would hand on."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 4096, size=(num_rows, data_plane.NUM_TOKENS), dtype=np.int16),
            data_plane.random_fp16(rng, (num_rows, *data_plane.RESIDUAL_SHAPE)))


class WidenStage:
    """Ray Data actor stage after the tokenizer: each batch's tokens and residual replaced by
    1024px-sized ones."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seed = int(batch["sample_index"].max()) if len(batch["sample_index"]) else 0
        batch["tokens"], batch["residual"] = wide_tokens_residual(len(batch["row_kind"]), seed)
        return batch


def widened_pipeline(config, resolution: int) -> PrecomputeSummary:
    """The precompute plan with its rows widened to 1024px size before the real route stage, writers and
    driver loop (`plan.encoded_rows` -> `WidenStage` -> `plan.add_route_stage` -> `plan.drain_to_writers`)."""
    names = shard_source.name_shards(shard_source.list_shards(config.input))
    setup = prepare(config)
    fp = data_plane.fingerprint(False)
    schema = cache_schema(data_plane.NUM_TOKENS, data_plane.RESIDUAL_SHAPE, None)
    compute = config.compute
    summary = PrecomputeSummary(shards_total=len(names))
    started = time.perf_counter()
    pool = WriterPool(compute.writer_actors, compute.writer_cpus, {}, output=config.output, endpoint_url="",
                      fingerprint_hash=manifest_lib.fingerprint_hash(fp), schema=schema, shard_uris=names,
                      num_threads=compute.writer_threads, max_pending=compute.writer_max_pending)
    ds = encoded_rows([{"name": name, "uri": uri} for name, uri in names.items()], config, resolution, setup["tokenizer_hash"])
    # The stand-in stage runs in one actor (a task would fuse into the route actors, unlike the real
    # plan's last encoder stage) and asks for what it holds: ~3 of its output blocks (each up to Ray
    # Data's target block size: the one being built, its concatenation, its serialized form)
    # measured, plus headroom.
    widen_memory = ROUTE_BASE_MEMORY + 4 * ds.context.target_max_block_size
    ds = ds.map_batches(WidenStage, batch_size=compute.tokenizer_batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=ROUTE_CPUS, memory=widen_memory)
    ds = add_route_stage(ds, pool.actors, {}, schema, compute.tokenizer_batch_size)

    def first_batch(batch: dict) -> None:
        summary.startup_seconds = time.perf_counter() - started
        summary.startup_samples = int(batch["rows"].sum())

    try:
        done, failed, _ = drain_to_writers(ds, pool, summary, log=lambda *_: None, first_batch=first_batch)
    finally:
        pool.close()
    for stats in done.values():
        summary.add_stats(stats)
    summary.shards_failed = failed
    summary.seconds = time.perf_counter() - started
    return summary


def cache_bytes_per_sample(preset: str) -> dict[str, int]:
    config = TOKENIZER_PRESETS[preset]
    side = config.patch_nums[-1]
    tokens = 2 * config.num_tokens()
    residual = 2 * config.z_channels * side * side
    return {"resolution": config.image_size(), "tokens_bytes": tokens, "residual_bytes": residual, "total_bytes": tokens + residual}


# Process roles of the CPU breakdown: a Ray worker's title (`ray::<task or actor>`) names what it runs;
# a fused operator's title names every stage in it. First match per name; order is the plan's.
STAGE_TITLES = (("read_shards", "read"), ("decode_batch", "decode"), ("TokenizerStage", "tokenizer actors"),
                ("TextFeatureStage", "text actors"), ("WidenStage", "widen (1024px rows)"), ("RouteStage", "route"), ("ShardWriterActor", "writer actors"))


def process_role(pid: int, driver: int, last_roles: dict[int, str] | None = None) -> str:
    """What a process of this Ray session does, for the CPU breakdown. A task worker is titled
    `ray::IDLE` between tasks (most of the time for short ones, whatever it spends its CPU on):
    with `last_roles` (pid -> role, updated here) it keeps the role of the last task it ran."""
    if pid == driver:
        return "driver"
    line = command_line(pid)
    if line.startswith("ray::"):
        stages = [role for title, role in STAGE_TITLES if title in line]
        if stages:
            role = "+".join(stages)
            if last_roles is not None:
                last_roles[pid] = role
            return role
        if line.startswith("ray::IDLE"):
            return (last_roles or {}).get(pid, "idle Ray workers")
        return "Ray Data helper actors"
    if "default_worker.py" in line:
        return "Ray workers starting (imports)"
    return "Ray's own processes (raylet, GCS, agents)"


def breakdown_lines(summary, cpu_seconds: dict[str, float], seconds: float, compute) -> list[str]:
    """Per stage: blocks, task wall seconds and their share of (workers x run), CPU seconds (Ray Data's
    count of the task, and psutil's of the processes in that role); then every other role's CPU."""
    workers = {"read": compute.read_tasks, "decode": compute.decode_tasks, "tokenizer actors": compute.tokenizer_actors,
               "text actors": compute.text_actors, "route": compute.writer_actors}
    lines = [f"stage breakdown over the pipeline's {seconds:.1f} s on {os.cpu_count()} CPUs "
             f"(busy = Ray Data's task wall time / (workers x run); CPU = psutil over the processes in that role):",
             f"  {'stage':<40} {'workers':>7} {'blocks':>6} {'busy s':>8} {'busy %':>7} {'task CPU s':>10} {'process CPU s':>13}"]
    seen = set()
    for name, row in summary.operator_seconds.get("operators", {}).items():
        roles = [role for title, role in STAGE_TITLES if title in name]
        role = "+".join(roles) or name
        seen.add(role)
        count = workers.get(roles[0], 1) if roles else 1
        lines.append(f"  {role:<40} {count:>7} {row['blocks']:>6} {row['wall_s']:>8.1f} {100 * row['wall_s'] / (count * seconds):>6.0f}% "
                     f"{row['cpu_s']:>10.1f} {cpu_seconds.get(role, 0.0):>13.1f}")
    blocked = summary.operator_seconds.get("consumer_blocked_s", 0.0)
    for role, used in sorted(cpu_seconds.items(), key=lambda item: -item[1]):
        if role in seen:
            continue
        extra = f"  (blocked waiting for the next block {blocked:.1f} s)" if role == "driver" else ""
        lines.append(f"  {role:<40} {'':>7} {'':>6} {'':>8} {'':>7} {'':>10} {used:>13.1f}{extra}")
    total = sum(cpu_seconds.values())
    lines.append(f"  {'all processes':<40} {'':>7} {'':>6} {'':>8} {'':>7} {'':>10} {total:>13.1f}"
                 f"  = {100 * total / ((os.cpu_count() or 1) * seconds):.0f}% of the CPUs")
    return lines


def one_run(args, uris: list[str], config, source: TokenizerSource, resolution: int, device: torch.device,
            threads: int) -> dict:
    """(b) bare loop, (a) the pipeline, (b) again: one ratio, every number of it from this run."""
    shutil.rmtree(config.output, ignore_errors=True)
    torch.set_num_threads(threads)
    bare_first = bare_loop(uris, source, resolution, args.batch_size, device, args.row_size == 1024)
    load_before = os.getloadavg()[0]
    print(f"(b) bare loop, run 1: {bare_first[0]} images in {bare_first[1]:.2f}s = {bare_first[0] / bare_first[1]:.1f} img/s"
          f"  [{threads} threads; load average {load_before:.1f}]")

    connect(None, args.num_cpus)  # the local instance hart-precompute starts
    driver = os.getpid()
    last_roles: dict[int, str] = {}
    # every 1 s: a sample of ~20 processes costs the driver ~5 ms of CPU, which the pipeline pays
    with CpuSampler(lambda: {pid: process_role(pid, driver, last_roles) for pid in process_tree(driver)},
                    every_s=1.0) as cpu:
        started = time.perf_counter()
        summary = (widened_pipeline(config, resolution) if args.row_size == 1024
                   else run_precompute(config, log=lambda *_: None))
        pipeline_seconds = time.perf_counter() - started
    ray.shutdown()
    assert summary.samples_written == bare_first[0] and not summary.shards_failed, summary.table()
    pipeline_rate = summary.samples_written / pipeline_seconds
    load_pipeline = os.getloadavg()[0]
    print(f"(a) Ray Data pipeline: {summary.samples_written} images in {pipeline_seconds:.2f}s = {pipeline_rate:.1f} img/s "
          f"(start-up {summary.startup_seconds:.1f}s; {summary.steady_images_per_second:.1f} img/s after it)"
          f"  [load average {load_pipeline:.1f}; Ray worker niceness {os.environ.get('RAY_worker_niceness', '15')}]")
    print("    start-up phases (s): " + ", ".join(f"{phase} {seconds:.2f}" for phase, seconds in summary.startup_phases.items())
          + f"  [first batch: {summary.startup_samples} samples]")
    for line in breakdown_lines(summary, cpu.seconds, pipeline_seconds, config.compute):
        print(line)
    if args.ray_stats:
        print(summary.ray_stats)

    torch.set_num_threads(threads)
    bare_second = bare_loop(uris, source, resolution, args.batch_size, device, args.row_size == 1024)
    load_after = os.getloadavg()[0]
    print(f"(b) bare loop, run 2: {bare_second[0]} images in {bare_second[1]:.2f}s = {bare_second[0] / bare_second[1]:.1f} img/s"
          f"  [load average {load_after:.1f}]")
    bare_rates = [bare_first[0] / bare_first[1], bare_second[0] / bare_second[1]]
    ratio = pipeline_rate / max(bare_rates)
    print(f"ratio a/b = {ratio:.3f}  (pipeline {pipeline_rate:.1f} img/s / best bare {max(bare_rates):.1f} img/s)")
    return {"pipeline_img_s": pipeline_rate, "bare_img_s": max(bare_rates), "bare_runs_img_s": bare_rates, "ratio": ratio,
            "startup_seconds": summary.startup_seconds, "steady_img_s": summary.steady_images_per_second,
            "startup_phases": summary.startup_phases, "load_average": [load_before, load_pipeline, load_after],
            "cpu_seconds": cpu.seconds, "operator_seconds": summary.operator_seconds, "pipeline_seconds": pipeline_seconds,
            "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # 16,000 images: a workload long enough that Ray's ~13 s start-up is not most of it (BENCHMARKS.md).
    parser.add_argument("--num-samples", type=int, default=16000)
    parser.add_argument("--num-shards", type=int, default=32)
    parser.add_argument("--runs", type=int, default=1, help="repeat (bare, pipeline, bare) this many times; medians at the end")
    parser.add_argument("--preset", default="tiny", help="tokenizer preset (random weights, seed 0)")
    parser.add_argument("--image-size", type=int, default=64, help="side of the generated images")
    parser.add_argument("--row-size", type=int, default=0, choices=(0, 1024),
                        help="1024: rows of a 1024px HART cache's size (stand-in tokens + residual after the encoder, in both loops)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-cpus", type=int, default=None, help="local Ray CPUs (default: all)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads of the bare loop (0 = CPU count)")
    parser.add_argument("--config", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "jobs", "configs", "precompute.yaml"),
                        help="pipeline job config whose compute section (a) uses (default: the shipped one)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra pipeline config overrides")
    parser.add_argument("--ray-stats", action="store_true", help="print Ray Data's per-operator report")
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    args = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="bench-precompute-")
    try:
        uris = shapes.write_shapes_shards(f"{workdir}/raw", args.num_samples, args.num_shards, image_size=args.image_size)
        source = TokenizerSource(config=args.preset, seed=0)
        resolution = TOKENIZER_PRESETS[args.preset].image_size()
        device = torch.device(args.device)
        cpus = os.cpu_count() or 1
        threads = args.threads or cpus
        gpu = args.device == "cuda"
        overrides = [
            f"input.shards={json.dumps(uris)}", "input.list_file=''", f"output={workdir}/cache", "progress=false",
            "tokenizer.checkpoint=''", f"tokenizer.config={args.preset}", "tokenizer.seed=0", "text.encoder=''",
            f"compute.tokenizer_batch_size={args.batch_size}", f"compute.decode_batch_size={args.batch_size}",
        ]
        if gpu:  # the GPU sizing of the config file's header: one actor per GPU, decode on the CPUs
            overrides += ["compute.tokenizer_gpus=1", "compute.tokenizer_actors=1", "compute.tokenizer_cpus=0",
                          f"compute.decode_tasks={max(1, cpus - 2)}", "compute.read_tasks=2"]
        config = load_precompute_config(args.config, overrides + args.overrides)

        print(f"shards: {args.num_shards} x {args.num_samples // args.num_shards} samples at {args.image_size}px; "
              f"tokenizer {args.preset} ({resolution}px) on {args.device}; {cpus} CPUs")
        compute = config.compute
        print(f"pipeline compute ({os.path.relpath(args.config)}{' + ' + ' '.join(args.overrides) if args.overrides else ''}): "
              f"{compute.tokenizer_actors} tokenizer actor(s) x {compute.tokenizer_cpus:g} CPU / {compute.tokenizer_gpus:g} GPU, "
              f"{compute.torch_threads or max(1, int(compute.tokenizer_cpus))} torch thread(s) each, batch {compute.tokenizer_batch_size}; "
              f"{compute.read_tasks} read x {compute.read_cpus:g} CPU, {compute.decode_tasks} decode x {compute.decode_cpus:g} CPU; "
              f"bare loop: {threads} thread(s)")
        runs = []
        for run in range(args.runs):
            if args.runs > 1:
                print(f"--- run {run + 1} of {args.runs}")
            runs.append(one_run(args, uris, config, source, resolution, device, threads))
        summary = runs[-1]["summary"]
        if args.runs > 1:
            median = {key: float(np.median([r[key] for r in runs]))
                      for key in ("ratio", "pipeline_img_s", "bare_img_s", "startup_seconds", "steady_img_s")}
            ratios = ", ".join(f"{r['ratio']:.3f}" for r in runs)
            print(f"median of {args.runs} runs: a/b {median['ratio']:.3f} (ratios {ratios}); "
                  f"pipeline {median['pipeline_img_s']:.1f} img/s, bare {median['bare_img_s']:.1f} img/s, "
                  f"start-up {median['startup_seconds']:.1f} s, {median['steady_img_s']:.1f} img/s after it")
        routed_per_sample = summary.routed_bytes / max(1, summary.samples_in)
        driver_per_sample = summary.driver_bytes / max(1, summary.samples_in)
        print(f"bytes per sample through the driver: {driver_per_sample:.1f} ({summary.driver_bytes / max(1, summary.shards_done):.0f} "
              f"per shard); routed worker -> writer actor (what a driver-side writer would receive): {routed_per_sample:.0f}")
        measured = summary.bytes_written / max(1, summary.samples_written)
        print(f"measured cache bytes/sample this run ({args.preset}, zstd parquet incl. key/caption): {measured:.0f}")
        table = {name: cache_bytes_per_sample(name) for name in ("var-d16-f16", "hart-512", "hart-1024")}
        print("cache bytes/sample of the released presets (raw: int16 tokens + fp16 residual; + caption/key, "
              "+ T*D*2 if text features are stored):")
        for name, row in table.items():
            print(f"  {row['resolution']:>5}px {name:<12} tokens {row['tokens_bytes']:>7,} B + residual "
                  f"{row['residual_bytes']:>8,} B = {row['total_bytes']:>8,} B")
        if args.json:
            with open(args.json, "w") as handle:
                json.dump({"runs": [{k: v for k, v in r.items() if k != "summary"} for r in runs],
                           "measured_bytes_per_sample": measured, "driver_bytes_per_sample": driver_per_sample,
                           "routed_bytes_per_sample": routed_per_sample, "released_presets": table, "args": vars(args)},
                          handle, indent=2)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
