"""trainer/batches.py without Ray: the global batch and its micro-batches at any world size, the
position a checkpoint records, the elastic config checks, and the step ledger's audit."""

from __future__ import annotations

import pytest

from trainer.config import load_train_config
from trainer.batches import (
    StepLedger, audit_ledger, audit_online_ledger, cache_order, cache_steps, global_batch, micro_batches_per_step,
    position_meta, restored_position,
)
from trainer.data import CacheCollate
from pipelines.cache import read_manifest
from tests.training_fixtures import write_tiny_cache


def test_the_global_batch_is_fixed_by_the_largest_world_and_split_by_the_present_one():
    config = load_train_config(None, "joint", ["scaling.num_workers=[1, 4]", "data.batch_size=4", "data.grad_accumulation=2"])
    assert config.scaling.elastic and (config.scaling.min_workers, config.scaling.max_workers) == (1, 4)
    assert global_batch(config) == 32
    assert [micro_batches_per_step(config, w) for w in (1, 2, 3, 4)] == [8, 4, 3, 2]  # 3 workers: slices of 10-11 rows
    with pytest.raises(ValueError, match=r"needs 1 <= min <= max"):
        load_train_config(None, "joint", ["scaling.num_workers=[3, 2]"])
    # Ray Data's split (tokenizer stage, online mode) needs a batch that divides at every size
    with pytest.raises(ValueError, match=r"it does not for \[3\]"):
        load_train_config(None, "tokenizer", ["scaling.num_workers=[2, 4]", "data.batch_size=4"])
    with pytest.raises(ValueError, match="data.ledger records the cache keys"):
        load_train_config(None, "tokenizer", ["data.ledger=true"])


def test_cache_steps_give_every_rank_equal_micro_batch_counts_weighted_to_the_global_mean(tmp_path):
    root = str(tmp_path / "cache")
    write_tiny_cache(root, {"a": 40})
    manifest = read_manifest(root)
    config = load_train_config(None, "joint", [f"data.cache={root}", "data.batch_size=4", "scaling.num_workers=[1, 2]",
                                               "data.grad_accumulation=2"])  # global batch 16
    order = cache_order(config, manifest)
    per_rank = []
    for rank in range(3):  # 3 workers: slices of 5, 5 and 6 rows, 2 micro-batches each
        steps = cache_steps(config, manifest, order, CacheCollate(manifest), rank, 3, first_position=16)
        micro, weights = next(steps)
        steps.close()
        per_rank.append(([len(b["key"]) for b in micro], weights, [k for b in micro for k in b["key"]]))
    assert [sizes for sizes, _, _ in per_rank] == [[2, 3], [2, 3], [3, 3]]
    # a micro-batch's loss is its rows' mean; averaged over 2 micro-batches and 3 ranks, every row weighs 1/16
    row_weights = {w / (2 * 3 * n) for sizes, weights, _ in per_rank for w, n in zip(weights, sizes)}
    assert all(x == pytest.approx(1 / 16) for x in row_weights)
    keys = [k for _, _, ks in per_rank for k in ks]
    alone = cache_steps(config, manifest, order, CacheCollate(manifest), 0, 1, first_position=16)
    assert keys == [k for b in next(alone)[0] for k in b["key"]]  # the second global batch, whatever the world size
    alone.close()


def test_a_position_is_refused_on_another_cache(tmp_path):
    first, second = str(tmp_path / "one"), str(tmp_path / "two")
    write_tiny_cache(first, {"a": 10})
    write_tiny_cache(second, {"a": 12})
    config = load_train_config(None, "ar", [f"data.cache={first}"])
    digest = cache_order(config, read_manifest(first)).digest
    meta = {"data_position": position_meta(24, digest, config)}
    assert restored_position(meta, digest, config) == 24
    assert restored_position({}, digest, config) == 0  # a checkpoint from before positions were recorded
    other = cache_order(config, read_manifest(second)).digest
    with pytest.raises(ValueError, match="made reading another cache"):
        restored_position(meta, other, config)
    ignoring = load_train_config(None, "ar", [f"data.cache={first}", "run.ignore_data_position=true"])
    assert restored_position(meta, digest, ignoring) == 0


def test_the_ledger_audit_finds_repeats_gaps_and_foreign_keys():
    keys = ["a", "b", "c", "d"]
    good = [{"step": 1, "keys": ["c", "a"]}, {"step": 2, "keys": ["d", "b"]}, {"step": 3, "keys": ["b", "a"]}]
    assert audit_ledger(good, keys) == {"steps": 3, "passes": 2, "problems": []}
    repeated = [{"step": 1, "keys": ["c", "a"]}, {"step": 2, "keys": ["c", "b"]}]
    assert audit_ledger(repeated, keys)["problems"] == ["pass 0: 1 keys trained on twice",
                                                        "pass 0: 1 keys of the cache never trained on"]
    assert audit_ledger([{"step": 2, "keys": ["x"]}], keys)["problems"][0].startswith("steps are not")
    online = [{"step": 1, "keys": ["0/a", "0/b"]}, {"step": 2, "keys": ["0/c", "1/a"]}, {"step": 3, "keys": ["0/d", "0/a"]}]
    audit = audit_online_ledger(online, keys)
    assert audit["problems"] == ["data epoch 0: 1 keys trained on twice"] and audit["complete"] == ["0"]


def test_the_step_ledger_keeps_steps_in_rank_order_across_checkpoints(tmp_path):
    ledger = StepLedger(enabled=True)
    ledger.record(1, [{"key": ["a", "b"]}, {"key": ["c"]}], world_size=1)
    ledger.gather()  # one process: no collective
    ledger.write(str(tmp_path))
    restored = StepLedger(enabled=True)
    restored.restore(str(tmp_path))
    restored.record(2, [{"key": ["d"], "visit": ["1:s"]}], world_size=1)
    restored.gather()
    assert [e["keys"] for e in restored.entries] == [["a", "b", "c"], ["1/d"]]
    off = StepLedger(enabled=False)
    off.record(1, [{"key": ["a"]}], 1)
    off.gather()
    off.write(str(tmp_path / "none"))
    assert off.entries == [] and not (tmp_path / "none").exists()
