"""Training data: token caches and image shards as Ray Datasets, checks, and per-batch tensors.

Design:
- Transformer stages read the token cache written by `jobs.precompute` in the run's deterministic
  order, each rank its slice of every global batch (`pipelines.cache_stream`, driven by
  `trainer.batches`); `cache_columns` says which columns, `CacheCollate` turns a table into tensors.
- The tokenizer stage reads WebDataset shards with the precompute pipeline's own reader
  and decode/crop function (`pipelines.shard_source`, `pipelines.decode`), so training
  sees exactly the pixels the cache was made from.
- `check_cache` runs on the driver before any worker starts and turns every mismatch
  between the cache manifest and the run (scale list, vocabulary, latent width, tokenizer
  weights hash, text features) into one ValueError that names both sides.
- Online mode (`online.enabled`) streams `data.shards` through the precompute stages into the
  workers instead of reading a cache (`online_dataset`, `pipelines.online`): the same rows, the
  same collate, the same checks against the model (`check_rows_match_model`).
- Text conditioning comes from the cache (`text_features`) when it has it, else from a
  frozen text encoder built once per worker (`TextFeatures`).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.data import TaskPoolStrategy
from ray.data.collate_fn import ArrowBatchCollateFn, NumpyBatchCollateFn

from hart.pixels import to_model
from hart.scale_grid import compatibility_problems
from hart.text_encoder import build_text_encoder
from pipelines import storage
from pipelines.cache import batch_to_tensors, read_manifest, table_to_numpy
from pipelines.config import InputConfig, PrecomputeConfig, PreprocessConfig
from pipelines.decode import decode_batch
from pipelines.online import VISIT_COLUMNS, plan_visits, read_visits_batch, training_rows
from pipelines.plan import encoded_rows, prepare
from pipelines.shard_source import list_shards, name_shards, read_shards_batch
from pipelines.text_stage import PAD_FEATURES
from pipelines.writer_pool import ROUTE_CPUS
from trainer.config import TrainRunConfig
from trainer.plan import RunPlan
from trainer.resume import PROGRESS_FILE, latest_checkpoint

CACHE_COLUMNS = ["key", "caption", "tokens", "residual"]
TEXT_COLUMNS = ["text_features", "text_mask"]


# --------------------------------------------------------------------------------------
# Driver-side checks
# --------------------------------------------------------------------------------------


def check_cache(plan: RunPlan, tokenizer_hash: str | None) -> dict[str, Any]:
    """Read the manifest and validate it against the run's models; returns the manifest."""
    config = plan.config
    uri = config.data.cache
    if not uri:
        raise ValueError(f"stage {config.stage!r} needs data.cache (a token cache from jobs.precompute)")
    manifest = read_manifest(uri, config.run.endpoint_url)
    if not manifest.get("num_rows"):
        raise ValueError(f"token cache {uri} is empty: no committed rows (run jobs.precompute to completion first)")
    check_rows_match_model(plan, manifest, tokenizer_hash, f"token cache {uri}")
    return manifest


def check_rows_match_model(plan: RunPlan, manifest: dict[str, Any], tokenizer_hash: str | None,
                           source: str) -> None:
    """One ValueError naming every mismatch between the rows' manifest (a cache's, or the one online
    mode builds) and the run's model: scale list, vocabulary, latent width, tokenizer, text features."""
    config, transformer = plan.config, plan.transformer
    problems = compatibility_problems(transformer, cache=manifest)
    if tokenizer_hash is not None and manifest.get("tokenizer_hash") != tokenizer_hash:
        problems.append(
            f"tokenizer hash: cache {str(manifest.get('tokenizer_hash'))[:16]}..., model.tokenizer_checkpoint "
            f"{config.model.tokenizer_checkpoint} has {tokenizer_hash[:16]}..."
        )
    if config.stage in ("diffusion", "joint") and not manifest.get("residual_shape", True):
        problems.append(f"residual: the {config.stage} stage trains on the continuous residual, and these rows "
                        f"have none (precompute tokenizer.residual false); use the ar stage or a cache with it")
    text_shape = manifest.get("text_features_shape")
    if text_shape and tuple(text_shape) != (transformer.context_token, transformer.context_dim):
        problems.append(
            f"text features: cache (T, D) = {tuple(text_shape)}, model (context_token, context_dim) = "
            f"{(transformer.context_token, transformer.context_dim)}"
        )

    if text_shape and (manifest.get("text") or {}).get("pad_features") != PAD_FEATURES:
        # Older caches zeroed the padded text positions, which generation never does (the pads are
        # prefix tokens the model attends to): a model trained on them ignores the prompt.
        problems.append(f"text features: the cache zeroed its padded text positions (built before pad_features="
                        f"{PAD_FEATURES!r}); rebuild it with jobs.precompute")
    if problems:
        raise ValueError(f"{source} does not match the run config: " + "; ".join(problems))


def online_precompute_config(plan: RunPlan):
    """The precompute settings whose read -> decode -> tokenize stages online mode runs."""
    config = plan.config
    if not config.model.tokenizer_checkpoint:
        raise ValueError("online.enabled needs model.tokenizer_checkpoint: the frozen tokenizer that encodes the shards")
    return PrecomputeConfig(
        input=InputConfig(shards=tuple(config.data.shards), endpoint_url=config.run.endpoint_url),
        preprocess=config.online.preprocess,
        tokenizer=config.model.tokenizer_source(),
        compute=config.online.compute, progress=False, shared_filesystem=config.run.shared_filesystem,
    )


def prepare_online(plan: RunPlan) -> tuple[dict[str, Any], dict[str, Any]]:
    """Driver side of online mode: the manifest header a cache of these shards would carry (checked
    against the model like a cache's), and what the stream needs (tokenizer hash, row schema, resolution)."""
    setup = prepare(online_precompute_config(plan))
    check_rows_match_model(plan, setup["header"], setup["tokenizer_hash"], "online mode (data.shards through "
                           f"model.tokenizer_checkpoint {plan.config.model.tokenizer_checkpoint})")
    online = {"tokenizer_hash": setup["tokenizer_hash"], "schema": setup["schema"], "resolution": setup["resolution"]}
    return setup["header"], online


def check_text_encoder(plan: RunPlan) -> None:
    """When the rows have no text features, the worker-side encoder must produce the model's (T, D)."""
    if plan.manifest.get("text_features_shape"):
        return

    config, transformer = plan.config, plan.transformer
    encoder = build_text_encoder(config.data.text_encoder, text_length(plan))
    if int(encoder.dim) != transformer.context_dim:
        raise ValueError(
            f"text encoder {config.data.text_encoder!r} gives {encoder.dim}-d features, the transformer's "
            f"context_dim is {transformer.context_dim}"
        )


def text_length(plan: RunPlan) -> int:
    transformer = plan.transformer
    length = plan.config.data.text_max_length or transformer.context_token
    if length != transformer.context_token:
        raise ValueError(f"data.text_max_length {length} must equal the transformer's context_token {transformer.context_token}")
    return length


def run_text_encoder(plan: RunPlan):
    """The text encoder of a run's prompts: the one the cache's features came from (its manifest),
    else `data.text_encoder`, at the transformer's text length (generation, STAR's null condition)."""
    return build_text_encoder(text_encoder_name(plan), plan.transformer.context_token)


def text_encoder_name(plan: RunPlan) -> str:
    """The text encoder the run's text features come from: the cache's (manifest), else `data.text_encoder`."""
    return ((plan.manifest or {}).get("text") or {}).get("encoder") or plan.config.data.text_encoder


def list_image_shards(config: TrainRunConfig) -> list[str]:
    if not config.data.shards:
        needs = "online mode" if config.online.enabled else "the tokenizer stage"
        raise ValueError(f"{needs} needs data.shards (WebDataset tars: paths, globs or s3:// URIs)")
    return list_shards(InputConfig(shards=tuple(config.data.shards), endpoint_url=config.run.endpoint_url))


# --------------------------------------------------------------------------------------
# Datasets (driver side; consumed on the workers)
# --------------------------------------------------------------------------------------


def cache_columns(manifest: dict[str, Any]) -> list[str]:
    """The cache columns training reads: the residual when the cache has one, text features when present."""
    columns = [c for c in CACHE_COLUMNS if c != "residual" or manifest.get("residual_shape")]
    return columns + (TEXT_COLUMNS if manifest.get("text_features_shape") else [])


def online_dataset(plan: RunPlan):
    """Online mode: `online.epochs` passes over the shards through read -> decode -> tokenizer actors
    -> cache rows (`pipelines.online`), leaving out what the run's latest checkpoint consumed."""
    config, online = plan.config, plan.online
    precompute = online_precompute_config(plan)
    visits = plan_visits(name_shards(list(plan.shards)), config.online.epochs, config.run.seed)
    storage_uri = config.run.storage_path
    if not storage.is_s3(storage_uri):
        storage_uri = storage.resolve(storage_uri)[1]  # absolute: the read tasks run in other folders
    # run.ignore_data_position (testing only): a restored run streams everything again
    progress = None if config.run.ignore_data_position else \
        CheckpointProgress(storage_uri, config.run.name, config.run.endpoint_url)
    ds = encoded_rows(visits, precompute, online["resolution"], online["tokenizer_hash"], read=read_visits_batch,
                      read_kwargs={"progress": progress})
    pinned = {"resources": dict(precompute.compute.resources)} if precompute.compute.resources else {}
    return ds.map_batches(training_rows, fn_kwargs={"schema": online["schema"]}, batch_size=None, batch_format="numpy",
                          compute=TaskPoolStrategy(size=1), num_cpus=ROUTE_CPUS, **pinned)


_PROGRESS_CACHE: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}


class CheckpointProgress:
    """`progress` of the online read stage: what the run's latest checkpoint consumed (its
    `progress.json`: visits done, samples of the others), read where the task runs. One small read of
    Ray's checkpoint list per call; the progress file itself only when the latest checkpoint changed
    (cached per process)."""

    def __init__(self, storage_uri: str, run_name: str, endpoint_url: str):
        self.storage_uri, self.run_name, self.endpoint_url = storage_uri, run_name, endpoint_url

    def __call__(self) -> dict[str, Any]:
        fs, path = storage.resolve(self.storage_uri, self.endpoint_url)
        found = latest_checkpoint(fs, path, self.run_name)
        if found is None:
            return {}
        folder, _ = found
        key = (self.storage_uri, self.run_name)
        cached = _PROGRESS_CACHE.get(key)
        if cached is None or cached[0] != folder:
            progress_path = f"{folder}/{PROGRESS_FILE}"
            state = json.loads(storage.read_bytes(fs, progress_path)) if storage.exists(fs, progress_path) else {}
            cached = _PROGRESS_CACHE[key] = (folder, state)
        return cached[1]


def image_dataset(plan: RunPlan):
    """Decoded, center-cropped images (uint8 R x R x 3) + captions of the accepted samples."""
    config = plan.config
    resolution = config.data.resolution or plan.tokenizer.image_size()
    input_config = InputConfig(shards=plan.shards, endpoint_url=config.run.endpoint_url)
    names = name_shards(list(plan.shards))
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
    return {"images": to_model(batch["image"]), "caption": [str(c) for c in batch["caption"]]}


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
        columns = table_to_numpy(batch)
        out = batch_to_tensors(columns, self.manifest)
        if "visit" in columns:  # online rows: what the worker's VisitLedger counts
            out.update({name: columns[name].tolist() for name in VISIT_COLUMNS})
        return out


class TextFeatures:
    """Context features for a batch: from the cache, or the frozen encoder on this worker."""

    def __init__(self, plan: RunPlan, device: torch.device):
        self.device = device
        self.encoder = None
        if plan.manifest is not None and not plan.manifest.get("text_features_shape"):
            self.encoder = build_text_encoder(plan.config.data.text_encoder, text_length(plan))
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
            "caption": batch["caption"],
        }
        if "residual" in batch:  # absent in token-only caches (the ar stage does not read it)
            out["residual"] = batch["residual"].to(self.device, non_blocking=True)
        if "text_features" in batch:
            out["context"] = batch["text_features"].to(self.device)
            out["context_mask"] = batch["text_mask"].to(self.device)
        else:
            out["context"], out["context_mask"] = self.encode(batch["caption"])
        return out


__all__ = [
    "check_cache", "check_rows_match_model", "check_text_encoder", "list_image_shards", "cache_columns", "image_dataset",
    "online_dataset", "online_precompute_config", "prepare_online", "CheckpointProgress",
    "images_collate", "ImagesCollate", "CacheCollate", "TextFeatures", "text_length", "run_text_encoder", "text_encoder_name",
]
