"""jobs/demo.py: `python -m jobs.demo` flags map onto DemoConfig (demo/config.py), its values are checked,
the summary says what it found, and the storage services leave what outlives them (demo/chain.py; no
pipeline run here: tests/jobs/test_demo_smoke.py runs the chain, `make demo-smoke`)."""

import os
from pathlib import Path

import pytest

from demo.chain import Services, mlflow_ui_command
from demo.config import SMOKE, DemoConfig
from jobs.demo import parse_args


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


@pytest.mark.parametrize(("flags", "message"), [
    (["--from-step", "train"], "invalid choice: 'train'"),
    (["--storage", "gcs"], "invalid choice: 'gcs'"),
    (["--joint-steps", "many"], "invalid int value: 'many'"),
])
def test_bad_flags_are_refused_by_the_parser(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(("values", "message"), [
    ({"storage": "gcs"}, "storage must be 'local' or 's3'"),
    ({"from_step": "train"}, "from_step must be one of"),
    ({"num_heldout_images": 1}, "num_heldout_images must be >= 2"),
    ({"num_train_samples": 3, "num_shards": 4}, "num_train_samples >= num_shards"),
    ({"samples_per_prompt": 0}, "samples_per_prompt and num_shards must be >= 1"),
])
def test_config_values_are_checked(values, message):
    with pytest.raises(ValueError, match=message):
        DemoConfig(**values)
    assert DemoConfig(num_train_samples=4, num_shards=4, num_heldout_images=2).num_shards == 4  # the limits themselves pass


def test_from_step_without_a_workdir_is_refused_before_anything_runs(monkeypatch):
    from jobs.demo import main

    monkeypatch.delenv("STORAGE", raising=False)
    with pytest.raises(SystemExit, match="--from-step needs the --workdir of an earlier demo"):
        main(["--smoke", "--from-step", "joint"])


def test_summary_reports_generation_only_with_a_valid_classifier(capsys):
    from demo.chain import print_summary

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

    from trainer import tracking
    from demo.chain import demo_services
    from demo.outputs import local_folder
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
