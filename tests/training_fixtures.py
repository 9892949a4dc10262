"""Training fixtures shared by tests/jobs and tests/faults (imported once by tests/conftest.py).

- `train_assets` (session): a seeded tiny tokenizer saved as a HART `tokenizer/` folder, a
  48-sample shapes corpus in 2 WebDataset shards, and a token cache made from them by the
  real precompute pipeline (`pipelines.plan.run_precompute`, no text features: the training
  worker then runs the embedded MiniLM text encoder itself).
- `mlflow_server`: a real `mlflow server` process on 127.0.0.1 (sqlite backend), started for
  the test and stopped after it.
- `tiny_config(...)`: a TrainRunConfig for the tiny presets on those assets.
- `write_tiny_cache(...)`: a token cache of a 2-scale grid (5 tokens, residual (2, 2, 2)) written by
  the cache's own header and shard writers, without Ray or a tokenizer, in well under a second;
  returns the rows it committed, for readers' tests to compare against.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hart.config import tokenizer_config
from trainer.config import TrainRunConfig, load_train_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def train_assets(tmp_path_factory, ray_local):
    from hart.tokenizer.model import HybridTokenizer
    from pipelines.config import load_precompute_config
    from pipelines.plan import run_precompute
    from pipelines.shapes import write_shapes_shards

    root = tmp_path_factory.mktemp("train_assets")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        HybridTokenizer(tokenizer_config("tiny")).save_pretrained(root / "tokenizer")
    write_shapes_shards(str(root / "shards"), num_samples=48, num_shards=2)
    precompute = load_precompute_config(None, [
        f"input.shards=['{root}/shards/*.tar']", f"output={root}/cache", f"tokenizer.checkpoint={root}/tokenizer",
        "progress=false", "compute.tokenizer_cpus=0.5",
        # a test's Ray may be a multi-node `ray_cluster` by the time this session fixture is first
        # needed (tests/faults/test_node_loss.py); its nodes all run on this machine, sharing its disk
        "shared_filesystem=true",
    ])
    summary = run_precompute(precompute, log=lambda *a: None)
    assert summary.samples_written == 48
    return {"root": root, "tokenizer": str(root / "tokenizer"), "shards": str(root / "shards" / "*.tar"),
            "cache": str(root / "cache")}


def save_tiny_qwen(folder: Path) -> str:
    """A random 2-layer Qwen2 and a byte-level BPE tokenizer trained on two sentences: no downloads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(["a red cat on a blue dog", "given a user prompt generate an enhanced prompt"] * 10, trainer)
    PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|endoftext|>", eos_token="<|endoftext|>").save_pretrained(folder)
    config = Qwen2Config(
        vocab_size=bpe.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    return str(folder)


def tiny_config(assets: dict, stage: str, tmp_path: Path, *overrides: str) -> TrainRunConfig:
    """Tiny presets, fp32, 1 worker with half a CPU, MLflow in a sqlite file under tmp_path."""
    base = [
        f"run.storage_path={tmp_path / 'storage'}", "run.max_steps=4", "run.checkpoint_every=2", "run.log_every=1",
        f"model.tokenizer_checkpoint={assets['tokenizer']}", f"data.cache={assets['cache']}",
        f"data.shards=['{assets['shards']}']", "data.batch_size=8", "optim.lr=0.002", "optim.warmup_steps=0",
        "optim.schedule=constant", "ema_decay=0.9", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"run.name=test-{stage}", "tracking.sample_prompts=['a red circle', 'a blue square']",
    ]
    return load_train_config(str(REPO / "jobs/configs/train_tiny.yaml"), stage, base + list(overrides))


TINY_CACHE_PATCH_NUMS = (1, 2)  # 5 tokens; residual (z, 2, 2)
TINY_CACHE_Z = 2


def write_tiny_cache(root: str, rows_per_shard: dict[str, int], text_shape: tuple[int, int] | None = None,
                     keys: dict[str, list[str]] | None = None, seed: int = 0) -> dict[str, dict]:
    """A token cache under `root` with the given shards and row counts (keys `<shard>-<i>` unless
    `keys` names them), committed by `pipelines.writer.ShardWriter` after `manifest.json`. Returns, per
    shard, the committed columns (tokens (N, 5) int16, residual (N, 2, 2, 2) float16, key, caption,
    and text_features / text_mask with `text_shape`)."""
    import numpy as np

    from pipelines import manifest as manifest_lib
    from pipelines.text_stage import PAD_FEATURES
    from pipelines.writer import ShardWriter, cache_schema

    text = ({"encoder": "minilm", "max_length": text_shape[0], "dim": text_shape[1], "pad_features": PAD_FEATURES}
            if text_shape else None)
    fingerprint = {"schema_version": manifest_lib.SCHEMA_VERSION, "tokenizer_hash": "0" * 64,
                   "tokenizer_config": {"patch_nums": list(TINY_CACHE_PATCH_NUMS), "z_channels": TINY_CACHE_Z,
                                        "vocab_size": 64},
                   "resolution": 32, "preprocess": {}, "text": text}
    header = manifest_lib.manifest_header(fingerprint, {}, text_shape[1] if text_shape else 0)
    manifest_lib.write_json(root, manifest_lib.MANIFEST_NAME, header)
    residual_shape = (TINY_CACHE_Z, 2, 2)
    writer = ShardWriter(root, "", header["fingerprint_hash"], cache_schema(5, residual_shape, text_shape),
                         {shard: f"/raw/{shard}.tar" for shard in rows_per_shard})
    rng = np.random.default_rng(seed)
    written = {}
    for number, (shard, n) in enumerate(rows_per_shard.items()):
        columns = {
            "row_kind": np.array(["sample"] * n, dtype=object), "source_shard": np.array([shard] * n, dtype=object),
            "sample_index": np.arange(n, dtype=np.int64), "status": np.array(["ok"] * n, dtype=object),
            "notes": np.array([""] * n, dtype=object),
            "key": np.array((keys or {}).get(shard) or [f"{shard}-{i}" for i in range(n)], dtype=object),
            "caption": np.array([f"caption {shard} {i}" for i in range(n)], dtype=object),
            "metadata": np.array([""] * n, dtype=object),
            "width": np.full(n, 32, np.int32), "height": np.full(n, 32, np.int32),
            "tokens": (np.arange(5, dtype=np.int16)[None] + 5 * np.arange(n, dtype=np.int16)[:, None] + 20 * number) % 64,
            "residual": rng.standard_normal((n, *residual_shape)).astype(np.float16),
        }
        if text_shape:
            columns["text_features"] = rng.standard_normal((n, *text_shape)).astype(np.float16)
            columns["text_mask"] = np.arange(text_shape[0])[None] < rng.integers(1, text_shape[0] + 1, (n, 1))
        info = {"error": "", "truncated": "", "num_samples": n, "source_uri": f"/raw/{shard}.tar"}
        writer.submit(shard, info, columns, 0.0)
        written[shard] = columns
    committed = writer.collect(wait=True)
    writer.close()
    assert sorted(committed) == sorted(rows_per_shard), writer.failed
    return written


@pytest.fixture
def mlflow_server(tmp_path):
    from trainer.local_services import mlflow_server

    with mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "mlflow-server.log",
                      ("--default-artifact-root", str(tmp_path / "server-artifacts"))) as uri:
        yield uri
