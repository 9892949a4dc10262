"""Benchmark: planning a precompute run over 100k shards, and the manifest such a cache carries.

    python benchmarks/planning.py                 # 100,000 shards, S3 through moto_server on loopback
    python benchmarks/planning.py --shards 1000000

No data is needed: the shards are names only (planning never opens a shard). Measured, on the driver:
  - `shard_source.list_shards` + `name_shards` + the cluster path check for a brace range of N S3
    shards and for a list file of N lines on S3, with the requests the S3 server received (through
    the counting proxy of tests/faults: the goal is no request per shard);
  - the size of `manifest.json` once N shards are committed (`manifest.build_manifest` over N
    synthetic commit records) and the time to serialise it: the manifest lists every committed
    shard, so it grows with N and the driver rewrites it whole every `MANIFEST_REFRESH_SECONDS`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/ (the counting proxy)

from pipelines import manifest as manifest_lib  # noqa: E402
from pipelines import storage  # noqa: E402
from pipelines.config import InputConfig  # noqa: E402
from pipelines.plan import MANIFEST_REFRESH_SECONDS  # noqa: E402
from pipelines.shard_source import list_shards, name_shards  # noqa: E402
from tests.faults.s3_fault_proxy import FaultProxy  # noqa: E402

from data_plane import loopback_s3  # noqa: E402  (benchmarks/ is this script's folder)


def plan(config: InputConfig) -> tuple[int, float]:
    started = time.perf_counter()
    names = name_shards(list_shards(config))
    storage.check_reachable({f"input shard {n}": u for n, u in names.items()}, num_nodes=3, shared_filesystem=False)
    return len(names), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=100_000)
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

    fingerprint = {"schema_version": manifest_lib.SCHEMA_VERSION, "tokenizer_hash": "0" * 64,
                   "tokenizer_config": {"patch_nums": [1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64], "z_channels": 32},
                   "resolution": 1024, "preprocess": {}, "text": None}
    header = manifest_lib.manifest_header(fingerprint, {}, 0)
    committed = {f"shard-{i:0{width}d}": {"file": manifest_lib.data_file(f"shard-{i:0{width}d}"), "samples_written": 9_800,
                                         "source_uri": f"s3://bucket/raw/images/shard-{i:0{width}d}.tar"} for i in range(n)}
    started = time.perf_counter()
    payload = json.dumps(manifest_lib.build_manifest(header, committed), indent=2, sort_keys=True)
    seconds = time.perf_counter() - started
    print(f"manifest.json with {n:,} committed shards: {len(payload) / 1e6:.1f} MB, built and serialised in {seconds:.2f} s "
          f"(rewritten whole every {MANIFEST_REFRESH_SECONDS:.0f} s while a run commits, and at its end)")


if __name__ == "__main__":
    main()
