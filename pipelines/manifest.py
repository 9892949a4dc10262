"""The cache's `manifest.json` and per-shard `<shard>.stats.json` commit markers (contract 4).

Design: the manifest is written *before* any shard (so a cache root always says what produced
it) and rewritten as shards commit and at the end. Its `fingerprint` holds everything that
changes the cache content: schema version, tokenizer weight hash and config, resolution,
preprocessing parameters, text encoder. A run whose fingerprint differs from an existing
manifest refuses with a `ValueError` naming the differing fields, so two tokenizers or two
resolutions can never mix in one cache.

The source of truth for "shard committed" is its stats file, written last, after the parquet
file (img2dataset's `_stats.json` pattern). The manifest's `committed_shards` list is rebuilt
from the stats files each time, so a job killed between a stats write and a manifest write loses
nothing: the next run (or `rebuild_committed`) lists that shard.

Layout under the cache root (local, file:// or s3://):
    manifest.json
    data/part-<shard>.parquet     one file per input shard, deterministic name
    stats/<shard>.stats.json      commit marker + per-shard counters
"""

from __future__ import annotations

import datetime
import hashlib
import json
from typing import Any

from pipelines import storage

SCHEMA_VERSION = 1
FORMAT_NAME = "hart-token-cache"
MANIFEST_NAME = "manifest.json"
DATA_DIR = "data"
STATS_DIR = "stats"


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


def read_manifest(uri: str, endpoint_url: str = "") -> dict[str, Any]:
    """The manifest of a cache root; ValueError when there is none or it is not a token cache."""
    manifest = read_json(uri, MANIFEST_NAME, endpoint_url)
    if manifest is None:
        raise ValueError(f"no {MANIFEST_NAME} under {uri}: not a token cache (run jobs.precompute first)")
    if manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{storage.join(uri, MANIFEST_NAME)} is not a {FORMAT_NAME} manifest")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"cache {uri} has schema_version {manifest.get('schema_version')}, this code reads {SCHEMA_VERSION}")
    return manifest


def check_compatible(existing: dict[str, Any], fingerprint: dict[str, Any], uri: str) -> None:
    """Refuse to add to a cache built with another tokenizer, resolution, preprocessing or text encoder."""
    old = existing.get("fingerprint", {})
    if fingerprint_hash(old) == fingerprint_hash(fingerprint):
        return
    differing = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
    details = "; ".join(f"{k}: cache has {_short(old.get(k))}, this run has {_short(fingerprint.get(k))}" for k in differing)
    raise ValueError(
        f"output {uri} already holds a token cache made with different settings ({details}). "
        f"Write to a new output prefix, or delete the old cache first."
    )


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 120 else text[:117] + "..."


def list_committed(uri: str, fingerprint_hex: str, endpoint_url: str = "",
                   manifest: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """shard -> stats of every shard whose stats marker exists and matches this fingerprint.

    The stats directory listing is the truth; markers already listed in a matching `manifest`
    are not downloaded again (one LIST instead of one GET per shard on object stores)."""
    known = {}
    if manifest is not None and manifest.get("fingerprint_hash") == fingerprint_hex:
        known = {e["shard"]: {"shard": e["shard"], "file": e["file"], "samples_written": e["num_rows"],
                              "source_uri": e["source_uri"]} for e in manifest.get("committed_shards", [])}
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


def build_manifest(header: dict[str, Any], committed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    shards = [
        {"shard": name, "file": s["file"], "num_rows": s["samples_written"], "source_uri": s["source_uri"]}
        for name, s in sorted(committed.items())
    ]
    return {
        **header,
        "committed_shards": shards,
        "num_committed_shards": len(shards),
        "num_rows": sum(s["num_rows"] for s in shards),
        "updated_at": now(),
    }


def manifest_header(fingerprint: dict[str, Any], tokenizer_source: dict[str, Any], text_dim: int) -> dict[str, Any]:
    """The fixed part of the manifest (everything but the committed-shard list)."""
    config = fingerprint["tokenizer_config"]
    patch_nums = list(config["patch_nums"])
    side = patch_nums[-1]
    header = {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "fingerprint": fingerprint,
        "fingerprint_hash": fingerprint_hash(fingerprint),
        "tokenizer_hash": fingerprint["tokenizer_hash"],
        "tokenizer_config": config,
        "tokenizer_source": tokenizer_source,
        "patch_nums": patch_nums,
        "num_tokens": sum(p * p for p in patch_nums),
        "resolution": fingerprint["resolution"],
        "residual_shape": [config["z_channels"], side, side],
        "preprocess": fingerprint["preprocess"],
        "text": fingerprint["text"],
        "text_features_shape": [fingerprint["text"]["max_length"], text_dim] if fingerprint["text"] else None,
        "columns": {
            "key": "string: sample key inside its source shard",
            "caption": "string: UTF-8 caption (truncated to preprocess.max_caption_chars)",
            "tokens": "fixed_size_list<int16>[num_tokens]: token ids of all scales concatenated, coarse to fine (patch_nums)",
            "residual": "fixed_size_binary[z*h*w*2]: little-endian float16 bytes of the continuous residual, C order (z, h, w) = residual_shape",
            "width": "int32: original image width", "height": "int32: original image height",
            "source_shard": "string: input shard name", "sample_index": "int64: sample order inside the shard",
            "metadata": "string: the sample's .json member as text, '' if none",
            "text_features": "fixed_size_binary[T*D*2]: little-endian float16 bytes (T, D) = text_features_shape (only with a text encoder)",
            "text_mask": "fixed_size_list<bool>[T]: valid text positions (only with a text encoder)",
        },
    }
    return header
