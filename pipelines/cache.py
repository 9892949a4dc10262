"""Readers of the token cache (contract 4): manifest, committed files, a Ray dataset, tensors.

Design: readers trust only committed markers (never a glob of data/): `read_manifest` lists the
committed shards from the index and one listing of the stats markers (`pipelines.manifest`), so a
shard whose parquet exists but whose commit marker does not is invisible to training, and a shard
stays visible even when the run that committed it died before indexing it. Version-1 caches are
read from the shard list their manifest holds. The cache
files are plain Parquet: `pyarrow.parquet.read_table`, `pandas.read_parquet` and duckdb read them
without this project (fp16 arrays are stored as little-endian bytes in fixed_size_binary columns,
which every reader handles; `decode_fp16` turns them back into arrays). Training reads the
committed files in its own order through `pipelines.cache_stream`; `read_cache_dataset` is the Ray
Dataset of all committed rows for batch jobs and benchmarks. `batch_to_tensors` turns
one numpy batch (from `Dataset.iter_batches(batch_format="numpy")` or a pyarrow table converted
with `table_to_numpy`) into the tensors the training step wants. `table_to_numpy` views the
fixed-size columns' Arrow buffers in place (no per-row Python bytes objects).

Shape legend: B rows, L tokens of all scales, l = pn*pn tokens of one scale, z/h/w residual,
T/D text features.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from hart.scale_grid import ScaleGrid
from pipelines import storage
from pipelines.manifest import read_manifest

__all__ = ["read_manifest", "committed_files", "read_cache_dataset", "read_cache_table", "batch_to_tensors",
           "decode_fp16", "table_to_numpy"]


def committed_files(uri: str, manifest: dict[str, Any], shards: list[str] | None = None) -> list[str]:
    """Full URIs/paths of the committed parquet files (optionally only the given shards)."""
    entries = manifest["committed_shards"]
    if shards is not None:
        wanted = set(shards)
        missing = wanted - {e["shard"] for e in entries}
        if missing:
            raise ValueError(f"shards not committed in {uri}: {sorted(missing)}")
        entries = [e for e in entries if e["shard"] in wanted]
    return [storage.join(uri, e["file"]) for e in entries]


def read_cache_dataset(uri: str, columns: list[str] | None = None, shuffle_seed: int | None = None,
                       endpoint_url: str = "", shards: list[str] | None = None, **read_parquet_args):
    """Committed rows as a `ray.data.Dataset` (file-level shuffle when `shuffle_seed` is set)."""
    import ray

    manifest = read_manifest(uri, endpoint_url)
    files = committed_files(uri, manifest, shards)
    if not files:
        raise ValueError(f"cache {uri} has no committed shards yet")
    fs, _ = storage.resolve(uri, endpoint_url)
    paths = [storage.resolve(f, endpoint_url)[1] for f in files]
    if shuffle_seed is not None:
        read_parquet_args["shuffle"] = ray.data.FileShuffleConfig(seed=shuffle_seed)
    dataset = ray.data.read_parquet(paths, filesystem=fs, **read_parquet_args)
    return dataset.select_columns(columns) if columns else dataset


def read_cache_table(uri: str, columns: list[str] | None = None, endpoint_url: str = "",
                     shards: list[str] | None = None) -> pa.Table:
    """All committed rows as one pyarrow Table (small caches, tests, audits); no Ray needed."""
    manifest = read_manifest(uri, endpoint_url)
    fs, _ = storage.resolve(uri, endpoint_url)
    tables = [pq.read_table(storage.resolve(f, endpoint_url)[1], filesystem=fs, columns=columns)
              for f in committed_files(uri, manifest, shards)]
    if not tables:
        raise ValueError(f"cache {uri} has no committed shards yet")
    return pa.concat_tables(tables)


def decode_fp16(values: Any, shape: tuple[int, ...]) -> np.ndarray:
    """fixed_size_binary fp16 values (numpy object array of bytes, list, or Arrow array) -> (B, *shape) float16."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        values = values.to_pylist()
    if isinstance(values, np.ndarray) and values.dtype != object:
        # a bytes ('S') array: from `table_to_numpy`, or as Ray hands fixed-size binary over
        return np.ascontiguousarray(values).view(np.uint8).view("<f2").reshape(len(values), *shape)
    joined = b"".join(values)
    return np.frombuffer(joined, dtype="<f2").reshape(len(values), *shape)


def _stack_int(values: Any) -> np.ndarray:
    if isinstance(values, np.ndarray) and values.dtype != object:
        return values
    return np.stack([np.asarray(v) for v in values]) if len(values) else np.zeros((0, 0), np.int16)


def table_to_numpy(table: pa.Table) -> dict[str, np.ndarray]:
    """A pyarrow table of cache rows -> the numpy batch layout `batch_to_tensors` reads. Fixed-size
    binary columns become 'S<width>' arrays over Arrow's buffer, fixed-size lists (B, width)
    arrays (both without copying when the column is one chunk, as a reader's batch is; several chunks
    are combined into one copy first); strings become object arrays."""
    batch: dict[str, np.ndarray] = {}
    for name in table.column_names:
        chunked = table.column(name)
        # combine_chunks copies even a single chunk
        column = chunked.chunk(0) if chunked.num_chunks == 1 else chunked.combine_chunks()
        if pa.types.is_fixed_size_list(column.type):
            width = column.type.list_size
            batch[name] = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), width)
        elif pa.types.is_fixed_size_binary(column.type) and not column.null_count:
            width = column.type.byte_width
            batch[name] = np.frombuffer(column.buffers()[1], dtype=f"S{width}", count=len(column),
                                        offset=column.offset * width)
        else:
            batch[name] = np.array(column.to_pylist(), dtype=object) if not pa.types.is_integer(column.type) else column.to_numpy()
    return batch


def batch_to_tensors(batch: dict[str, Any], manifest: dict[str, Any], split: bool = True) -> dict[str, Any]:
    """Numpy batch of cache rows -> tokens (list per scale, or (B, L) with split=False) LongTensor,
    residual (B, z, h, w) float32, caption list[str], key list[str], and text_features (B, T, D)
    float32 + text_mask (B, T) bool when present."""
    tokens_BL = torch.from_numpy(_stack_int(batch["tokens"]).astype(np.int64))
    out: dict[str, Any] = {
        "tokens": ScaleGrid(tuple(manifest["patch_nums"])).split(tokens_BL) if split else tokens_BL,
        "caption": [str(c) for c in batch["caption"]],
        "key": [str(k) for k in batch["key"]],
    }
    if "residual" in batch:
        out["residual"] = torch.from_numpy(decode_fp16(batch["residual"], tuple(manifest["residual_shape"])).astype(np.float32))
    if "text_features" in batch and manifest.get("text_features_shape"):
        shape = tuple(manifest["text_features_shape"])
        out["text_features"] = torch.from_numpy(decode_fp16(batch["text_features"], shape).astype(np.float32))
        out["text_mask"] = torch.from_numpy(_stack_int(batch["text_mask"]).astype(bool))
    return out
