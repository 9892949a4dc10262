"""The cache layout of `pipelines.manifest`: header written once, committed-shard index, version-1 reader.

The index and marker tests write commit markers and segments with the module's own writers (what
the shard writers and the driver call) into a local folder or moto S3; the run tests use the real
precompute job (`run_precompute`) on small shapes shards, and the version-1 tests turn a real
cache made by the current code into the layout version 1 wrote.
"""

import json
import os
import shutil

import pytest

from pipelines import manifest as manifest_lib
from pipelines import plan, shapes, storage
from pipelines.cache import read_cache_table, read_manifest
from pipelines.config import load_precompute_config
from pipelines.plan import run_precompute
from tests.faults.s3_fault_proxy import FaultProxy
from tests.training_fixtures import tiny_config

FINGERPRINT = {"schema_version": manifest_lib.SCHEMA_VERSION, "tokenizer_hash": "0" * 64,
               "tokenizer_config": {"patch_nums": [1, 2, 4], "z_channels": 8}, "resolution": 32,
               "preprocess": {}, "text": None}
FP_HEX = manifest_lib.fingerprint_hash(FINGERPRINT)


def new_cache(root: str, endpoint: str = "") -> str:
    manifest_lib.write_json(root, manifest_lib.MANIFEST_NAME, manifest_lib.manifest_header(FINGERPRINT, {}, 0), endpoint)
    return root


def commit(root: str, shard: str, rows: int = 3, endpoint: str = "", fingerprint_hex: str = FP_HEX) -> dict:
    """A shard's commit marker, as `ShardWriter._commit` writes it (its parquet file is not needed here)."""
    stats = {"shard": shard, "source_uri": f"s3://raw/{shard}.tar", "fingerprint_hash": fingerprint_hex,
             "file": manifest_lib.data_file(shard), "samples_in": rows, "samples_written": rows, "rejected": {}}
    manifest_lib.write_json(root, manifest_lib.stats_file(shard), stats, endpoint)
    return stats


def shard_names(manifest: dict) -> list[str]:
    return [e["shard"] for e in manifest["committed_shards"]]


def test_index_and_markers_reconcile(tmp_path):
    root = new_cache(str(tmp_path / "cache"))
    records = {s: commit(root, s, rows=i + 1) for i, s in enumerate(["a", "b", "c", "d"])}
    manifest_lib.write_index_segment(root, FP_HEX, {s: records[s] for s in ("a", "b")})
    manifest = read_manifest(root)  # c and d committed after the last segment (a run killed before compaction)
    assert shard_names(manifest) == ["a", "b", "c", "d"]
    assert manifest["committed_shards"][2] == {"shard": "c", "file": "data/part-c.parquet", "num_rows": 3,
                                               "source_uri": "s3://raw/c.tar"}
    assert (manifest["num_committed_shards"], manifest["num_rows"]) == (4, 1 + 2 + 3 + 4)
    assert manifest["patch_nums"] == [1, 2, 4] and manifest["schema_version"] == 2

    os.remove(tmp_path / "cache" / manifest_lib.stats_file("a"))  # a deleted marker un-commits the shard
    assert shard_names(read_manifest(root)) == ["b", "c", "d"]
    commit(root, "e", fingerprint_hex="f" * 64)  # a marker of other settings is not this cache's
    assert shard_names(read_manifest(root)) == ["b", "c", "d"]


def test_duplicate_stale_and_foreign_segments_are_tolerated(tmp_path):
    root = new_cache(str(tmp_path / "cache"))
    records = {s: commit(root, s) for s in ["a", "b", "c"]}
    # A crash between compaction's write and its deletes: the old segments and the full one coexist.
    manifest_lib.write_index_segment(root, FP_HEX, {"a": records["a"], "b": records["b"]})
    manifest_lib.write_index_segment(root, FP_HEX, {"b": records["b"]})
    manifest_lib.write_index_segment(root, FP_HEX, records)
    # A stale entry (its marker was deleted since) and a segment written for another fingerprint.
    manifest_lib.write_index_segment(root, FP_HEX, {"gone": {**records["a"], "shard": "gone"}})
    manifest_lib.write_index_segment(root, "f" * 64, {"x": {**records["a"], "shard": "x"}})
    index = tmp_path / "cache" / manifest_lib.INDEX_DIR
    (index / ".tmp-0123-segment.parquet").write_bytes(b"half a local write")  # hidden: skipped
    (index / "not-parquet.parquet").write_bytes(b"not parquet")  # cannot come from an atomic write, still harmless
    known, segments = manifest_lib.read_index(root, FP_HEX)
    assert sorted(known) == ["a", "b", "c", "gone"] and len(segments) == 6
    manifest = read_manifest(root)
    assert shard_names(manifest) == ["a", "b", "c"] and manifest["num_rows"] == 9


def test_compaction_leaves_one_segment_of_the_committed_shards(tmp_path):
    root = new_cache(str(tmp_path / "cache"))
    records = {s: commit(root, s) for s in ["a", "b", "c"]}
    assert manifest_lib.write_index_segment(root, FP_HEX, {}) is None  # nothing new: no segment
    for shard in records:
        manifest_lib.write_index_segment(root, FP_HEX, {shard: records[shard]})
    committed = manifest_lib.list_committed(root, FP_HEX, known=manifest_lib.read_index(root, FP_HEX)[0])
    name, size = manifest_lib.compact_index(root, FP_HEX, committed)
    assert manifest_lib.list_index_segments(root) == [name] and size == os.path.getsize(tmp_path / "cache" / name)
    known, _ = manifest_lib.read_index(root, FP_HEX)
    assert sorted(known) == ["a", "b", "c"] and known["a"]["samples_written"] == 3


def test_index_saves_one_request_per_marker_on_s3(s3_bucket, s3_endpoint):
    """Reading a compacted cache costs the same requests at 5 or 40 shards; each marker committed
    after the last segment costs the same extra requests."""

    def requests_to_read(num_shards: int, num_indexed: int) -> int:
        root = f"{s3_bucket}/cache-{num_shards}-{num_indexed}"
        new_cache(root, s3_endpoint)
        records = {f"s{i:03d}": commit(root, f"s{i:03d}", endpoint=s3_endpoint) for i in range(num_shards)}
        manifest_lib.write_index_segment(root, FP_HEX, dict(list(records.items())[:num_indexed]), s3_endpoint)
        with FaultProxy(s3_endpoint) as proxy:
            assert read_manifest(root, proxy.url)["num_committed_shards"] == num_shards
            return proxy.counts["requests"]

    compacted = requests_to_read(5, 5)
    assert requests_to_read(40, 40) == compacted
    per_marker = requests_to_read(40, 39) - compacted
    assert per_marker >= 1 and requests_to_read(40, 30) == compacted + 10 * per_marker


def test_unreadable_headers_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not a token cache"):
        read_manifest(str(tmp_path / "nowhere"))
    root = new_cache(str(tmp_path / "cache"))
    header = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    for version in (3, 0, None, "2", True):
        manifest_lib.write_json(root, manifest_lib.MANIFEST_NAME, {**header, "schema_version": version})
        with pytest.raises(ValueError, match=r"schema_version .*; this code reads versions 1, 2"):
            read_manifest(root)
    manifest_lib.write_json(root, manifest_lib.MANIFEST_NAME, {**header, "schema_version": 1})
    with pytest.raises(ValueError, match="schema_version 1.* has no committed_shards list"):
        read_manifest(root)
    manifest_lib.write_json(root, manifest_lib.MANIFEST_NAME, {**header, "format": "something-else"})
    with pytest.raises(ValueError, match="is not a hart-token-cache manifest"):
        read_manifest(root)


# --------------------------------------------------------------------------------------
# The precompute job's writes
# --------------------------------------------------------------------------------------


def make_config(uris, output, **overrides):
    items = [f"input.shards={json.dumps(list(uris))}", f"output={output}", "progress=false",
             "compute.tokenizer_batch_size=16", "compute.decode_batch_size=16"]
    return load_precompute_config(None, items + [f"{k}={v}" for k, v in overrides.items()])


def test_header_written_once_and_index_compacted(ray_local, tmp_path, monkeypatch):
    uris = shapes.write_shapes_shards(str(tmp_path / "raw"), 12, 3, seed=4)
    cache = tmp_path / "cache"
    first = run_precompute(make_config(uris, cache, **{"input.max_shards": 1}))
    assert first.shards_done == 1 and sorted(os.listdir(cache)) == ["data", "index", "manifest.json", "stats"]
    header = (cache / "manifest.json").read_bytes()
    assert "committed_shards" not in json.loads(header)
    [segment] = manifest_lib.list_index_segments(str(cache))
    # A run killed before it wrote any segment: its marker is committed, the index does not know it.
    os.remove(cache / segment)
    assert shard_names(read_manifest(str(cache))) == ["shard-00000"]

    # The rerun appends a segment at every refresh (here: every batch), the first one holding the
    # shard its start-up listing found outside the index, and compacts at its end.
    written = []

    def recording(uri, fingerprint_hex, committed, endpoint_url=""):
        result = real_write(uri, fingerprint_hex, committed, endpoint_url)
        if result:
            written.append(sorted(committed))
        return result

    real_write = manifest_lib.write_index_segment
    monkeypatch.setattr(manifest_lib, "write_index_segment", recording)
    monkeypatch.setattr(plan, "INDEX_REFRESH_SECONDS", 0.0)
    second = run_precompute(make_config(uris, cache))
    assert (second.shards_skipped, second.shards_done) == (1, 2) and not second.shards_failed
    assert len(written) >= 2 and written[0][0] == "shard-00000"  # refresh segment(s), then the compacted one
    assert written[-1] == ["shard-00000", "shard-00001", "shard-00002"]
    assert (cache / "manifest.json").read_bytes() == header  # never rewritten
    [compacted] = manifest_lib.list_index_segments(str(cache))
    known, _ = manifest_lib.read_index(str(cache), json.loads(header)["fingerprint_hash"])
    assert sorted(known) == ["shard-00000", "shard-00001", "shard-00002"]
    manifest = read_manifest(str(cache))
    assert manifest["num_rows"] == 12 and len(read_cache_table(str(cache))) == 12

    # A rerun with nothing to do leaves header and compacted index as they are.
    written.clear()
    third = run_precompute(make_config(uris, cache))
    assert third.shards_skipped == 3 and not written
    assert manifest_lib.list_index_segments(str(cache)) == [compacted]
    assert (cache / "manifest.json").read_bytes() == header


# --------------------------------------------------------------------------------------
# Version 1 caches
# --------------------------------------------------------------------------------------


def as_version_1(cache: str, destination) -> str:
    """A copy of a current cache in the layout version 1 wrote: the same parquet files, a manifest
    holding the committed-shard list (and schema_version 1 in its fingerprint, whose hash the
    markers carry), no index."""
    manifest = read_manifest(cache)
    shutil.copytree(cache, destination, ignore=shutil.ignore_patterns(manifest_lib.INDEX_DIR))
    header = json.loads((destination / manifest_lib.MANIFEST_NAME).read_text())
    fingerprint = {**header["fingerprint"], "schema_version": 1}
    fingerprint_hex = manifest_lib.fingerprint_hash(fingerprint)
    header.pop("created_at")
    old = {**header, "schema_version": 1, "fingerprint": fingerprint, "fingerprint_hash": fingerprint_hex,
           "committed_shards": manifest["committed_shards"], "num_committed_shards": manifest["num_committed_shards"],
           "num_rows": manifest["num_rows"], "updated_at": "2026-01-01T00:00:00+00:00"}
    (destination / manifest_lib.MANIFEST_NAME).write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")
    for marker in (destination / manifest_lib.STATS_DIR).iterdir():
        stats = json.loads(marker.read_text())
        marker.write_text(json.dumps({**stats, "fingerprint_hash": fingerprint_hex}))
    return str(destination)


def test_version_1_cache_is_read_and_never_added_to(train_assets, tmp_path):
    from trainer.driver import preflight

    v1 = as_version_1(train_assets["cache"], tmp_path / "v1")
    manifest = read_manifest(v1)
    assert manifest["schema_version"] == 1 and manifest["num_committed_shards"] == 2 and manifest["num_rows"] == 48
    assert manifest["committed_shards"] == read_manifest(train_assets["cache"])["committed_shards"]
    assert len(read_cache_table(v1)) == 48
    # Training's check (`trainer.data.check_cache`, inside preflight) accepts it as it is.
    plan = preflight(tiny_config(train_assets, "ar", tmp_path, f"data.cache={v1}"))
    assert plan.manifest["num_rows"] == 48
    # The current writer refuses to add shards to it, before any Ray work.
    header_before = (tmp_path / "v1" / "manifest.json").read_bytes()
    config = load_precompute_config(None, [f"input.shards=['{train_assets['shards']}']", f"output={v1}",
                                           f"tokenizer.checkpoint={train_assets['tokenizer']}", "progress=false"])
    with pytest.raises(ValueError, match=r"format version 1 .* this code writes version 2 .* new output prefix"):
        run_precompute(config)
    assert (tmp_path / "v1" / "manifest.json").read_bytes() == header_before
    assert not (tmp_path / "v1" / manifest_lib.INDEX_DIR).exists()


def test_marker_listing_reads_v2_layout_without_a_compacted_index(train_assets, tmp_path):
    """The cache of a run killed after its commits and before compaction (segments gone too) reads
    whole from its markers."""
    killed = tmp_path / "killed"
    shutil.copytree(train_assets["cache"], killed, ignore=shutil.ignore_patterns(manifest_lib.INDEX_DIR))
    assert read_manifest(str(killed))["committed_shards"] == read_manifest(train_assets["cache"])["committed_shards"]
    assert len(read_cache_table(str(killed))) == 48
    assert storage.list_files(*storage.resolve(str(killed / manifest_lib.INDEX_DIR))) == []
