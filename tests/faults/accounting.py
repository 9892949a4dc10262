"""Exactly-once accounting shared by the fault trials: what went in vs what a reader sees committed.

Design: the *input* key set is read straight from the shards with the same tar parser the job
uses (`read_shard_rows`), the *committed* set only through what a cache reader trusts (the
stats markers and the parquet files they name). A trial passes when committed keys are unique
and equal input keys minus the rejected ones, and every shard's counters add up
(samples_in = written + rejected). `visible_junk` lists files a reader could mistake for data.

Training input: `check_ledger` compares a run's step ledger (`data.ledger`, trainer/batches.py)
with the order the cache prescribes, computed here from the cache files, and audits it (every pass
every key once).
"""

from __future__ import annotations

import json
from collections import Counter

import pyarrow.parquet as pq

from pipelines import manifest as manifest_lib
from pipelines import storage
from trainer.batches import audit_ledger, cache_order, global_batch, read_ledger
from pipelines.cache import read_cache_table, read_manifest
from pipelines.cache_stream import read_block
from pipelines.config import InputConfig
from pipelines.shard_source import read_shard_rows


def input_keys(uris: list[str], endpoint_url: str = "") -> dict[str, set[str]]:
    """shard name -> sample keys, read from the raw shards."""
    keys: dict[str, set[str]] = {}
    for uri in uris:
        name = uri.rsplit("/", 1)[-1].removesuffix(".tar")
        for table in read_shard_rows(name, uri, InputConfig(endpoint_url=endpoint_url)):
            rows = zip(table.column("key").to_pylist(), table.column("row_kind").to_pylist())
            keys.setdefault(name, set()).update(k for k, kind in rows if kind == "sample")
    return keys


def committed(cache: str, endpoint_url: str = "") -> dict:
    """Everything a reader trusts: stats markers, the keys in the parquet files they name, counters."""
    fs, base = storage.resolve(cache, endpoint_url)
    stats = {}
    for path in storage.list_files(fs, f"{base}/{manifest_lib.STATS_DIR}"):
        data = json.loads(storage.read_bytes(fs, path))
        stats[data["shard"]] = data
    keys: list[str] = []
    rejected: Counter = Counter()
    for shard, data in stats.items():
        table = pq.read_table(f"{base}/{data['file']}", filesystem=fs, columns=["key", "source_shard"])
        assert set(table.column("source_shard").to_pylist()) <= {shard}
        keys += table.column("key").to_pylist()
        assert len(table) == data["samples_written"], f"{shard}: parquet rows != stats samples_written"
        assert data["samples_in"] == data["samples_written"] + sum(data["rejected"].values()), f"{shard}: counters"
        rejected.update(data["rejected"])
    return {"stats": stats, "keys": keys, "rejected": rejected}


def assert_exactly_once(cache: str, uris: list[str], endpoint_url: str = "", input_endpoint: str = "") -> dict:
    """Committed keys == input keys (all shards committed, none rejected in these corpora), no duplicates."""
    expected = input_keys(uris, input_endpoint or endpoint_url)
    seen = committed(cache, endpoint_url)
    assert set(seen["stats"]) == set(expected), f"committed shards {sorted(seen['stats'])} != input {sorted(expected)}"
    keys = seen["keys"]
    duplicates = [k for k, n in Counter(keys).items() if n > 1]
    assert not duplicates, f"duplicated keys: {duplicates[:10]}"
    all_expected = set().union(*expected.values())
    assert sum(seen["rejected"].values()) == 0 and set(keys) == all_expected, (
        f"lost {len(all_expected - set(keys))}, extra {len(set(keys) - all_expected)}")
    manifest = manifest_lib.read_manifest(cache, endpoint_url)
    assert manifest["num_committed_shards"] == len(expected) and manifest["num_rows"] == len(keys)
    assert [e["shard"] for e in manifest["committed_shards"]] == sorted(seen["stats"])
    return seen


def visible_junk(cache: str, endpoint_url: str = "") -> list[str]:
    """Files in data/ and stats/ that are neither a committed shard's file/marker nor hidden.

    Hidden names (`.tmp-*`, left by a write killed before its rename) are skipped by every
    parquet dataset reader (pyarrow, Ray Data, duckdb globs): they are litter, not visible data.
    """
    fs, base = storage.resolve(cache, endpoint_url)
    seen = committed(cache, endpoint_url)
    allowed = {f"{base}/{s['file']}" for s in seen["stats"].values()}
    allowed |= {f"{base}/{manifest_lib.stats_file(shard)}" for shard in seen["stats"]}
    files = storage.list_files(fs, f"{base}/{manifest_lib.DATA_DIR}") + storage.list_files(fs, f"{base}/{manifest_lib.STATS_DIR}")
    return [path for path in files if path not in allowed and not path.rsplit('/', 1)[-1].startswith('.')]


def predicted_ledger(config, steps: int) -> list[list[str]]:
    """Per step, the keys of its global batch in the order the run's stream prescribes."""
    endpoint = config.run.endpoint_url
    order = cache_order(config, read_manifest(config.data.cache, endpoint))
    blocks = {i: read_block(b, ["key"], endpoint).column("key").to_pylist() for i, b in enumerate(order.blocks)}
    size = global_batch(config)
    return [[blocks[b][r] for b, r in order.rows(s * size, (s + 1) * size)] for s in range(steps)]


def check_ledger(config, checkpoint: str, steps: int) -> tuple[list[list[str]], list[str]]:
    """(the ledger's keys per step, problems): empty problems when the ledger is the prescribed order
    and every pass holds every key of the cache once."""
    entries = read_ledger(checkpoint)
    keys = read_cache_table(config.data.cache, ["key"], config.run.endpoint_url).column("key").to_pylist()
    problems = audit_ledger(entries, keys)["problems"]
    ledger = [e["keys"] for e in entries]
    if ledger != predicted_ledger(config, steps):
        first = next((i for i, (a, b) in enumerate(zip(ledger, predicted_ledger(config, steps))) if a != b), len(ledger))
        problems.append(f"the global batches differ from the prescribed order from step {first + 1} on")
    return ledger, problems
