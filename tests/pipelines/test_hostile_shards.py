"""pipelines/hostile_shards.py: the hostile corpus itself. Every kind is built the same way each time,
declares consistent expectations, and holds the damage it is named for (a cut tar, a lying PNG header,
the image modes it lists); `write_hostile_shards` writes exactly the kinds asked for. Whether the
reader counts each kind as declared is tested with the reader (tests/pipelines/test_shard_source.py)."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib

import pytest
from PIL import Image

from pipelines.hostile_shards import HOSTILE_KINDS, _png_bomb, write_hostile_shards

EXPECTATION_KEYS = {"samples_in", "samples_written", "failed", "rejected", "members_ignored", "notes",
                    "unsorted_members", "truncated"}


@pytest.fixture(scope="module")
def built():
    return {kind: build() for kind, build in HOSTILE_KINDS.items()}


def members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive if m.isfile()}


def test_every_kind_declares_consistent_counters(built):
    for kind, (data, expected) in built.items():
        assert set(expected) == EXPECTATION_KEYS, kind
        if expected["failed"]:  # a shard that fails as a whole has no samples to count
            assert expected["samples_in"] == expected["samples_written"] == 0 and not expected["rejected"], kind
            continue
        # every sample is written or rejected for a reason: none is lost
        assert expected["samples_written"] + sum(expected["rejected"].values()) == expected["samples_in"], kind
        assert expected["samples_written"] >= 1, kind  # each shard also carries a good sample


def test_kinds_are_built_the_same_every_time(built):
    for kind, build in HOSTILE_KINDS.items():
        assert build() == built[kind], kind


def test_truncated_kinds_are_cut_short_and_the_others_are_whole_archives(built):
    for kind, (data, expected) in built.items():
        if expected["failed"]:
            continue
        whole = len(data) % tarfile.RECORDSIZE == 0
        assert whole != expected["truncated"], kind
    with pytest.raises(tarfile.ReadError):
        members(built["truncated_tar"][0])  # the cut falls inside c.jpg's data
    # cut at a member header and inside one: `tarfile` itself reads both as a whole, shorter archive
    for kind, into_header in (("truncated_tar_at_header", 0), ("truncated_tar_in_header", 100)):
        data = built[kind][0]
        assert len(data) % tarfile.BLOCKSIZE == into_header and set(members(data)) == {"a.jpg", "a.txt", "b.txt"}, kind


def test_png_bomb_claims_a_huge_image_in_a_tiny_valid_file():
    data = _png_bomb(50_000, 40_000)
    assert len(data) < 1000 and data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (50_000, 40_000)
    assert struct.unpack(">I", data[29:33])[0] == zlib.crc32(data[12:29])  # a valid chunk, not a broken file
    with pytest.raises(Image.DecompressionBombError):  # Pillow reads the claim from the header alone
        Image.open(io.BytesIO(data))


def test_image_modes_hold_the_modes_they_name(built):
    files = members(built["image_modes"][0])
    modes = {}
    for name, data in files.items():
        if not name.endswith(".txt"):
            with Image.open(io.BytesIO(data)) as image:
                modes[name] = (image.format, image.mode)
    assert modes["cmyk.jpg"] == ("JPEG", "CMYK") and modes["gray.png"] == ("PNG", "L")
    assert modes["rgba.png"] == ("PNG", "RGBA") and modes["palette.png"] == ("PNG", "P")
    assert modes["deep.png"][1].startswith("I") and modes["webp.webp"] == ("WEBP", "RGB")
    assert len(modes) == built["image_modes"][1]["samples_in"]


def test_unsafe_names_hold_the_member_names_they_are_about(built):
    with tarfile.open(fileobj=io.BytesIO(built["unsafe_names"][0])) as archive:
        names = archive.getnames()
    assert {"../escape.jpg", "/abs/path.jpg", "dir/../../up.txt"} <= set(names)


def test_write_hostile_shards_writes_the_kinds_asked_for(tmp_path, built):
    result = write_hostile_shards(str(tmp_path / "raw"), ["duplicate_keys", "zero_byte_shard"])
    assert sorted(result) == ["duplicate_keys", "zero_byte_shard"]
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["duplicate_keys.tar", "zero_byte_shard.tar"]
    for kind, (uri, expected) in result.items():
        assert uri == str(tmp_path / "raw" / f"{kind}.tar") and expected == built[kind][1]
        assert (tmp_path / "raw" / f"{kind}.tar").read_bytes() == built[kind][0]
    with pytest.raises(KeyError):
        write_hostile_shards(str(tmp_path / "other"), ["no_such_kind"])
