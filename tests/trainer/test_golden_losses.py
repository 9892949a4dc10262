"""A golden loss record: the first steps of a seeded tiny run of each stage (tokenizer, ar, joint,
STAR ar), compared with `tests/assets/golden_losses.json`.

Design: each stage runs through the worker's own code without Ray (`trainer.worker.setup_worker`, then
`trainer.worker_step.optimizer_step`, the generator seeded by `step_seed` as on a worker), on fixed data: the
first rows of the real token cache `train_assets` builds for the transformer stages, rendered
shapes for the tokenizer. A refactor that is meant to keep numerics must leave every recorded loss within
`RELATIVE_TOLERANCE` (fp32 on CPU; the slack covers kernels that sum in another order on another
CPU or thread count, not a changed formula: a 1% change of the learning rate moves the last steps
by more). A change that is meant to move numerics regenerates the record, and says so in its commit:

    HART_GOLDEN_WRITE=1 .venv/bin/pytest tests/trainer/test_golden_losses.py -q
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.worker import setup_worker
from trainer.config import load_train_config
from trainer.data import images_collate
from trainer.worker_step import optimizer_step, step_seed
from tests.training_fixtures import REPO, tiny_config
from trainer.plan import RunPlan

RECORD = REPO / "tests" / "assets" / "golden_losses.json"
STEPS = 6
BATCH = 8
RELATIVE_TOLERANCE = 1e-3
# The stages' recipes as the tiny configs ship them, plus what makes a few steps informative: a
# constant learning rate from step 0.
OVERRIDES = ("optim.warmup_steps=0", "optim.schedule=constant", "run.seed=0")
STAGES = ("tokenizer", "ar", "joint", "star-ar")


def stage_config(train_assets, name: str, tmp_path: Path):
    if name != "star-ar":
        return tiny_config(train_assets, name, tmp_path, *OVERRIDES)
    return load_train_config(str(REPO / "jobs/configs/train_star_tiny.yaml"), "ar", [
        f"run.storage_path={tmp_path / 'storage'}", f"model.tokenizer_checkpoint={train_assets['tokenizer']}",
        f"data.cache={train_assets['cache']}", f"data.batch_size={BATCH}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", *OVERRIDES])


def fixed_batches(train_assets, name: str, text) -> list[dict]:
    """STEPS batches of BATCH samples, the same on every run and machine."""
    if name == "tokenizer":
        from pipelines.shapes import render, sample_spec

        return [images_collate({"image": np.stack([np.asarray(render(sample_spec(step * BATCH + i))) for i in range(BATCH)]),
                                "caption": np.array([""] * BATCH, dtype=object)}) for step in range(STEPS)]
    from pipelines.cache import batch_to_tensors, read_cache_table, read_manifest, table_to_numpy

    manifest = read_manifest(train_assets["cache"])
    table = read_cache_table(train_assets["cache"], columns=["key", "caption", "tokens", "residual"])
    assert table.num_rows >= STEPS * BATCH
    return [text.add_context(batch_to_tensors(table_to_numpy(table.slice(step * BATCH, BATCH)), manifest))
            for step in range(STEPS)]


def run_losses(train_assets, name: str, tmp_path: Path) -> list[dict[str, float]]:
    """The loss figures (every `loss`/`ce`/`diffusion`-like key the step reports) of STEPS steps."""
    from pipelines.cache import read_manifest

    config = stage_config(train_assets, name, tmp_path)
    manifest = read_manifest(train_assets["cache"]) if config.stage != "tokenizer" else None
    threads = torch.get_num_threads()
    try:
        setup = setup_worker(RunPlan.of(config, manifest=manifest), torch.device("cpu"))
        batches = fixed_batches(train_assets, name, setup.text)
        generator = torch.Generator()
        history = []
        for step, batch in enumerate(batches):
            generator.manual_seed(step_seed(config.run.seed, 0, step))
            metrics = optimizer_step(config, setup.stage, setup.objective, setup.disc_objective, setup.optimizer,
                                     setup.scheduler, setup.disc_optimizer, [batch], step, generator)
            history.append({k: round(float(v), 7) for k, v in sorted(metrics.items()) if "loss" in k or k in ("ce", "diffusion")})
    finally:
        torch.set_num_threads(threads)
    return history


@pytest.fixture(scope="module")
def record():
    return json.loads(RECORD.read_text()) if RECORD.exists() else {}


@pytest.mark.parametrize("name", STAGES)
def test_first_steps_match_the_golden_record(train_assets, tmp_path, record, name):
    history = run_losses(train_assets, name, tmp_path)
    assert history and all(history), f"{name}: the step reported no loss"
    if os.environ.get("HART_GOLDEN_WRITE") == "1":
        stored = json.loads(RECORD.read_text()) if RECORD.exists() else {}
        stored[name] = history
        RECORD.parent.mkdir(parents=True, exist_ok=True)
        RECORD.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
        return
    assert name in record, f"no golden record for {name}: regenerate it (module docstring)"
    expected = record[name]
    assert [sorted(h) for h in history] == [sorted(h) for h in expected], f"{name}: the step reports other figures"
    for step, (got, want) in enumerate(zip(history, expected)):
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=RELATIVE_TOLERANCE, abs=1e-6), (
                f"{name} step {step} {key}: {got[key]} vs the record's {value}; if the change is meant to move "
                f"numerics, regenerate the record (module docstring)")
