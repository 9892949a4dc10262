"""demo/chain.py without running a step: each step's typed config is its recipe with the demo's values
(no command line in between), and a failed precompute shard fails the step by name."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

import demo.chain
from demo.chain import Services, precompute, precompute_config, stage_config
from demo.config import demo_tokenizer, demo_transformer, recipe
from pipelines.config import PrecomputeConfig
from trainer.config import TrainRunConfig


def services(root: str = "/data/demo", endpoint: str = "") -> Services:
    return Services(root=root, tracking_uri="sqlite:////data/mlflow.db", endpoint=endpoint,
                    artifact_location="/data/mlartifacts", mlflow_store=Path("/data/mlflow.db"), mlflow_artifacts=None)


def test_precompute_runs_on_a_typed_config_of_its_recipe_and_the_demo_paths():
    config = precompute_config(services("s3://hart-demo/demo", "http://127.0.0.1:9"), "s3://hart-demo/demo/cache/shapes",
                               Path("/w/export"), 24)
    assert isinstance(config, PrecomputeConfig)
    assert config.input.shards == ("s3://hart-demo/demo/shapes/shard-*.tar",)
    assert (config.input.endpoint_url, config.output) == ("http://127.0.0.1:9", "s3://hart-demo/demo/cache/shapes")
    assert (config.tokenizer.checkpoint, config.text.max_length) == ("/w/export/tokenizer", 24)
    recipe_values = recipe("precompute")
    assert config.text.encoder == recipe_values["text"]["encoder"]
    assert config.compute.tokenizer_cpus == recipe_values["compute"]["tokenizer_cpus"]


def test_training_stages_run_on_typed_configs_of_their_recipes():
    config = stage_config("joint", "demo-joint", services(), {"run.max_steps": 7, "model.transformer": demo_transformer()})
    assert isinstance(config, TrainRunConfig) and config.stage == "joint"
    assert (config.run.name, config.run.storage_path, config.run.max_steps) == ("demo-joint", "/data/demo/train", 7)
    assert config.tracking.tracking_uri == "sqlite:////data/mlflow.db"
    assert config.model.transformer == demo_transformer()
    hybrid = stage_config("tokenizer_hybrid", "demo-hybrid", services(), {"model.tokenizer": demo_tokenizer()})
    assert hybrid.model.tokenizer == demo_tokenizer() and hybrid.objective.tokenizer_mode == "hybrid"
    with pytest.raises(ValueError, match="run.max_steps"):  # a value of the wrong type is the config's error
        stage_config("joint", "demo-joint", services(), {"run.max_steps": "many"})


def test_a_failed_precompute_shard_fails_the_step_by_name(monkeypatch, capsys):
    summary = SimpleNamespace(table=lambda: "the table", shards_failed={"shard-00001": "bad tar", "shard-00000": "x"})
    monkeypatch.setattr(demo.chain, "run_precompute", lambda config: summary)
    with pytest.raises(RuntimeError, match="precompute: 2 shard\\(s\\) failed: shard-00000, shard-00001"):
        precompute(PrecomputeConfig())
    assert "the table" in capsys.readouterr().out
    summary.shards_failed = {}
    precompute(PrecomputeConfig())
