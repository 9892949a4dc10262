"""benchmarks/data_plane.py: the stand-in rows it feeds the real data plane (1024px sizes, a header row
leading each shard, chunking, fresh incompressible fp16 bits) and that they make exactly the cache's
rows (`pipelines.writer.rows_to_table` against `cache_schema`), the cache fingerprint with and
without text features, the loopback S3 server it (and benchmarks/planning.py) starts, and its
command-line errors. Writing and reading the cache runs on a local Ray cluster, so that part is left
to the benchmark itself."""

from __future__ import annotations

import json
import os
import sys

import boto3
import numpy as np
import pytest
import requests

from benchmarks import data_plane as bench
from pipelines import manifest as manifest_lib
from pipelines.writer import cache_schema, rows_to_table


def test_row_sizes_are_those_of_a_1024px_hart_row():
    assert bench.NUM_TOKENS == 9_451  # 1 + 4 + 9 + ... + 64^2 over the 14 released 1024px scales
    assert bench.RESIDUAL_SHAPE == (32, 64, 64)
    assert bench.TEXT_SHAPE == (300, 1536)


def test_random_fp16_is_fresh_bounded_and_seeded():
    rng = np.random.default_rng(0)
    first, second = bench.random_fp16(rng, (4, 1000)), bench.random_fp16(rng, (4, 1000))
    assert first.dtype == np.float16 and first.shape == (4, 1000)
    magnitude = np.abs(first.astype(np.float32))
    assert np.isfinite(first).all() and magnitude.min() >= 0.25 and magnitude.max() < 4  # exponents -2..1
    assert (first < 0).any() and (first > 0).any()
    assert not np.array_equal(first, second)  # fresh bits on every call
    assert np.array_equal(first, bench.random_fp16(np.random.default_rng(0), (4, 1000)))  # the seed decides them
    assert len(np.unique(first.view(np.uint16))) > 3000  # mantissas vary: nothing for a compressor to exploit


def shard_parts(rows_per_shard: int, chunk: int, with_text: bool = False, names=("shard-0",)) -> list[dict]:
    batch = {"name": np.array(names, dtype=object), "seed": np.array([7] * len(names))}
    return list(bench.standin_rows(batch, rows_per_shard=rows_per_shard, chunk=chunk, with_text=with_text))


def test_standin_rows_lead_with_the_shard_header_then_every_sample_once_in_chunks():
    parts = shard_parts(rows_per_shard=5, chunk=2, names=("a", "b"))
    assert len(parts) == 6  # per shard: header + 1 sample, then 2 + 2 samples
    for name, shard in (("a", parts[:3]), ("b", parts[3:])):
        assert [len(p["key"]) for p in shard] == [2, 2, 2]
        kinds = np.concatenate([p["row_kind"] for p in shard])
        assert list(kinds) == ["shard"] + ["sample"] * 5
        assert list(np.concatenate([p["sample_index"] for p in shard])) == [-1, 0, 1, 2, 3, 4]
        statuses = np.concatenate([p["status"] for p in shard])
        assert list(statuses) == ["shard"] + ["ok"] * 5
        assert set(np.concatenate([p["source_shard"] for p in shard])) == {name}
        assert set(np.concatenate([p["shard_num_samples"] for p in shard])) == {5}
        info = json.loads(shard[0]["shard_info"][0])
        assert info["error"] == "" and info["source_uri"] == f"standin://{name}"
        for part in shard:
            n = len(part["key"])
            assert part["tokens"].shape == (n, bench.NUM_TOKENS) and part["tokens"].dtype == np.int16
            assert part["residual"].shape == (n, *bench.RESIDUAL_SHAPE) and part["residual"].dtype == np.float16
            assert "text_features" not in part


def test_standin_samples_make_exactly_cache_rows():
    for with_text in (False, True):
        parts = shard_parts(rows_per_shard=3, chunk=4, with_text=with_text)
        columns = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        accepted = np.flatnonzero(columns["status"] == "ok")  # as the shard writer selects them
        schema = cache_schema(bench.NUM_TOKENS, bench.RESIDUAL_SHAPE, bench.TEXT_SHAPE if with_text else None)
        table = rows_to_table(columns, accepted, schema)  # asserts the schema itself
        assert table.num_rows == 3
        row_bytes = bench.NUM_TOKENS * 2 + 32 * 64 * 64 * 2 + (300 * 1536 * 2 if with_text else 0)
        payload = table.column("tokens").nbytes + table.column("residual").nbytes
        if with_text:
            assert columns["text_features"].shape == (4, *bench.TEXT_SHAPE) and columns["text_mask"].all()
            payload += table.column("text_features").nbytes
        assert payload == 3 * row_bytes


def test_fingerprint_records_the_text_features_and_changes_with_them():
    plain, text = bench.fingerprint(False), bench.fingerprint(True)
    assert plain["text"] is None and text["text"] == {"encoder": "stand-in", "max_length": 300, "dim": 1536}
    assert plain["resolution"] == 1024 and plain["tokenizer_config"]["z_channels"] == 32
    assert plain["tokenizer_config"]["patch_nums"][-1] == 64
    assert plain["schema_version"] == manifest_lib.SCHEMA_VERSION
    assert manifest_lib.fingerprint_hash(plain) != manifest_lib.fingerprint_hash(text)


def test_loopback_s3_serves_the_bucket_and_stops(monkeypatch):
    monkeypatch.setenv("AWS_REGION", "eu-west-1")  # a caller's own setting stays
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    with bench.loopback_s3("bench") as endpoint:
        assert os.environ["AWS_ACCESS_KEY_ID"] == "testing" and os.environ["AWS_REGION"] == "eu-west-1"
        assert endpoint.startswith("http://127.0.0.1:")
        client = boto3.client("s3", endpoint_url=endpoint)
        client.put_object(Bucket="bench", Key="a/b", Body=b"row")
        assert client.get_object(Bucket="bench", Key="a/b")["Body"].read() == b"row"
    with pytest.raises(requests.ConnectionError):
        requests.get(endpoint, timeout=5)
    assert "AWS_ACCESS_KEY_ID" not in os.environ and "AWS_SECRET_ACCESS_KEY" not in os.environ  # placeholders gone
    assert os.environ["AWS_REGION"] == "eu-west-1"


@pytest.mark.parametrize("flags", [["--rows", "many"], ["--no-such-flag"], ["--targets", "S3"], ["--targets", ""]])
def test_bad_command_lines_are_refused_before_any_work(monkeypatch, flags):
    monkeypatch.setattr(sys, "argv", ["data_plane", *flags])
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    assert exit_info.value.code == 2
