"""Training input exactly once, proven by the step ledger (`data.ledger`, trainer/batches.py).

The ledger of a run is in its final checkpoint: the keys of every optimizer step its weights descend
from, in global batch order. Each trial compares it with the order the cache prescribes
(`pipelines.sample_order`, computed here from the cache files) and audits it against the cache's keys:
steps 1..n once each, every pass every key exactly once. Each has a negative control
(`run.ignore_data_position`: the restored run keeps the weights but starts its stream over) that must
fail the same check, so the check can fail.

Fast trials (`make test`): a worker SIGKILLed after a checkpoint, restored by Ray Train; a run
resubmitted at another world size with FSDP2 (2 -> 1 workers). In `make chaos`: their negative
control, the DDP resubmission (1 -> 2 workers), the job kill and resubmission and the multi-node
trials (tests/faults/test_train_faults.py, tests/faults/test_node_loss.py).

Run: .venv/bin/pytest tests/faults/test_training_input.py -q
"""

from __future__ import annotations

import pytest

from trainer.driver import run_training
from trainer.batches import global_batch, read_ledger
from tests.faults.accounting import check_ledger
from tests.faults.test_train_faults import kill_a_worker_once_registered
from tests.training_fixtures import tiny_config


# `make chaos` (in-job restart after a kill; the resubmission trial below keeps a restore at a stream position in
# `make test`); the negative control too (the audit's failing cases are unit-tested in tests/trainer/test_batches.py)
@pytest.mark.slow
@pytest.mark.parametrize("position", ["restored", "ignored"])
def test_worker_sigkill_mid_pass_continues_the_stream_exactly(train_assets, tmp_path, position):
    """48 cache rows, global batch 8: 6 steps a pass, 14 steps (2 passes and a third begun). The worker
    is SIGKILLed once the step-4 checkpoint (mid pass 0) is registered; Ray Train restarts the group
    from it by itself."""
    max_steps = 14
    config = tiny_config(train_assets, "ar", tmp_path, f"run.max_steps={max_steps}", "run.checkpoint_every=4",
                         "run.max_failures=1", "run.export=false", "tracking.sample_every=0", "data.ledger=true",
                         f"run.ignore_data_position={'true' if position == 'ignored' else 'false'}",
                         f"run.name=kill-{position}")
    record: dict = {}
    thread = kill_a_worker_once_registered(tmp_path / "storage", config.run.name, "checkpoint_step00000004", record)
    outcome = run_training(config)
    thread.join()
    assert "pid" in record and outcome["final_step"] == max_steps
    ledger, problems = check_ledger(config, outcome["checkpoint_path"], max_steps)
    print(f"worker SIGKILL after the step-4 checkpoint, position {position}: {len(ledger)} steps in the ledger; "
          f"problems: {problems or 'none'}")
    if position == "restored":
        assert not problems
    else:  # the negative control: the restarted stream re-feeds pass 0's first 4 batches
        assert any("twice" in p for p in problems) and any("prescribed order" in p for p in problems)


@pytest.mark.parametrize("strategy,before,after", [pytest.param("ddp", 1, 2, marks=pytest.mark.slow), ("fsdp", 2, 1)])
def test_a_run_resubmitted_at_another_world_size_continues_the_stream(train_assets, tmp_path, strategy, before, after):
    """Global batch 16 (batch 8): 2 workers x 1 micro-batch or 1 worker x 2. The first submission runs
    4 steps, the second resumes at the other world size to step 8: the ledger is the prescribed order,
    and the world size it was trained at is in each step's entry."""

    def config_for(workers: int, steps: int):
        return tiny_config(train_assets, "joint", tmp_path, f"run.max_steps={steps}", "run.checkpoint_every=4",
                           "run.export=false", "tracking.sample_every=0", "data.ledger=true",
                           f"scaling.num_workers={workers}", f"data.grad_accumulation={2 // workers}",
                           f"parallel.strategy={strategy}", f"run.name=resize-{strategy}")

    first = config_for(before, 4)
    run_training(first)
    second = config_for(after, 8)
    assert global_batch(first) == global_batch(second) == 16
    outcome = run_training(second)
    assert outcome["final_step"] == 8
    ledger, problems = check_ledger(second, outcome["checkpoint_path"], 8)
    sizes = [e["world_size"] for e in read_ledger(outcome["checkpoint_path"])]
    print(f"{strategy}: {before} -> {after} workers, world sizes per step {sizes}; problems: {problems or 'none'}")
    assert sizes == [before] * 4 + [after] * 4
    assert not problems
