"""Shard listing (braces, globs, list files, S3) and tar parsing of hostile shards, without Ray."""

import gzip
import io
import json
import tarfile
from collections import Counter

import pyarrow as pa
import pytest

from pipelines import shapes, storage
from pipelines.config import InputConfig, PreprocessConfig
from pipelines.decode import decode_batch
from pipelines.hostile_shards import HOSTILE_KINDS, write_hostile_shards
from pipelines.shard_source import expand_braces, list_shards, name_shards, parse_tar, read_shard_rows, shard_name


def test_expand_braces():
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}/x-{8..10}.tar") == ["a/x-8.tar", "a/x-9.tar", "a/x-10.tar", "b/x-8.tar", "b/x-9.tar", "b/x-10.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="counts down"):
        expand_braces("{5..1}")
    with pytest.raises(ValueError, match="cannot expand"):
        expand_braces("{abc}")


def test_list_shards_local_glob_brace_dir_and_list_file(tmp_path):
    uris = shapes.write_shapes_shards(str(tmp_path / "in"), num_samples=6, num_shards=3)
    assert list_shards(InputConfig(shards=(str(tmp_path / "in" / "shard-*.tar"),))) == uris
    assert list_shards(InputConfig(shards=(f"file://{tmp_path}/in/shard-{{00000..00001}}.tar",))) == [
        f"file://{tmp_path}/in/shard-00000.tar", f"file://{tmp_path}/in/shard-00001.tar"]
    assert list_shards(InputConfig(shards=(str(tmp_path / "in"),))) == uris
    listing = tmp_path / "list.txt"
    listing.write_text("# shards\n" + "\n".join(uris[::-1]) + "\n\n")
    assert list_shards(InputConfig(list_file=str(listing))) == uris[::-1]
    with pytest.raises(ValueError, match="matches no"):
        list_shards(InputConfig(shards=(str(tmp_path / "nothing-*.tar"),)))
    with pytest.raises(ValueError, match="no input shards"):
        list_shards(InputConfig())


def test_list_shards_on_s3_via_env_endpoint(s3_env, s3_endpoint):
    uris = shapes.write_shapes_shards(f"{s3_env}/raw", num_samples=4, num_shards=2, endpoint_url=s3_endpoint)
    # No endpoint in the config: AWS_ENDPOINT_URL (set by s3_env) is honoured.
    assert list_shards(InputConfig(shards=(f"{s3_env}/raw/shard-*.tar",))) == uris
    assert list_shards(InputConfig(shards=(f"{s3_env}/raw/shard-{{00000..00001}}.tar",))) == uris


def test_planning_makes_no_request_per_shard(s3_bucket, s3_endpoint):
    from tests.faults.s3_fault_proxy import FaultProxy

    names = [f"{s3_bucket}/raw/shard-{i:06d}.tar" for i in range(20000)]
    with FaultProxy(s3_endpoint) as proxy:  # rate 0: forwards and counts every request
        planned = list_shards(InputConfig(shards=(f"{s3_bucket}/raw/shard-{{000000..019999}}.tar",), endpoint_url=proxy.url))
        assert planned == names and proxy.counts["requests"] == 0
        requests = []
        for listed in (names[:10], names):  # the list file's lookups and (ranged) reads only
            fs, path = storage.resolve(f"{s3_bucket}/list-{len(listed)}.txt", proxy.url)
            storage.write_bytes_atomic(fs, path, "\n".join(listed).encode())
            before = proxy.counts["requests"]
            assert list_shards(InputConfig(list_file=f"{s3_bucket}/list-{len(listed)}.txt", endpoint_url=proxy.url)) == listed
            requests.append(proxy.counts["requests"] - before)
        assert requests[0] <= requests[1] <= 10, requests  # 20,000 shards, a ~0.9 MB list: a handful of requests


def test_shard_names_are_path_free_and_unique():
    assert shard_name("s3://b/x/shard-00001.tar") == "shard-00001"
    assert shard_name("/a/../../etc/pa ss.tar.gz") == "pa_ss"
    assert shard_name("/x/..hidden.tar") == "hidden"
    with pytest.raises(ValueError, match="same output name"):
        name_shards(["/a/s.tar", "/b/s.tar"])


def _read_and_decode(uri):
    table = pa.concat_tables(list(read_shard_rows("x", uri, InputConfig())))
    batch = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    return decode_batch(batch, PreprocessConfig(), 64)


@pytest.mark.parametrize("kind", sorted(HOSTILE_KINDS))
def test_hostile_shard_is_counted_not_lost(tmp_path, kind):
    (uri, expected), = write_hostile_shards(str(tmp_path), [kind]).values()
    out = _read_and_decode(uri)
    header = json.loads(out["shard_info"][-1])
    assert out["row_kind"][-1] == "shard" and bool(header["error"]) == expected["failed"]
    samples = out["row_kind"] == "sample"
    statuses = Counter(out["status"][samples])
    assert samples.sum() == expected["samples_in"]
    assert statuses.get("ok", 0) == expected["samples_written"]
    assert {k: v for k, v in statuses.items() if k != "ok"} == expected["rejected"]
    assert header.get("members_ignored", {}) == expected["members_ignored"]
    assert header.get("unsorted_members", 0) == expected["unsorted_members"]
    assert bool(header.get("truncated")) == expected["truncated"]
    notes = Counter(n for joined in out["notes"] if joined for n in joined.split(","))
    assert dict(notes) == expected["notes"]
    assert set(out["sample_index"][samples]) == set(range(expected["samples_in"]))


def test_missing_shard_is_a_failed_shard(tmp_path):
    out = _read_and_decode(str(tmp_path / "missing.tar"))
    assert list(out["row_kind"]) == ["shard"] and "not found" in json.loads(out["shard_info"][0])["error"]


def test_gzip_shard_reads_like_plain(tmp_path):
    import gzip

    (uri,) = shapes.write_shapes_shards(str(tmp_path), num_samples=3, num_shards=1)
    gz = tmp_path / "packed.tar.gz"
    gz.write_bytes(gzip.compress(open(uri, "rb").read()))
    out = _read_and_decode(str(gz))
    assert list(out["status"][out["row_kind"] == "sample"]) == ["ok"] * 3


def test_atomic_local_write_leaves_no_temp_files(tmp_path):
    fs, base = storage.resolve(str(tmp_path))
    storage.write_bytes_atomic(fs, f"{base}/d/x.bin", b"abc")
    storage.write_bytes_atomic(fs, f"{base}/d/x.bin", b"abcd")
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["x.bin"] and (tmp_path / "d" / "x.bin").read_bytes() == b"abcd"
    with pytest.raises(ValueError, match="scheme"):
        storage.resolve("gs://bucket/x")


def test_oversized_members_are_skipped_and_counted(tmp_path):
    from pipelines.shapes import tar_bytes

    path = tmp_path / "big.tar"
    path.write_bytes(tar_bytes([("a.jpg", b"x" * 5000), ("a.txt", b"caption"), ("b.jpg", b"y" * 10), ("b.txt", b"b")]))
    table = pa.concat_tables(list(read_shard_rows("big", str(path), InputConfig(max_member_bytes=1000))))
    rows = {k: s for k, s, kind in zip(*(table.column(c).to_pylist() for c in ("key", "status", "row_kind"))) if kind == "sample"}
    assert rows == {"a": "member_too_large", "b": "ok"}


def _tar(mode: str = "w", tar_format: int = tarfile.PAX_FORMAT, names=("a.jpg", "a.txt", "b.jpg", "b.txt")) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode, format=tar_format) as archive:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = 600
            archive.addfile(info, io.BytesIO(bytes(600)))
    return buffer.getvalue()


def test_only_an_archive_that_ends_with_its_two_zero_blocks_is_whole():
    data = _tar()
    headers = [m.offset for m in tarfile.open(fileobj=io.BytesIO(data))]
    end = headers[-1] + 512 + 1024  # after b.txt's header and its 600 bytes padded to 1024
    whole = {"pax": data, "gnu long names": _tar(tar_format=tarfile.GNU_FORMAT, names=("x" * 150 + ".jpg", "x" * 150 + ".txt")),
             "ustar": _tar(tar_format=tarfile.USTAR_FORMAT), "stream (webdataset, img2dataset)": _tar("w|"),
             "gzip": _tar("w:gz"), "gzip stream": _tar("w|gz"), "no members": _tar(names=()),
             "end blocks without record padding": data[: end + 1024]}
    for label, whole_data in whole.items():
        samples, facts = parse_tar(io.BytesIO(whole_data), 10_000)
        assert facts["truncated"] == "" and all(len(s.members) == 2 for s in samples), label
    broken = bytearray(data)
    broken[headers[2] + 20] ^= 0xFF  # b.jpg's header fails its checksum
    cut = {"at a member header": (data[: headers[2]], "ends at a member boundary", {"a": 2}),
           "inside a member header": (data[: headers[3] + 100], "ends inside a member header", {"a": 2, "b": 1}),
           "gzip, inside a member header": (gzip.compress(data[: headers[2] + 1]), "inside a member header", {"a": 2}),
           "before the end blocks": (data[:end], "ends at a member boundary", {"a": 2, "b": 2}),
           "between the two end blocks": (data[: end + 512], "one zero block of the two", {"a": 2, "b": 2}),
           "corrupt member header": (bytes(broken), "invalid member header (bad checksum)", {"a": 2})}
    for label, (data, reason, kept) in cut.items():
        samples, facts = parse_tar(io.BytesIO(data), 10_000)
        assert reason in facts["truncated"], (label, facts)
        assert {s.key: len(s.members) for s in samples} == kept, label  # what came before the cut is kept
    # a tar that holds nothing readable at all is still a failed shard, not an empty truncated one
    with pytest.raises(tarfile.ReadError):
        parse_tar(io.BytesIO(_tar()[:100]), 10_000)
