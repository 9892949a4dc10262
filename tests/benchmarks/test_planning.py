"""benchmarks/planning.py at small sizes: planning a brace range and a list file of S3 shards (through
moto_server on loopback, as the benchmark does) finds every shard with a number of S3 requests that
does not grow with the shard count; the cache bookkeeping part leaves a header whose size does not
depend on the shard count and cleans up after itself; and one whole run of the script at 60 shards
prints every figure for that count."""

from __future__ import annotations

import re
import sys
import tempfile

import pytest

from benchmarks import planning as bench
from benchmarks.data_plane import loopback_s3
from pipelines import storage
from pipelines.config import InputConfig
from tests.faults.s3_fault_proxy import FaultProxy


@pytest.fixture
def s3_credentials(monkeypatch):
    # credentials of the test's S3 clients (undone after the test)
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)


def test_planning_requests_do_not_grow_with_the_shard_count(s3_credentials):
    brace_requests, list_requests = {}, {}
    with loopback_s3("plan") as endpoint, FaultProxy(endpoint) as proxy:
        fs, _ = storage.resolve("s3://plan/x", endpoint)
        for n in (40, 400):
            width = len(str(n - 1))
            before = proxy.counts["requests"]
            count, _ = bench.plan(InputConfig(shards=(f"s3://plan/raw-{n}/shard-{{{0:0{width}d}..{n - 1}}}.tar",),
                                              endpoint_url=proxy.url))
            assert count == n
            brace_requests[n] = proxy.counts["requests"] - before
            listing = f"plan/list-{n}.txt"
            storage.write_bytes_atomic(fs, listing, "\n".join(f"s3://plan/raw/shard-{i:0{width}d}.tar" for i in range(n)).encode())
            before = proxy.counts["requests"]
            count, _ = bench.plan(InputConfig(list_file=f"s3://{listing}", endpoint_url=proxy.url))
            assert count == n
            list_requests[n] = proxy.counts["requests"] - before
    assert brace_requests[400] == brace_requests[40]
    assert list_requests[400] == list_requests[40] > 0  # the list file is read, the shards are not visited


def layout_output(capsys, n: int, refresh: int) -> str:
    bench.cache_layout(n, len(str(n - 1)), refresh)
    return capsys.readouterr().out


def test_cache_layout_header_is_written_once_whatever_the_shard_count(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    small, large = layout_output(capsys, 30, 10), layout_output(capsys, 300, 10)
    header = [re.search(r"manifest.json: ([\d,]+) B", out).group(1) for out in (small, large)]
    assert header[0] == header[1]
    refresh = [float(re.search(r"refresh segment of 10 shards: ([\d.]+) kB", out).group(1)) for out in (small, large)]
    assert refresh[0] == refresh[1]  # a refresh segment holds only its own shards
    for n, out in ((30, small), (300, large)):
        assert len(re.findall(rf"read_manifest over {n} committed markers with", out)) == 2  # index, then none
    assert list(tmp_path.iterdir()) == []  # the temp cache is removed


def test_a_whole_small_run_prints_every_figure(s3_credentials, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["planning", "--shards", "60", "--refresh-shards", "7"])
    bench.main()
    out = capsys.readouterr().out
    assert re.search(r"^brace range of 60 S3 shards: planned in [\d.]+ s, \d+ S3 requests$", out, re.M)
    assert re.search(r"^list file of 60 S3 shards \([\d.]+ MB\): planned in [\d.]+ s, \d+ S3 requests$", out, re.M)
    assert "refresh segment of 7 shards" in out and "compacted index of 60 shards" in out
    assert len(re.findall(r"read_manifest over 60 committed markers", out)) == 2
    assert list(tmp_path.iterdir()) == []
