"""Bad input is refused on the driver, before any Ray worker starts (`trainer.driver.preflight`).

Run: .venv/bin/pytest tests/jobs/test_train_preflight.py -q
"""

from __future__ import annotations

import json
import shutil
import socket

import pytest
import torch

from hart.config import tokenizer_config
from hart.tokenizer.model import HybridTokenizer
from trainer.driver import preflight
from trainer.config import load_train_config
from tests.training_fixtures import tiny_config


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_preflight_accepts_matching_cache(train_assets, tmp_path):
    plan = preflight(tiny_config(train_assets, "ar", tmp_path))
    assert plan.manifest["num_rows"] == 48 and plan.run_id and plan.resume_step is None


@pytest.mark.parametrize("override,message", [
    ("model.tokenizer={preset: tiny, patch_nums: [1, 2, 4, 8]}", r"patch_nums: cache \(1, 2, 3, 4, 6, 8\), transformer \(1, 2, 4, 8\)"),
    ("model.transformer={preset: tiny, vocab_size: 512}", "vocab"),
])
def test_manifest_mismatch(train_assets, tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        preflight(tiny_config(train_assets, "joint", tmp_path, override))


def test_a_cache_at_another_scale_list_trains_with_that_list(train_assets, tmp_path):
    """Precompute's `tokenizer.config` with another scale list (same weights: progressive training)
    makes a cache that training takes when `model.tokenizer` names the same list; the transformer
    follows the tokenizer's list."""
    from pipelines.config import load_precompute_config
    from pipelines.plan import run_precompute

    cache = tmp_path / "cache-1248"
    run_precompute(load_precompute_config(None, [
        f"input.shards=['{train_assets['shards']}']", f"output={cache}", f"tokenizer.checkpoint={train_assets['tokenizer']}",
        "tokenizer.config={preset: tiny, patch_nums: [1, 2, 4, 8]}", "progress=false", "compute.tokenizer_cpus=0.5"]), log=lambda *a: None)
    config = tiny_config(train_assets, "joint", tmp_path, f"data.cache={cache}",
                         "model.tokenizer={preset: tiny, patch_nums: [1, 2, 4, 8]}")
    plan = preflight(config)
    assert plan.manifest["patch_nums"] == [1, 2, 4, 8] and plan.manifest["num_rows"] == 48
    with pytest.raises(ValueError, match=r"patch_nums: cache \(1, 2, 4, 8\), transformer \(1, 2, 3, 4, 6, 8\)"):
        preflight(tiny_config(train_assets, "joint", tmp_path, f"data.cache={cache}"))


def test_other_tokenizer_weights_are_refused(train_assets, tmp_path):
    torch.manual_seed(1)
    HybridTokenizer(tokenizer_config("tiny")).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="tokenizer hash"):
        preflight(tiny_config(train_assets, "ar", tmp_path, f"model.tokenizer_checkpoint={tmp_path / 'other'}"))


def test_missing_and_empty_cache(train_assets, tmp_path):
    with pytest.raises(ValueError, match="not a token cache"):
        preflight(tiny_config(train_assets, "ar", tmp_path, f"data.cache={tmp_path / 'nowhere'}"))
    empty = tmp_path / "empty"  # a cache root as a run leaves it before its first commit: the header only
    empty.mkdir()
    shutil.copy(train_assets["root"] / "cache" / "manifest.json", empty / "manifest.json")
    with pytest.raises(ValueError, match="empty"):
        preflight(tiny_config(train_assets, "ar", tmp_path, f"data.cache={empty}"))


def test_cache_with_zeroed_text_pads_is_refused(train_assets, tmp_path):
    """Caches from before `pad_features` zeroed the padded text positions: training on them would
    teach the model other inputs than generation gives it."""
    old = tmp_path / "old"
    shutil.copytree(train_assets["root"] / "cache", old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest.update(text={"encoder": "minilm", "max_length": 16, "dim": 384}, text_features_shape=[16, 384])
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="zeroed its padded text positions"):
        preflight(tiny_config(train_assets, "ar", tmp_path, f"data.cache={old}"))


def test_unreachable_mlflow_server(train_assets, tmp_path):
    with pytest.raises(ValueError, match="unreachable"):
        preflight(tiny_config(train_assets, "ar", tmp_path, f"tracking.tracking_uri=http://127.0.0.1:{closed_port()}"))


def test_missing_bucket_and_unreachable_s3(train_assets, s3_endpoint, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        preflight(tiny_config(train_assets, "ar", tmp_path, "run.storage_path=s3://no-such-bucket/train",
                              f"run.endpoint_url={s3_endpoint}"))
    with pytest.raises(ValueError, match=r"run.storage_path=s3://bucket/train: the S3 endpoint 127.0.0.1:\d+ does not "
                                         r"answer .*check run.endpoint_url"):
        preflight(tiny_config(train_assets, "ar", tmp_path, "run.storage_path=s3://bucket/train",
                              f"run.endpoint_url=http://127.0.0.1:{closed_port()}"))


def test_every_named_input_is_checked_before_the_mlflow_run(train_assets, s3_endpoint, tmp_path):
    """A missing start checkpoint, tokenizer or cache bucket is one ValueError naming the setting, raised
    before the MLflow run exists (no FAILED run, no store file), not a worker's traceback after it."""
    cases = {"model.init_from": f"model.init_from={tmp_path / 'no-such-llm'}",
             "model.tokenizer_checkpoint": f"model.tokenizer_checkpoint={tmp_path / 'no-tokenizer'}",
             "data.cache": "data.cache=s3://no-such-bucket/cache"}
    for setting, override in cases.items():
        config = tiny_config(train_assets, "joint", tmp_path, override, f"run.endpoint_url={s3_endpoint}")
        with pytest.raises(ValueError, match=rf"^{setting}=\S+: (not found|bucket 'no-such-bucket' does not exist)"):
            preflight(config)
        assert not (tmp_path / "mlflow.db").exists(), setting
    preflight(tiny_config(train_assets, "tokenizer", tmp_path))  # the tokenizer stage starts from the tokenizer
    assert (tmp_path / "mlflow.db").exists()


def test_eval_prompts_are_checked_at_submission(tmp_path):
    from trainer.driver import check_eval_prompts

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a white background\na photo of a cat\n")
    config = load_train_config(None, "joint", ["eval.every_steps=10", f"eval.prompts={prompts}"])
    with pytest.raises(ValueError, match="not a shapes prompt.*a photo of a cat"):
        check_eval_prompts(config)
    check_eval_prompts(load_train_config(None, "joint", ["eval.every_steps=10", f"eval.prompts={prompts}",
                                                         "eval.metrics=[clip]", "eval.clip=/clip"]))


def test_tokenizer_stage_needs_shards(tmp_path):
    config = load_train_config(None, "tokenizer", [f"run.storage_path={tmp_path}", "data.shards=[]"])
    with pytest.raises(ValueError, match="data.shards"):
        preflight(config)


def test_paths_one_machine_sees_are_refused_on_a_cluster(train_assets, tmp_path):
    from trainer.driver import check_cluster_paths

    remote = ["run.storage_path=s3://b/train", "data.cache=s3://b/cache", "model.tokenizer_checkpoint=s3://b/tokenizer",
              "tracking.tracking_uri=http://mlflow:5000"]
    check_cluster_paths(tiny_config(train_assets, "joint", tmp_path, *remote), num_nodes=3)  # all reachable
    check_cluster_paths(tiny_config(train_assets, "joint", tmp_path), num_nodes=1)  # one node: anything goes
    cases = {"run.storage_path": f"run.storage_path={tmp_path / 'train'}", "data.cache": f"data.cache={tmp_path}/cache",
             "model.tokenizer_checkpoint": f"model.tokenizer_checkpoint={tmp_path}/tok",
             "model.init_from": f"model.init_from={tmp_path}/llm", "data.text_encoder": f"data.text_encoder={tmp_path}/qwen",
             "tracking.tracking_uri": f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"}
    for name, override in cases.items():
        with pytest.raises(ValueError, match=rf"{name}=.* is a local path, but this Ray cluster has 3 nodes"):
            check_cluster_paths(tiny_config(train_assets, "joint", tmp_path, *remote, override), num_nodes=3)
    check_cluster_paths(tiny_config(train_assets, "joint", tmp_path, *remote, f"data.cache={tmp_path}/cache",
                                    "run.shared_filesystem=true"), num_nodes=3)  # declared shared
    with pytest.raises(ValueError, match="relative path"):
        check_cluster_paths(tiny_config(train_assets, "joint", tmp_path, *remote, "run.storage_path=runs/train",
                                        "run.shared_filesystem=true"), num_nodes=3)
    # shards matter to the tokenizer stage and online mode only; the built-in text encoder name is not a path
    check_cluster_paths(tiny_config(train_assets, "joint", tmp_path, *remote, "data.text_encoder=minilm"), num_nodes=3)
    with pytest.raises(ValueError, match=r"data.shards\[0\]="):
        check_cluster_paths(tiny_config(train_assets, "tokenizer", tmp_path, *remote), num_nodes=3)
    with pytest.raises(ValueError, match=r"data.shards\[0\]="):
        check_cluster_paths(tiny_config(train_assets, "joint", tmp_path, *remote, "online.enabled=true"), num_nodes=3)
    check_cluster_paths(tiny_config(train_assets, "joint", tmp_path, *remote, "online.enabled=true", "data.cache=''",
                                    "data.shards=['s3://b/raw/{0..9}.tar']"), num_nodes=3)
