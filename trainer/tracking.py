"""MLflow tracking for training runs: safe params, one run per run name, rank-0 logging, registry.

Design:
- The *driver* opens the MLflow run before any Ray worker starts (`open_run`): that is the
  fail-fast reachability check. Which run is continued is decided by the checkpoint, not by
  the name: the run id goes into every checkpoint's meta.json; resubmitting a run name whose
  storage holds a checkpoint continues that checkpoint's MLflow run (same step axis), and a
  run name with no checkpoint left (never checkpointed, or its folder deleted) gets a *new*
  MLflow run, so steps 1..N are never appended to an old run's history. Every run carries
  the tag `hart.run_name`; a new run lists earlier runs of the same name in `hart.previous_runs`.
- Workers log training metrics only on world rank 0 (`RunLogger`; each node's system metrics come from
  its first worker: trainer/system_metrics.py), with explicit `step=` taken from the
  training step, so a resumed run continues the same step axis; every `run.log_every` steps
  one row per metric, averaged over those steps (`log_every: 1` logs every step) (Ray's MLflowLoggerCallback
  is a Tune callback and is rejected by Train V2, docs/design/ray.md, "Tune callbacks under Train V2").
- Params are the flattened run config (`flatten_params`). Anything that looks secret is
  redacted: values of keys named like key/secret/token/password/credential, and user:pass
  or credential query parameters inside URIs. Count-like fields such as `context_token`
  (ints) are not secrets and stay.
- The MLflow UI: experiments carry the model-training kind tag that MLflow's experiment-kind selector
  writes, but MLflow 3.17's UI does not read it: it opens an experiment in the view of its GenAI / Model
  training switch, which each browser keeps (GenAI until the user switches), unless the link names the
  view. Links this project prints name it (`experiment_ui_url`); `python -m jobs.mlflow_ui_check`
  checks in a real browser what such a link shows.
- `mlflow` is imported inside the functions that call it, not at the top: the import costs about 3 s
  of CPU, which every Ray Train worker would pay at start-up although only rank 0 logs.

Length: over 400 lines; it is every MLflow call the jobs make (params, runs, datasets, the registered pyfunc
model, the rank-0 logger). The pyfunc logging (`log_export_and_register` and its signature, requirements and
tracking-URI helpers) is the part that could become a module of its own.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np

from pipelines import storage

RUN_NAME_TAG = "hart.run_name"
# The experiment kind as MLflow's experiment-kind selector records it. MLflow 3.17's UI, which has a
# GenAI / Model training switch in its place, does not read it (`experiment_ui_url`).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
MODEL_TRAINING_VIEW = "machine_learning"  # the UI's `workflowType` of its "Model training" view
PREVIOUS_RUNS_TAG = "hart.previous_runs"  # earlier runs of the same name that had no checkpoint left to resume
DEFAULT_TRACKING_URI = "sqlite:///runs/mlflow.db"
# The run's logged (pyfunc) model of a transformer export, or its artifact folder of a tokenizer export
EXPORT_ARTIFACT_PATH = "model"
TRAIN_CONFIG_FILE = "train_config.json"  # the run config beside an export's folders (secrets redacted)
REDACTED = "***"
MAX_PARAM_CHARS = 500
DATASET_DIGEST_CHARS = 36  # MLflow's dataset digest column (run inputs and the dataset of a metric)
DATASET_CONTEXT_TAG = "mlflow.data.context"  # a run input's role: "training", "evaluation"
# A key segment (split on . _ -) that names a secret. "token" alone, not "tokenizer"/"tokens".
SECRET_SEGMENTS = {"key", "secret", "token", "password", "passwd", "pwd", "credential", "credentials", "auth"}
SECRET_QUERY = re.compile(r"(key|secret|token|password|signature|credential|sig)", re.IGNORECASE)


def resolve_tracking_uri(configured: str) -> str:
    """The tracking URI a job uses: `configured`, else MLFLOW_TRACKING_URI, else the local default; a local
    store (a sqlite file, a folder) with an absolute path, so Ray workers, whose working directory is
    not the driver's, log to the same store."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///"):
        return "sqlite:///" + storage.absolute(uri.removeprefix("sqlite:///"))  # sqlite:////abs/path
    return storage.absolute(uri)


def experiment_ui_url(ui_url: str, experiment_id: str) -> str:
    """The link that opens an experiment's runs in the MLflow UI's model-training view in any browser (a
    bare `#/experiments/<id>` opens in the view the browser last chose, GenAI in a new one)."""
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType={MODEL_TRAINING_VIEW}"


# --------------------------------------------------------------------------------------
# Params: flatten + redact
# --------------------------------------------------------------------------------------


def redact_uri(value: str) -> str:
    """Remove user:password@ and credential-like query parameters from a URI string."""
    if "://" not in value:
        return value
    try:
        parts = urlsplit(value)
    except ValueError:
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = [(k, REDACTED if SECRET_QUERY.search(k) else v) for k, v in parse_qsl(query, keep_blank_values=True)]
        query = urlencode(pairs, safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def is_secret_key(key: str) -> bool:
    segments = re.split(r"[._\-]", key.lower())
    return any(segment in SECRET_SEGMENTS for segment in segments)


def redact_value(key: str, value: Any) -> Any:
    if isinstance(value, str):
        if value and is_secret_key(key):
            return REDACTED
        return redact_uri(value)
    return value


def redact_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The nested config with the same redaction as `flatten_params` (for files such as checkpoint meta)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out[key] = redact_config(value, f"{name}.")
        elif isinstance(value, (list, tuple)):
            out[key] = [redact_value(name, v) for v in value]
        else:
            out[key] = redact_value(name, value)
    return out


def set_terminated_quietly(client, run_id: str, status: str) -> None:
    """`MlflowClient.set_terminated` prints "View run ... at: <tracking URI>"; keep that line, minus credentials."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        client.set_terminated(run_id, status=status)
    if buffer.getvalue():
        sys.stdout.write(re.sub(r"://[^/@\s]+@", f"://{REDACTED}@", buffer.getvalue()))


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dict -> {"a.b.c": "value"} with secrets redacted and long values clipped."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{name}."))
            continue
        if isinstance(value, (list, tuple)):
            value = [redact_value(name, v) for v in value]
            text = ",".join(str(v) for v in value)
        else:
            text = str(redact_value(name, value))
        flat[name] = text[:MAX_PARAM_CHARS]
    return flat


# --------------------------------------------------------------------------------------
# Driver side: open or resume the run
# --------------------------------------------------------------------------------------


def probe_server(tracking_uri: str, timeout_s: float = 5.0) -> None:
    """For http(s) stores: one GET of /health with a short timeout (MLflow's client retries for minutes)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return

    # urllib cannot open a URL with user:password@ in it (it resolves "user:password@host" as the
    # host): probe the bare host and send the credentials as a basic-auth header, as MLflow does.
    parts = urlsplit(tracking_uri)
    headers = {}
    if parts.username is not None:
        import base64

        token = base64.b64encode(f"{parts.username}:{parts.password or ''}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
        parts = parts._replace(netloc=parts.netloc.rsplit("@", 1)[1])
    request = urllib.request.Request(urlunsplit(parts).rstrip("/") + "/health", headers=headers)
    try:
        urllib.request.urlopen(request, timeout=timeout_s).close()
    except (urllib.error.URLError, OSError) as exc:
        raise ValueError(f"MLflow tracking server {redact_uri(tracking_uri)} is unreachable: {exc}") from None


def open_run(tracking_uri: str, experiment: str, run_name: str, params: Mapping[str, str],
             resume_run_id: str | None = None, artifact_location: str = "") -> tuple[str, bool]:
    """Continue `resume_run_id` (the run of the checkpoint being resumed) or create a new run; returns (run_id, resumed).

    Without a checkpoint to resume there is no step history to continue: a new run is created even
    when older runs carry the same `run_name` (their steps are not appended to). The new run is
    tagged with the ids of those older runs (`hart.previous_runs`). `artifact_location` is the artifact
    root of the experiment if this call creates it (empty: the store's default).
    Raises ValueError when the tracking server cannot be reached (before workers start), or when
    the run to resume is not in this tracking store.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    probe_server(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(
            experiment, artifact_location=artifact_location or None, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
        if found and EXPERIMENT_KIND_TAG not in found.tags:  # older experiments: tag them once
            client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
        previous = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'")
    except Exception as exc:  # noqa: BLE001 - any transport/store error means "unreachable" here
        raise ValueError(f"MLflow tracking at {redact_uri(tracking_uri)} is not usable: {type(exc).__name__}: {exc}") from None
    if resume_run_id:
        run = next((r for r in previous if r.info.run_id == resume_run_id), None)
        if run is None:
            raise ValueError(
                f"the checkpoint of run {run_name!r} belongs to MLflow run {resume_run_id}, which experiment "
                f"{experiment!r} at {redact_uri(tracking_uri)} does not hold (another tracking URI or experiment?)"
            )
        set_terminated_quietly(client, resume_run_id, "RUNNING")
        return resume_run_id, True
    tags = {RUN_NAME_TAG: run_name}
    if previous:
        tags[PREVIOUS_RUNS_TAG] = ",".join(r.info.run_id for r in previous)[:MAX_PARAM_CHARS]
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    items = sorted(params.items())
    for start in range(0, len(items), 100):  # log_batch limit: 100 params per call
        client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v) for k, v in items[start : start + 100]])
    return run.info.run_id, False


def log_dataset_input(tracking_uri: str, run_id: str, name: str, digest: str, source: str, context: str = "training") -> None:
    """Record what a run read as an MLflow dataset input (the run page's Dataset column): `digest` is
    the data's own identity (a cache's manifest fingerprint hash), `source` its URI (credentials redacted).
    Logging the same input again (a resumed run) is a no-op in MLflow."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.tracking import MlflowClient

    source = redact_uri(source)
    dataset = Dataset(name=name, digest=digest[:DATASET_DIGEST_CHARS],
                      source_type="s3" if source.startswith("s3://") else "local", source=json.dumps({"uri": source}))
    MlflowClient(tracking_uri=tracking_uri).log_inputs(
        run_id, datasets=[DatasetInput(dataset, tags=[InputTag(DATASET_CONTEXT_TAG, context)])])


def finish_run(tracking_uri: str, run_id: str, status: str) -> None:
    from mlflow.tracking import MlflowClient

    set_terminated_quietly(MlflowClient(tracking_uri=tracking_uri), run_id, status)


def log_export_and_register(tracking_uri: str, run_id: str, export_dir: str | Path, model_name: str,
                            *, text_encoder: str, protocol: str, step: int = 0) -> int:
    """Log an export from its run and register it; returns the model version.

    A transformer export (HART's `llm/` or STAR's `star/`, with `tokenizer/`) becomes the pyfunc model
    of `trainer.served_model` (MLflow's models-from-code: the file is the model's code, the export's
    folders its artifacts, in the released layout), logged at `step` as the run's model `model` and
    registered as `model_name` from that model: `mlflow.pyfunc.load_model("models:/NAME/VERSION")` and
    `mlflow models serve` make hart-generate's images. `text_encoder` is recorded by reference and
    `protocol` as the sampling settings (`model_config`, both overridable at load). A tokenizer export
    (no transformer, nothing to generate with) is uploaded as the run's `model/` artifacts and
    registered from there."""
    import mlflow
    from mlflow.tracking import MlflowClient

    export_dir = Path(export_dir)
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        client.get_registered_model(model_name)
    except Exception:  # noqa: BLE001 - mlflow raises RestException / MlflowException when absent
        client.create_registered_model(model_name, description="HART weights exported by jobs.train")
    transformer = [name for name in ("llm", "star") if (export_dir / name).is_dir()]
    if not transformer:
        client.log_artifacts(run_id, str(export_dir), artifact_path=EXPORT_ARTIFACT_PATH)
        source = f"{client.get_run(run_id).info.artifact_uri}/{EXPORT_ARTIFACT_PATH}"
        return int(client.create_model_version(model_name, source=source, run_id=run_id).version)
    artifacts = {name: str(export_dir / name) for name in (*transformer, "tokenizer")}
    if (export_dir / TRAIN_CONFIG_FILE).is_file():
        artifacts["train_config"] = str(export_dir / TRAIN_CONFIG_FILE)
    # The fluent API places the logged model in the active run's experiment; leaving the run ends it
    # (FINISHED, as the driver's finish_run does next; FAILED on an error here).
    with fluent_tracking_uri(tracking_uri), mlflow.start_run(run_id=run_id, log_system_metrics=False), \
            warnings.catch_warnings():
        # the signature is given; an input example would load and run the model here to check it
        warnings.filterwarnings("ignore", message=".*An input example was not provided")
        info = mlflow.pyfunc.log_model(
            name=EXPORT_ARTIFACT_PATH, step=step, registered_model_name=model_name,
            python_model=str(Path(__file__).with_name("served_model.py")), artifacts=artifacts,
            signature=served_signature(),
            model_config={"text_encoder": text_encoder, "protocol": protocol, "overrides": [], "device": ""},
            # given, not inferred: inferring loads the model (and its text encoder) in a subprocess
            pip_requirements=served_requirements(),
        )
    return int(info.registered_model_version)


@contextlib.contextmanager
def fluent_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to `uri` (the fluent API reads only that), then put back as it
    was: the global (unset included) and the MLFLOW_TRACKING_URI variable `set_tracking_uri` also writes."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_uri, saved_env = tracking_utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_uri)
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def served_signature():
    """The served model's signature: `prompt` (string) and optional `seed` (long), `cfg` (double) in,
    `image` (PNG bytes) out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = Schema([ColSpec("string", "prompt"), ColSpec("long", "seed", required=False),
                     ColSpec("double", "cfg", required=False)])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("binary", "image")]))


def served_requirements() -> list[str]:
    """This project and the libraries the served model's code imports, at their installed versions."""
    from importlib.metadata import PackageNotFoundError, version

    pinned = []
    for name in ("hart-on-ray", "torch", "transformers", "safetensors", "pillow", "pandas", "pyyaml", "pydantic", "mlflow"):
        try:
            pinned.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pinned.append(name)
    return pinned


# --------------------------------------------------------------------------------------
# Worker side: rank-0 logger
# --------------------------------------------------------------------------------------


class RunLogger:
    """Logs metrics and images into an existing run; a no-op on ranks other than 0.

    Steps are recorded into a window (`record`, no I/O) and `write()` logs the window as one row
    per metric at its last step: the mean over the window's steps; the last value for `lr`; the
    harmonic mean for rates (`*_per_s`), which for equal-sized steps is the window's total rate.
    The worker writes every `run.log_every` steps and at checkpoints, so the store costs one small
    `log_batch` per window: MLflow's sqlite store spends ~10 ms of CPU per call plus ~0.2 ms per
    row, as much as a tenth of a tiny CPU step when every step's ~25 metrics were written.
    """
    LAST_VALUE_KEYS = ("lr",)
    RATE_SUFFIX = "_per_s"

    def __init__(self, tracking_uri: str, run_id: str, enabled: bool):
        self.enabled = enabled and bool(run_id)
        self.run_id = run_id
        self.client = None
        self.window: dict[str, list[float]] = {}
        self.window_step: int | None = None
        self.pending: list = []
        if self.enabled:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=tracking_uri)

    def record(self, metrics: Mapping[str, float], step: int) -> None:
        """Add this step's metrics to the current window (no I/O)."""
        if not self.enabled:
            return
        for key, value in metrics.items():
            self.window.setdefault(key, []).append(float(value))
        self.window_step = step

    def summary(self) -> dict[str, float]:
        """The current window's values as `write()` logs them."""
        out = {}
        for key, values in self.window.items():
            if key in self.LAST_VALUE_KEYS:
                out[key] = values[-1]
            elif key.endswith(self.RATE_SUFFIX) and all(v > 0 for v in values):
                out[key] = len(values) / sum(1.0 / v for v in values)
            else:
                out[key] = sum(values) / len(values)
        return out

    def write(self, model_id: str | None = None, dataset: tuple[str, str] | None = None) -> None:
        """Log the window at its last step and start a new one; asynchronous (MLflow's queue does the I/O).
        `model_id`: the logged model the values describe; `dataset`: (name, digest) they were computed on."""
        if not self.enabled or self.window_step is None:
            return
        import mlflow

        timestamp = int(1000 * time.time())
        name, digest = dataset if dataset else (None, None)
        entries = [mlflow.entities.Metric(k, v, timestamp, self.window_step, model_id=model_id, dataset_name=name,
                                          dataset_digest=digest[:DATASET_DIGEST_CHARS] if digest else None)
                   for k, v in self.summary().items()]
        self.window, self.window_step = {}, None
        for start in range(0, len(entries), 1000):  # log_batch limit: 1000 metrics per call
            operation = self.client.log_batch(self.run_id, metrics=entries[start : start + 1000], synchronous=False)
            if operation is not None:
                self.pending.append(operation)

    def log_metrics(self, metrics: Mapping[str, float], step: int, model_id: str | None = None,
                    dataset: tuple[str, str] | None = None) -> None:
        """Log one step's metrics (a window of one step), asynchronously as `write()`: `flush()` waits."""
        self.write()
        self.record(metrics, step)
        self.write(model_id, dataset)

    def flush(self) -> None:
        """Write the open window and wait for all writes (called at checkpoints, so logged == checkpointed)."""
        self.write()
        for operation in self.pending:
            operation.wait()
        self.pending = []

    def log_image(self, image_HW3: np.ndarray, artifact_file: str) -> None:
        if not self.enabled:
            return
        self.client.log_image(self.run_id, image_HW3, artifact_file=artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            self.client.log_text(self.run_id, text, artifact_file)


def image_grid(images_BHW3: np.ndarray, columns: int = 4) -> np.ndarray:
    """uint8 images (B, H, W, 3) -> one (rows*H, columns*W, 3) grid, padded with black."""
    B, H, W, _ = images_BHW3.shape
    columns = min(columns, B)
    rows = -(-B // columns)
    grid = np.zeros((rows * H, columns * W, 3), dtype=np.uint8)
    for index in range(B):
        r, c = divmod(index, columns)
        grid[r * H : (r + 1) * H, c * W : (c + 1) * W] = images_BHW3[index]
    return grid


__all__ = [
    "flatten_params", "redact_uri", "is_secret_key", "open_run", "finish_run", "log_export_and_register",
    "RunLogger", "image_grid", "resolve_tracking_uri", "RUN_NAME_TAG", "log_dataset_input",
    "EXPERIMENT_KIND_TAG", "MODEL_TRAINING", "MODEL_TRAINING_VIEW", "experiment_ui_url", "probe_server",
    "DATASET_DIGEST_CHARS", "DATASET_CONTEXT_TAG",
]
