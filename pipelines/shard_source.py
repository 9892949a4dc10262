"""Find WebDataset shards and read one shard into raw-bytes rows (no image decoding here).

Design: we parse tars ourselves instead of using `ray.data.read_webdataset`, because that reader
groups members by *consecutive* key (unsorted tars silently become split samples, ray#44068), a
truncated tar fails the whole read task, and it cannot tell a downstream writer how many samples a
shard holds. Here one task reads one whole shard (streamed through `pyarrow.fs`, so local, S3 and
gzip tars look the same), groups members by key in any order, and emits:

- one `row_kind="sample"` row per key, with the raw image/caption/json bytes and a `status`
  ("ok" or the rejection reason known at read time), its index and the shard's sample count;
- one `row_kind="shard"` header row with the shard-level facts (members ignored by reason,
  unsorted members, truncation, bytes, read seconds, or the error that made the shard unreadable).

Every stage passes header rows and rejected rows through, so the writer can prove that it has
seen every sample of a shard (exactly-once) and count every rejection by reason.

A shard is `truncated` when reading stopped before the archive's end: an error inside a member,
or no end-of-archive marker (two zero blocks, which every tar writer puts after the last member;
Python's `tarfile`, and so img2dataset and webdataset, included). `tarfile`'s stream mode ends
silently at a short, empty or invalid header after the first one, so a tar cut at or inside a
member header would otherwise read as a whole, shorter archive (`_HeaderRecordingTarInfo`).

Member names are only ever used as strings (the key column): nothing is written at a member's
path. Absolute names and names with `..` are still refused and counted, because they mark a
hostile or broken archive. Members that are not images/captions/json (e.g. `.pth`, `.pkl`) are
ignored and counted; nothing is ever unpickled.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import re
import tarfile
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.fs as pafs

from pipelines import storage
from pipelines.config import IMAGE_EXTENSIONS, InputConfig

CAPTION_EXTENSION = "txt"
METADATA_EXTENSION = "json"
ROWS_PER_CHUNK = 256  # rows per yielded table: keeps blocks small so stages pipeline

RAW_SCHEMA = pa.schema([
    ("row_kind", pa.string()),  # "sample" | "shard"
    ("source_shard", pa.string()),
    ("sample_index", pa.int64()),
    ("shard_num_samples", pa.int64()),
    ("key", pa.string()),
    ("image_bytes", pa.binary()),
    ("caption_bytes", pa.binary()),
    ("metadata_bytes", pa.binary()),
    ("status", pa.string()),
    ("shard_info", pa.string()),  # JSON, header rows only
])


# ------------------------------------------------------------------------------------------------
# Listing
# ------------------------------------------------------------------------------------------------

_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """`shard-{000..002}.tar` -> three names (zero padding kept); `{a,b}` lists; nested left to right."""
    match = _BRACE.search(pattern)
    if not match:
        return [pattern]
    body = match.group(1)
    range_match = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if range_match:
        low_text, high_text = range_match.groups()
        low, high = int(low_text), int(high_text)
        if high < low:
            raise ValueError(f"brace range {{{body}}} in {pattern!r} counts down")
        width = len(low_text) if low_text.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(low, high + 1)]
    elif "," in body:
        options = body.split(",")
    else:
        raise ValueError(f"cannot expand {{{body}}} in {pattern!r}: use {{a..b}} or {{x,y}}")
    head, tail = pattern[: match.start()], pattern[match.end():]
    return [expanded for option in options for expanded in expand_braces(head + option + tail)]


def _glob(pattern: str, endpoint_url: str) -> list[str]:
    if not storage.is_s3(pattern):
        local = pattern[len("file://"):] if pattern.startswith("file://") else pattern
        return sorted(glob.glob(local))
    fs, path = storage.resolve(pattern, endpoint_url)
    # List below the longest prefix without wildcards, then match the full pattern.
    static = re.split(r"[*?\[]", path, maxsplit=1)[0]
    base = static.rsplit("/", 1)[0]
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return sorted(f"s3://{i.path}" for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.path, path))


def _is_shard_file(name: str) -> bool:
    return name.endswith((".tar", ".tar.gz", ".tgz"))


def list_shards(config: InputConfig) -> list[str]:
    """All shard URIs named by `config.shards` and `config.list_file`, de-duplicated, in order.

    Planning costs no request per shard: names ending in .tar/.tgz/.tar.gz (from brace ranges or a
    list file) are taken as given, globs cost one listing per pattern, and only other names are
    looked up (a folder of shards is listed)."""
    patterns = list(config.shards)
    if config.list_file:
        fs, path = storage.resolve(config.list_file, config.endpoint_url)
        if not storage.exists(fs, path):
            raise ValueError(f"input.list_file not found: {config.list_file}")
        lines = storage.read_bytes(fs, path).decode("utf-8").splitlines()
        patterns += [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not patterns:
        raise ValueError("no input shards: set input.shards (paths, globs, braces) or input.list_file")
    uris: list[str] = []
    for pattern in patterns:
        for expanded in expand_braces(pattern):
            if any(ch in expanded for ch in "*?["):
                found = [u for u in _glob(expanded, config.endpoint_url) if _is_shard_file(u)]
                if not found:
                    raise ValueError(f"input pattern {expanded!r} matches no .tar shard")
                uris += found
                continue
            if _is_shard_file(expanded):  # no request per shard: a missing file is a failed shard later
                uris.append(expanded)
                continue
            fs, path = storage.resolve(expanded, config.endpoint_url)
            if fs.get_file_info(path).type == pafs.FileType.Directory:
                prefix = expanded.rstrip("/")
                uris += [storage.join(prefix, p.rsplit("/", 1)[-1]) for p in storage.list_files(fs, path) if _is_shard_file(p)]
            else:
                uris.append(expanded)  # a missing file is reported as a failed shard, not here
    return list(dict.fromkeys(uris))


def shard_name(uri: str) -> str:
    """Deterministic, path-free output name of a shard: its file stem with unsafe characters replaced."""
    base = uri.rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    name = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")
    if not name:
        raise ValueError(f"cannot derive an output name from shard {uri!r}")
    return name


def name_shards(uris: list[str]) -> dict[str, str]:
    """name -> uri; two shards that would share an output name are a configuration error."""
    names: dict[str, str] = {}
    for uri in uris:
        name = shard_name(uri)
        if name in names:
            raise ValueError(f"shards {names[name]!r} and {uri!r} map to the same output name {name!r}; rename one")
        names[name] = uri
    return names


# ------------------------------------------------------------------------------------------------
# Reading one shard
# ------------------------------------------------------------------------------------------------


@dataclass
class _Sample:
    key: str
    members: dict[str, bytes]
    status: str = "ok"


def _split_name(name: str) -> tuple[str, str] | None:
    """WebDataset convention: key = path up to the first '.' of the basename, ext = the rest."""
    directory, _, base = name.rpartition("/")
    if "." not in base or base.startswith("."):
        return None
    stem, ext = base.split(".", 1)
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _unsafe(name: str) -> bool:
    return name.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", name) or re.match(r"^[A-Za-z]:", name) is not None


class _HeaderRecordingTarInfo(tarfile.TarInfo):
    """A TarInfo that keeps, on its archive, the header error that ended the member iteration.

    In stream mode `TarFile.next` turns the error of any header after the first into "no more
    members"; which error it was tells an end-of-archive zero block (`EOFHeaderError`) from a cut
    at a header (`EmptyHeaderError`), inside one (`TruncatedHeaderError`) or a corrupt one."""

    @classmethod
    def fromtarfile(cls, archive):
        try:
            return super().fromtarfile(archive)
        except tarfile.HeaderError as exc:
            archive.ending_header_error = exc
            raise


def _check_archive_end(archive: tarfile.TarFile) -> None:
    """ReadError unless the members ended at an end-of-archive marker: a zero block, then another."""
    ended_by = getattr(archive, "ending_header_error", None)
    if isinstance(ended_by, tarfile.EOFHeaderError):
        second = archive.fileobj.read(tarfile.BLOCKSIZE)
        if second == bytes(tarfile.BLOCKSIZE):
            return
        raise tarfile.ReadError(f"archive ends at byte {archive.offset} with one zero block of the two that end a tar")
    if isinstance(ended_by, tarfile.EmptyHeaderError):
        reason = "the data ends at a member boundary"
    elif isinstance(ended_by, tarfile.TruncatedHeaderError):
        reason = "the data ends inside a member header"
    else:
        reason = f"invalid member header ({ended_by or 'unknown'})"
    raise tarfile.ReadError(f"archive ends at byte {archive.offset} without its end-of-archive blocks: {reason}")


def parse_tar(stream, max_member_bytes: int) -> tuple[list[_Sample], dict]:
    """Group the members of a tar stream by key; returns samples in first-seen order and shard facts."""
    samples: dict[str, _Sample] = {}
    ignored: Counter = Counter()
    unsorted_members = 0
    truncated = ""
    last_key = None
    try:
        with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_HeaderRecordingTarInfo) as archive:
            for member in archive:
                if not member.isreg():
                    ignored["non_file_member"] += 1
                    continue
                if _unsafe(member.name):
                    ignored["unsafe_member_name"] += 1
                    continue
                parts = _split_name(member.name)
                if parts is None:
                    ignored["no_extension"] += 1
                    continue
                key, ext = parts
                if ext not in IMAGE_EXTENSIONS + (CAPTION_EXTENSION, METADATA_EXTENSION):
                    ignored["unknown_extension"] += 1
                    continue
                sample = samples.get(key)
                if sample is None:
                    sample = samples[key] = _Sample(key, {})
                elif key != last_key:
                    unsorted_members += 1  # this key's members are not contiguous in the tar
                last_key = key
                if ext in sample.members:
                    sample.status = "duplicate_key"
                    continue
                if member.size > max_member_bytes:
                    sample.status = "member_too_large"
                    sample.members[ext] = b""
                    continue
                handle = archive.extractfile(member)
                sample.members[ext] = handle.read() if handle is not None else b""
            _check_archive_end(archive)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        if not samples and not ignored:
            raise  # nothing readable at all: the caller reports a failed shard
        truncated = f"{type(exc).__name__}: {exc}"
    return list(samples.values()), {
        "members_ignored": dict(ignored),
        "unsorted_members": unsorted_members,
        "truncated": truncated,
    }


def _sample_status(sample: _Sample) -> str:
    if sample.status != "ok":
        return sample.status
    images = [ext for ext in IMAGE_EXTENSIONS if ext in sample.members]
    if not images:
        return "missing_image"
    if len(images) > 1:
        return "multiple_images"
    return "ok"


def read_shard_rows(name: str, uri: str, config: InputConfig) -> Iterator[pa.Table]:
    """Yield RAW_SCHEMA tables for one shard: its samples in chunks, then its header row."""
    started = time.perf_counter()
    info: dict = {"source_uri": uri, "error": "", "bytes_read": 0}
    samples: list[_Sample] = []
    try:
        fs, path = storage.resolve(uri, config.endpoint_url)
        file_info = fs.get_file_info(path)
        if file_info.type != pafs.FileType.File:
            raise FileNotFoundError(f"shard not found: {uri}")
        info["bytes_read"] = file_info.size
        with fs.open_input_stream(path, compression=None) as stream:
            samples, facts = parse_tar(stream, config.max_member_bytes)
        info.update(facts)
    except Exception as exc:  # noqa: BLE001 - any failure of one shard must not kill the job
        info["error"] = f"{type(exc).__name__}: {exc}"
        samples = []
    info["read_seconds"] = round(time.perf_counter() - started, 4)
    num_samples = len(samples)
    for start in range(0, num_samples, ROWS_PER_CHUNK):
        chunk = samples[start: start + ROWS_PER_CHUNK]
        rows = {
            "row_kind": ["sample"] * len(chunk),
            "source_shard": [name] * len(chunk),
            "sample_index": list(range(start, start + len(chunk))),
            "shard_num_samples": [num_samples] * len(chunk),
            "key": [s.key for s in chunk],
            "image_bytes": [next((s.members[e] for e in IMAGE_EXTENSIONS if e in s.members), None) for s in chunk],
            "caption_bytes": [s.members.get(CAPTION_EXTENSION) for s in chunk],
            "metadata_bytes": [s.members.get(METADATA_EXTENSION) for s in chunk],
            "status": [_sample_status(s) for s in chunk],
            "shard_info": [""] * len(chunk),
        }
        yield pa.Table.from_pydict(rows, schema=RAW_SCHEMA)
    header = {
        "row_kind": ["shard"], "source_shard": [name], "sample_index": [-1], "shard_num_samples": [num_samples],
        "key": [""], "image_bytes": [None], "caption_bytes": [None], "metadata_bytes": [None],
        "status": ["shard_failed" if info["error"] else "shard"], "shard_info": [json.dumps(info)],
    }
    yield pa.Table.from_pydict(header, schema=RAW_SCHEMA)


def read_shards_batch(batch: pa.Table, config: InputConfig) -> Iterator[pa.Table]:
    """`map_batches` UDF over a table of (name, uri) rows: reads each shard in turn."""
    for name, uri in zip(batch.column("name").to_pylist(), batch.column("uri").to_pylist()):
        yield from read_shard_rows(name, uri, config)
