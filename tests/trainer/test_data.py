"""trainer/data.py: the driver's check of rows against the model (every mismatch named in one
error), the settings online mode derives, shard and text-length checks, the worker-side collates and
context, the checkpoint progress the online read stage skips by, and the cache as a streaming Dataset.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from configuration.loader import config_to_dict
from hart.config import tokenizer_config
from trainer.config import load_train_config
from trainer.data import (
    CacheCollate, CheckpointProgress, TextFeatures, check_rows_match_model, images_collate, list_image_shards,
    online_precompute_config, text_length,
)
from pipelines import manifest as manifest_lib
from tests.training_fixtures import write_tiny_cache
from trainer.plan import RunPlan


def tiny_manifest(text_shape=None, pad_features="encoder_output") -> dict:
    """The header of a cache of the tiny tokenizer (what `check_cache` and online mode compare)."""
    text = {"encoder": "minilm", "max_length": text_shape[0], "dim": text_shape[1], "pad_features": pad_features} \
        if text_shape else None
    fingerprint = {"schema_version": manifest_lib.SCHEMA_VERSION, "tokenizer_hash": "a" * 64,
                   "tokenizer_config": config_to_dict(tokenizer_config("tiny")), "resolution": 64, "preprocess": {},
                   "text": text}
    return manifest_lib.manifest_header(fingerprint, {}, text_shape[1] if text_shape else 0)


def test_rows_of_the_models_tokenizer_pass():
    config = load_train_config(None, "joint")
    check_rows_match_model(RunPlan.of(config), tiny_manifest(), "a" * 64, "cache c")
    check_rows_match_model(RunPlan.of(config), tiny_manifest(text_shape=(16, 384)), None, "cache c")  # the tiny context (T, D)


def test_every_mismatch_is_named_in_one_error():
    config = load_train_config(None, "joint", ["model.tokenizer_checkpoint=/weights/tok"])
    manifest = tiny_manifest(text_shape=(8, 384), pad_features=None)
    manifest["patch_nums"] = [1, 2, 4]
    manifest["tokenizer_config"] = {**manifest["tokenizer_config"], "vocab_size": 512}
    with pytest.raises(ValueError) as error:
        check_rows_match_model(RunPlan.of(config), manifest, "b" * 64, "token cache s3://b/c")
    message = str(error.value)
    assert message.startswith("token cache s3://b/c does not match the run config: ")
    for part in ("patch_nums: cache (1, 2, 4)", "vocabulary: cache vocab_size 512",
                 f"tokenizer hash: cache {'a' * 16}..., model.tokenizer_checkpoint /weights/tok has {'b' * 16}...",
                 "text features: cache (T, D) = (8, 384), model (context_token, context_dim) = (16, 384)",
                 "zeroed its padded text positions"):
        assert part in message, part


def test_online_mode_derives_the_precompute_stages_from_the_run():
    with pytest.raises(ValueError, match="online.enabled needs model.tokenizer_checkpoint"):
        online_precompute_config(RunPlan.of(load_train_config(None, "joint", ["online.enabled=true"])))
    config = load_train_config(None, "joint", [
        "online.enabled=true", "model.tokenizer_checkpoint=s3://b/tok", "data.shards=['s3://b/raw/{0..3}.tar']",
        "run.endpoint_url=http://s3:9000", "online.compute.tokenizer_actors=2", "online.preprocess.min_side=16",
        "model.tokenizer={preset: tiny, patch_nums: [1, 2, 4, 8]}", "run.shared_filesystem=true"])
    precompute = online_precompute_config(RunPlan.of(config))
    assert precompute.input.shards == ("s3://b/raw/{0..3}.tar",) and precompute.input.endpoint_url == "http://s3:9000"
    assert precompute.tokenizer.checkpoint == "s3://b/tok"
    assert precompute.tokenizer.config == {"preset": "tiny", "patch_nums": [1, 2, 4, 8]}  # model.tokenizer, as given
    assert precompute.compute.tokenizer_actors == 2 and precompute.preprocess.min_side == 16
    assert precompute.shared_filesystem and not precompute.progress


def test_shards_are_required_and_listed(tmp_path):
    for name in ("b.tar", "a.tar"):
        (tmp_path / name).write_bytes(b"")
    config = load_train_config(None, "tokenizer", [f"data.shards=['{tmp_path}/*.tar']"])
    assert list_image_shards(config) == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    with pytest.raises(ValueError, match="the tokenizer stage needs data.shards"):
        list_image_shards(load_train_config(None, "tokenizer", ["data.shards=[]"]))
    with pytest.raises(ValueError, match="online mode needs data.shards"):
        list_image_shards(load_train_config(None, "joint", ["data.shards=[]", "online.enabled=true"]))


def test_text_length_is_the_transformers_context():
    assert text_length(RunPlan.of(load_train_config(None, "joint"))) == 16
    assert text_length(RunPlan.of(load_train_config(None, "joint", ["data.text_max_length=16"]))) == 16
    with pytest.raises(ValueError, match="data.text_max_length 8 must equal the transformer's context_token 16"):
        text_length(RunPlan.of(load_train_config(None, "joint", ["data.text_max_length=8"])))


def test_images_collate_maps_pixels_to_minus_one_to_one():
    image = np.zeros((2, 4, 4, 3), np.uint8)
    image[1] = 255
    image[0, 0, 0] = (0, 255, 0)
    out = images_collate({"image": image, "caption": np.array(["a", "b"], dtype=object)})
    assert out["images"].shape == (2, 3, 4, 4) and out["images"].dtype == torch.float32
    assert out["images"][1].eq(1).all() and out["images"][0, 0, 1:].eq(-1).all()
    assert out["images"][0, :, 0, 0].tolist() == [-1.0, 1.0, -1.0] and out["caption"] == ["a", "b"]


def test_cache_collate_gives_tokens_per_scale_and_the_online_accounting(tmp_path):
    from pipelines.cache import read_cache_table, read_manifest

    root = str(tmp_path / "cache")
    written = write_tiny_cache(root, {"a": 3}, text_shape=(2, 4))
    manifest = read_manifest(root)
    table = read_cache_table(root)
    out = CacheCollate(manifest)(table)
    assert [t.shape for t in out["tokens"]] == [(3, 1), (3, 4)] and out["key"] == ["a-0", "a-1", "a-2"]
    assert torch.equal(out["text_features"], torch.from_numpy(written["a"]["text_features"]).float())
    assert "visit" not in out
    online = table.append_column("visit", pa.array(["0:a"] * 3)).append_column("covers", pa.array([[0], [1, 2], [3]])) \
        .append_column("visit_samples", pa.array([4, 4, 4]))
    out = CacheCollate(manifest)(online)
    assert out["visit"] == ["0:a"] * 3 and out["covers"] == [[0], [1, 2], [3]] and out["visit_samples"] == [4, 4, 4]


def test_cached_text_features_become_the_context_without_an_encoder():
    config = load_train_config(None, "joint")
    text = TextFeatures(RunPlan.of(config, manifest={"text_features_shape": [2, 4]}), torch.device("cpu"))
    assert text.encoder is None
    batch = {"tokens": [torch.zeros(2, 1, dtype=torch.long)], "residual": torch.ones(2, 2, 2, 2), "caption": ["x", "y"],
             "text_features": torch.full((2, 2, 4), 0.5), "text_mask": torch.tensor([[True, False], [True, True]])}
    out = text.add_context(batch)
    assert torch.equal(out["context"], batch["text_features"]) and torch.equal(out["context_mask"], batch["text_mask"])
    assert torch.equal(out["residual"], batch["residual"]) and out["caption"] == ["x", "y"]
    assert TextFeatures(RunPlan.of(config, manifest=None), torch.device("cpu")).encoder is None  # the tokenizer stage's worker


def write_checkpoint(run_dir, name: str, done: list[str] | None) -> None:
    (run_dir / name).mkdir(parents=True)
    (run_dir / name / "meta.json").write_text(json.dumps({"step": 2}))
    if done is not None:
        (run_dir / name / "progress.json").write_text(json.dumps({"done": done, "partial": {"1:b": [0]}}))
    (run_dir / "checkpoint_manager_snapshot.json").write_text(
        json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": name}}))


def test_checkpoint_progress_reads_the_latest_checkpoints_done_visits(tmp_path):
    progress = CheckpointProgress(str(tmp_path), "run-progress", "")
    assert progress() == {}  # no checkpoint yet: nothing to skip
    run_dir = tmp_path / "run-progress"
    write_checkpoint(run_dir, "checkpoint_step00000002", ["0:a", "0:b"])
    assert progress() == {"done": ["0:a", "0:b"], "partial": {"1:b": [0]}}
    write_checkpoint(run_dir, "checkpoint_step00000004", ["0:a", "0:b", "1:a"])  # a later checkpoint: read again
    assert progress()["done"] == ["0:a", "0:b", "1:a"]
    write_checkpoint(run_dir, "checkpoint_step00000006", None)  # a checkpoint without progress: nothing done
    assert progress() == {}


def test_a_token_only_cache_trains_the_ar_stage_only():
    manifest = {**tiny_manifest(), "residual_shape": None}  # precompute tokenizer.residual false
    check_rows_match_model(RunPlan.of(load_train_config(None, "ar", [])), manifest, None, "cache c")
    check_rows_match_model(RunPlan.of(load_train_config(None, "ar", ["model.family=star",
                                                          "model.transformer={preset: tiny, vocab_size: 256, token_dim: 16}"])),
                           manifest, None, "cache c")
    for stage in ("joint", "diffusion"):
        with pytest.raises(ValueError, match=f"residual: the {stage} stage trains on the continuous residual"):
            check_rows_match_model(RunPlan.of(load_train_config(None, stage, [])), manifest, None, "cache c")
