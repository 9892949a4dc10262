"""demo/outputs.py on hand-made outputs: each step's check finds what is missing and nothing else
(shard files, the cache's committed shards, rows and keys, the generated images, an export's folders
and compatibility notes, the evaluation's figures in the joint run), and an output that cannot even be
read is a finding of its step, not a crash. The checks on a real demo run in tests/jobs/test_demo_smoke.py.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from demo.config import DemoConfig
from demo.figures import SAMPLE_TAGS, evaluation_config
from demo.outputs import (
    STEP_CHECKS, check_data, check_demo, check_export, check_generate, check_precompute, expected_figures,
)
from tests.training_fixtures import write_tiny_cache


def test_data_check_counts_the_shard_files(tmp_path):
    for name in ("shard-00000.tar", "shard-00001.tar", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    summary = {"where": {"shards": str(tmp_path)}, "steps": {"data": {"num_shards": 2}}}
    assert check_data(summary, "") == []
    summary["steps"]["data"]["num_shards"] = 3
    assert check_data(summary, "") == [f"2 shard files in {tmp_path}, expected 3"]


def test_precompute_check_wants_every_shard_committed_and_every_sample_once(tmp_path):
    cache = str(tmp_path / "cache")
    write_tiny_cache(cache, {"shard-00000": 3, "shard-00001": 2})
    summary = {"where": {"cache": cache}, "steps": {"data": {"num_shards": 2, "num_train_samples": 5}}}
    assert check_precompute(summary, "") == []
    summary["steps"]["data"] = {"num_shards": 3, "num_train_samples": 6}
    assert check_precompute(summary, "") == [f"2 committed shards in {cache}, expected 3",
                                             f"5 cache rows in {cache}, expected 6 (one per sample)"]
    duplicated = str(tmp_path / "duplicated")
    write_tiny_cache(duplicated, {"s0": 2, "s1": 2}, keys={"s0": ["k0", "k1"], "s1": ["k1", "k2"]})
    summary = {"where": {"cache": duplicated}, "steps": {"data": {"num_shards": 2, "num_train_samples": 4}}}
    assert check_precompute(summary, "") == [f"1 duplicated keys in {duplicated}"]


def write_samples(root: Path, count: int, size=(64, 64)) -> None:
    for tag in SAMPLE_TAGS:
        folder = root / tag / "images"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("RGB", size).save(folder / f"{i:04d}.png")


def test_generate_check_wants_one_image_per_prompt_and_sample_of_one_size(tmp_path):
    from pipelines.shapes import prompts

    expected = len(prompts("heldout")) * 2
    write_samples(tmp_path, expected)
    summary = {"where": {"samples": str(tmp_path)}, "steps": {"evaluate": {"samples_per_prompt": 2}}}
    assert check_generate(summary, "") == []
    (tmp_path / "without_head" / "images" / "0000.png").unlink()
    Image.new("RGB", (32, 32)).save(tmp_path / "with_head" / "images" / "0001.png")
    assert check_generate(summary, "") == [f"{expected - 1} images in samples/without_head/images, expected {expected}",
                                           "samples have several sizes: [(32, 32), (64, 64)]"]


def test_export_check_loads_the_folders_and_wants_a_note_exactly_when_needed(tmp_path):
    import torch

    from hart.config import tokenizer_config
    from hart.reference_compat import NOTE_FILE
    from hart.tokenizer.model import HybridTokenizer

    assert check_export(tmp_path, with_transformer=False) == ([f"export {tmp_path} has no tokenizer/ folder"], {})
    torch.manual_seed(0)
    HybridTokenizer(tokenizer_config("tiny")).save_pretrained(tmp_path / "tokenizer")
    problems, models = check_export(tmp_path, with_transformer=False)
    assert problems == [] and isinstance(models["tokenizer"], HybridTokenizer)
    problems, _ = check_export(tmp_path, with_transformer=True)
    assert problems == [f"export {tmp_path} has no llm/ folder"]
    note = tmp_path / "tokenizer" / NOTE_FILE
    had_note = note.is_file()
    note.unlink() if had_note else note.write_text("a note the config does not need")
    problems, _ = check_export(tmp_path, with_transformer=False)
    assert len(problems) == 1 and NOTE_FILE in problems[0]
    assert ("is missing" if had_note else "is present") in problems[0]


def test_expected_figures_follow_the_classifier_bar():
    valid = expected_figures({"results": {"classifier_accuracy_on_real": 0.99}})
    invalid = expected_figures({"results": {"classifier_accuracy_on_real": 0.5}})
    assert any(name.startswith("generation_") for name in valid)
    assert not any(name.startswith("generation_") for name in invalid) and set(invalid) < set(valid)
    assert expected_figures({"results": {}}) == invalid


def test_an_unreadable_output_is_a_finding_of_its_step(tmp_path):
    write_samples(tmp_path / "samples", 18)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "shard-00000.tar").write_bytes(b"")
    # a summary with the data and generate steps' records only: every other check fails to read
    summary = {"where": {"shards": str(tmp_path / "shards"), "samples": str(tmp_path / "samples"), "mlflow_runs": {}},
               "steps": {"data": {"num_shards": 1}, "evaluate": {"samples_per_prompt": 1}}}
    problems = check_demo(summary)
    steps = [line.split(":")[0] for line in problems]
    assert steps == ["tokenizer", "precompute", "joint", "evaluate"], problems
    assert all(": cannot read its outputs: KeyError: " in line for line in problems)
    assert list(STEP_CHECKS) == ["data", "tokenizer", "precompute", "joint", "generate", "evaluate"]


def test_the_evaluation_goes_to_the_joint_run_and_its_check_wants_it_there(tmp_path):
    """hart-evaluate's function, as the demo calls it, logs each generation's figures and per-category table to the
    joint run (`eval/<tag>/...` at the joint run's last step), and the evaluate check reads them back."""
    import io
    import math

    from mlflow.tracking import MlflowClient
    from PIL import Image

    from trainer import tracking
    from demo.figures import figure_names
    from demo.outputs import check_evaluate
    from trainer.evaluation import log_to_mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id, _ = tracking.open_run(uri, "hart-demo", "joint", {}, artifact_location=str(tmp_path / "artifacts"))
    unlogged = evaluation_config(tmp_path / "export", DemoConfig(), tmp_path, "with_head")
    assert not unlogged.tracking_uri and not unlogged.run_id
    results = {name: 0.5 for name in figure_names(True)} | {"classifier_accuracy_on_real": 1.0}
    logger = tracking.RunLogger(uri, run_id, enabled=True)
    logger.log_metrics({f"demo/{k}": v for k, v in results.items()}, step=0)
    logger.flush()  # the writes are asynchronous: under load the check below could read before them
    tracking.RunLogger(uri, run_id, enabled=True).log_text("grid", "demo/heldout_with_head-t.png")
    summary = {"results": results, "steps": {"joint": {"joint_steps": 10}},
               "where": {"mlflow": uri, "mlflow_runs": {"joint": run_id}, "heldout_grid": "demo/heldout_with_head-t.png"}}
    assert sorted(check_evaluate(summary, "")) == sorted(
        [f"MLflow run {run_id} has no eval/{tag}/ metrics (hart-evaluate's figures)" for tag in SAMPLE_TAGS]
        + [f"MLflow run {run_id} has no eval/{tag}/step-10/per_category.json (hart-evaluate's per-category table)"
           for tag in SAMPLE_TAGS])
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    for tag in SAMPLE_TAGS:
        config = evaluation_config(tmp_path / "export", DemoConfig(), tmp_path, tag, uri, run_id, 10)
        assert (config.run_id, config.name, config.step) == (run_id, f"eval/{tag}", 10)
        figures = {"images": 18.0, "colour_accuracy": 0.5, "shape_accuracy": 0.5, "joint_accuracy": 0.5}
        log_to_mlflow(config, {}, {"figures": figures, "per_category": {"circle": figures}}, [png.getvalue()])
    assert check_evaluate(summary, "") == []
    client = MlflowClient(tracking_uri=uri)
    assert math.isclose(client.get_run(run_id).data.metrics["eval/with_head/circle/colour_accuracy"], 0.5)
    client.log_metric(run_id, "eval/without_head/shape_accuracy", 0.25, step=11)  # another evaluation's figure
    assert check_evaluate(summary, "") == [
        f"MLflow run {run_id}'s eval/without_head/ metrics are not this evaluation's: ['shape']"]
