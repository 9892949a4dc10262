"""Training checkpoints as MLflow logged models, which evaluation figures are logged against.

Design:
- A checkpoint becomes a logged model of type `hart-checkpoint` named `<run.name>-step<N>`: it is in the
  experiment's Models view and on its run's page at step N (a run output), with params `step` and
  `checkpoint_uri`, the checkpoint folder's storage URI with credentials redacted. The weights stay where
  Ray Train wrote them: the model's own artifact folder (assigned by the store) stays empty unless
  `run.checkpoint_models: copy` uploads the checkpoint's weight files into it (`COPIED_FILES`: weights, EMA
  weights, meta.json; not the optimizer). `off` logs no models. `run.checkpoint_models_every: k` keeps
  every k-th checkpoint (the steps that are multiples of k x `run.checkpoint_every`) and the final one,
  so a resumed run picks the same steps.
- Rank 0 opens the model (status PENDING) at a checkpoint step *before* that step's in-training
  evaluation, whose figures are then logged against it (`model_id`, and the prompt set as their
  dataset: `pipelines.eval_protocol.prompt_set_identity`), and marks it READY once `ray.train.report` has
  returned, when the checkpoint is persisted. A model left PENDING names a checkpoint that was never
  written. Evaluation steps that are not checkpoint steps stay run metrics: no checkpoint holds the
  weights they measured (an `eval.every_steps` that divides `run.checkpoint_every` ranks every
  checkpoint). Training metrics (loss windows) stay run metrics, so the Models view's metric columns
  are the evaluation's figures. `hart-evaluate --run-id R --step N` logs its figures against run R's
  model of step N (`model_of_step`).
- Idempotent by step: a worker's first request searches the run's checkpoint models once; then a new
  checkpoint costs three small requests (create, the run output, finalize), beside the checkpoint's
  upload. A step redone after a restore (the checkpoint of that step was never recorded by Ray) reuses
  the model its first attempt opened, and the restored step's model, if a crash came between the
  report and finalize, is marked READY at the restore (in `copy` mode without its files).
- `mlflow` is imported inside the functions (the rule of modules Ray workers import: trainer/tracking.py).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hart.training.checkpoint import META_FILE
from pipelines import storage
from trainer.config import RunSection
from trainer.resume import checkpoint_dir_name
from trainer.tracking import redact_uri

CHECKPOINT_MODEL_TYPE = "hart-checkpoint"
STEP_PARAM = "step"
URI_PARAM = "checkpoint_uri"
MODEL_NAME_REFUSED = r"[/:.%\"']"  # MLflow 3.17's logged-model name check
COPIED_FILES = ("model.safetensors", "ema.safetensors", META_FILE)  # run.checkpoint_models: copy


def checkpoint_model_name(run_name: str, step: int) -> str:
    """`<run.name>-step<N>`, with the characters MLflow refuses in a model name (`MODEL_NAME_REFUSED`, e.g. the
    dot of `hart-0.7b-finetune`) written as `_`."""
    return re.sub(MODEL_NAME_REFUSED, "_", f"{run_name}-step{step:08d}")


def logs_model(run: RunSection, step: int) -> bool:
    """Whether the checkpoint reported at `step` becomes a logged model (module doc)."""
    if run.checkpoint_models == "off":
        return False
    return step == run.max_steps or step % (run.checkpoint_every * run.checkpoint_models_every) == 0


def run_checkpoint_models(client, run_id: str, experiment_id: str) -> dict[int, Any]:
    """{step: LoggedModel} of the checkpoint models run `run_id` logged (the first one of a step)."""
    found: dict[int, Any] = {}
    token = None
    while True:
        page = client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'",
                                           page_token=token)
        for model in page:
            if model.model_type == CHECKPOINT_MODEL_TYPE and STEP_PARAM in model.params:
                found.setdefault(int(model.params[STEP_PARAM]), model)
        token = page.token
        if not token:
            return found


def model_of_step(client, run_id: str, step: int):
    """Run `run_id`'s checkpoint model of `step`, or None (none logged at that step)."""
    experiment_id = client.get_run(run_id).info.experiment_id
    return run_checkpoint_models(client, run_id, experiment_id).get(step)


class CheckpointModels:
    """Rank 0's logged models of a run's checkpoints (module doc); a no-op where its `RunLogger` is one
    (other ranks, no run) and with `run.checkpoint_models: off`."""

    def __init__(self, client, run_id: str, run: RunSection, enabled: bool = True):
        self.enabled = enabled and client is not None and bool(run_id) and run.checkpoint_models != "off"
        self.client, self.run_id, self.run = client, run_id, run
        self.experiment_id = ""
        self.by_step: dict[int, Any] | None = None

    def known(self) -> dict[int, Any]:
        if self.by_step is None:
            self.experiment_id = self.client.get_run(self.run_id).info.experiment_id
            self.by_step = run_checkpoint_models(self.client, self.run_id, self.experiment_id)
        return self.by_step

    def open(self, step: int) -> str | None:
        """The id of the model of the checkpoint about to be reported at `step` (created PENDING, or the
        one an earlier attempt at this step made); None where no model is logged for it."""
        if not self.enabled or not logs_model(self.run, step):
            return None
        known = self.known()
        if step not in known:
            from mlflow.entities import LoggedModelOutput

            uri = storage.join(self.run.storage_path, self.run.name, checkpoint_dir_name(step))
            model = self.client.create_logged_model(
                self.experiment_id, name=checkpoint_model_name(self.run.name, step), source_run_id=self.run_id,
                params={STEP_PARAM: str(step), URI_PARAM: redact_uri(uri)}, model_type=CHECKPOINT_MODEL_TYPE)
            self.client.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, step)])
            known[step] = model
        return known[step].model_id

    def ready(self, step: int, directory: str | Path | None = None) -> None:
        """Mark the model of `step` READY (its checkpoint is persisted), after uploading the checkpoint's
        weight files from `directory` in `copy` mode; nothing where no model was opened or it is READY."""
        if not self.enabled:
            return
        from mlflow.entities import LoggedModelStatus

        model = self.known().get(step)
        if model is None or model.status == LoggedModelStatus.READY:
            return
        if self.run.checkpoint_models == "copy" and directory is not None:
            with tempfile.TemporaryDirectory(prefix="hart-model-") as staging:
                for name in COPIED_FILES:
                    if Path(directory, name).exists():
                        shutil.copy2(Path(directory, name), Path(staging, name))
                self.client.log_model_artifacts(model.model_id, staging)
        self.by_step[step] = self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)


__all__ = ["CheckpointModels", "CHECKPOINT_MODEL_TYPE", "STEP_PARAM", "URI_PARAM", "COPIED_FILES",
           "checkpoint_model_name", "logs_model", "run_checkpoint_models", "model_of_step"]
