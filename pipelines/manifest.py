"""The token cache's layout: `manifest.json` header, commit markers, committed-shard index (contract 4).

Layout under the cache root (local, file:// or s3://), format version 2 (`SCHEMA_VERSION`):
    manifest.json                    header: format, schema_version, fingerprint, shapes, columns
    data/part-<shard>.parquet        one file per input shard, deterministic name
    stats/<shard>.stats.json         commit marker + per-shard counters, written last
    index/<utc-time>-<random>.parquet  segments of the committed-shard index (shard, file, num_rows, source_uri)

Design:
- The header is written once, when a run creates the cache root, before any shard (so a cache
  root always says what produced it), and never rewritten: a rerun only validates it. Its
  `fingerprint` holds everything that changes the cache content: schema version, tokenizer weight
  hash and config, resolution, preprocessing parameters, text encoder. A run whose fingerprint
  differs refuses with a `ValueError` naming the differing fields, so two tokenizers or two
  resolutions (or two format versions) never mix in one cache. Its size does not depend on the
  number of shards.
- A shard is committed when its stats marker exists (written after its parquet file:
  img2dataset's `_stats.json` pattern) and carries this cache's fingerprint hash. The marker
  listing is the truth; everything else is a cache of it.
- The index saves readers one GET per marker. It is append-only: while a run commits, the driver
  writes a small segment of the shards committed since its previous segment; at the end it
  compacts (one segment of every committed shard, from the final marker listing, then deletes the
  segments listed before that write). No file is rewritten per commit or grows with the run
  (17.5 MB rewritten every 15 s at 100k shards with version 1's shard list inside the manifest).
  Segments are read as a set keyed by shard name, so a crash at any point leaves at worst stale or
  duplicate segments, never a wrong answer.
- `list_committed` is the one reconciliation of index and markers, for readers and for the
  job's resume: one LIST of stats/; an indexed shard whose marker is gone is dropped; a marker
  missing from the index is downloaded and kept if its fingerprint hash matches. A run killed
  before compaction therefore still reads completely, with GETs only for the markers committed
  after its last segment.
- A local write killed before its rename leaves a hidden temporary file (`storage.TEMPORARY_PREFIX`)
  in the root, data/, stats/ or index/; every reader skips hidden names. `remove_interrupted_writes`
  deletes them; the precompute job calls it on its driver before its writers start, the one point
  at which no write of its own is in flight (the job assumes no other job writes the same cache at
  the same time: such a job's write in flight would fail, and its shard be redone by a rerun).
- Version 1 caches (the shard list inside `manifest.json`, rewritten as shards committed) stay
  readable: `read_manifest` returns their own list. Writing to one is refused by the fingerprint
  check (write version 2 under a new prefix).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from hart.scale_grid import ScaleGrid
from pipelines import storage

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
FORMAT_NAME = "hart-token-cache"
MANIFEST_NAME = "manifest.json"
DATA_DIR = "data"
STATS_DIR = "stats"
INDEX_DIR = "index"
INDEX_SCHEMA = pa.schema([("shard", pa.string()), ("file", pa.string()), ("num_rows", pa.int64()),
                          ("source_uri", pa.string())])
FINGERPRINT_KEY = b"fingerprint_hash"  # index segments' parquet metadata: the fingerprint their shards carry


def data_file(shard: str) -> str:
    return f"{DATA_DIR}/part-{shard}.parquet"


def stats_file(shard: str) -> str:
    return f"{STATS_DIR}/{shard}.stats.json"


def fingerprint_hash(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def read_json(root: str, name: str, endpoint_url: str = "") -> dict[str, Any] | None:
    fs, base = storage.resolve(root, endpoint_url)
    path = f"{base}/{name}"
    if not storage.exists(fs, path):
        return None
    try:
        return json.loads(storage.read_bytes(fs, path))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{storage.join(root, name)} is not valid JSON: {exc}") from None


def write_json(root: str, name: str, data: dict[str, Any], endpoint_url: str = "") -> int:
    fs, base = storage.resolve(root, endpoint_url)
    payload = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
    storage.write_bytes_atomic(fs, f"{base}/{name}", payload)
    return len(payload)


def remove_interrupted_writes(root: str, endpoint_url: str = "") -> list[str]:
    """Delete the temporary files that killed writes left in the cache's folders (see the module
    doc for when this is safe); returns their paths. Nothing to do on S3."""
    fs, base = storage.resolve(root, endpoint_url)
    return [path for folder in (base, f"{base}/{DATA_DIR}", f"{base}/{STATS_DIR}", f"{base}/{INDEX_DIR}")
            for path in storage.remove_temporaries(fs, folder)]


def read_header(uri: str, endpoint_url: str = "") -> dict[str, Any]:
    """`manifest.json` of a cache root, checked to be a token cache of a version this code reads."""
    header = read_json(uri, MANIFEST_NAME, endpoint_url)
    if header is None:
        raise ValueError(f"no {MANIFEST_NAME} under {uri}: not a token cache (run jobs.precompute first)")
    if header.get("format") != FORMAT_NAME:
        raise ValueError(f"{storage.join(uri, MANIFEST_NAME)} is not a {FORMAT_NAME} manifest")
    version = header.get("schema_version")
    if type(version) is not int or version not in READABLE_VERSIONS:  # JSON `true` would equal 1
        raise ValueError(f"cache {uri} has schema_version {version!r}; this code reads versions "
                         f"{', '.join(map(str, READABLE_VERSIONS))}")
    return header


def read_manifest(uri: str, endpoint_url: str = "") -> dict[str, Any]:
    """The cache's header plus its committed shards: `committed_shards` (list of {shard, file,
    num_rows, source_uri}, sorted by shard), `num_committed_shards` and `num_rows`. ValueError when
    there is no manifest, it is not a token cache, or its schema_version is not one this code reads."""
    header = read_header(uri, endpoint_url)
    if header["schema_version"] == 1:
        # Version 1 kept the committed-shard list in the manifest itself (rewritten as shards committed).
        if not isinstance(header.get("committed_shards"), list):
            raise ValueError(f"{storage.join(uri, MANIFEST_NAME)} (schema_version 1) has no committed_shards list")
        return header
    expected = header.get("fingerprint_hash")
    if not expected:
        raise ValueError(f"{storage.join(uri, MANIFEST_NAME)} has no fingerprint_hash")
    committed = list_committed(uri, expected, endpoint_url, read_index(uri, expected, endpoint_url)[0])
    return with_committed(header, committed)


def check_compatible(existing: dict[str, Any], fingerprint: dict[str, Any], uri: str) -> None:
    """Refuse to add to a cache built with another tokenizer, resolution, preprocessing, text
    encoder or format version."""
    if existing.get("format") != FORMAT_NAME:
        raise ValueError(f"{storage.join(uri, MANIFEST_NAME)} is not a {FORMAT_NAME} manifest: write to a new output prefix")
    old = existing.get("fingerprint", {})
    if fingerprint_hash(old) == fingerprint_hash(fingerprint):
        return
    old_version = existing.get("schema_version")
    if old_version != fingerprint.get("schema_version"):
        raise ValueError(
            f"output {uri} holds a token cache in format version {old_version} (its schema_version); this code writes "
            f"version {fingerprint.get('schema_version')} and adds shards only to a cache of that version. Write to a "
            f"new output prefix (training still reads a version-1 cache as it is), or delete the old cache first."
        )
    differing = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
    details = "; ".join(f"{k}: cache has {_short(old.get(k))}, this run has {_short(fingerprint.get(k))}" for k in differing)
    raise ValueError(
        f"output {uri} already holds a token cache made with different settings ({details}). "
        f"Write to a new output prefix, or delete the old cache first."
    )


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 120 else text[:117] + "..."


# --------------------------------------------------------------------------------------
# Committed shards: markers and index
# --------------------------------------------------------------------------------------


def list_committed(uri: str, fingerprint_hex: str, endpoint_url: str = "",
                   known: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """shard -> commit record of every shard whose stats marker exists and matches this fingerprint.

    The stats directory listing is the truth. `known` (shard -> record with `file`,
    `samples_written`, `source_uri`: index entries, or the records a run received) saves the
    download of those markers; a known shard without a marker is not committed. Every other marker
    is read: one LIST plus one GET per marker not known."""
    known = known or {}
    fs, base = storage.resolve(uri, endpoint_url)
    committed = {}
    for path in storage.list_files(fs, f"{base}/{STATS_DIR}"):
        if not path.endswith(".stats.json"):
            continue
        shard = path.rsplit("/", 1)[-1][: -len(".stats.json")]
        if shard in known:
            committed[shard] = known[shard]
            continue
        try:
            stats = json.loads(storage.read_bytes(fs, path))
        except json.JSONDecodeError:
            continue  # cannot happen with atomic writes; an unreadable marker means "not committed"
        if stats.get("fingerprint_hash") == fingerprint_hex:
            committed[stats["shard"]] = stats
    return committed


def index_entries(committed: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Commit records -> the index's rows {shard, file, num_rows, source_uri}, sorted by shard."""
    return [{"shard": name, "file": s["file"], "num_rows": int(s["samples_written"]), "source_uri": s["source_uri"]}
            for name, s in sorted(committed.items())]


def with_committed(header: dict[str, Any], committed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The dict `read_manifest` returns: the header plus the committed-shard list and its totals."""
    shards = index_entries(committed)
    return {**header, "committed_shards": shards, "num_committed_shards": len(shards),
            "num_rows": sum(s["num_rows"] for s in shards)}


def _segment_name() -> str:
    # UTC time first, so a listing shows segments in the order they were written; the random part
    # keeps two writers in the same microsecond apart.
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{INDEX_DIR}/{stamp}-{uuid.uuid4().hex[:8]}.parquet"


def write_index_segment(uri: str, fingerprint_hex: str, committed: dict[str, dict[str, Any]],
                        endpoint_url: str = "") -> tuple[str, int] | None:
    """Append one index segment holding these commit records; returns (its name under the root, its
    bytes), or None (nothing written) when there are none."""
    if not committed:
        return None
    entries = index_entries(committed)
    table = pa.Table.from_pylist(entries, schema=INDEX_SCHEMA.with_metadata({FINGERPRINT_KEY: fingerprint_hex.encode()}))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    payload = sink.getvalue().to_pybytes()
    name = _segment_name()
    fs, base = storage.resolve(uri, endpoint_url)
    storage.write_bytes_atomic(fs, f"{base}/{name}", payload)
    return name, len(payload)


def list_index_segments(uri: str, endpoint_url: str = "") -> list[str]:
    """Names (under the root) of the index segments, oldest first; temp files of a local write are skipped."""
    fs, base = storage.resolve(uri, endpoint_url)
    names = [p.rsplit("/", 1)[-1] for p in storage.list_files(fs, f"{base}/{INDEX_DIR}")]
    return [f"{INDEX_DIR}/{n}" for n in names if n.endswith(".parquet") and not n.startswith(".")]


def read_index(uri: str, fingerprint_hex: str, endpoint_url: str = "") -> tuple[dict[str, dict[str, Any]], list[str]]:
    """(shard -> commit record from the index segments made for this fingerprint, the segment names read).

    Set semantics: a shard in several segments counts once (the newest segment's entry wins).
    Segments of another fingerprint (left by an older cache in the same place) are ignored; an
    unreadable segment is ignored too, since the marker listing covers whatever it held."""
    fs, base = storage.resolve(uri, endpoint_url)
    segments = list_index_segments(uri, endpoint_url)
    known: dict[str, dict[str, Any]] = {}
    for name in segments:
        try:
            payload = storage.read_bytes(fs, f"{base}/{name}")
        except FileNotFoundError:
            continue  # compacted away since the listing: the segment that replaced it is newer, the markers cover it
        try:
            table = pq.read_table(pa.BufferReader(payload))
        except pa.ArrowInvalid:
            continue  # not parquet: cannot come from the atomic writes here, and the markers cover it
        if ((table.schema.metadata or {}).get(FINGERPRINT_KEY) != fingerprint_hex.encode()
                or not set(INDEX_SCHEMA.names) <= set(table.column_names)):
            continue
        for row in table.to_pylist():
            known[row["shard"]] = {"shard": row["shard"], "file": row["file"], "samples_written": row["num_rows"],
                                   "source_uri": row["source_uri"]}
    return known, segments


def compact_index(uri: str, fingerprint_hex: str, committed: dict[str, dict[str, Any]],
                  endpoint_url: str = "") -> tuple[str, int] | None:
    """Replace the index by one segment of `committed` (which must come from a full marker listing):
    list the segments, write the new one, then delete the listed ones. A crash in between leaves
    duplicates, which readers tolerate. Returns what `write_index_segment` returns."""
    fs, base = storage.resolve(uri, endpoint_url)
    replaced = list_index_segments(uri, endpoint_url)
    written = write_index_segment(uri, fingerprint_hex, committed, endpoint_url)
    for name in replaced:
        storage.delete_if_exists(fs, f"{base}/{name}")
    return written


def manifest_header(fingerprint: dict[str, Any], tokenizer_source: dict[str, Any], text_dim: int) -> dict[str, Any]:
    """The content of `manifest.json` (written once, when the cache root is created)."""
    config = fingerprint["tokenizer_config"]
    grid = ScaleGrid(tuple(config["patch_nums"]))
    header = {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "fingerprint": fingerprint,
        "fingerprint_hash": fingerprint_hash(fingerprint),
        "tokenizer_hash": fingerprint["tokenizer_hash"],
        "tokenizer_config": config,
        "tokenizer_source": tokenizer_source,
        "patch_nums": list(grid.patch_nums),
        "num_tokens": grid.num_tokens,
        "resolution": fingerprint["resolution"],
        # None: the cache stores no residual column (precompute tokenizer.residual false)
        "residual_shape": None if fingerprint.get("residual") is False else list(grid.residual_shape(config["z_channels"])),
        "preprocess": fingerprint["preprocess"],
        "text": fingerprint["text"],
        "text_features_shape": [fingerprint["text"]["max_length"], text_dim] if fingerprint["text"] else None,
        "columns": {
            "key": "string: sample key inside its source shard",
            "caption": "string: UTF-8 caption (truncated to preprocess.max_caption_chars)",
            "tokens": "fixed_size_list<int16>[num_tokens]: token ids of all scales concatenated, coarse to fine (patch_nums)",
            "residual": "fixed_size_binary[z*h*w*2]: little-endian float16 bytes of the continuous residual, C order (z, h, w) = residual_shape (absent when residual_shape is null)",
            "width": "int32: original image width", "height": "int32: original image height",
            "source_shard": "string: input shard name", "sample_index": "int64: sample order inside the shard",
            "metadata": "string: the sample's .json member as text, '' if none",
            "text_features": "fixed_size_binary[T*D*2]: little-endian float16 bytes (T, D) = text_features_shape (only with a text encoder)",
            "text_mask": "fixed_size_list<bool>[T]: valid text positions (only with a text encoder)",
        },
    }
    return header
