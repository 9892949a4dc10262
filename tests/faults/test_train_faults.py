"""Training under faults: SIGKILL a Ray Train worker mid-run, and SIGKILL the whole job then resubmit.

The training engineer's tests (tests/jobs/test_train.py) cover the `run.fail_at_step` hook (an
exception in the worker, then a manual resubmit). Here the faults are real kills:

- worker kill (fast): `run_training` with `run.max_failures=1` runs in this process; a thread waits
  for the step-2 checkpoint, finds the `RayTrainWorker` actor of this job in the GCS actor table and
  SIGKILLs its process. Ray Train must restart the worker group by itself, restore the checkpoint,
  and finish with the full step count, one MLflow run, every step logged, and a step-N checkpoint.
- job kill (slow): `python -m jobs.train` with its own local Ray in its own process group is
  SIGKILLed after its first checkpoint; resubmitting the same command resumes from it, and its step
  ledger (`data.ledger`) shows the stream continued exactly; a copy of the killed run's storage and
  MLflow store, resubmitted with `run.ignore_data_position`, is the negative control that must fail it.

Run: .venv/bin/pytest tests/faults/test_train_faults.py -q  (job kill: -m slow)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from hart.training.checkpoint import load_training_state
from trainer import tracking
from trainer.driver import run_training
from tests.faults.accounting import check_ledger
from tests.training_fixtures import REPO, tiny_config


def checkpoints(storage: Path, name: str) -> list[str]:
    folder = storage / name
    return sorted(p.name for p in folder.glob("checkpoint_step*")) if folder.exists() else []


def registered(storage: Path, name: str, checkpoint: str) -> bool:
    """True once Ray Train's controller has recorded `checkpoint` (its snapshot file names it).

    The checkpoint folder appears while it is still being uploaded and before the controller
    registers it; a kill in that window rightly restarts from the previous checkpoint, so the
    trial waits for the snapshot to be sure what "the last checkpoint" is.
    """
    snapshot = storage / name / "checkpoint_manager_snapshot.json"
    return snapshot.exists() and checkpoint in snapshot.read_text()


def train_worker_pids(ray) -> list[int]:
    from ray._private import state

    job_id = ray.get_runtime_context().get_job_id()
    return [a["Pid"] for a in state.actors().values()
            if a["State"] == "ALIVE" and a["JobID"] == job_id and a["ActorClassName"] == "RayTrainWorker" and a["Pid"]]


def kill_a_worker_once_registered(storage: Path, name: str, checkpoint: str, record: dict,
                                  which: int = 0) -> threading.Thread:
    """A started thread that SIGKILLs a `RayTrainWorker` of this job (`which`: its index among them) once
    Ray Train has registered `checkpoint`; `record` gets the checkpoints on disk at the kill and the pid."""
    import ray

    def killer() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not registered(storage, name, checkpoint):
            time.sleep(0.05)
        while time.time() < deadline:
            pids = train_worker_pids(ray)
            if pids:
                record["checkpoints_at_kill"] = checkpoints(storage, name)
                record["pid"] = pids[which]
                os.kill(record["pid"], signal.SIGKILL)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=killer)
    thread.start()
    return thread


def run_steps(tracking_uri: str, experiment: str, run_name: str) -> tuple[int, list[int]]:
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{tracking.RUN_NAME_TAG}` = '{run_name}'")
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")] if runs else []
    return len(runs), steps


@pytest.mark.slow  # `make chaos`; `make test` keeps Ray Train's own restore after a crash (tests/jobs/test_train.py)
def test_worker_sigkill_restores_from_checkpoint_by_itself(train_assets, tmp_path):
    max_steps = 6
    config = tiny_config(train_assets, "ar", tmp_path, f"run.max_steps={max_steps}", "run.checkpoint_every=2",
                         "run.max_failures=1", "run.export=false", "tracking.sample_every=0", "run.name=worker-kill")
    storage = tmp_path / "storage"
    record: dict = {}
    thread = kill_a_worker_once_registered(storage, config.run.name, "checkpoint_step00000002", record)
    outcome = run_training(config)
    thread.join()
    assert "pid" in record, "no training worker was found to kill"
    assert f"checkpoint_step{max_steps:08d}" not in record["checkpoints_at_kill"], "killed too late to prove anything"
    assert outcome["final_step"] == max_steps
    state = load_training_state(outcome["checkpoint_path"])
    assert state.step == max_steps and state.meta["mlflow_run_id"] == outcome["run_id"]
    assert state.scheduler["last_epoch"] == max_steps  # no optimizer step repeated or skipped in the state
    num_runs, steps = run_steps(config.tracking.tracking_uri, config.tracking.experiment, config.run.name)
    assert num_runs == 1 and set(steps) == set(range(1, max_steps + 1)), steps
    # Restored, not restarted: steps up to the registered checkpoint were never run again (steps
    # between that checkpoint and the kill may be redone and logged twice; nothing before it).
    assert steps.count(1) == 1 and steps.count(2) == 1, f"the restarted worker did not restore step 2: {sorted(steps)}"
    print(f"worker SIGKILL: pid {record['pid']} with {record['checkpoints_at_kill']} on disk; "
          f"metric steps logged {sorted(steps)}")


@pytest.mark.slow
def test_job_sigkill_then_resubmit_resumes(train_assets, tmp_path):
    max_steps = 6
    # log_every=1 on both submissions (train_tiny.yaml logs 5-step window means): every step's metric row is checked
    settings = [f"run.max_steps={max_steps}", "run.checkpoint_every=2", "run.log_every=1", "run.export=false",
                "tracking.sample_every=0", "run.name=job-kill", "data.ledger=true"]
    config = tiny_config(train_assets, "ar", tmp_path, *settings)
    storage = tmp_path / "storage"
    base = [f"run.storage_path={storage}", f"model.tokenizer_checkpoint={train_assets['tokenizer']}",
            f"data.cache={train_assets['cache']}", "data.batch_size=8", "optim.lr=0.002", "optim.warmup_steps=0",
            "optim.schedule=constant", "ema_decay=0.9", f"tracking.tracking_uri={config.tracking.tracking_uri}",
            "tracking.sample_prompts=['a red circle']", *settings]
    command = [sys.executable, "-m", "jobs.train", "--stage", "ar", "--config", str(REPO / "jobs/configs/train_tiny.yaml")]
    for item in base:
        command += ["--set", item]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    process = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 400
        # kill once Ray has registered the first checkpoint: before that, a resubmission has nothing to
        # resume and rightly starts over in a new MLflow run (trainer.resume.resumable_checkpoint)
        while (time.time() < deadline and process.poll() is None
               and not registered(storage, "job-kill", "checkpoint_step00000002")):
            time.sleep(0.2)
        assert process.poll() is None, "the job ended before the kill"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    at_kill = checkpoints(storage, "job-kill")
    assert at_kill and f"checkpoint_step{max_steps:08d}" not in at_kill
    # the negative control resumes a copy of the killed run (checkpoints and MLflow store) ignoring the position
    control = tmp_path / "control"
    shutil.copytree(storage, control / "storage")
    shutil.copy(tmp_path / "mlflow.db", control / "mlflow.db")
    outcome = run_training(config)  # resubmit: same name, same storage
    assert outcome["final_step"] == max_steps
    num_runs, steps = run_steps(config.tracking.tracking_uri, config.tracking.experiment, "job-kill")
    assert num_runs == 1 and set(steps) == set(range(1, max_steps + 1)), steps
    _, problems = check_ledger(config, outcome["checkpoint_path"], max_steps)
    print(f"job SIGKILL with {at_kill} on disk; resumed to step {outcome['final_step']}; steps logged {sorted(steps)}; "
          f"ledger problems: {problems or 'none'}")
    assert not problems
    ignored = tiny_config(train_assets, "ar", control, *settings, "run.ignore_data_position=true")
    control_outcome = run_training(ignored)
    _, control_problems = check_ledger(ignored, control_outcome["checkpoint_path"], max_steps)
    print(f"negative control (position ignored): ledger problems {control_problems}")
    assert any("twice" in p for p in control_problems)
