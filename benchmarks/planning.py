"""Benchmark: planning a precompute run over 100k shards, and the cache layout such a run leaves.

    python -m benchmarks.planning                 # 100,000 shards, S3 through moto_server on loopback
    python -m benchmarks.planning --shards 1000000

No data is needed: the shards are names only (planning never opens a shard). Measured, on the driver:
  - `shard_source.list_shards` + `name_shards` + the cluster path check for a brace range of N S3
    shards and for a list file of N lines on S3, with the requests the S3 server received (through
    the counting proxy of tests/faults: the goal is no request per shard);
  - the cache's bookkeeping once N shards are committed (`pipelines.manifest`), on local disk under
    a temp folder: the bytes of `manifest.json` (the header, written once), of the compacted index
    segment and of one refresh segment (`--refresh-shards` commits, what the driver appends every
    `INDEX_REFRESH_SECONDS`), and the time `read_manifest` takes over N commit markers with the
    compacted index, and with no index at all (a run killed before its first segment: every
    marker is read).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

from benchmarks.data_plane import loopback_s3
from hart.config import RELEASED_SCALE_LISTS
from pipelines import manifest as manifest_lib
from pipelines import storage
from pipelines.config import InputConfig
from pipelines.plan import INDEX_REFRESH_SECONDS
from pipelines.shard_source import list_shards, name_shards
from tests.faults.s3_fault_proxy import FaultProxy


def plan(config: InputConfig) -> tuple[int, float]:
    started = time.perf_counter()
    names = name_shards(list_shards(config))
    storage.check_reachable({f"input shard {n}": u for n, u in names.items()}, num_nodes=3, shared_filesystem=False)
    return len(names), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=100_000)
    parser.add_argument("--refresh-shards", type=int, default=100, help="shards in the measured refresh segment")
    args = parser.parse_args()
    n, width = args.shards, len(str(args.shards - 1))
    with loopback_s3("plan") as endpoint:
        with FaultProxy(endpoint) as proxy:
            brace = InputConfig(shards=(f"s3://plan/raw/shard-{{{0:0{width}d}..{n - 1:0{width}d}}}.tar",), endpoint_url=proxy.url)
            count, seconds = plan(brace)
            print(f"brace range of {count:,} S3 shards: planned in {seconds:.2f} s, {proxy.counts['requests']} S3 requests")
            fs, path = storage.resolve("s3://plan/list.txt", endpoint)
            storage.write_bytes_atomic(fs, path, "\n".join(f"s3://plan/raw/shard-{i:0{width}d}.tar" for i in range(n)).encode())
            before = proxy.counts["requests"]
            count, seconds = plan(InputConfig(list_file="s3://plan/list.txt", endpoint_url=proxy.url))
            print(f"list file of {count:,} S3 shards ({storage.read_bytes(fs, path).__len__() / 1e6:.1f} MB): planned in "
                  f"{seconds:.2f} s, {proxy.counts['requests'] - before} S3 requests")

    cache_layout(n, width, args.refresh_shards)


def cache_layout(n: int, width: int, refresh_shards: int) -> None:
    fingerprint = {"schema_version": manifest_lib.SCHEMA_VERSION, "tokenizer_hash": "0" * 64,
                   "tokenizer_config": {"patch_nums": list(RELEASED_SCALE_LISTS[1024]), "z_channels": 32},
                   "resolution": 1024, "preprocess": {}, "text": None}
    fingerprint_hex = manifest_lib.fingerprint_hash(fingerprint)
    names = [f"shard-{i:0{width}d}" for i in range(n)]
    committed = {name: {"shard": name, "file": manifest_lib.data_file(name), "samples_written": 9_800,
                        "source_uri": f"s3://bucket/raw/images/{name}.tar", "fingerprint_hash": fingerprint_hex}
                 for name in names}
    root = tempfile.mkdtemp(prefix="planning-cache-")
    try:
        header_bytes = manifest_lib.write_json(root, manifest_lib.MANIFEST_NAME, manifest_lib.manifest_header(fingerprint, {}, 0))
        started = time.perf_counter()
        os.makedirs(f"{root}/{manifest_lib.STATS_DIR}")
        # Markers of the size a writer commits (its counters included); plain writes, since the
        # temp-file-and-rename of `write_json` would only slow this set-up down.
        for name, record in committed.items():
            marker = {**record, "samples_in": 9_800, "rejected": {}, "notes": {}, "members_ignored": {},
                      "unsorted_members": 0, "truncated": False, "bytes_read": 0, "bytes_written": 0,
                      "read_seconds": 0.0, "seconds": 0.0, "committed_at": manifest_lib.now()}
            with open(f"{root}/{manifest_lib.stats_file(name)}", "w") as file:
                json.dump(marker, file, indent=2, sort_keys=True)
        print(f"({n:,} commit markers written to local disk in {time.perf_counter() - started:.1f} s)")
        _, refresh_bytes = manifest_lib.write_index_segment(
            root, fingerprint_hex, dict(list(committed.items())[:refresh_shards]))
        print(f"refresh segment of {refresh_shards:,} shards: {refresh_bytes / 1e3:.1f} kB "
              f"(appended at most every {INDEX_REFRESH_SECONDS:.0f} s while a run commits)")
        started = time.perf_counter()
        _, index_bytes = manifest_lib.compact_index(root, fingerprint_hex, committed)
        compact_seconds = time.perf_counter() - started
        print(f"manifest.json: {header_bytes:,} B (written once); compacted index of {n:,} shards: "
              f"{index_bytes / 1e6:.2f} MB, written in {compact_seconds:.2f} s (once, at the end of a run)")
        for label in ("with the compacted index", "with no index (every marker read)"):
            if label.startswith("with no"):
                shutil.rmtree(f"{root}/{manifest_lib.INDEX_DIR}")
            started = time.perf_counter()
            manifest = manifest_lib.read_manifest(root)
            seconds = time.perf_counter() - started
            assert manifest["num_committed_shards"] == n
            print(f"read_manifest over {n:,} committed markers {label}: {seconds:.2f} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)

if __name__ == "__main__":
    main()
