"""The trained model as an MLflow pyfunc model: prompts (+ seed, cfg) -> PNG images, hart-generate's images.

Design: MLflow logs this file as the model's code ("models from code", MLflow 3's way for custom
models: nothing is pickled) with the export's folders as its artifacts, kept in the released layout:
`artifacts/llm/` + `artifacts/tokenizer/` for HART (the official code loads them), `artifacts/star/` +
`artifacts/tokenizer/` for STAR (`tracking.log_served_model` logs it). Loading (`load_context`) makes
a `trainer.generation.GenerationConfig` of the model's folder and its `model_config` and loads it
with `Generator.load`, the same code as hart-generate's `--export`; `predict` runs `Generator.generate`,
so a prediction is the PNG file hart-generate writes for the same prompts, seed and cfg, byte for byte.

`model_config` (set at log time, each key overridable when loading): `text_encoder` is the text
encoder by reference, never copied into the model (HART's Qwen2 is larger than the transformer):
`minilm` (the embedded package), a local folder (a causal LM such as Qwen2-VL-1.5B-Instruct for
HART, an SD-2.1 folder for STAR), or an MLflow artifact URI (`runs:/...`, `models:/...`,
`mlflow-artifacts:/...`, `s3://...`) that is downloaded from the tracking server's store at load.
`protocol` and `overrides` are hart-generate's `--protocol` and `--set`; `device` its `--device`.
A deployment supplies its own path with `mlflow.pyfunc.load_model(uri, model_config={...})` or, for
`mlflow models serve`, MLflow's `MLFLOW_PYFUNC_INFERENCE_CONFIG='{"text_encoder": "/models/qwen2"}'`.

Input: a DataFrame with a `prompt` column (string) and optional `seed` (integer) and `cfg` (float)
columns, checked by MLflow against the signature first (so `cfg` is written 3.0, not 3, and a `seed`
column has a value on every row); an absent column (or a NaN cfg) means the protocol's. Output: one row per input row, column `image`, the PNG
bytes (base64 in a served JSON answer). Seeds are per request, as in hart-generate: the rows that share
a (seed, cfg) pair, in row order, are one hart-generate call with `--set seed=S --set cfg=C`, so
group g of the protocol's batch_size rows samples with seed S + g, and a row's image depends on the
rows batched with it (as a prompt's image does in a prompt list). A protocol that makes several
images per prompt is refused at load: repeat a row instead (k consecutive copies of a prompt are
exactly `images_per_prompt=k`). Weights (EMA or raw) are the protocol's, chosen at load.

This module imports mlflow at the top; only the model's loader and tests import it (never a Ray
worker), and `trainer.tracking` names it by path.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from pipelines.eval_protocol import EvalPrompt, protocol_with
from trainer.generation import GenerationConfig, Generator

# Artifact URIs a text-encoder reference may be, downloaded from the tracking server's artifact store.
ARTIFACT_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/", "s3://")
OUTPUT_COLUMN = "image"


def served_settings(model_config: dict[str, Any], folder: str | Path) -> GenerationConfig:
    """The generation config of a served model: its folder as the export, its `model_config` as the
    text encoder (an artifact URI downloaded here), protocol, overrides and device. ValueError naming
    the setting to fix (before any weight is loaded)."""
    config = dict(model_config or {})
    unknown = set(config) - {"text_encoder", "protocol", "overrides", "device"}
    if unknown:
        raise ValueError(f"model_config: unknown key(s) {sorted(unknown)}; expected text_encoder, protocol, "
                         f"overrides, device")
    text_encoder = str(config.get("text_encoder") or "minilm")
    if text_encoder.startswith(ARTIFACT_SCHEMES):
        # a folder the loaded model reads from for as long as it lives (the process)
        text_encoder = mlflow.artifacts.download_artifacts(text_encoder, dst_path=tempfile.mkdtemp(prefix="text-encoder-"))
    elif text_encoder != "minilm" and not os.path.isdir(text_encoder):
        raise ValueError(f"text encoder {text_encoder}: no such folder here; supply it with load_model(uri, "
                         f"model_config={{'text_encoder': PATH}}) or, for `mlflow models serve`, "
                         f"MLFLOW_PYFUNC_INFERENCE_CONFIG='{{\"text_encoder\": \"PATH\"}}' (a local folder, 'minilm', or "
                         f"an MLflow artifact URI)")
    settings = GenerationConfig(output="", export=str(folder), text_encoder=text_encoder,
                                protocol=str(config.get("protocol") or GenerationConfig.protocol),
                                overrides=tuple(config.get("overrides") or ()), device=str(config.get("device") or ""))
    images_per_prompt = protocol_with(settings.protocol, settings.overrides).images_per_prompt
    if images_per_prompt != 1:
        raise ValueError(f"protocol {settings.protocol} makes {images_per_prompt} images per prompt; the served model "
                         f"makes one per row: set overrides ['images_per_prompt=1'] and repeat rows")
    return settings


def request_batches(model_input: pd.DataFrame) -> list[tuple[dict[str, Any], list[int]]]:
    """A request's rows as hart-generate calls: [({"seed": S, "cfg": C} (None: the protocol's), row
    numbers in order)], one per (seed, cfg) pair, in the order of first appearance. ValueError on a
    missing prompt column, an empty or non-text prompt, a seed that is not a whole number >= 0, a cfg
    that is not a finite number."""
    if not isinstance(model_input, pd.DataFrame) or "prompt" not in model_input.columns:
        columns = list(model_input.columns) if isinstance(model_input, pd.DataFrame) else type(model_input).__name__
        raise ValueError(f"expected a table with a 'prompt' column (and optional 'seed', 'cfg'), got {columns}")
    batches: dict[tuple, list[int]] = {}
    for number, row in enumerate(model_input.to_dict("records")):
        prompt = row["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"row {number}: prompt must be a non-empty string, got {prompt!r}")
        seed, cfg = (None if _missing(row.get(key)) else row[key] for key in ("seed", "cfg"))
        if seed is not None and (isinstance(seed, bool) or float(seed) != int(seed) or int(seed) < 0):
            raise ValueError(f"row {number}: seed must be a whole number >= 0, got {seed!r}")
        if cfg is not None and (isinstance(cfg, bool) or not math.isfinite(float(cfg))):
            raise ValueError(f"row {number}: cfg must be a finite number, got {cfg!r}")
        key = (None if seed is None else int(seed), None if cfg is None else float(cfg))
        batches.setdefault(key, []).append(number)
    if not batches:
        raise ValueError("no rows: give at least one prompt")
    return [({"seed": seed, "cfg": cfg}, rows) for (seed, cfg), rows in batches.items()]


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


class ServedGenerator(mlflow.pyfunc.PythonModel):
    """The pyfunc model: `load_context` loads the export's generator once, `predict` makes the images."""

    def load_context(self, context) -> None:
        folder = Path(context.artifacts["tokenizer"]).parent  # artifacts/: tokenizer/ + llm/ or star/
        self.generator = Generator.load(served_settings(context.model_config, folder))

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        batches = request_batches(model_input)  # checked before any image is made
        prompts = model_input["prompt"].tolist()
        images: list[bytes | None] = [None] * len(prompts)
        for changes, rows in batches:
            protocol = dataclasses.replace(self.generator.protocol,
                                           **{k: v for k, v in changes.items() if v is not None})
            # ids as hart-generate gives them (000000, ...): they name files there and only label rows here
            batch = [EvalPrompt(f"{n:06d}", prompts[row]) for n, row in enumerate(rows)]
            for row, image in zip(rows, self.generator.generate(batch, protocol), strict=True):
                images[row] = image["png"]
        return pd.DataFrame({OUTPUT_COLUMN: images})


mlflow.models.set_model(ServedGenerator())
