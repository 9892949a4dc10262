"""The composed pre-tokenization plan: shards -> read -> decode -> tokenize (-> text) -> commit.

Design: `run_precompute(config)` is the whole job minus cluster setup (Ray must already be
initialised; only `jobs/` calls `ray.init`). It
  1. builds the frozen tokenizer once on the driver to hash its weights and read its config,
  2. writes/validates `manifest.json` (refusing a cache built with other settings),
  3. lists input shards and skips the ones whose stats marker exists (resume),
  4. streams the rest through Ray Data:
       from_items(shards) -> read (TaskPool, raw bytes only) -> decode/filter/crop (TaskPool, CPU)
       -> TokenizerStage (ActorPoolStrategy, num_gpus per actor, explicit batch size)
       -> TextFeatureStage (optional actor pool) -> driver iter_batches -> ShardWriter,
  5. rewrites the manifest and returns a `PrecomputeSummary`.
Only `compute.*` sizes the stages, so the same config runs on a 2-core laptop (fractional CPUs
leave headroom for the read tasks and the driver, RAY_NOTES §4) and on a GPU cluster.

Start-up (measured on 2 CPUs, BENCHMARKS.md "Pre-tokenization"): the driver-side steps 1-3 and
planning take well under a second (the weight hash of the tiny tokenizer is ~15 ms); the fixed
cost is Ray's: the executor start, each tokenizer actor's worker importing ray.data and torch, and
Ray Data's helper actors, all competing for the same cores. `PrecomputeSummary.startup_phases`
records the driver's view of it. The driver iterates with `prefetch_batches=0`: with whole-shard
blocks, Ray's prefetch held every finished block back until `prefetch_batches` more existed, which
delayed each commit by two shards and made the start-up look ~2 shards longer than it was.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy

from hart.config import config_to_dict
from pipelines import manifest as manifest_lib
from pipelines import shard_source
from pipelines.config import PrecomputeConfig, preprocess_fingerprint
from pipelines.decode import decode_batch
from pipelines.tokenize_stage import TokenizerStage, load_tokenizer, weights_hash
from pipelines.writer import ShardAssembler, ShardWriter, cache_schema

MANIFEST_REFRESH_SECONDS = 15.0


@dataclass
class PrecomputeSummary:
    shards_total: int = 0
    shards_skipped: int = 0  # already committed before this run
    shards_done: int = 0
    shards_failed: dict[str, str] = field(default_factory=dict)
    shards_left: int = 0  # pending shards not attempted (input.max_shards)
    samples_in: int = 0
    samples_written: int = 0
    rejected: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    members_ignored: Counter = field(default_factory=Counter)
    unsorted_members: int = 0
    truncated_shards: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    startup_seconds: float = 0.0  # from the start of the run to the first batch reaching the writer
    startup_samples: int = 0  # sample rows in that first batch (already encoded during start-up)
    # Driver-side split of the start-up, in order: setup (tokenizer load + weight hash), manifest
    # (read/check/list committed/write), listing (input shards), planning (resource check + lazy
    # plan), first_batch (Ray executor and actor start, read/decode/encode of the first block).
    startup_phases: dict[str, float] = field(default_factory=dict)
    ray_stats: str = ""  # Ray Data's per-operator timing report of this run

    @property
    def images_per_second(self) -> float:
        return self.samples_in / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_images_per_second(self) -> float:
        steady = self.seconds - self.startup_seconds
        return (self.samples_in - self.startup_samples) / steady if steady > 0 else 0.0

    def table(self) -> str:
        rows = [
            ("shards total", self.shards_total), ("shards done", self.shards_done),
            ("shards skipped (committed before)", self.shards_skipped),
            ("shards failed", len(self.shards_failed)), ("shards left (max_shards)", self.shards_left),
            ("samples in", self.samples_in), ("samples written", self.samples_written),
            ("samples rejected", sum(self.rejected.values())),
        ]
        rows += [(f"  rejected: {reason}", n) for reason, n in sorted(self.rejected.items())]
        rows += [(f"  note: {note}", n) for note, n in sorted(self.notes.items())]
        rows += [(f"  member ignored: {reason}", n) for reason, n in sorted(self.members_ignored.items())]
        rows += [("unsorted members", self.unsorted_members), ("truncated shards", self.truncated_shards),
                 ("bytes read", self.bytes_read), ("bytes written", self.bytes_written),
                 ("seconds", f"{self.seconds:.1f}"), ("  of which start-up", f"{self.startup_seconds:.1f}"),
                 *[(f"    {phase}", f"{seconds:.2f}") for phase, seconds in self.startup_phases.items()],
                 ("images/s", f"{self.images_per_second:.1f}"), ("images/s after start-up", f"{self.steady_images_per_second:.1f}")]
        width = max(len(name) for name, _ in rows)
        lines = [f"{name:<{width}}  {value}" for name, value in rows]
        lines += [f"FAILED shard {name}: {error}" for name, error in sorted(self.shards_failed.items())]
        return "\n".join(lines)

    def add_stats(self, stats: dict[str, Any]) -> None:
        self.shards_done += 1
        self.samples_in += stats["samples_in"]
        self.samples_written += stats["samples_written"]
        self.rejected.update(stats["rejected"])
        self.notes.update(stats["notes"])
        self.members_ignored.update(stats["members_ignored"])
        self.unsorted_members += stats["unsorted_members"]
        self.truncated_shards += bool(stats["truncated"])
        self.bytes_read += stats["bytes_read"]
        self.bytes_written += stats["bytes_written"]


def build_dataset(shards: dict[str, str], config: PrecomputeConfig, resolution: int, tokenizer_hash: str) -> ray.data.Dataset:
    """The lazy Ray Data plan over the pending shards (name -> uri)."""
    compute = config.compute
    items = [{"name": name, "uri": uri} for name, uri in shards.items()]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.map_batches(
        shard_source.read_shards_batch, fn_kwargs={"config": config.input}, batch_size=1, batch_format="pyarrow",
        compute=TaskPoolStrategy(size=compute.read_tasks), num_cpus=compute.read_cpus,
    )
    ds = ds.map_batches(
        decode_batch, fn_kwargs={"config": config.preprocess, "resolution": resolution},
        batch_size=compute.decode_batch_size, batch_format="numpy",
        compute=TaskPoolStrategy(size=compute.decode_tasks), num_cpus=compute.decode_cpus,
    )
    gpu_args = {"num_gpus": compute.tokenizer_gpus} if compute.tokenizer_gpus > 0 else {}
    ds = ds.map_batches(
        TokenizerStage,
        fn_constructor_kwargs={"source": config.tokenizer, "endpoint_url": config.input.endpoint_url,
                               "expected_hash": tokenizer_hash,
                               "torch_threads": compute.torch_threads or max(1, int(compute.tokenizer_cpus)),
                               "use_gpu": compute.tokenizer_gpus > 0},
        batch_size=compute.tokenizer_batch_size, batch_format="numpy",
        compute=ActorPoolStrategy(size=compute.tokenizer_actors), num_cpus=compute.tokenizer_cpus, **gpu_args,
    )
    if config.text.encoder:
        from pipelines.text_stage import TextFeatureStage

        text_gpu_args = {"num_gpus": compute.text_gpus} if compute.text_gpus > 0 else {}
        ds = ds.map_batches(
            TextFeatureStage, fn_constructor_kwargs={"config": config.text, "use_gpu": compute.text_gpus > 0},
            batch_size=compute.text_batch_size, batch_format="numpy", compute=ActorPoolStrategy(size=compute.text_actors),
            num_cpus=compute.text_cpus, **text_gpu_args,
        )
    return ds


def check_resources(config: PrecomputeConfig) -> None:
    """ValueError when the fixed actor pools leave no room for the read/decode tasks (a silent hang otherwise)."""
    compute = config.compute
    with_text = bool(config.text.encoder)
    cpus = (compute.tokenizer_actors * compute.tokenizer_cpus + compute.read_cpus + compute.decode_cpus
            + (compute.text_actors * compute.text_cpus if with_text else 0.0))
    gpus = compute.tokenizer_actors * compute.tokenizer_gpus + (compute.text_actors * compute.text_gpus if with_text else 0.0)
    available = ray.cluster_resources()
    if cpus > available.get("CPU", 0.0) + 1e-9 or gpus > available.get("GPU", 0.0) + 1e-9:
        raise ValueError(
            f"the stages need {cpus:g} CPUs and {gpus:g} GPUs at once (actor pools + one read and one decode task) "
            f"but the cluster has {available.get('CPU', 0):g} CPUs and {available.get('GPU', 0):g} GPUs; lower "
            f"compute.*_actors / *_cpus / *_gpus, or set compute.check_resources=false on an autoscaling cluster"
        )


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
    side = tokenizer.config.patch_nums[-1]
    schema = cache_schema(tokenizer.config.num_tokens(), (tokenizer.config.z_channels, side, side),
                          (config.text.max_length, text_dim) if config.text.encoder else None)
    header = manifest_lib.manifest_header(fingerprint, config_to_dict(config.tokenizer), text_dim)
    return {"tokenizer": tokenizer, "tokenizer_hash": tokenizer_hash, "resolution": resolution,
            "fingerprint": fingerprint, "schema": schema, "header": header}


def _log_commits(writer: ShardWriter, shards: list[str], log) -> None:
    for shard in shards:
        stats = writer.committed[shard]
        rejected = sum(stats["rejected"].values())
        log(f"committed {shard}: {stats['samples_written']}/{stats['samples_in']} written, {rejected} rejected "
            f"({len(writer.committed)} shards this run)")


def run_precompute(config: PrecomputeConfig, log=print) -> PrecomputeSummary:
    """Run (or resume) the job; Ray must be initialised. Returns the summary (failed shards inside)."""
    started = last_mark = time.perf_counter()
    phases: dict[str, float] = {}

    def mark(phase: str) -> None:
        nonlocal last_mark
        now = time.perf_counter()
        phases[phase] = now - last_mark
        last_mark = now

    setup = prepare(config)
    mark("setup")
    output, endpoint = config.output, config.output_endpoint()
    fingerprint_hex = manifest_lib.fingerprint_hash(setup["fingerprint"])
    existing = manifest_lib.read_json(output, manifest_lib.MANIFEST_NAME, endpoint)
    if existing is not None:
        manifest_lib.check_compatible(existing, setup["fingerprint"], output)
    committed = manifest_lib.list_committed(output, fingerprint_hex, endpoint, existing)
    manifest_lib.write_json(output, manifest_lib.MANIFEST_NAME, manifest_lib.build_manifest(setup["header"], committed), endpoint)
    mark("manifest")

    uris = shard_source.list_shards(config.input)
    names = shard_source.name_shards(uris)
    mark("listing")
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
        DataContext.get_current().enable_progress_bars = config.progress
        dataset = build_dataset(pending, config, setup["resolution"], setup["tokenizer_hash"])
        mark("planning")
        writer = ShardWriter(output, endpoint, fingerprint_hex, setup["schema"], pending,
                             config.compute.writer_threads, config.crash_after_commits)
        assembler = ShardAssembler()
        last_manifest = time.perf_counter()
        try:
            # prefetch_batches=0: hand each block to the writer as soon as it exists (see module doc).
            for batch in dataset.iter_batches(batch_format="numpy", batch_size=None, prefetch_batches=0):
                if not summary.startup_seconds:
                    mark("first_batch")
                    summary.startup_phases = dict(phases)
                    summary.startup_seconds = time.perf_counter() - started
                    summary.startup_samples = int((batch["row_kind"] == "sample").sum())
                for shard in assembler.add(batch):
                    writer.submit(shard, *assembler.take(shard))
                _log_commits(writer, writer.collect(), log)
                if time.perf_counter() - last_manifest > MANIFEST_REFRESH_SECONDS:
                    manifest_lib.write_json(output, manifest_lib.MANIFEST_NAME, manifest_lib.build_manifest(
                        setup["header"], {**committed, **writer.committed}), endpoint)
                    last_manifest = time.perf_counter()
            _log_commits(writer, writer.collect(wait=True), log)
            summary.ray_stats = dataset.stats()
        finally:
            writer.close()
        for shard in assembler.pending():  # cannot happen unless a stage drops rows: fail loudly
            writer.failed[shard] = "incomplete: the stream ended before all rows of this shard arrived"
        for stats in writer.committed.values():
            summary.add_stats(stats)
        summary.shards_failed = dict(writer.failed)
        committed.update(writer.committed)
    manifest_lib.write_json(output, manifest_lib.MANIFEST_NAME, manifest_lib.build_manifest(setup["header"], committed), endpoint)
    summary.seconds = time.perf_counter() - started
    return summary
