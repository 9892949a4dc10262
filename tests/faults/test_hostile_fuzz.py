"""Hostile input: hypothesis fuzz of the shard reader + decoder, and a generated hostile corpus end to end.

Properties (each a way users lose trust):
- never crashes: `read_shard_rows` and `decode_batch` return rows for any bytes (a shard that
  cannot be read at all becomes one `shard_failed` header, never an exception);
- accounts for every sample: sample indices are exactly 0..N-1, N equals a reference model's
  count of keys (regular, safe-named members with an image/caption/json extension), and every row
  ends with status "ok" or a named rejection;
- never writes outside its output prefix: the reader/decoder write no file at all (checked on a
  scratch working directory), and the full Ray job over a fuzz-generated corpus writes only
  under its cache root, where committed = in - rejected by reason.

Run: .venv/bin/pytest tests/faults/test_hostile_fuzz.py -q  (more examples: -m slow)
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipelines.config import IMAGE_EXTENSIONS, InputConfig, PreprocessConfig
from pipelines.decode import decode_batch
from pipelines.shard_source import CAPTION_EXTENSION, METADATA_EXTENSION, read_shard_rows

RESOLUTION = 64
KNOWN = set(IMAGE_EXTENSIONS) | {CAPTION_EXTENSION, METADATA_EXTENSION}


def _png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", size, (200, 30, 30)).convert(mode)
    image.save(buffer, format="PNG" if mode not in ("CMYK",) else "JPEG")
    return buffer.getvalue()


def _jpeg(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (30, 30, 200)).save(buffer, format="JPEG")
    return buffer.getvalue()


VALID_IMAGE = _jpeg((80, 64))
KEYS = ["a", "b", "dir/c", "../up", "/abs/d", "e f", "ü", "dir/../../g", "C:/win", ".hidden", "x.y"]
EXTENSIONS = ["jpg", "png", "webp", "jpeg", "JPG", "txt", "json", "pth", "pickle", "pkl", "npy", "", "tar"]
PAYLOADS = st.one_of(
    st.just(VALID_IMAGE), st.just(_png((64, 64), "L")), st.just(_png((64, 64), "RGBA")), st.just(_png((64, 64), "P")),
    st.just(_png((8, 8))), st.just(_png((300, 40))), st.just(b""), st.binary(max_size=300),
    st.just(VALID_IMAGE[: len(VALID_IMAGE) // 2]), st.just("caf\xe9".encode("latin-1")), st.just(b"x" * 50_000),
    st.just(b"\x80\x04\x95pickle"), st.text(max_size=40).map(str.encode),
)
MEMBER = st.tuples(st.sampled_from(KEYS), st.sampled_from(EXTENSIONS), PAYLOADS,
                   st.sampled_from(["file", "file", "file", "dir", "symlink"]))


def build_tar(members) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for key, extension, payload, kind in members:
            info = tarfile.TarInfo(f"{key}.{extension}" if extension else key)
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                archive.addfile(info)
            else:
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def reference_keys(members) -> set[str]:
    """The keys a correct reader must report for an intact tar (the WebDataset grouping rule)."""
    keys = set()
    for key, extension, _, kind in members:
        name = f"{key}.{extension}" if extension else key
        if kind != "file" or name.startswith(("/", "\\")) or ".." in name.replace("\\", "/").split("/"):
            continue
        if name[1:2] == ":" and name[:1].isalpha():
            continue
        directory, _, base = name.rpartition("/")
        if "." not in base or base.startswith("."):
            continue
        stem, ext = base.split(".", 1)
        if ext.lower() in KNOWN:
            keys.add(f"{directory}/{stem}" if directory else stem)
    return keys


def read_and_decode(path: str) -> tuple[dict, list[dict]]:
    """The job's first two stages in-process: returns (header info, decoded sample rows)."""
    tables = list(read_shard_rows("fuzz", path, InputConfig(max_member_bytes=40_000)))
    table = pa.concat_tables(tables)
    kinds = table.column("row_kind").to_pylist()
    assert kinds.count("shard") == 1 and kinds[-1] == "shard", "exactly one header row, last"
    batch = {name: np.array(table.column(name).to_pylist(), dtype=object) for name in table.column_names}
    decoded = decode_batch(batch, PreprocessConfig(), RESOLUTION)
    header = json.loads(table.column("shard_info").to_pylist()[-1])
    header["num_samples"] = table.column("shard_num_samples").to_pylist()[-1]
    rows = [{"key": decoded["key"][i], "status": decoded["status"][i], "index": decoded["sample_index"][i]}
            for i in range(len(kinds)) if kinds[i] == "sample"]
    return header, rows


def check_shard(data: bytes, members, scratch, mutated: bool) -> Counter:
    path = os.path.join(scratch, "shard.tar")
    with open(path, "wb") as handle:
        handle.write(data)
    before = sorted(os.listdir(scratch))
    header, rows = read_and_decode(path)
    assert sorted(os.listdir(scratch)) == before, "the reader wrote a file"
    assert [r["index"] for r in rows] == list(range(header["num_samples"])) == list(range(len(rows)))
    assert len({r["key"] for r in rows}) == len(rows), "a key appears twice"
    assert all(isinstance(r["status"], str) and r["status"] for r in rows)
    if header["error"]:
        assert not rows
    elif not mutated:
        assert not header["truncated"] and {r["key"] for r in rows} == reference_keys(members)
    return Counter(r["status"] for r in rows)


@settings(max_examples=60, deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(members=st.lists(MEMBER, max_size=12), cut=st.one_of(st.none(), st.floats(0.0, 1.0)),
       flips=st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 255)), max_size=3))
def test_fuzz_reader_and_decoder_never_crash_and_account_for_every_sample(tmp_path, members, cut, flips):
    data = bytearray(build_tar(members))
    for where, value in flips:
        data[int(where * (len(data) - 1))] = value
    if cut is not None:
        data = data[: int(cut * len(data))]
    old = os.getcwd()
    os.chdir(tmp_path)  # a reader that wrote at a member's path would write here (or above)
    try:
        check_shard(bytes(data), members, str(tmp_path), mutated=bool(flips) or cut is not None)
    finally:
        os.chdir(old)
    assert not any(name in ("up.jpg", "d.jpg", "g.txt") for _, _, names in os.walk(tmp_path.parent) for name in names)


@pytest.mark.slow
@settings(max_examples=1500, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(members=st.lists(MEMBER, max_size=30), cut=st.one_of(st.none(), st.floats(0.0, 1.0)))
def test_fuzz_reader_many_examples(tmp_path, members, cut):
    data = build_tar(members)
    data = data if cut is None else data[: int(cut * len(data))]
    check_shard(data, members, str(tmp_path), mutated=cut is not None)


def fuzz_corpus(directory, num_shards: int, seed: int) -> dict[str, list]:
    """Deterministic hostile shards drawn from the same member generator (no hypothesis database)."""
    rng = random.Random(seed)
    payloads = [VALID_IMAGE, _png((64, 64), "L"), _png((8, 8)), b"", b"\x00" * 100, "caf\xe9".encode("latin-1"),
                b"a caption", b"x" * 50_000, b"\x80\x04pickle", VALID_IMAGE[:300]]
    shards = {}
    for index in range(num_shards):
        members = [(rng.choice(KEYS), rng.choice(EXTENSIONS), rng.choice(payloads), rng.choice(["file"] * 4 + ["symlink"]))
                   for _ in range(rng.randint(4, 14))]
        members += [(f"good{index}", "jpg", VALID_IMAGE, "file"), (f"good{index}", "txt", b"a good caption", "file")]
        data = build_tar(members)
        if index % 3 == 2:
            data = data[: rng.randint(len(data) // 2, len(data) - 1)]  # truncated
        with open(os.path.join(directory, f"fuzz-{index:03d}.tar"), "wb") as handle:
            handle.write(data)
        shards[f"fuzz-{index:03d}"] = members
    return shards


def test_fuzz_corpus_through_the_ray_job_stays_in_its_prefix_and_adds_up(ray_local, tmp_path):
    from pipelines.config import load_precompute_config
    from pipelines.plan import run_precompute

    raw = tmp_path / "raw"
    raw.mkdir()
    shards = fuzz_corpus(str(raw), 9, seed=2024)
    work = tmp_path / "work"
    cache = work / "out" / "cache"
    work.mkdir()
    before = {p for p, _, _ in os.walk(tmp_path)}
    config = load_precompute_config(None, [f"input.shards=['{raw}/*.tar']", f"output={cache}", "progress=false",
                                           "input.max_member_bytes=40000"])
    summary = run_precompute(config, log=lambda *a: None)
    # written + rejected by reason == in, per run and per shard; failed shards are named, not lost
    assert summary.samples_in == summary.samples_written + sum(summary.rejected.values())
    assert summary.shards_done + len(summary.shards_failed) == len(shards)
    for name, members in shards.items():
        stats_path = cache / "stats" / f"{name}.stats.json"
        if name in summary.shards_failed:
            assert not stats_path.exists()
            continue
        stats = json.loads(stats_path.read_text())
        assert stats["samples_in"] == stats["samples_written"] + sum(stats["rejected"].values())
        if int(name[-3:]) % 3 != 2:  # intact shards (every third one was cut by fuzz_corpus)
            assert not stats["truncated"] and stats["samples_in"] == len(reference_keys(members)), name
            assert stats["samples_written"] >= 1, name  # the shard's good sample survives its hostile neighbours
    # nothing was written outside the cache root
    after = {p for p, _, _ in os.walk(tmp_path)}
    new_dirs = after - before
    assert all(p.startswith(str(cache)) or str(cache).startswith(p) for p in new_dirs), new_dirs
    assert sorted(os.listdir(work)) == ["out"] and sorted(os.listdir(cache)) == ["data", "index", "manifest.json", "stats"]
    print(f"fuzz corpus: {summary.samples_in} in, {summary.samples_written} written, rejected {dict(summary.rejected)}, "
          f"ignored {dict(summary.members_ignored)}, failed {sorted(summary.shards_failed)}")
