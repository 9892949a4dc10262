"""Benchmark: the cache's data plane at 1024px row sizes, with a stand-in for the encoder.

    python -m benchmarks.data_plane                        # local disk and loopback S3, 1024px rows
    python -m benchmarks.data_plane --rows 3000 --text     # + Qwen2-sized text features (300 x 1536 fp16)

What runs is the precompute plan's tail, the real code: `writer_pool.RouteStage` (the plan's
last stage, `plan.add_route_stage`), the shard-writer actors, storage, and the driver loop
(`plan.drain_to_writers`); then the training reader (`cache.read_cache_dataset` ->
`batch_to_tensors`). What is stood in for is everything before it: a Ray Data task emits rows of
exactly the size a 1024px HART cache row has (9,451 int16 tokens + a 32x64x64 fp16 residual,
optionally 300x1536 fp16 text features) of fresh random bits (`random_fp16`: cheap to make, and as
incompressible as a real residual's mantissas), so the CPU spent is the data plane's, not an
encoder's or a decoder's.

Reported per storage target (a local folder; S3 through `moto_server` in its own process on
loopback):
  - MB/s of cache written (parquet bytes / wall time) and rows/s;
  - bytes per row that reached the driver process, next to the bytes per row routed between workers;
  - peak private RSS (RSS less shared pages: the object store's mapped pages are not the process's
    own) of the driver and of each writer actor (`benchmarks.processes.MemorySampler`, every 0.2 s;
    also over time) and the object store's spilled bytes (Ray's memory summary): these must not grow
    with the row count, since no stage buffers more than a few shards;
  - the training reader's data-wait share: the fraction of wall time a simulated training loop
    (`--step-ms` of sleep per batch of `--batch-size` rows) spends waiting for its next batch.
Run twice with different `--rows` to see whether peak memory stays flat, and one `--targets` at a
time for clean driver figures (the reader runs in the driver process and leaves its memory there).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np

from benchmarks.processes import MemorySampler
from hart.config import RELEASED_SCALE_LISTS
from hart.scale_grid import ScaleGrid
from pipelines import manifest as manifest_lib
from pipelines.cache import batch_to_tensors, read_cache_dataset
from pipelines.config import ComputeConfig
from pipelines.plan import add_route_stage, drain_to_writers
from pipelines.precompute_summary import PrecomputeSummary
from pipelines.writer import cache_schema
from pipelines.writer_pool import WriterPool

NUM_TOKENS = ScaleGrid(RELEASED_SCALE_LISTS[1024]).num_tokens  # 9,451
RESIDUAL_SHAPE = ScaleGrid(RELEASED_SCALE_LISTS[1024]).residual_shape(32)  # z, h, w of a 1024px row
TEXT_SHAPE = (300, 1536)  # Qwen2-1.5B features of HART's 300-token prompts


def random_fp16(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """fp16 values with random sign and mantissa and an exponent in [-2, 2): fresh bits for every
    row (zstd finds no repeats to exploit, as in real latents), ~0.3 ms per 1024px residual."""
    bits = rng.integers(0, 2**16, size=shape, dtype=np.uint16)
    exponent = ((bits >> 10) & 0x3) + 13  # biased exponents 13..16
    return ((bits & 0x83FF) | (exponent << 10)).astype(np.uint16).view(np.float16)


def standin_rows(batch: dict, rows_per_shard: int, chunk: int, with_text: bool) -> "iter":
    """Ray Data UDF: for each shard name, its rows in chunks (header row first), at 1024px sizes."""
    rng = np.random.default_rng(int(batch["seed"][0]))
    for name in batch["name"]:
        for start in range(-1, rows_per_shard, chunk):  # -1: the header row leads the first chunk
            indices = np.arange(max(start, 0), min(start + chunk, rows_per_shard))
            n = len(indices) + (start < 0)
            kind = np.array((["shard"] if start < 0 else []) + ["sample"] * len(indices), dtype=object)
            info = json.dumps({"error": "", "source_uri": f"standin://{name}", "members_ignored": {}, "unsorted_members": 0,
                               "truncated": "", "bytes_read": 0, "read_seconds": 0.0})
            rows = {
                "row_kind": kind, "source_shard": np.array([name] * n, dtype=object),
                "sample_index": np.concatenate([[-1] if start < 0 else [], indices]).astype(np.int64),
                "shard_num_samples": np.full(n, rows_per_shard, np.int64),
                "key": np.array([f"{name}-{i}" for i in range(n)], dtype=object),
                "status": np.where(kind == "shard", "shard", "ok").astype(object),
                "shard_info": np.array([info if k == "shard" else "" for k in kind], dtype=object),
                "caption": np.array(["a stand-in caption of a few dozen characters"] * n, dtype=object),
                "metadata": np.array([""] * n, dtype=object), "notes": np.array([""] * n, dtype=object),
                "width": np.full(n, 1024, np.int32), "height": np.full(n, 1024, np.int32),
                "tokens": rng.integers(0, 4096, size=(n, NUM_TOKENS), dtype=np.int16),
                "residual": random_fp16(rng, (n, *RESIDUAL_SHAPE)),
            }
            if with_text:
                rows["text_features"] = random_fp16(rng, (n, *TEXT_SHAPE))
                rows["text_mask"] = np.ones((n, TEXT_SHAPE[0]), bool)
            yield rows


def fingerprint(with_text: bool) -> dict:
    return {"schema_version": manifest_lib.SCHEMA_VERSION, "tokenizer_hash": "stand-in",
            "tokenizer_config": {"patch_nums": list(RELEASED_SCALE_LISTS[1024]), "z_channels": RESIDUAL_SHAPE[0]},
            "resolution": 1024, "preprocess": {"stand_in": True},
            "text": {"encoder": "stand-in", "max_length": TEXT_SHAPE[0], "dim": TEXT_SHAPE[1]} if with_text else None}


def spilled_bytes() -> int:
    """Bytes the object store has spilled to disk so far (Ray's memory summary)."""
    from ray._private.internal_api import memory_summary

    match = re.search(r"Spilled ([\d.]+) MiB", memory_summary(stats_only=True))
    return int(float(match.group(1)) * 2**20) if match else 0


def write_cache(output: str, endpoint: str, args) -> dict:
    import ray

    shards = [f"shard-{i:05d}" for i in range(args.shards)]
    rows_per_shard = args.rows // args.shards
    fp = fingerprint(args.text)
    header = manifest_lib.manifest_header(fp, {"stand_in": True}, TEXT_SHAPE[1] if args.text else 0)
    schema = cache_schema(NUM_TOKENS, RESIDUAL_SHAPE, TEXT_SHAPE if args.text else None)
    sizing = ComputeConfig()  # the shipped writer sizing (CPUs, upload threads, writes in flight)
    pool = WriterPool(args.writers, sizing.writer_cpus, {}, output=output, endpoint_url=endpoint,
                      fingerprint_hash=manifest_lib.fingerprint_hash(fp), schema=schema,
                      shard_uris={s: f"standin://{s}" for s in shards}, num_threads=sizing.writer_threads,
                      max_pending=sizing.writer_max_pending)
    pids = {"driver": os.getpid(), **{f"writer{i}": ray.get(a.__ray_call__.remote(lambda self: os.getpid()))
                                      for i, a in enumerate(pool.actors)}}
    ds = ray.data.from_items([{"name": s, "seed": i} for i, s in enumerate(shards)], override_num_blocks=len(shards))
    ds = ds.map_batches(standin_rows, batch_size=1, num_cpus=0.5,
                        fn_kwargs={"rows_per_shard": rows_per_shard, "chunk": args.chunk, "with_text": args.text})
    ds = add_route_stage(ds, pool.actors, {}, schema, args.chunk + 1)  # + the header row
    summary = PrecomputeSummary(shards_total=len(shards))
    spilled_before = spilled_bytes()
    started = time.perf_counter()
    with MemorySampler(pids, every_s=0.2, private=True) as memory:
        try:
            done, failed, _ = drain_to_writers(ds, pool, summary, log=lambda *a: None)
        finally:
            pool.close()
    seconds = time.perf_counter() - started
    assert not failed and len(done) == len(shards), failed
    for stats in done.values():
        summary.add_stats(stats)
    manifest_lib.write_json(output, manifest_lib.MANIFEST_NAME, header, endpoint)
    manifest_lib.compact_index(output, manifest_lib.fingerprint_hash(fp), done, endpoint)
    rows = summary.samples_written
    return {"rows": rows, "seconds": seconds, "mb_per_s": summary.bytes_written / seconds / 1e6, "rows_per_s": rows / seconds,
            "bytes_per_row_written": summary.bytes_written / rows, "driver_bytes_per_row": summary.driver_bytes / rows,
            "routed_bytes_per_row": summary.routed_bytes / rows, "driver_bytes_per_shard": summary.driver_bytes / len(shards),
            "peak_rss_mb": {k: v / 2**20 for k, v in memory.peak().items()},
            "rss_mb_series": {name: [(round(t, 1), round(r / 2**20)) for t, r in series[:: max(1, len(series) // 12)]]
                              for name, series in ((name, memory.series(name)) for name in pids)},
            "spilled_mb": (spilled_bytes() - spilled_before) / 2**20}


def read_share(output: str, endpoint: str, args) -> dict:
    """A training loop's data-wait share: next-batch wait / wall time at `--step-ms` per batch."""
    columns = ["tokens", "residual", "caption", "key"] + (["text_features", "text_mask"] if args.text else [])
    manifest = manifest_lib.read_manifest(output, endpoint)
    ds = read_cache_dataset(output, columns=columns, shuffle_seed=0, endpoint_url=endpoint)
    waited, batches, started = 0.0, 0, time.perf_counter()
    iterator = iter(ds.iter_batches(batch_size=args.batch_size, batch_format="numpy", prefetch_batches=2))
    while True:
        before = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            break
        batch_to_tensors(batch, manifest)
        waited += time.perf_counter() - before
        batches += 1
        time.sleep(args.step_ms / 1000)
    wall = time.perf_counter() - started
    return {"batches": batches, "wait_share": waited / wall, "wall_seconds": wall}


@contextlib.contextmanager
def loopback_s3(bucket: str):
    """`moto_server` in its own process on a free loopback port (its memory stays out of the measured
    driver) with `bucket` created; yields the endpoint URL. Also used by benchmarks/planning.py.
    While it runs, S3 clients without credentials get moto's placeholder ones (set only where unset,
    and removed again on exit)."""
    from trainer.local_services import free_port

    placeholders = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}
    added = [name for name in placeholders if name not in os.environ]
    os.environ.update({name: placeholders[name] for name in added})
    endpoint = f"http://127.0.0.1:{free_port()}"
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
                               "-p", endpoint.rsplit(":", 1)[1]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import boto3

        deadline = time.time() + 30
        while True:
            try:
                boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
                break
            except Exception:  # noqa: BLE001 - the server is still starting
                if time.time() > deadline:
                    raise
                time.sleep(0.3)
        yield endpoint
    finally:
        server.terminate()
        server.wait()
        for name in added:
            os.environ.pop(name, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2000, help="cache rows in all")
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--chunk", type=int, default=32, help="rows per block out of the stand-in stage")
    parser.add_argument("--writers", type=int, default=1, help="shard-writer actors")
    parser.add_argument("--text", action="store_true", help="also store 300x1536 fp16 text features per row")
    parser.add_argument("--batch-size", type=int, default=16, help="training reader batch")
    parser.add_argument("--step-ms", type=float, default=100.0, help="simulated training step time per batch")
    parser.add_argument("--targets", default="local,s3", help="comma-separated: local, s3")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    args = parser.parse_args()
    wanted = [t for t in args.targets.split(",") if t]
    if not wanted or set(wanted) - {"local", "s3"}:
        parser.error(f"--targets: expected a comma list of local, s3; got {args.targets!r}")

    import ray

    workdir = tempfile.mkdtemp(prefix="bench-data-plane-")
    stack = contextlib.ExitStack()
    results: dict = {"args": vars(args), "row_bytes": {"tokens": NUM_TOKENS * 2, "residual": int(np.prod(RESIDUAL_SHAPE)) * 2,
                                                       "text": int(np.prod(TEXT_SHAPE)) * 2 if args.text else 0}}
    try:
        targets = {}
        if "local" in wanted:
            targets["local"] = (f"{workdir}/cache", "")
        if "s3" in wanted:
            endpoint = stack.enter_context(loopback_s3("bench"))
            targets["s3"] = ("s3://bench/cache", endpoint)
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        print(f"rows: {args.rows} in {args.shards} shards, {sum(results['row_bytes'].values()):,} B raw per row "
              f"(tokens {results['row_bytes']['tokens']:,} + residual {results['row_bytes']['residual']:,}"
              f"{' + text ' + format(results['row_bytes']['text'], ',') if args.text else ''}); {args.writers} writer actor(s); "
              f"{args.num_cpus} CPUs")
        for name, (output, endpoint) in targets.items():
            written = write_cache(output, endpoint, args)
            read = read_share(output, endpoint, args)
            results[name] = {"write": written, "read": read}
            peaks = ", ".join(f"{k} {v:.0f}" for k, v in written["peak_rss_mb"].items())
            print(f"[{name}] write: {written['rows']} rows in {written['seconds']:.1f}s = {written['mb_per_s']:.1f} MB/s "
                  f"({written['rows_per_s']:.0f} rows/s, {written['bytes_per_row_written']:,.0f} B/row on storage)")
            print(f"[{name}] driver received {written['driver_bytes_per_row']:.1f} B/row ({written['driver_bytes_per_shard']:.0f} B/shard); "
                  f"routed between workers {written['routed_bytes_per_row']:,.0f} B/row")
            print(f"[{name}] peak private RSS MB: {peaks}; object store spilled {written['spilled_mb']:.0f} MB")
            for process, series in written["rss_mb_series"].items():
                print(f"[{name}] {process} private RSS MB over time (s, MB): {series}")
            print(f"[{name}] reader: {read['batches']} batches of {args.batch_size} at {args.step_ms:.0f} ms/step: "
                  f"data-wait share {100 * read['wait_share']:.1f}%")
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(results, handle, indent=2)
    finally:
        ray.shutdown()
        stack.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
