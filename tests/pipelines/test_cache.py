"""pipelines/cache.py, the training side of the token cache, on small caches written by the cache's own
writers (`tests.training_fixtures.write_tiny_cache`): committed files and shard selection, whole-table
reads, the numpy views of fixed-size columns, fp16 decoding, tensors per scale, and the Ray Data reader.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipelines.cache import (
    batch_to_tensors, committed_files, decode_fp16, read_cache_dataset, read_cache_table, read_manifest, table_to_numpy,
)
from tests.training_fixtures import write_tiny_cache


@pytest.fixture
def cache(tmp_path):
    root = str(tmp_path / "cache")
    return root, write_tiny_cache(root, {"a": 3, "b": 2})


def test_committed_files_follow_the_markers_and_name_missing_shards(cache):
    root, _ = cache
    manifest = read_manifest(root)
    assert committed_files(root, manifest) == [f"{root}/data/part-a.parquet", f"{root}/data/part-b.parquet"]
    assert committed_files(root, manifest, ["b"]) == [f"{root}/data/part-b.parquet"]
    with pytest.raises(ValueError, match=r"shards not committed in .*: \['c', 'd'\]"):
        committed_files(root, manifest, ["b", "d", "c"])
    os.remove(f"{root}/stats/a.stats.json")  # no marker: the parquet file is not part of the cache
    assert committed_files(root, read_manifest(root)) == [f"{root}/data/part-b.parquet"]


def test_table_reads_committed_rows_of_the_chosen_shards_and_columns(cache):
    root, written = cache
    table = read_cache_table(root, columns=["key", "tokens"])
    assert table.column_names == ["key", "tokens"]
    assert table.column("key").to_pylist() == ["a-0", "a-1", "a-2", "b-0", "b-1"]
    only_b = read_cache_table(root, shards=["b"])
    assert only_b.column("key").to_pylist() == ["b-0", "b-1"]
    assert np.array_equal(np.array(only_b.column("tokens").to_pylist()), written["b"]["tokens"])


def test_a_cache_without_commits_is_refused(tmp_path):
    root = str(tmp_path / "cache")
    write_tiny_cache(root, {"a": 2})
    os.remove(f"{root}/stats/a.stats.json")
    for index in os.listdir(f"{root}/index") if os.path.isdir(f"{root}/index") else []:
        os.remove(f"{root}/index/{index}")
    with pytest.raises(ValueError, match="no committed shards yet"):
        read_cache_table(root)
    with pytest.raises(ValueError, match="not a token cache"):
        read_cache_table(str(tmp_path / "nowhere"))


def test_fixed_size_columns_become_numpy_arrays_without_a_python_object_per_value(cache):
    root, written = cache
    batch = table_to_numpy(read_cache_table(root, shards=["a"]))
    assert batch["tokens"].shape == (3, 5) and batch["tokens"].dtype == np.int16
    assert np.array_equal(batch["tokens"], written["a"]["tokens"])
    residual = batch["residual"]
    assert residual.dtype == np.dtype("S16") and residual.shape == (3,)  # one fixed-width value per row
    assert batch["key"].dtype == object and list(batch["key"]) == ["a-0", "a-1", "a-2"]
    assert batch["sample_index"].dtype == np.int64 and list(batch["sample_index"]) == [0, 1, 2]


def test_fixed_size_binary_of_a_sliced_table_views_the_right_rows(cache):
    root, written = cache
    table = read_cache_table(root, shards=["a"]).slice(1, 2)  # an Arrow offset into the buffer
    batch = table_to_numpy(table)
    assert np.array_equal(decode_fp16(batch["residual"], (2, 2, 2)), written["a"]["residual"][1:])


def test_decode_fp16_reads_every_form_a_batch_can_take():
    values = np.arange(2 * 8, dtype="<f2").reshape(2, 8) / 4
    as_bytes = [row.tobytes() for row in values]
    forms = {"list": as_bytes, "object array": np.array(as_bytes, dtype=object),
             "bytes array": np.array(as_bytes, dtype="S16"), "arrow": pa.array(as_bytes, pa.binary(16))}
    for name, form in forms.items():
        decoded = decode_fp16(form, (2, 2, 2))
        assert decoded.shape == (2, 2, 2, 2) and decoded.dtype == np.float16, name
        assert np.array_equal(decoded.reshape(2, 8), values), name


def test_batch_to_tensors_splits_tokens_per_scale_and_decodes_residuals(cache):
    root, written = cache
    manifest = read_manifest(root)
    out = batch_to_tensors(table_to_numpy(read_cache_table(root, shards=["a"])), manifest)
    assert [t.shape for t in out["tokens"]] == [(3, 1), (3, 4)] and out["tokens"][0].dtype == torch.int64
    assert torch.equal(torch.cat(out["tokens"], 1), torch.from_numpy(written["a"]["tokens"]).long())
    assert out["residual"].dtype == torch.float32 and out["residual"].shape == (3, 2, 2, 2)
    assert torch.equal(out["residual"], torch.from_numpy(written["a"]["residual"]).float())
    assert out["caption"] == ["caption a 0", "caption a 1", "caption a 2"] and out["key"] == ["a-0", "a-1", "a-2"]
    assert "text_features" not in out
    whole = batch_to_tensors(table_to_numpy(read_cache_table(root, shards=["a"])), manifest, split=False)
    assert whole["tokens"].shape == (3, 5)


def test_text_features_come_back_only_where_the_manifest_declares_them(tmp_path):
    root = str(tmp_path / "cache")
    written = write_tiny_cache(root, {"a": 4}, text_shape=(3, 2))
    manifest = read_manifest(root)
    batch = table_to_numpy(read_cache_table(root))
    out = batch_to_tensors(batch, manifest)
    assert out["text_features"].shape == (4, 3, 2) and out["text_features"].dtype == torch.float32
    assert torch.equal(out["text_features"], torch.from_numpy(written["a"]["text_features"]).float())
    assert out["text_mask"].dtype == torch.bool and torch.equal(out["text_mask"], torch.from_numpy(written["a"]["text_mask"]))
    assert "text_features" not in batch_to_tensors(batch, {**manifest, "text_features_shape": None})


def test_ray_dataset_reader(ray_local, tmp_path):
    root = str(tmp_path / "cache")
    write_tiny_cache(root, {"a": 6, "b": 7, "c": 5})
    manifest = read_manifest(root)
    dataset = read_cache_dataset(root, columns=["key", "caption", "tokens", "residual"], shuffle_seed=0)
    batches = list(dataset.iter_batches(batch_format="numpy", batch_size=10))
    tensors = [batch_to_tensors(b, manifest, split=False) for b in batches]
    assert sum(t["tokens"].shape[0] for t in tensors) == 18
    assert tensors[0]["tokens"].dtype == torch.int64 and tensors[0]["residual"].shape[1:] == (2, 2, 2)
    assert len({k for t in tensors for k in t["key"]}) == 18
