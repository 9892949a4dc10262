"""Online mode (`online.enabled`): shards -> decode -> tokenizer actors -> Ray Train workers, no cache.

- the streamed rows are the rows `jobs.precompute` writes for the same shards and tokenizer
  (same fingerprint, equal tokens, residuals and collated tensors);
- (slow) a joint run (2 DDP workers) whose worker is SIGKILLed after a checkpoint is restored by Ray
  Train, and its new stream leaves out what that checkpoint consumed, whole shards and rows of the
  others: its step ledger has no key twice in an epoch (`online_replayed_rows` stays 0); with the
  position ignored, the same trial fails that check;
- stages that do not fit beside the workers, and (slow) a stream too short for run.max_steps, fail clearly.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
import ray
from mlflow.tracking import MlflowClient

from trainer.resume import PROGRESS_FILE
from trainer.driver import run_training
from trainer.data import CacheCollate, list_image_shards, online_dataset, prepare_online
from pipelines.cache import read_cache_table, read_manifest
from pipelines.manifest import fingerprint_hash
from pipelines.shapes import write_shapes_shards
from tests.training_fixtures import tiny_config
from trainer.plan import RunPlan

ONLINE = ["online.enabled=true", "online.compute.tokenizer_cpus=0.5", "online.compute.decode_cpus=0.25",
          "tracking.sample_every=0", "run.export=false"]


def test_online_rows_are_the_cache_rows(train_assets, tmp_path):
    config = tiny_config(train_assets, "joint", tmp_path, *ONLINE)
    manifest, online = prepare_online(RunPlan.of(config))
    cache_manifest = read_manifest(train_assets["cache"])
    assert fingerprint_hash(manifest["fingerprint"]) == fingerprint_hash(cache_manifest["fingerprint"])
    dataset = online_dataset(RunPlan.of(config, manifest=manifest, online=online, shards=tuple(list_image_shards(config))))
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


@pytest.mark.slow  # `make chaos`: a kill and a restore per variant (the ledger's bookkeeping is unit-tested in make test)
@pytest.mark.parametrize("position", ["restored", "ignored"])
def test_online_worker_sigkill_resumes_row_exactly(train_assets, tmp_path, position):
    """2 DDP workers, 5 shards of 9-10 samples, global batch 16 (3 steps an epoch), 3 epochs streamed, 6 steps.
    A worker is SIGKILLed once the step-2 checkpoint (mid epoch 0, shards consumed in part) is
    registered; Ray Train restores the group, whose stream leaves out what the checkpoint consumed. The
    step ledger must hold no key twice in a data epoch; `run.ignore_data_position` (the stream starts
    over) is the negative control that must fail it."""
    from trainer.batches import audit_online_ledger, read_ledger
    from tests.faults.accounting import input_keys
    from tests.faults.test_train_faults import kill_a_worker_once_registered

    # 9-10 samples a shard: the ranks' 16-row slices end inside shards, so the checkpoint has shards consumed in part
    uris = write_shapes_shards(str(tmp_path / "shards"), num_samples=48, num_shards=5)
    config = tiny_config(  # 2 DDP workers: a visit's rows are split between them, the ranks' records are joined
        train_assets, "joint", tmp_path, *ONLINE, f"data.shards=['{tmp_path}/shards/*.tar']", "online.epochs=3",
        "scaling.num_workers=2", "scaling.cpus_per_worker=0.4", "data.ledger=true", f"run.name=online-{position}",
        "run.max_steps=6", "run.checkpoint_every=2", "run.max_failures=1", "run.num_to_keep=5",
        f"run.ignore_data_position={'true' if position == 'ignored' else 'false'}",
    )
    storage, record = tmp_path / "storage", {}
    thread = kill_a_worker_once_registered(storage, config.run.name, "checkpoint_step00000002", record, which=-1)
    outcome = run_training(config)
    thread.join()
    assert "pid" in record and outcome["final_step"] == 6
    run_dir = storage / config.run.name
    progress = json.loads((run_dir / "checkpoint_step00000002" / PROGRESS_FILE).read_text())
    assert progress["partial"], "the kill proved nothing: no shard was consumed in part at the checkpoint"
    keys = [k for shard in input_keys(uris).values() for k in shard]
    audit = audit_online_ledger(read_ledger(outcome["checkpoint_path"]), keys)
    client = MlflowClient(tracking_uri=config.tracking.tracking_uri)
    replayed = [m.value for m in client.get_metric_history(outcome["run_id"], "online_replayed_rows")]
    print(f"online, worker SIGKILL after the step-2 checkpoint ({len(progress['partial'])} shards consumed in part), "
          f"position {position}: rows per epoch {audit['epochs']}, complete epochs {audit['complete']}, "
          f"replayed rows {replayed}, problems {audit['problems'] or 'none'}")
    if position == "restored":
        assert not audit["problems"] and set(replayed) == {0.0}
        assert "0" in audit["complete"]  # 96 rows trained: epoch 0 whole
    else:
        assert any("twice" in p for p in audit["problems"])


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
