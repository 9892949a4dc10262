"""Security: nothing executes what it reads, and no credential reaches what the jobs write.

- Malicious pickles through the *user-facing* loaders (`HybridTokenizer.from_pretrained` folder
  and single file, `HARTForT2I.from_pretrained` with a poisoned `pytorch_model.bin` or
  `ema_model.bin`): each is refused with a ValueError and the payload (a `touch MARKER` command
  hidden in `__reduce__`) never runs. (tests/hart/test_weights.py covers `load_weight_file` itself.)
- Pickle-bearing shard members (`.pickle`, `.pth`, `.pkl`, `.pt`, object `.npy`) are never
  unpickled: not by our shard reader, not by the whole precompute job, and not by Ray's own
  `read_webdataset` with its default decoder (unsafe deserialization stays off: the env switch
  is unset and no project file sets it).
- Credentials: with fake secrets in the environment (AWS keys, session token, MLflow password)
  and a tracking URI carrying `user:password@`, a precompute run and a tiny training run (real
  mlflow server on loopback, export + registry) are made, then every byte they wrote is searched:
  cache, manifest, stats, checkpoints, export, the MLflow store (sqlite + artifacts), the job's
  captured stdout/stderr and this Ray session's log files.
Infra manifests (Ray token auth, MLflow auth, loopback binds, no secrets in files) are checked by
tests/infra/test_manifests.py and tests/infra/test_images_and_secrets.py; not repeated here.

Run: .venv/bin/pytest tests/faults/test_security.py -q  (the credential scan: -m slow)
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from hart.config import tokenizer_config, transformer_config
from hart.tokenizer.model import HybridTokenizer
from hart.transformer.model import HARTForT2I

REPO = Path(__file__).resolve().parents[2]


class Exploit:
    """Unpickling this runs `touch MARKER`: the marker file proves code execution."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def poison(path: Path, marker: Path) -> None:
    torch.save({"weight": torch.zeros(2), "payload": Exploit(str(marker))}, path)


def test_user_facing_loaders_refuse_malicious_pickles(tmp_path):
    marker = tmp_path / "pwned"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tokenizer = HybridTokenizer(tokenizer_config("tiny"))
        transformer = HARTForT2I(transformer_config("tiny"))
    # tokenizer/ folder whose only weights are a poisoned pytorch_model.bin
    folder = tmp_path / "tokenizer"
    tokenizer.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    poison(folder / "pytorch_model.bin", marker)
    with pytest.raises(ValueError, match="refusing to load"):
        HybridTokenizer.from_pretrained(folder)
    # VAR-style single .pth
    poison(tmp_path / "vae.pth", marker)
    with pytest.raises(ValueError, match="refusing to load"):
        HybridTokenizer.from_pretrained(tmp_path / "vae.pth", config=tokenizer_config("tiny"))
    # llm/ folder: poisoned EMA file next to good weights, then poisoned main weights
    llm = tmp_path / "llm"
    transformer.save_pretrained(llm, ema_state=transformer.state_dict())
    poison(llm / "ema_model.bin", marker)
    assert HARTForT2I.from_pretrained(llm) is not None  # the safetensors weights still load
    with pytest.raises(ValueError, match="refusing to load"):
        HARTForT2I.from_pretrained(llm, ema=True)
    (llm / "model.safetensors").unlink()
    poison(llm / "pytorch_model.bin", marker)
    with pytest.raises(ValueError, match="refusing to load"):
        HARTForT2I.from_pretrained(llm)
    assert not marker.exists(), "a pickle payload was executed"


def pickle_shard(path: Path, marker: Path) -> None:
    """A WebDataset shard: one good sample plus members whose unpickling would touch `marker`."""
    from pipelines.hostile_shards import _good

    payload = pickle.dumps(Exploit(str(marker)))
    npy = io.BytesIO()
    np.save(npy, np.array([Exploit(str(marker))], dtype=object), allow_pickle=True)
    torch_file = io.BytesIO()
    torch.save({"x": Exploit(str(marker))}, torch_file)
    members = _good("a") + [("a.pickle", payload), ("a.pth", torch_file.getvalue()), ("b.pkl", payload),
                            ("b.jpg", _good("b")[0][1]), ("b.txt", b"caption b"), ("b.pt", torch_file.getvalue()),
                            ("c.npy", npy.getvalue()), ("c.txt", b"caption c")]
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_shard_pickles_are_never_unpickled(ray_local, tmp_path):
    from pipelines.config import InputConfig
    from pipelines.shard_source import read_shard_rows

    marker = tmp_path / "pwned"
    shard = tmp_path / "evil-00000.tar"
    pickle_shard(shard, marker)
    tables = list(read_shard_rows("evil", str(shard), InputConfig()))
    info = tables[-1].column("shard_info").to_pylist()[0]
    assert '"unknown_extension": 5' in info, info  # counted and skipped, never parsed
    # Ray's own WebDataset reader with its default decoder: pickle members are refused, not loaded.
    assert "RAY_DATA_WEBDATASET_ALLOW_UNSAFE_DESERIALIZATION" not in os.environ
    try:
        ray_local.data.read_webdataset(str(shard)).take_all()
    except Exception as exc:  # noqa: BLE001 - refusing is the expected outcome
        assert "unsafe" in str(exc).lower() or "pickle" in str(exc).lower(), exc
    assert not marker.exists(), "a pickle member was executed"
    for folder in ("infra", "jobs", "pipelines", "hart"):
        for path in (REPO / folder).rglob("*"):
            if path.is_file() and path.suffix in (".py", ".yaml", ".yml", ".sh", ".toml", ".json", ".env", ""):
                assert b"ALLOW_UNSAFE_DESERIALIZATION" not in path.read_bytes(), path


SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "FAKEawsSecretKey0000x9Qz",
    "AWS_SESSION_TOKEN": "FAKEawsSessionToken1111x9Qz",
    "MLFLOW_TRACKING_PASSWORD": "FAKEmlflowPassword2222x9Qz",
}
URI_PASSWORD = "FAKEuriPassword3333x9Qz"


def files_under(*roots: Path):
    for root in roots:
        if root.is_file():
            yield root
        elif root.exists():
            yield from (p for p in root.rglob("*") if p.is_file())


@pytest.mark.slow  # ~55 s (precompute + training + export + registry); the fast security trials are above
def test_no_credential_reaches_outputs_params_or_logs(train_assets, mlflow_server, tmp_path, monkeypatch, capfd):
    from mlflow.tracking import MlflowClient

    from trainer.driver import run_training
    from pipelines.config import load_precompute_config
    from pipelines.plan import run_precompute
    from tests.training_fixtures import tiny_config

    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    marker = tmp_path / "pwned"
    raw = tmp_path / "raw"
    raw.mkdir()
    pickle_shard(raw / "evil-00000.tar", marker)
    cache = tmp_path / "cache"
    summary = run_precompute(load_precompute_config(None, [
        f"input.shards=['{raw}/*.tar', '{train_assets['shards']}']", f"output={cache}",
        f"tokenizer.checkpoint={train_assets['tokenizer']}", "progress=false", "compute.tokenizer_cpus=0.5"]))
    print(summary.table())
    assert summary.members_ignored["unknown_extension"] == 5 and not marker.exists()

    host = mlflow_server.split("://", 1)[1]
    tracking_uri = f"http://alice:{URI_PASSWORD}@{host}"
    config = tiny_config(train_assets, "ar", tmp_path, "run.max_steps=2", "run.checkpoint_every=2",
                         f"data.cache={cache}", f"tracking.tracking_uri={tracking_uri}", "run.name=secret-scan",
                         "tracking.sample_every=0")
    outcome = run_training(config, export_dir=str(tmp_path / "export"))
    assert outcome["final_step"] == 2

    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(outcome["run_id"])
    assert run.data.params["tracking.tracking_uri"] == f"http://***@{host}"  # redacted, still useful
    texts = [str(run.data.params), str(run.data.tags)]
    captured = capfd.readouterr()
    texts += [captured.out, captured.err]
    session_logs = Path(ray_session_dir()) / "logs"
    roots = [cache, tmp_path / "storage", tmp_path / "export", tmp_path / "server.db",
             tmp_path / "server-artifacts", tmp_path / "mlflow.db", session_logs]
    scanned = 0
    leaks = []
    for path in files_under(*roots):
        data = path.read_bytes()
        scanned += 1
        leaks += [f"{path}: {name}" for name, value in {**SECRETS, "uri": URI_PASSWORD}.items() if value.encode() in data]
    leaks += [f"text {i}: {name}" for i, text in enumerate(texts)
              for name, value in {**SECRETS, "uri": URI_PASSWORD}.items() if value in text]
    assert scanned > 20 and (tmp_path / "server.db").exists()
    assert not leaks, leaks
    print(f"secret scan: {scanned} files + params/tags/stdout/stderr, 0 leaks")


def ray_session_dir() -> str:
    import ray

    return ray._private.worker._global_node.get_session_dir_path()
