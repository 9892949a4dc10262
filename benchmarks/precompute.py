"""Benchmark: the Ray Data pre-tokenization pipeline vs a bare single-process loop, same shards.

    python -m benchmarks.precompute                      # 2-core CPU, tiny tokenizer, 64px shapes
    python -m benchmarks.precompute --preset var-d16-f16 --image-size 256 --device cuda --num-samples 4096

Measures in one run, on the same shards and the same tokenizer weights:
  (a) `pipelines.plan.run_precompute` end to end (planning, actor start-up, read, decode, encode,
      parquet commit), Ray already initialised, with the shipped job config
      `jobs/configs/precompute.yaml` (its `compute` section is what a user gets; on `--device cuda`
      the GPU sizing from that file's header), only input/output/tokenizer/batch size set here,
      plus any `--set` overrides, and
  (b) a bare loop in this process: read tar -> decode/crop (`prepare_image`) -> `encode_images`
      in batches (no writing), with `--threads` torch intra-op threads (default: all CPUs),
and prints images/s of both and the ratio a/b (goal: >= 0.85 on a 2-core CPU with the tiny
tokenizer, >= 0.9 on a GPU at 256px with the released preset). The bare loop runs before and
after the pipeline and the better of the two is used, so background load penalises the pipeline,
not the baseline; the same `--batch-size` goes to both. The 1-minute load average is printed next
to each number because a shared machine makes them noisy, and the pipeline's start-up is split
into its driver-side phases (`PrecomputeSummary.startup_phases`). It also prints the cache bytes per sample of the released presets at
256/512/1024px, computed from the cache schema (int16 tokens + fp16 residual), and the measured
parquet bytes per sample of this run, and the bytes per sample that reached the driver process
(route counts + commit records) next to the encoded bytes routed between workers.
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
import torch

from hart.config import TOKENIZER_PRESETS
from pipelines import shapes
from pipelines.config import InputConfig, PreprocessConfig, TokenizerSource, load_precompute_config
from pipelines.decode import Rejected, prepare_caption, prepare_image
from pipelines.shard_source import read_shard_rows
from pipelines.tokenize_stage import encode_images, load_tokenizer


def bare_loop(uris: list[str], source: TokenizerSource, resolution: int, batch_size: int, device: torch.device) -> tuple[int, float]:
    """Decode + encode every sample in this process; returns (images, seconds)."""
    model = load_tokenizer(source).to(device)
    config = PreprocessConfig()
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
                    encode_images(model, np.stack(pending), device)
                    num_images, pending = num_images + len(pending), []
    if pending:
        encode_images(model, np.stack(pending), device)
        num_images += len(pending)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return num_images, time.perf_counter() - started


def cache_bytes_per_sample(preset: str) -> dict[str, int]:
    config = TOKENIZER_PRESETS[preset]
    side = config.patch_nums[-1]
    tokens = 2 * config.num_tokens()
    residual = 2 * config.z_channels * side * side
    return {"resolution": config.image_size(), "tokens_bytes": tokens, "residual_bytes": residual, "total_bytes": tokens + residual}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # 16,000 images: a workload long enough that Ray's ~13 s start-up is not most of it (BENCHMARKS.md).
    parser.add_argument("--num-samples", type=int, default=16000)
    parser.add_argument("--num-shards", type=int, default=32)
    parser.add_argument("--preset", default="tiny", help="tokenizer preset (random weights, seed 0)")
    parser.add_argument("--image-size", type=int, default=64, help="side of the generated images")
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

    import ray

    from pipelines.plan import run_precompute

    workdir = tempfile.mkdtemp(prefix="bench-precompute-")
    try:
        uris = shapes.write_shapes_shards(f"{workdir}/raw", args.num_samples, args.num_shards, image_size=args.image_size)
        source = TokenizerSource(preset=args.preset, seed=0)
        resolution = TOKENIZER_PRESETS[args.preset].image_size()
        device = torch.device(args.device)
        cpus = os.cpu_count() or 1
        threads = args.threads or cpus
        gpu = args.device == "cuda"
        overrides = [
            f"input.shards={json.dumps(uris)}", "input.list_file=''", f"output={workdir}/cache", "progress=false",
            "tokenizer.checkpoint=''", f"tokenizer.preset={args.preset}", "tokenizer.seed=0", "text.encoder=''",
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
        torch.set_num_threads(threads)
        bare_first = bare_loop(uris, source, resolution, args.batch_size, device)
        print(f"(b) bare loop, run 1: {bare_first[0]} images in {bare_first[1]:.2f}s = {bare_first[0] / bare_first[1]:.1f} img/s"
              f"  [{threads} threads; load average {os.getloadavg()[0]:.1f}]")

        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False)
        started = time.perf_counter()
        summary = run_precompute(config, log=lambda *_: None)
        pipeline_seconds = time.perf_counter() - started
        ray.shutdown()
        assert summary.samples_written == bare_first[0] and not summary.shards_failed, summary.table()
        pipeline_rate = summary.samples_written / pipeline_seconds
        print(f"(a) Ray Data pipeline: {summary.samples_written} images in {pipeline_seconds:.2f}s = {pipeline_rate:.1f} img/s "
              f"(start-up {summary.startup_seconds:.1f}s; {summary.steady_images_per_second:.1f} img/s after it)"
              f"  [load average {os.getloadavg()[0]:.1f}]")
        print("    start-up phases (s): " + ", ".join(f"{phase} {seconds:.2f}" for phase, seconds in summary.startup_phases.items())
              + f"  [first batch: {summary.startup_samples} samples]")
        if args.ray_stats:
            print(summary.ray_stats)

        torch.set_num_threads(threads)
        bare_second = bare_loop(uris, source, resolution, args.batch_size, device)
        print(f"(b) bare loop, run 2: {bare_second[0]} images in {bare_second[1]:.2f}s = {bare_second[0] / bare_second[1]:.1f} img/s"
              f"  [load average {os.getloadavg()[0]:.1f}]")
        bare_rate = max(bare_first[0] / bare_first[1], bare_second[0] / bare_second[1])
        ratio = pipeline_rate / bare_rate
        print(f"ratio a/b = {ratio:.3f}  (pipeline {pipeline_rate:.1f} img/s / best bare {bare_rate:.1f} img/s)")
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
                json.dump({"pipeline_img_s": pipeline_rate, "bare_img_s": bare_rate, "ratio": ratio,
                           "startup_seconds": summary.startup_seconds, "startup_phases": summary.startup_phases,
                           "bare_runs_img_s": [bare_first[0] / bare_first[1], bare_second[0] / bare_second[1]],
                           "measured_bytes_per_sample": measured, "driver_bytes_per_sample": driver_per_sample,
                           "routed_bytes_per_sample": routed_per_sample, "released_presets": table, "args": vars(args)}, handle, indent=2)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
