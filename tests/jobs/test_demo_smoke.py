"""`make demo-smoke`: the README's first command end to end at tiny step counts, and its check's teeth.

The module runs the demo once with `--smoke` (`jobs.demo.main`, in this process: a local Ray
instance of its own, started and stopped by the demo), then:
- asserts that it passed its outputs check (`demo.outputs`) and exited 0;
- breaks one real output at a time (in place, restored afterwards) and asserts that exactly the
  step that should have produced it reports the problem;
- reruns the last step (on a copy) with its image writing broken and asserts that the demo exits
  non-zero, and with other evaluation settings and asserts that earlier steps are checked against
  the settings they ran with.

Marked `smoke`: `make test` leaves it out, `make demo-smoke` (and so `.ci/run`) runs it.
Run: .venv/bin/pytest -m smoke tests/jobs/test_demo_smoke.py -q -s
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.smoke


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    from jobs.demo import main

    root = tmp_path_factory.mktemp("smoke")
    started = time.time()
    code = main(["--smoke", "--storage", "local", "--workdir", str(root / "demo")])
    print(f"\n[demo-smoke] python -m jobs.demo --smoke: exit code {code} in {time.time() - started:.0f} s")
    summary = json.loads((root / "demo" / "summary.json").read_text())
    assert code == 0, summary["problems"]
    return {"root": root, "workdir": root / "demo", "summary": summary}


def test_every_step_produced_its_outputs(smoke):
    from demo.figures import psnr_verdict
    from demo.outputs import check_demo, expected_figures

    summary = smoke["summary"]
    assert summary["problems"] == []
    assert check_demo(summary) == []  # the same check, run again from the saved summary
    assert all(math.isfinite(summary["results"][name]) for name in expected_figures(summary))
    # the demo tokenizer is not reference-buildable: both exported folders say so
    for folder in ("tokenizer", "llm"):
        assert (smoke["workdir"] / "export" / folder / "REFERENCE_COMPATIBILITY.txt").is_file()
    # after a few steps hybrid and discrete PSNR are within noise: no verdict
    assert psnr_verdict(summary["results"]).startswith("no meaningful difference")


@contextlib.contextmanager
def moved_away(path: Path):
    """`path` is gone inside the block and back after it."""
    aside = path.with_name(path.name + ".aside")
    shutil.move(path, aside)
    try:
        yield
    finally:
        shutil.move(aside, path)


@contextlib.contextmanager
def rewritten(path: Path, change):
    """`path` holds `change(path)`'s edit inside the block, its own bytes after it."""
    original = path.read_bytes()
    try:
        change(path)
        yield
    finally:
        path.write_bytes(original)


def drop_a_row(path: Path) -> None:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    pq.write_table(table.slice(1), path)


def perturb_ema(path: Path) -> None:
    from hart.weights import load_weight_file, save_weight_file

    state = load_weight_file(path)
    key = next(k for k, v in state.items() if v.is_floating_point() and "attn_bias" not in k)
    state[key] = state[key] + 1.0
    save_weight_file(state, path)


def run_folder(workdir: Path, suffix: str) -> Path:
    return next((workdir / "train").glob(f"demo-*-{suffix}"))


def mlflow_artifacts(smoke, run_key: str) -> Path:
    run_id = smoke["summary"]["where"]["mlflow_runs"][run_key]
    return next((smoke["root"] / "mlartifacts").glob(f"{run_id}/artifacts"))


@contextlib.contextmanager
def run_status(smoke, run_key: str, status: str):
    """The MLflow run has `status` inside the block, FINISHED after it."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=smoke["summary"]["where"]["mlflow"])
    run_id = smoke["summary"]["where"]["mlflow_runs"][run_key]
    client.update_run(run_id, status=status)
    try:
        yield
    finally:
        client.update_run(run_id, status="FINISHED")


def duplicate_a_key(path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    pq.write_table(pa.concat_tables([table.slice(0, 1), table.slice(0, len(table) - 1)]), path)  # same row count


def step_back(path: Path) -> None:
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "step": meta["step"] - 1}))


def cache_file(s) -> Path:
    return sorted((s["workdir"] / "cache/shapes/data").glob("*.parquet"))[0]


# (what is broken, how, which step must report it, words of its report)
BREAKAGES = {
    "a shard file": (lambda s: moved_away(sorted((s["workdir"] / "shapes").glob("*.tar"))[0]),
                     "data", "1 shard files in"),
    "the tokenizer stage's export": (lambda s: moved_away(run_folder(s["workdir"], "tokenizer-full") / "export"),
                                     "tokenizer", "has no tokenizer/ folder"),
    "the tokenizer stage's reconstruction grid": (
        lambda s: moved_away(mlflow_artifacts(s, "tokenizer_full") / "reconstructions"), "tokenizer",
        "has no reconstructions/*.png grid"),
    "the tokenizer run's exported model artifact": (
        lambda s: moved_away(mlflow_artifacts(s, "tokenizer_full") / "model"), "tokenizer", "has no exported model"),
    "the tokenizer run's end (status FAILED)": (lambda s: run_status(s, "tokenizer_full", "FAILED"),
                                                "tokenizer", "has status FAILED, expected FINISHED"),
    "a cache row": (lambda s: rewritten(cache_file(s), drop_a_row), "precompute", "63 cache rows"),
    "a cache key (duplicated)": (lambda s: rewritten(cache_file(s), duplicate_a_key), "precompute", "1 duplicated keys"),
    "a shard's commit (its stats marker)": (
        lambda s: moved_away(sorted((s["workdir"] / "cache/shapes/stats").glob("*.stats.json"))[0]),
        "precompute", "1 committed shards in"),
    "the generator export (export skipped)": (lambda s: moved_away(s["workdir"] / "export" / "llm"),
                                              "joint", "has no llm/ folder"),
    "the exported weights (a stale export)": (
        lambda s: rewritten(s["workdir"] / "export" / "llm" / "ema_model.bin", perturb_ema),
        "joint", "does not hold the weights"),
    "Ray Train's checkpoint list": (
        lambda s: moved_away(run_folder(s["workdir"], "joint") / "checkpoint_manager_snapshot.json"),
        "joint", "has no checkpoint under"),
    "the joint checkpoint folder": (lambda s: moved_away(next(run_folder(s["workdir"], "joint").glob("checkpoint_*"))),
                                    "joint", "cannot read its outputs: ValueError: run 'demo-"),
    "the joint checkpoint's step": (
        lambda s: rewritten(next(run_folder(s["workdir"], "joint").glob("checkpoint_*")) / "meta.json", step_back),
        "joint", "is at step 9, expected 10"),
    "the joint run's sample grid": (lambda s: moved_away(mlflow_artifacts(s, "joint") / "samples"),
                                    "joint", "has no samples/*.png grid"),
    "the compatibility note": (
        lambda s: moved_away(s["workdir"] / "export" / "tokenizer" / "REFERENCE_COMPATIBILITY.txt"),
        "joint", "REFERENCE_COMPATIBILITY.txt is missing"),
    "a generated image": (
        lambda s: moved_away(sorted((s["workdir"] / "samples" / "with_head" / "images").glob("*.png"))[0]),
        "generate", "17 images in samples/with_head/images, expected 18"),
    "the evaluation's held-out grid": (lambda s: moved_away(mlflow_artifacts(s, "joint") / "demo"),
                                       "evaluate", "has no demo/heldout_with_head-"),
}


@pytest.mark.parametrize("what", list(BREAKAGES))
def test_a_missing_output_fails_the_check_of_its_step(smoke, what):
    from demo.outputs import check_demo

    breakage, step, words = BREAKAGES[what]
    with breakage(smoke):
        problems = check_demo(smoke["summary"])
    assert problems, f"breaking {what} went unnoticed"
    assert all(p.startswith(f"{step}: ") for p in problems), problems
    assert any(words in p for p in problems), problems
    assert check_demo(smoke["summary"]) == []  # restored


def test_a_missing_or_nan_figure_fails_the_evaluate_check(smoke):
    from demo.outputs import check_demo

    summary = json.loads(json.dumps(smoke["summary"]))
    summary["results"]["tokenizer_psnr_hybrid"] = float("nan")
    del summary["results"]["generation_shape_accuracy_with_head"]
    summary["results"]["classifier_accuracy_on_real"] = 0.99  # not what this evaluation logged to MLflow
    problems = check_demo(summary)
    assert problems == ["evaluate: figure tokenizer_psnr_hybrid is nan",
                        "evaluate: figure generation_shape_accuracy_with_head is missing from the summary",
                        f"evaluate: MLflow run {summary['where']['mlflow_runs']['joint']} does not hold this "
                        "evaluation's figures: ['classifier_accuracy_on_real']"]


def copy_of(smoke, root: Path) -> Path:
    """A copy of the demo's workdir and MLflow store (which sits beside it) under `root`."""
    shutil.copytree(smoke["workdir"], root / "demo", symlinks=True)
    shutil.copy(smoke["root"] / "mlflow.db", root / "mlflow.db")
    return root / "demo"


def test_a_rerun_with_other_settings_checks_earlier_steps_against_theirs(smoke, tmp_path):
    """`--from-step evaluate` without --smoke: the default evaluation sizes (8 samples per prompt), while
    the data, tokenizer and joint outputs keep the smoke sizes they were made with."""
    from jobs.demo import main

    workdir = copy_of(smoke, tmp_path)
    assert main(["--storage", "local", "--workdir", str(workdir), "--from-step", "evaluate"]) == 0
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps"]["data"]["num_train_samples"] == 64 and summary["config"]["num_train_samples"] == 4000
    assert len(list((workdir / "samples" / "with_head" / "images").glob("*.png"))) == 18 * 8


def test_a_broken_step_makes_the_demo_fail(smoke, tmp_path, monkeypatch, capsys):
    """The generation step rerun, on a copy of the demo, with hart-evaluate's images sent elsewhere (its
    config's `out` redirected): nothing raises inside the demo, and its outputs check fails it."""
    import dataclasses

    import demo.figures
    from jobs.demo import main

    workdir = copy_of(smoke, tmp_path)
    evaluation_config = demo.figures.evaluation_config

    def elsewhere(*args, **kwargs):
        config = evaluation_config(*args, **kwargs)
        return dataclasses.replace(config, out=str(tmp_path / "elsewhere" / Path(config.out).name))

    monkeypatch.setattr(demo.figures, "evaluation_config", elsewhere)
    code = main(["--smoke", "--storage", "local", "--workdir", str(workdir), "--from-step", "evaluate"])
    output = capsys.readouterr().out
    assert code == 1, output[-3000:]
    assert "generate: 0 images in samples/with_head/images, expected 18" in output
    assert "evaluate: MLflow run" in output and "has no demo/heldout_with_head-" in output  # not the first run's
    assert "[demo] FAILED" in output
