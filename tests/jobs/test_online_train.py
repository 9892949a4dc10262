"""Online mode (`online.enabled`): shards -> decode -> tokenizer actors -> Ray Train workers, no cache.

- the streamed rows are the rows `jobs.precompute` writes for the same shards and tokenizer
  (same fingerprint, equal tokens, residuals and collated tensors);
- a joint run (2 DDP workers) that dies after a checkpoint is restarted by Ray Train, and its new stream
  skips the visits (epoch, shard) that checkpoint had consumed whole: no row of them is trained on
  again (`online_replayed_rows` stays 0; it counts rows of done visits reaching a worker);
- stages that do not fit beside the workers, and (slow) a stream too short for run.max_steps, fail clearly.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
import ray
from mlflow.tracking import MlflowClient

from jobs.resume import PROGRESS_FILE
from jobs.train import run_training
from jobs.train_data import CacheCollate, list_image_shards, online_dataset, prepare_online
from pipelines.cache import read_cache_table, read_manifest
from pipelines.manifest import fingerprint_hash
from pipelines.shapes import write_shapes_shards
from tests.training_fixtures import tiny_config

ONLINE = ["online.enabled=true", "online.compute.tokenizer_cpus=0.5", "online.compute.decode_cpus=0.25",
          "tracking.sample_every=0", "run.export=false"]


def test_online_rows_are_the_cache_rows(train_assets, tmp_path):
    config = tiny_config(train_assets, "joint", tmp_path, *ONLINE)
    manifest, online = prepare_online(config)
    cache_manifest = read_manifest(train_assets["cache"])
    assert fingerprint_hash(manifest["fingerprint"]) == fingerprint_hash(cache_manifest["fingerprint"])
    dataset = online_dataset(config, list_image_shards(config), online)
    streamed = pa.concat_tables([ray.get(ref) for ref in dataset.to_arrow_refs()])
    cached = read_cache_table(train_assets["cache"])
    order = [("source_shard", "ascending"), ("sample_index", "ascending")]
    streamed, cached = streamed.sort_by(order), cached.sort_by(order)
    assert streamed.num_rows == cached.num_rows == 48
    for name in ("key", "caption", "tokens", "residual", "width", "height"):
        assert streamed.column(name).equals(cached.column(name)), name
    collate = CacheCollate(manifest)
    online_batch, cache_batch = collate(streamed.slice(0, 8)), collate(cached.slice(0, 8))
    assert all((a == b).all() for a, b in zip(online_batch["tokens"], cache_batch["tokens"]))
    assert (online_batch["residual"] == cache_batch["residual"]).all()
    assert online_batch["visit"] == [f"0:{shard}" for shard in streamed.column("source_shard").to_pylist()[:8]]


@pytest.mark.slow  # `make chaos`: two runs and a restart (the ledger's bookkeeping is unit-tested in make test)
def test_online_joint_run_restarts_without_replaying_consumed_shards(train_assets, tmp_path):
    write_shapes_shards(str(tmp_path / "shards"), num_samples=48, num_shards=6)  # 8 samples a shard
    config = tiny_config(  # 2 DDP workers: a visit's rows are split between them, the ranks' counts are summed
        train_assets, "joint", tmp_path, *ONLINE, f"data.shards=['{tmp_path}/shards/*.tar']", "online.epochs=3",
        "scaling.num_workers=2", "scaling.cpus_per_worker=0.4",
        "run.max_steps=6", "run.checkpoint_every=2", "run.fail_at_step=3", "run.max_failures=1", "run.num_to_keep=5",
    )
    outcome = run_training(config)  # the workers die at step 3; Ray Train restarts them from step 2
    assert outcome["final_step"] == 6
    run_dir = tmp_path / "storage" / config.run.name

    def done(step: int) -> set[str]:
        return set(json.loads((run_dir / f"checkpoint_step{step:08d}" / PROGRESS_FILE).read_text())["done"])

    assert done(2), "the restart had nothing to skip: no visit was consumed whole by step 2"
    client = MlflowClient(tracking_uri=config.tracking.tracking_uri)
    history = {k: [m.value for m in client.get_metric_history(outcome["run_id"], k)]
               for k in ("online_replayed_rows", "online_visits_done", "data_wait_share")}
    assert history["online_replayed_rows"] and set(history["online_replayed_rows"]) == {0.0}
    assert done(2) <= done(4) <= done(6) and len(done(6)) >= 6  # 96 rows trained on, 8 a visit
    assert history["online_visits_done"][-1] == len(done(6))
    assert all(0.0 <= share <= 1.0 for share in history["data_wait_share"])


def test_online_stages_that_do_not_fit_and_the_tokenizer_stage_are_refused(train_assets, tmp_path):
    crowded = tiny_config(train_assets, "joint", tmp_path, *ONLINE, "online.compute.tokenizer_cpus=1.5",
                          "run.name=crowded")
    with pytest.raises(ValueError, match="the Ray Train workers"):
        run_training(crowded)
    with pytest.raises(ValueError, match="online.enabled streams tokens to a transformer stage"):
        tiny_config(train_assets, "tokenizer", tmp_path, *ONLINE)


@pytest.mark.slow
def test_online_stream_too_short_fails_clearly(train_assets, tmp_path):
    short = tiny_config(train_assets, "joint", tmp_path, *ONLINE, "run.max_steps=12", "run.checkpoint_every=12",
                        "run.name=short")
    with pytest.raises(RuntimeError, match=r"online stream \(1 passes over data.shards\) ended at step 6"):
        run_training(short)  # 48 samples, batch 8: 6 steps
