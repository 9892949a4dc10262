"""The composed pre-tokenization plan: shards -> read -> decode -> tokenize (-> text) -> commit.

Design: `run_precompute(config)` is the whole job minus cluster setup (Ray must already be
initialised by the caller: `trainer.ray_session.connect`). It
  1. checks inputs and stores before any write (`pipelines.preflight`), lists the input shards and
     refuses, on a cluster of several nodes, shards only one machine can see,
  2. builds the frozen tokenizer once on the driver to hash its weights and read its config,
  3. writes `manifest.json` once when the cache root is new, or validates it (refusing a cache
     built with other settings or another format version), removes the temporary files of local
     writes that a killed run left (`manifest.remove_interrupted_writes`: none of this run's writers
     has started yet), and skips the shards whose stats marker exists (resume:
     `manifest.list_committed` over the index and one listing of stats/),
  4. streams the rest through Ray Data:
       from_items(shards) -> read (TaskPool, raw bytes only) -> decode/filter/crop (TaskPool, CPU)
       -> TokenizerStage (ActorPoolStrategy, num_gpus per actor, explicit batch size)
       -> TextFeatureStage (optional actor pool) -> route (RouteStage actors) -> writer actors,
     where the writer actors (`pipelines.writer_pool`) assemble and commit whole shards, and the
     driver iterates only the route stage's per-shard counts and polls the actors for commit
     records: no cache byte passes through the driver; every `INDEX_REFRESH_SECONDS` it appends
     one small index segment with the shards committed since the previous one,
  5. lists the stats markers (the truth, also for commits whose record was lost with a writer),
     compacts the index into one segment and returns a `PrecomputeSummary`.
What the driver writes per refresh is O(shards committed since the last one), never the whole
shard list (`pipelines.manifest` explains the layout and why a crash between writes loses nothing).
Only `compute.*` sizes the stages, so the same config runs on a 2-core laptop (fractional CPUs
leave headroom for the read tasks and the driver, docs/design/ray.md, "Fractional CPUs") and on a GPU cluster.

Start-up (measured on 2 CPUs, BENCHMARKS.md "Pre-tokenization"): the driver-side steps 1-3 and
planning take well under a second (the weight hash of the tiny tokenizer is ~15 ms); the fixed
cost is Ray's: the executor start, each tokenizer actor's worker importing ray.data and torch, and
Ray Data's helper actors, all competing for the same cores. Only the tokenizer (and text) actors
import torch: the route and writer actors read the scale grid and the cache schema without
it (importing it cost each of those processes ~3 s of CPU during the start-up and ~110 MiB).
The summary (`pipelines.precompute_summary`) records the driver's view of the start-up
(`startup_phases`) and each stage's task seconds (`operator_seconds`, `pipelines.operator_stats`).
The driver iterates with `prefetch_batches=0`: with whole-shard blocks, Ray's prefetch held every
finished block back until `prefetch_batches` more existed, which delayed each commit by two shards
and made the start-up look ~2 shards longer than it was.
"""

from __future__ import annotations

import time
from typing import Any

import ray
from ray.data import ActorPoolStrategy, TaskPoolStrategy

from configuration.loader import config_to_dict
from pipelines import manifest as manifest_lib
from pipelines import shard_source, storage
from pipelines.config import PrecomputeConfig, preprocess_fingerprint
from pipelines.decode import decode_batch
from pipelines.operator_stats import operator_seconds
from pipelines.precompute_summary import PrecomputeSummary
from pipelines.preflight import preflight
from pipelines.progress import Progress, show_ray_data_progress
from pipelines.tokenize_stage import TokenizerStage, load_tokenizer, weights_hash
from pipelines.writer import cache_schema
from pipelines.writer_pool import (ROUTE_CPUS, RoutedShards, RouteStage, WriterPool, batch_nbytes, route_batch_rows,
                                   route_memory)

INDEX_REFRESH_SECONDS = 15.0  # at most this often the driver appends an index segment
POLL_SECONDS = 0.5  # at most this often the driver asks writers with whole shards for commit records


def build_dataset(shards: dict[str, str], config: PrecomputeConfig, resolution: int, tokenizer_hash: str,
                  writers: list, schema) -> ray.data.Dataset:
    """The lazy Ray Data plan over the pending shards (name -> uri), ending in the route stage."""
    items = [{"name": name, "uri": uri} for name, uri in shards.items()]
    ds = encoded_rows(items, config, resolution, tokenizer_hash)
    compute = config.compute  # the route stage's input blocks are made of the last encoder stage's batches
    encoder_rows = compute.text_batch_size if config.text.encoder else compute.tokenizer_batch_size
    return add_route_stage(ds, writers, compute.resources, schema, encoder_rows)


def encoded_rows(items: list[dict[str, Any]], config: PrecomputeConfig, resolution: int, tokenizer_hash: str,
                 read=shard_source.read_shards_batch, read_kwargs: dict[str, Any] | None = None) -> ray.data.Dataset:
    """read -> decode -> tokenize (-> text): one item per shard read (`read`, a `map_batches` UDF over
    items with `config.input` as `config`), sized by `config.compute`. Precompute routes the result to
    its writers; online training (`pipelines.online`) hands it to the Ray Train workers."""
    compute = config.compute
    pinned = {"resources": dict(compute.resources)} if compute.resources else {}
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.map_batches(
        read, fn_kwargs={"config": config.input, **(read_kwargs or {})}, batch_size=1, batch_format="pyarrow",
        compute=TaskPoolStrategy(size=compute.read_tasks), num_cpus=compute.read_cpus, **pinned,
    )
    ds = ds.map_batches(
        decode_batch, fn_kwargs={"config": config.preprocess, "resolution": resolution},
        batch_size=compute.decode_batch_size, batch_format="numpy",
        compute=TaskPoolStrategy(size=compute.decode_tasks), num_cpus=compute.decode_cpus, **pinned,
    )
    gpu_args = {"num_gpus": compute.tokenizer_gpus} if compute.tokenizer_gpus > 0 else {}
    ds = ds.map_batches(
        TokenizerStage,
        fn_constructor_kwargs={"source": config.tokenizer, "endpoint_url": config.input.endpoint_url,
                               "expected_hash": tokenizer_hash,
                               "torch_threads": compute.torch_threads or max(1, int(compute.tokenizer_cpus)),
                               "use_gpu": compute.tokenizer_gpus > 0},
        batch_size=compute.tokenizer_batch_size, batch_format="numpy",
        compute=ActorPoolStrategy(size=compute.tokenizer_actors), num_cpus=compute.tokenizer_cpus, **gpu_args, **pinned,
    )
    if config.text.encoder:
        from pipelines.text_stage import TextFeatureStage

        text_gpu_args = {"num_gpus": compute.text_gpus} if compute.text_gpus > 0 else {}
        ds = ds.map_batches(
            TextFeatureStage, fn_constructor_kwargs={"config": config.text, "use_gpu": compute.text_gpus > 0},
            batch_size=compute.text_batch_size, batch_format="numpy", compute=ActorPoolStrategy(size=compute.text_actors),
            num_cpus=compute.text_cpus, **text_gpu_args, **pinned,
        )
    return ds


def add_route_stage(ds: ray.data.Dataset, writers: list, resources: dict[str, float], schema,
                    encoder_rows: int) -> ray.data.Dataset:
    """The plan's last stage: encoded rows (cache `schema`, made in batches of `encoder_rows`) -> their
    shard's writer actor (`writer_pool.RouteStage`), in batches whose memory each actor asks for
    (`route_batch_rows`, `route_memory`); one actor per writer is enough (each waits on its writer)."""
    pinned = {"resources": dict(resources)} if resources else {}
    block_bytes = ds.context.target_max_block_size
    if block_bytes is None:
        raise ValueError("the route stage's memory request needs a bounded block size: set Ray Data's "
                         "DataContext.target_max_block_size (None means unbounded blocks)")
    rows = route_batch_rows(schema, encoder_rows)
    return ds.map_batches(RouteStage, fn_constructor_kwargs={"writers": writers}, batch_size=rows, batch_format="numpy",
                          compute=ActorPoolStrategy(size=len(writers)), num_cpus=ROUTE_CPUS,
                          memory=route_memory(schema, rows, block_bytes), **pinned)


def check_resources(config: PrecomputeConfig, writers: bool = True, others: tuple[float, float] = (0.0, 0.0),
                    others_name: str = "") -> None:
    """ValueError when the fixed actor pools leave no room for the read/decode tasks (a silent hang
    otherwise). `writers=False` for a plan without writer actors (online training); `others` = (CPUs,
    GPUs) that other consumers hold at the same time (online: the Ray Train workers)."""
    compute = config.compute
    with_text = bool(config.text.encoder)
    cpus = (compute.tokenizer_actors * compute.tokenizer_cpus + compute.read_cpus + compute.decode_cpus
            + (compute.writer_actors * (compute.writer_cpus + ROUTE_CPUS) if writers else ROUTE_CPUS)
            + (compute.text_actors * compute.text_cpus if with_text else 0.0) + others[0])
    gpus = (compute.tokenizer_actors * compute.tokenizer_gpus + (compute.text_actors * compute.text_gpus if with_text else 0.0)
            + others[1])
    available = ray.cluster_resources()
    if cpus > available.get("CPU", 0.0) + 1e-9 or gpus > available.get("GPU", 0.0) + 1e-9:
        last = "writers and one route actor per writer" if writers else "one row-conversion task"
        raise ValueError(
            f"the stages need {cpus:g} CPUs and {gpus:g} GPUs at once (actor pools, one read, one decode task, {last}"
            f"{', ' + others_name if others_name else ''}) "
            f"but the cluster has {available.get('CPU', 0):g} CPUs and {available.get('GPU', 0):g} GPUs; lower "
            f"compute.*_actors / *_cpus / *_gpus, or set compute.check_resources=false on an autoscaling cluster"
        )


def count_alive_nodes() -> int:
    """Nodes of the connected Ray cluster that are alive (1 on a local instance, or before Ray has
    started: Ray Data then starts a local one)."""
    if not ray.is_initialized():
        return 1
    return sum(1 for node in ray.nodes() if node["Alive"])


def prepare(config: PrecomputeConfig) -> dict[str, Any]:
    """Driver-side setup shared by the job and the benchmark: tokenizer hash, fingerprint, schema."""
    tokenizer = load_tokenizer(config.tokenizer, config.input.endpoint_url)
    tokenizer_hash = weights_hash(tokenizer)
    native = tokenizer.config.image_size()
    resolution = config.preprocess.resolution or native
    if resolution != native:
        raise ValueError(
            f"preprocess.resolution={resolution} does not match the tokenizer: its scales {tokenizer.config.patch_nums} "
            f"and downsampling factor {tokenizer.config.downsample_factor()} need {native}px images"
        )
    if tokenizer.config.vocab_size > 32768:
        raise ValueError(f"vocab_size {tokenizer.config.vocab_size} does not fit the int16 token column")
    text_dim = 0
    if config.text.encoder:
        from pipelines.text_stage import PAD_FEATURES, load_text_encoder

        text_dim = int(load_text_encoder(config.text).dim)
    fingerprint = {
        "schema_version": manifest_lib.SCHEMA_VERSION,
        "tokenizer_hash": tokenizer_hash,
        "tokenizer_config": config_to_dict(tokenizer.config),
        "resolution": resolution,
        "preprocess": preprocess_fingerprint(config.preprocess, resolution),
        "text": {"encoder": config.text.encoder, "max_length": config.text.max_length, "dim": text_dim,
                 "pad_features": PAD_FEATURES} if config.text.encoder else None,
    }
    if not config.tokenizer.residual:  # only then: the fingerprints of caches with a residual stay as they were
        fingerprint["residual"] = False
    grid = tokenizer.config.grid
    schema = cache_schema(grid.num_tokens,
                          grid.residual_shape(tokenizer.config.z_channels) if config.tokenizer.residual else None,
                          (config.text.max_length, text_dim) if config.text.encoder else None)
    header = manifest_lib.manifest_header(fingerprint, config_to_dict(config.tokenizer), text_dim)
    return {"tokenizer": tokenizer, "tokenizer_hash": tokenizer_hash, "resolution": resolution,
            "fingerprint": fingerprint, "schema": schema, "header": header}


def commit_line(stats: dict[str, Any], progress: Progress, num_done: int, rows_written: int) -> str:
    """One committed shard, and the run so far: shards done of this run's total, rows/s, ETA."""
    rejected = sum(stats["rejected"].values())
    return (f"committed {stats['shard']}: {stats['samples_written']}/{stats['samples_in']} written, {rejected} rejected "
            f"| shards {progress.line(num_done, {'rows': rows_written})}")


def drain_to_writers(dataset: ray.data.Dataset, pool: WriterPool, summary: PrecomputeSummary, log=print,
                     first_batch=lambda batch: None, refresh_index=lambda done: None, total: int = 0):
    """The driver's loop over a plan that ends in the route stage: count the routed rows, ask the
    writers owning whole shards for their commit records (a line per new commit, with the progress
    over `total` shards), call `refresh_index(done)` now and then, and finish the pool. Returns
    (committed stats by shard, failed shards, the pool's final answer)."""
    done: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    progress, rows_written = Progress(total, "shards"), 0

    def take(answer: dict[str, Any]) -> None:
        nonlocal rows_written
        for stats in answer["committed"]:
            if stats["shard"] in done:  # `finish` answers with every record, polled ones included
                continue
            done[stats["shard"]] = stats
            rows_written += stats["samples_written"]
            log(commit_line(stats, progress, len(done), rows_written))
        summary.writer_nodes.update(answer["writer_node"].values())
        failed.update(answer["failed"])

    routed = RoutedShards(len(pool.actors))
    last_refresh = last_poll = time.perf_counter()
    try:
        # prefetch_batches=0: take each block's counts as soon as it exists (see module doc).
        for batch in dataset.iter_batches(batch_format="numpy", batch_size=None, prefetch_batches=0):
            if not summary.startup_seconds:
                first_batch(batch)
            summary.driver_bytes += batch_nbytes(batch)
            summary.routed_bytes += int(batch["routed_bytes"].sum())
            routed.add(batch)
            if routed.ready and time.perf_counter() - last_poll > POLL_SECONDS:
                take(pool.poll(routed.take_writers()))
                last_poll = time.perf_counter()
            if time.perf_counter() - last_refresh > INDEX_REFRESH_SECONDS:
                refresh_index(done)
                last_refresh = time.perf_counter()
        final = pool.finish()
        take(final)
        summary.ray_stats = dataset.stats()
        summary.operator_seconds = operator_seconds(dataset)
    finally:
        summary.driver_bytes += pool.received_bytes
    return done, failed, final


def run_precompute(config: PrecomputeConfig, log=print) -> PrecomputeSummary:
    """Run (or resume) the job; Ray must be initialised. Returns the summary (failed shards inside)."""
    started = last_mark = time.perf_counter()
    phases: dict[str, float] = {}

    def mark(phase: str) -> None:
        nonlocal last_mark
        now = time.perf_counter()
        phases[phase] = now - last_mark
        last_mark = now

    num_nodes = count_alive_nodes()
    config = preflight(config, num_nodes)
    uris = shard_source.list_shards(config.input)
    names = shard_source.name_shards(uris)
    storage.check_reachable({f"input shard {name}": uri for name, uri in names.items()}, num_nodes,
                            config.shared_filesystem)
    mark("listing")
    setup = prepare(config)
    mark("setup")
    output, endpoint = config.output, config.output_endpoint()
    fingerprint_hex = manifest_lib.fingerprint_hash(setup["fingerprint"])
    existing = manifest_lib.read_json(output, manifest_lib.MANIFEST_NAME, endpoint)
    if existing is None:
        # Before any shard, and never again: the header is fixed for the cache's life.
        manifest_lib.write_json(output, manifest_lib.MANIFEST_NAME,
                                {**setup["header"], "created_at": manifest_lib.now()}, endpoint)
    else:
        manifest_lib.check_compatible(existing, setup["fingerprint"], output)
    # Before any writer of this run exists, so no temporary file here belongs to a write in flight.
    interrupted = manifest_lib.remove_interrupted_writes(output, endpoint)
    if interrupted:
        log(f"precompute: removed {len(interrupted)} temporary file(s) of writes a killed run left in {output}")
    indexed, segments = manifest_lib.read_index(output, fingerprint_hex, endpoint)
    committed = manifest_lib.list_committed(output, fingerprint_hex, endpoint, indexed)
    mark("manifest")

    summary = PrecomputeSummary(shards_total=len(names))
    pending = {name: uri for name, uri in names.items() if name not in committed}
    summary.shards_skipped = len(names) - len(pending)
    if config.input.max_shards:
        summary.shards_left = max(0, len(pending) - config.input.max_shards)
        pending = dict(list(pending.items())[: config.input.max_shards])
    log(f"precompute: {len(names)} shards, {summary.shards_skipped} already committed, {len(pending)} to do "
        f"-> {output} (tokenizer {setup['tokenizer_hash'][:12]}, {setup['resolution']}px)")
    del setup["tokenizer"]  # the actors build their own; free driver memory

    if pending:
        if config.compute.check_resources:
            check_resources(config)
        show_ray_data_progress(config.progress)
        compute = config.compute
        pool = WriterPool(compute.writer_actors, compute.writer_cpus, compute.resources, output=output,
                          endpoint_url=endpoint, fingerprint_hash=fingerprint_hex, schema=setup["schema"],
                          shard_uris=pending, num_threads=compute.writer_threads,
                          max_pending=compute.writer_max_pending, crash_after_commits=config.crash_after_commits,
                          pause_after_commits=config.pause_after_commits)
        dataset = build_dataset(pending, config, setup["resolution"], setup["tokenizer_hash"], pool.actors, setup["schema"])
        mark("planning")
        in_index = set(indexed)

        def first_batch(batch: dict) -> None:
            mark("first_batch")
            summary.startup_phases = dict(phases)
            summary.startup_seconds = time.perf_counter() - started
            summary.startup_samples = int(batch["rows"].sum())

        def refresh_index(done: dict) -> None:
            # Shards known since the last segment: this run's commits, and at the first call also
            # markers the start-up listing found outside the index (a previous run killed early).
            new = {shard: stats for shard, stats in {**committed, **done}.items() if shard not in in_index}
            manifest_lib.write_index_segment(output, fingerprint_hex, new, endpoint)
            in_index.update(new)

        try:
            done, failed, final = drain_to_writers(dataset, pool, summary, log, first_batch, refresh_index,
                                                   total=len(pending))
        finally:
            pool.close()
        for shard in final["incomplete"]:  # rows lost with a writer (or a stage that dropped rows): redo on rerun
            failed[shard] = "incomplete: not all rows of this shard reached its writer"
        # The stats markers are the truth: a commit whose record died with its writer is still a commit.
        # Markers of records already in hand are not downloaded again.
        listed = manifest_lib.list_committed(output, fingerprint_hex, endpoint, {**committed, **done})
        done.update({shard: listed[shard] for shard in pending if shard in listed and shard not in done})
        for stats in done.values():
            failed.pop(stats["shard"], None)
            summary.add_stats(stats)
        summary.shards_failed = failed
        committed = listed
    # The index becomes one segment of exactly the committed shards; a rerun whose index already is
    # that (nothing pending, nothing found outside it) writes nothing.
    if pending or len(segments) != 1 or indexed.keys() != committed.keys():
        manifest_lib.compact_index(output, fingerprint_hex, committed, endpoint)
    summary.seconds = time.perf_counter() - started
    return summary
