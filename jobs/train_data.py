"""Training data: token caches and image shards as Ray Datasets, checks, and per-batch tensors.

Design:
- Transformer stages read the token cache written by `jobs.precompute` through
  `pipelines.cache` (committed shards only, file-level shuffle; no local shuffle buffer,
  which costs throughput and breaks DDP step parity, RAY_NOTES §4). Each worker gets its
  `get_dataset_shard("train")` and iterates `iter_torch_batches(collate_fn=...)` with
  `drop_last=True`, so all ranks take the same number of steps.
- The tokenizer stage reads WebDataset shards with the precompute pipeline's own reader
  and decode/crop function (`pipelines.shard_source`, `pipelines.decode`), so training
  sees exactly the pixels the cache was made from.
- `check_cache` runs on the driver before any worker starts and turns every mismatch
  between the cache manifest and the run (scale list, vocabulary, latent width, tokenizer
  weights hash, text features) into one ValueError that names both sides.
- Text conditioning comes from the cache (`text_features`) when it has it, else from a
  frozen text encoder built once per worker (`TextFeatures`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch
from ray.data.collate_fn import ArrowBatchCollateFn, NumpyBatchCollateFn

from jobs.train_config import TrainRunConfig, model_configs

CACHE_COLUMNS = ["key", "caption", "tokens", "residual"]
TEXT_COLUMNS = ["text_features", "text_mask"]


# --------------------------------------------------------------------------------------
# Driver-side checks
# --------------------------------------------------------------------------------------


def check_cache(config: TrainRunConfig, tokenizer_hash: str | None) -> dict[str, Any]:
    """Read the manifest and validate it against the run config; returns the manifest."""
    from pipelines.cache import read_manifest

    uri = config.data.cache
    if not uri:
        raise ValueError(f"stage {config.stage!r} needs data.cache (a token cache from jobs.precompute)")
    manifest = read_manifest(uri, config.run.endpoint_url)
    if not manifest.get("num_rows"):
        raise ValueError(f"token cache {uri} is empty: no committed rows (run jobs.precompute to completion first)")
    _, transformer = model_configs(config)
    problems = []
    if tuple(manifest["patch_nums"]) != tuple(transformer.patch_nums):
        problems.append(f"patch_nums: cache {tuple(manifest['patch_nums'])}, model {tuple(transformer.patch_nums)}")
    cache_tokenizer = manifest.get("tokenizer_config", {})
    if cache_tokenizer.get("vocab_size") != transformer.vocab_size:
        problems.append(f"vocabulary: cache {cache_tokenizer.get('vocab_size')}, model vocab_size {transformer.vocab_size}")
    if cache_tokenizer.get("z_channels") != transformer.token_dim:
        problems.append(f"latent width: cache z_channels {cache_tokenizer.get('z_channels')}, model token_dim {transformer.token_dim}")
    if tokenizer_hash is not None and manifest.get("tokenizer_hash") != tokenizer_hash:
        problems.append(
            f"tokenizer hash: cache {str(manifest.get('tokenizer_hash'))[:16]}..., model.tokenizer_checkpoint "
            f"{config.model.tokenizer_checkpoint} has {tokenizer_hash[:16]}..."
        )
    text_shape = manifest.get("text_features_shape")
    if text_shape and tuple(text_shape) != (transformer.context_token, transformer.context_dim):
        problems.append(
            f"text features: cache (T, D) = {tuple(text_shape)}, model (context_token, context_dim) = "
            f"{(transformer.context_token, transformer.context_dim)}"
        )
    from pipelines.text_stage import PAD_FEATURES

    if text_shape and (manifest.get("text") or {}).get("pad_features") != PAD_FEATURES:
        # Older caches zeroed the padded text positions, which generation never does (the pads are
        # prefix tokens the model attends to): a model trained on them ignores the prompt.
        problems.append(f"text features: the cache zeroed its padded text positions (built before pad_features="
                        f"{PAD_FEATURES!r}); rebuild it with jobs.precompute")
    if problems:
        raise ValueError(f"token cache {uri} does not match the run config: " + "; ".join(problems))
    return manifest


def check_text_encoder(config: TrainRunConfig, manifest: dict[str, Any]) -> None:
    """When the cache has no text features, the worker-side encoder must produce the model's (T, D)."""
    if manifest.get("text_features_shape"):
        return
    from hart.text_encoder import build_text_encoder

    _, transformer = model_configs(config)
    encoder = build_text_encoder(config.data.text_encoder, text_length(config))
    if int(encoder.dim) != transformer.context_dim:
        raise ValueError(
            f"text encoder {config.data.text_encoder!r} gives {encoder.dim}-d features, the transformer's "
            f"context_dim is {transformer.context_dim}"
        )


def text_length(config: TrainRunConfig) -> int:
    _, transformer = model_configs(config)
    length = config.data.text_max_length or transformer.context_token
    if length != transformer.context_token:
        raise ValueError(f"data.text_max_length {length} must equal the transformer's context_token {transformer.context_token}")
    return length


def list_image_shards(config: TrainRunConfig) -> list[str]:
    from pipelines.config import InputConfig
    from pipelines.shard_source import list_shards

    if not config.data.shards:
        raise ValueError("the tokenizer stage needs data.shards (WebDataset tars: paths, globs or s3:// URIs)")
    return list_shards(InputConfig(shards=tuple(config.data.shards), endpoint_url=config.run.endpoint_url))


# --------------------------------------------------------------------------------------
# Datasets (driver side; consumed on the workers)
# --------------------------------------------------------------------------------------


def cache_dataset(config: TrainRunConfig, manifest: dict[str, Any]):
    """The cache as a streaming Dataset; each execution (data epoch) re-reads it in a new file order.

    Read through Ray Data's V1 parquet datasource: it reads the file footers once, here on the
    driver, and each epoch only runs the read tasks. The V2 datasource (Ray 2.60's default) plans
    every execution with a ListFiles task that lists and re-reads all footers first: measured
    1.5-3 s before the first batch of *every* epoch on 2 cores (a 0.1 s step waits for it),
    against 0.14-0.18 s with V1.
    """
    import ray.data

    from pipelines.cache import read_cache_dataset

    columns = CACHE_COLUMNS + (TEXT_COLUMNS if manifest.get("text_features_shape") else [])
    context = ray.data.DataContext.get_current()  # [ray] read_parquet picks the datasource at call time
    previous, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        return read_cache_dataset(
            config.data.cache, columns=columns, shuffle_seed=config.run.seed, endpoint_url=config.run.endpoint_url,
            override_num_blocks=config.data.read_parallelism if config.data.read_parallelism > 1 else None,
        )
    finally:
        context.use_datasource_v2 = previous


def image_dataset(config: TrainRunConfig, shards: list[str]):
    """Decoded, center-cropped images (uint8 R x R x 3) + captions of the accepted samples."""
    import ray

    from pipelines.config import InputConfig, PreprocessConfig
    from pipelines.decode import decode_batch
    from pipelines.shard_source import name_shards, read_shards_batch

    tokenizer_cfg, _ = model_configs(config)
    resolution = config.data.resolution or tokenizer_cfg.image_size()
    input_config = InputConfig(shards=tuple(shards), endpoint_url=config.run.endpoint_url)
    names = name_shards(shards)
    items = [{"name": name, "uri": uri} for name, uri in names.items()]
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    dataset = dataset.map_batches(read_shards_batch, batch_size=1, batch_format="pyarrow",
                                  fn_kwargs={"config": input_config})
    dataset = dataset.map_batches(decode_batch, batch_format="numpy", batch_size=64,
                                  fn_kwargs={"config": PreprocessConfig(resolution=resolution), "resolution": resolution})
    return dataset.map_batches(_accepted_images, batch_format="numpy")


def _accepted_images(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    keep = (batch["row_kind"] == "sample") & (batch["status"] == "ok")
    return {"image": batch["image"][keep], "caption": batch["caption"][keep]}


# --------------------------------------------------------------------------------------
# Worker side: numpy batch -> model inputs
# --------------------------------------------------------------------------------------


def images_collate(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """uint8 (B, R, R, 3) -> float (B, 3, R, R) in [-1, 1]."""
    images = torch.from_numpy(np.ascontiguousarray(batch["image"])).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    return {"images": images, "caption": [str(c) for c in batch["caption"]]}


# `iter_torch_batches(collate_fn=...)` takes these classes: Ray hands a NumpyBatchCollateFn numpy
# batches and an ArrowBatchCollateFn the pyarrow table itself (a plain function is deprecated).


class ImagesCollate(NumpyBatchCollateFn):
    """Image shard rows -> `images_collate`."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        return images_collate(batch)


class CacheCollate(ArrowBatchCollateFn):
    """Cache rows (a pyarrow table) -> tokens per scale, residual, text. `table_to_numpy` views the
    fixed-size columns' buffers; Ray's own numpy conversion would make a Python bytes object per
    value. Measured on the tiny cache, batch 16: 1.2-1.9 ms of CPU per batch either way, Ray's
    iteration included (the fp16 -> fp32 copies dominate the collate), so the point is the
    supported collate interface, not speed."""

    def __init__(self, manifest: dict[str, Any]):
        self.manifest = manifest

    def __call__(self, batch: pa.Table) -> dict[str, Any]:
        from pipelines.cache import batch_to_tensors, table_to_numpy

        return batch_to_tensors(table_to_numpy(batch), self.manifest)


class TextFeatures:
    """Context features for a batch: from the cache, or the frozen encoder on this worker."""

    def __init__(self, config: TrainRunConfig, manifest: dict[str, Any] | None, device: torch.device):
        self.device = device
        self.encoder = None
        if manifest is not None and not manifest.get("text_features_shape"):
            from hart.text_encoder import build_text_encoder

            self.encoder = build_text_encoder(config.data.text_encoder, text_length(config))
            if hasattr(self.encoder, "to"):
                self.encoder.to(device)
            if hasattr(self.encoder, "eval"):
                self.encoder.eval()

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        features, mask = self.encoder(list(prompts))
        return features.float().to(self.device), mask.to(self.device)

    def add_context(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Move a collated cache batch to the device and add `context` / `context_mask`."""
        out = {
            "tokens": [t.to(self.device, non_blocking=True) for t in batch["tokens"]],
            "residual": batch["residual"].to(self.device, non_blocking=True),
            "caption": batch["caption"],
        }
        if "text_features" in batch:
            out["context"] = batch["text_features"].to(self.device)
            out["context_mask"] = batch["text_mask"].to(self.device)
        else:
            out["context"], out["context_mask"] = self.encode(batch["caption"])
        return out


__all__ = [
    "check_cache", "check_text_encoder", "list_image_shards", "cache_dataset", "image_dataset",
    "images_collate", "ImagesCollate", "CacheCollate", "TextFeatures", "text_length",
]
