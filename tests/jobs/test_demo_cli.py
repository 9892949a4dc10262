"""`python -m jobs.demo` flags map onto DemoConfig, and the summary says what it found (no pipeline run
here: tests/jobs/test_demo_smoke.py runs the chain, `make demo-smoke`)."""

import os
from pathlib import Path

import pytest

from jobs.demo import SMOKE, DemoConfig, Services, mlflow_ui_command, parse_args
from jobs.demo_evaluation import evaluation_argv, psnr_verdict


def test_defaults_are_the_config_defaults(monkeypatch):
    monkeypatch.delenv("STORAGE", raising=False)
    assert parse_args([]) == DemoConfig()
    monkeypatch.setenv("STORAGE", "s3")
    assert parse_args([]).storage == "s3" and parse_args(["--storage", "local"]).storage == "local"


def test_smoke_sizes_and_a_temporary_workdir_unless_flags_say_otherwise(monkeypatch):
    monkeypatch.delenv("STORAGE", raising=False)
    smoke = parse_args(["--smoke"])
    assert smoke.workdir == "" and all(getattr(smoke, name) == value for name, value in SMOKE.items())
    assert parse_args(["--smoke", "--joint-steps", "3", "--workdir", "w"]).joint_steps == 3
    assert parse_args(["--smoke", "--workdir", "w"]).workdir == "w"


def test_flags_set_their_fields():
    config = parse_args(["--workdir", "runs/x", "--tokenizer-full-steps", "30", "--tokenizer-vq-warmup-steps", "20",
                         "--tokenizer-threads", "2", "--joint-threads", "1", "--joint-steps", "5", "--from-step", "joint",
                         "--head-cfg", "2.5", "--joint-batch-size", "8", "--joint-lr", "0.001"])
    assert (config.workdir, config.tokenizer_full_steps, config.tokenizer_vq_warmup_steps) == ("runs/x", 30, 20)
    assert (config.tokenizer_threads, config.joint_threads, config.joint_steps, config.from_step) == (2, 1, 5, "joint")
    assert (config.head_cfg, config.joint_batch_size, config.joint_lr) == (2.5, 8, 0.001)


def test_summary_reports_generation_only_with_a_valid_classifier(capsys):
    from jobs.demo import print_summary

    results = {"tokenizer_psnr_hybrid": 27.0, "tokenizer_psnr_discrete": 25.0, "tokenizer_psnr_gain_se": 0.1,
               "classifier_accuracy_on_real": 0.95, "seconds_total": 1.0}
    for kind in ("hybrid", "discrete"):
        results[f"reconstruction_colour_accuracy_{kind}"] = results[f"reconstruction_shape_accuracy_{kind}"] = 0.9
    summary = {"results": results, "timings_s": {"data": 1.0}, "where": {"export": "runs/x"}, "problems": [],
               "after_exit": {"mlflow_store": "runs/mlflow.db", "mlflow_ui": "make mlflow-ui"}}
    print_summary(summary)  # no generation_* keys: evaluate() leaves them out below the classifier's bar
    out = capsys.readouterr().out
    assert out.count("not scored, the classifier is below 98% on real images") == 2
    for tag in ("with_head", "without_head"):
        for key in ("colour", "shape", "joint"):
            results[f"generation_{key}_accuracy_{tag}"] = 0.5
    results["classifier_accuracy_on_real"] = 1.0
    print_summary(summary)
    out = capsys.readouterr().out
    assert "not scored" not in out and "generation (with head): colour 50.0%, shape 50.0%" in out
    assert "every step produced its outputs" in out and "hybrid higher, as HART claims" in out
    summary["problems"] = ["joint: export runs/x has no llm/ folder"]
    print_summary(summary)
    out = capsys.readouterr().out
    assert "1 PROBLEMS:" in out and "  - joint: export runs/x has no llm/ folder" in out


@pytest.mark.parametrize(("hybrid", "discrete", "se", "verdict"), [
    (24.87, 23.22, 0.10, "hybrid higher, as HART claims"),
    (10.86, 10.78, 0.01, "no meaningful difference"),  # significant, but far below 0.5 dB
    (25.00, 24.00, 0.60, "no meaningful difference"),  # 1 dB, but within the 95% interval
    (23.00, 24.00, 0.10, "hybrid LOWER"),
])
def test_psnr_verdict_needs_a_large_and_clear_gain(hybrid, discrete, se, verdict):
    text = psnr_verdict({"tokenizer_psnr_hybrid": hybrid, "tokenizer_psnr_discrete": discrete,
                         "tokenizer_psnr_gain_se": se})
    assert text.startswith(verdict), text


def test_mlflow_ui_line_names_the_store_and_the_artifacts_that_outlive_the_demo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    def services(store, artifacts=None):
        return Services(root="", tracking_uri="", endpoint="", artifact_location="", mlflow_store=store,
                        mlflow_artifacts=artifacts)
    assert mlflow_ui_command(services(tmp_path / "runs" / "mlflow.db")) == "make mlflow-ui"
    assert mlflow_ui_command(services(Path("/elsewhere/mlflow.db"))) == "make mlflow-ui MLFLOW_STORE=/elsewhere/mlflow.db"
    s3 = services(tmp_path / "runs/demo-s3/mlflow-server/mlflow.db", tmp_path / "runs/demo-s3/s3-copy/mlflow")
    assert mlflow_ui_command(s3) == ("make mlflow-ui MLFLOW_STORE=runs/demo-s3/mlflow-server/mlflow.db "
                                    "MLFLOW_ARTIFACTS=runs/demo-s3/s3-copy/mlflow")


def test_s3_services_leave_a_copy_of_the_bucket_and_a_store_that_serves_it(tmp_path, monkeypatch):
    """`--storage s3`: the loopback servers stop with the demo; what they held outlives it."""
    from mlflow.tracking import MlflowClient

    from jobs import tracking
    from jobs.demo import demo_services
    from jobs.demo_outputs import local_folder
    from pipelines import storage

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.setenv(name, os.environ.get(name, "unset"))  # restored after the test: the services set them
    workdir = tmp_path / "demo"
    with demo_services(DemoConfig(storage="s3"), workdir) as services:
        assert services.root.startswith("s3://") and services.s3_copy == workdir / "s3-copy"
        fs, path = storage.resolve(f"{services.root}/cache/part.txt", services.endpoint)
        storage.write_bytes_atomic(fs, path, b"rows")
        with local_folder(f"{services.root}/cache", services.endpoint) as folder:  # how the outputs check reads S3
            assert (folder / "part.txt").read_bytes() == b"rows"
        run_id, _ = tracking.open_run(services.tracking_uri, "hart-demo", "run", {})
        tracking.RunLogger(services.tracking_uri, run_id, enabled=True).log_text("grid", "samples/grid.txt")
    assert (workdir / "s3-copy" / "demo" / "cache" / "part.txt").read_bytes() == b"rows"
    run = MlflowClient(tracking_uri=f"sqlite:///{services.mlflow_store}").get_run(run_id)
    # proxied artifacts: the run names no server, so a later `mlflow ui --artifacts-destination` serves the copy
    relative = run.info.artifact_uri.removeprefix("mlflow-artifacts:/")
    assert relative != run.info.artifact_uri
    assert (services.mlflow_artifacts / relative / "samples" / "grid.txt").read_text() == "grid"
    assert "MLFLOW_ARTIFACTS=" in mlflow_ui_command(services)


def test_the_evaluation_goes_to_the_joint_run_and_its_check_wants_it_there(tmp_path):
    """hart-evaluate, as the demo calls it, logs each generation's figures and per-category table to the
    joint run (`eval/<tag>/...` at the joint run's last step), and the evaluate check reads them back."""
    import io
    import math

    from mlflow.tracking import MlflowClient
    from PIL import Image

    from jobs import tracking
    from jobs.demo_evaluation import SAMPLE_TAGS, figure_names
    from jobs.demo_outputs import check_evaluate
    from jobs.evaluate import log_to_mlflow
    from jobs.evaluate import parse_args as evaluate_args

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id, _ = tracking.open_run(uri, "hart-demo", "joint", {}, artifact_location=str(tmp_path / "artifacts"))
    unlogged = evaluate_args(evaluation_argv(tmp_path / "export", DemoConfig(), tmp_path, "with_head"))
    assert not unlogged.tracking_uri and unlogged.run_id is None
    results = {name: 0.5 for name in figure_names(True)} | {"classifier_accuracy_on_real": 1.0}
    tracking.RunLogger(uri, run_id, enabled=True).log_metrics({f"demo/{k}": v for k, v in results.items()}, step=0)
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
        args = evaluate_args(evaluation_argv(tmp_path / "export", DemoConfig(), tmp_path, tag, uri, run_id, 10))
        assert (args.run_id, args.name, args.step) == (run_id, f"eval/{tag}", 10)
        figures = {"images": 18.0, "colour_accuracy": 0.5, "shape_accuracy": 0.5, "joint_accuracy": 0.5}
        log_to_mlflow(args, {}, {"figures": figures, "per_category": {"circle": figures}}, [png.getvalue()])
    assert check_evaluate(summary, "") == []
    client = MlflowClient(tracking_uri=uri)
    assert math.isclose(client.get_run(run_id).data.metrics["eval/with_head/circle/colour_accuracy"], 0.5)
    client.log_metric(run_id, "eval/without_head/shape_accuracy", 0.25, step=11)  # another evaluation's figure
    assert check_evaluate(summary, "") == [
        f"MLflow run {run_id}'s eval/without_head/ metrics are not this evaluation's: ['shape']"]
