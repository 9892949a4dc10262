"""The registered export as an MLflow pyfunc model (trainer/served_model.py, tracking.log_export_and_register):
loaded from `models:/NAME/VERSION` it predicts hart-generate's PNG files byte for byte (HART with a
Qwen2 text encoder named by reference, and STAR), its artifacts keep the released layout, the text
encoder can be supplied at load, bad input is refused with a clear message, and `mlflow models serve
--env-manager local` answers a real request on loopback with the same images. Tiny models, built here."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from hart.config import tokenizer_config, transformer_config
from hart.tokenizer.model import HybridTokenizer
from hart.transformer.model import HARTForT2I
from tests.training_fixtures import save_tiny_qwen
from trainer import tracking
from trainer.generation import GenerationConfig, run_generation
from trainer.local_services import free_port, stop_process_group, wait_for_port

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star"]


def hart_export(root: Path, text_dim: int) -> Path:
    torch.manual_seed(0)
    tokenizer = HybridTokenizer(tokenizer_config("tiny"))
    tokenizer.save_pretrained(root / "tokenizer")
    model = HARTForT2I(transformer_config({"preset": "tiny", "context_dim": text_dim}))
    model.init_weights()
    parameters = {name for name, _ in model.named_parameters()}  # EMA differs: the served weights are checked
    ema = {k: v + 0.05 * torch.randn_like(v) if k in parameters else v for k, v in model.state_dict().items()}
    model.save_pretrained(root / "llm", ema_state=ema, tokenizer=tokenizer.config)
    (root / "train_config.json").write_text("{}\n")
    return root


def star_export(root: Path) -> Path:
    from configuration.loader import replace
    from hart.star.checkpoint import save_star
    from hart.star.config import STAR_PRESETS
    from hart.star.model import STARForT2I

    torch.manual_seed(1)
    tok = tokenizer_config("tiny")
    HybridTokenizer(tok).save_pretrained(root / "tokenizer")
    star = STARForT2I(replace(STAR_PRESETS["tiny"], patch_nums=tok.patch_nums, vocab_size=tok.vocab_size,
                              token_dim=tok.z_channels, text_dim=384, context_token=16))
    save_star(star, root / "star" / "model.pth")
    save_star(star, root / "star" / "ema_model.pth")
    return root


def hart_generate(tmp_path: Path, export: Path, text_encoder: str, prompts: list[str], *overrides: str) -> list[bytes]:
    """hart-generate's PNG files for `prompts` (protocol shapes), in prompt order."""
    output = tmp_path / f"generated-{len(list(tmp_path.glob('generated-*')))}"
    written = run_generation(GenerationConfig(output=str(output), export=str(export), text_encoder=text_encoder,
                                              prompts=tuple(prompts), protocol="shapes", overrides=overrides,
                                              device="cpu"))
    return [path.read_bytes() for path in written]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A sqlite store with one run that registered a tiny HART export (Qwen2 text encoder by path) as
    `hart-served` and a tiny STAR export as `star-served`, each through `log_export_and_register`."""
    root = tmp_path_factory.mktemp("served")
    qwen = save_tiny_qwen(root / "qwen")
    (Path(qwen) / "system_prompt.txt").write_text("describe the image")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("served", artifact_location=str(root / "artifacts"))
    run_ids = {family: client.create_run(experiment).info.run_id for family in ("hart", "star")}
    hart = hart_export(root / "hart", text_dim=32)
    star = star_export(root / "star")
    versions = {"hart": tracking.log_export_and_register(uri, run_ids["hart"], hart, "hart-served", text_encoder=qwen,
                                                         protocol="shapes", step=4),
                "star": tracking.log_export_and_register(uri, run_ids["star"], star, "star-served",
                                                         text_encoder="minilm", protocol="shapes")}
    assert mlflow.get_tracking_uri() != uri  # the process-wide URI is put back
    return {"root": root, "uri": uri, "client": client, "run_ids": run_ids, "qwen": qwen, "hart": hart, "star": star,
            "versions": versions}


def test_hart_predictions_are_hart_generates_files_and_the_server_answers_the_same(registry, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    client, version = registry["client"], registry["versions"]["hart"]
    assert version == 1
    # the registry's version is the run's logged pyfunc model, whose artifacts keep the released layout
    source = client.get_model_version("hart-served", "1")
    assert source.run_id == registry["run_ids"]["hart"] and source.source.startswith("models:/m-")
    logged = client.get_logged_model(source.source.removeprefix("models:/"))
    run = client.get_run(source.run_id)
    assert logged.experiment_id == run.info.experiment_id and logged.name == "model" and logged.source_run_id == run.info.run_id
    assert [(o.model_id, o.step) for o in run.outputs.model_outputs] == [(logged.model_id, 4)]
    assert run.info.status == "FINISHED"
    local = Path(mlflow.artifacts.download_artifacts("models:/hart-served/1", dst_path=str(tmp_path / "model")))
    assert {p.name for p in (local / "artifacts").iterdir()} == {"llm", "tokenizer", "train_config.json"}
    assert HARTForT2I.from_pretrained(local / "artifacts" / "llm", ema=True) is not None
    mlmodel = (local / "MLmodel").read_text()
    assert "prompt" in mlmodel and "binary" in mlmodel and registry["qwen"] in mlmodel

    model = mlflow.pyfunc.load_model("models:/hart-served/1")
    # rows sharing (seed, cfg) are one hart-generate call in row order; another seed is another call
    request = pd.DataFrame({"prompt": PROMPTS, "seed": [3, 3, 7, 3], "cfg": [2.0, 2.0, 2.0, 2.0]})
    images = model.predict(request)["image"].tolist()
    qwen = registry["qwen"]
    same_seed = hart_generate(tmp_path, registry["hart"], qwen, [PROMPTS[0], PROMPTS[1], PROMPTS[3]], "seed=3", "cfg=2.0")
    other_seed = hart_generate(tmp_path, registry["hart"], qwen, [PROMPTS[2]], "seed=7", "cfg=2.0")
    assert images == [same_seed[0], same_seed[1], other_seed[0], same_seed[2]]
    assert len(set(images)) == 4 and all(image.startswith(b"\x89PNG") for image in images)
    # no seed / cfg: the protocol's (shapes: seed 0, cfg 3.0), as hart-generate without --set
    defaults = model.predict(pd.DataFrame({"prompt": PROMPTS[:2]}))["image"].tolist()
    assert defaults == hart_generate(tmp_path, registry["hart"], qwen, PROMPTS[:2])

    # bad input: a clear message
    with pytest.raises(Exception, match="prompt"):
        model.predict(pd.DataFrame({"text": ["a red circle"]}))
    with pytest.raises(ValueError, match="row 1: seed must be a whole number >= 0"):
        model.predict(pd.DataFrame({"prompt": PROMPTS[:2], "seed": [1, -2]}))
    with pytest.raises(ValueError, match="row 0: prompt must be a non-empty string"):
        model.predict(pd.DataFrame({"prompt": [" "]}))

    # the text encoder is a reference: moved away, the model says how to supply it; supplied, same images
    moved = shutil.move(qwen, tmp_path / "qwen-elsewhere")
    try:
        with pytest.raises(Exception, match="MLFLOW_PYFUNC_INFERENCE_CONFIG"):
            mlflow.pyfunc.load_model("models:/hart-served/1")
        supplied = mlflow.pyfunc.load_model("models:/hart-served/1", model_config={"text_encoder": str(moved)})
        assert supplied.predict(request)["image"].tolist() == images

        # `mlflow models serve` on the downloaded model, this environment, nothing built or downloaded
        port = free_port()
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               "MLFLOW_PYFUNC_INFERENCE_CONFIG": json.dumps({"text_encoder": str(moved)})}
        with open(tmp_path / "serve.log", "w") as log:
            server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", str(local),
                                       "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                                      stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            wait_for_port(server, port, f"mlflow models serve (log: {tmp_path / 'serve.log'})", timeout_s=120)
            body = json.dumps({"dataframe_records": request.to_dict("records")}).encode()
            answer = urllib.request.urlopen(urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}),
                timeout=120)
            predictions = json.loads(answer.read())["predictions"]
            assert [base64.b64decode(row["image"]) for row in predictions] == images
            bad = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", headers={"Content-Type": "application/json"},
                                         data=json.dumps({"dataframe_records": [{"prompt": "x", "seed": -1}]}).encode())
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(bad, timeout=60)
            assert refused.value.code == 400 and "seed must be a whole number" in refused.value.read().decode()
        finally:
            stop_process_group(server)
    finally:
        shutil.move(moved, qwen)


def test_star_predictions_are_hart_generates_files(registry, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    local = Path(mlflow.artifacts.download_artifacts("models:/star-served/1", dst_path=str(tmp_path / "model")))
    assert sorted(p.name for p in (local / "artifacts" / "star").iterdir()) == ["ema_model.pth", "model.pth"]
    model = mlflow.pyfunc.load_model("models:/star-served/1")
    images = model.predict(pd.DataFrame({"prompt": PROMPTS[:3], "seed": [4, 4, 4]}))["image"].tolist()
    assert images == hart_generate(tmp_path, registry["star"], "minilm", PROMPTS[:3], "seed=4")


def test_a_text_encoder_registered_as_an_artifact_is_downloaded_and_a_multi_image_protocol_refused(registry, tmp_path,
                                                                                                    monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    client = registry["client"]
    run_id = client.create_run(client.get_experiment_by_name("served").experiment_id).info.run_id
    client.log_artifacts(run_id, registry["qwen"], artifact_path="qwen2")
    model = mlflow.pyfunc.load_model("models:/hart-served/1", model_config={"text_encoder": f"runs:/{run_id}/qwen2"})
    images = model.predict(pd.DataFrame({"prompt": PROMPTS[:1], "seed": [2]}))["image"].tolist()
    assert images == hart_generate(tmp_path, registry["hart"], registry["qwen"], PROMPTS[:1], "seed=2")
    with pytest.raises(Exception, match="set overrides \\['images_per_prompt=1'\\] and repeat rows"):
        mlflow.pyfunc.load_model("models:/hart-served/1", model_config={"protocol": "demo"})
