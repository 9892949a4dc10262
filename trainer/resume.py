"""Which checkpoint a training run resumes from, read the way Ray Train will restore it.

The driver reads it before starting (a run with no checkpoint starts a new MLflow run; one with a
checkpoint continues its run), the online-mode reader reads the visits that checkpoint had
consumed (`PROGRESS_FILE`), and the demo's outputs check reads the final one.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow.fs as pafs

from hart.training.checkpoint import META_FILE, upgrade_meta
from pipelines import storage


# Train V2 keeps its list of reported checkpoints in this file of the run folder and restores the
# latest one it names (docs/design/ray.md, "Restore from the run folder"); reading it tells the
# driver what the workers will resume.
RAY_CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"
# Online mode: the visits (epoch, shard) a checkpoint had consumed whole, beside its meta.json
# (pipelines/online.py); the online read stage skips them.
PROGRESS_FILE = "progress.json"


def checkpoint_dir_name(step: int) -> str:
    """The folder of the checkpoint reported at `step`, under `<run.storage_path>/<run.name>/`."""
    return f"checkpoint_step{step:08d}"


def resumable_checkpoint(fs, storage_path: str, run_name: str) -> dict[str, Any] | None:
    """meta.json of the checkpoint Ray Train will restore for `run_name`, or None when it starts fresh."""
    found = latest_checkpoint(fs, storage_path, run_name)
    return found[1] if found else None


def latest_checkpoint(fs, storage_path: str, run_name: str) -> tuple[str, dict[str, Any]] | None:
    """(folder path in `fs`, meta.json) of the checkpoint Ray Train would restore for `run_name`, or None.

    ValueError when Ray's snapshot names a checkpoint folder that is gone (a partial delete): Ray
    would hand the workers a checkpoint it cannot read.
    """
    run_dir = f"{storage_path.rstrip('/')}/{run_name}"
    snapshot_path = f"{run_dir}/{RAY_CHECKPOINT_SNAPSHOT}"
    if fs.get_file_info(snapshot_path).type == pafs.FileType.NotFound:
        return None
    try:
        latest = json.loads(storage.read_bytes(fs, snapshot_path)).get("latest_checkpoint_result")
        name = latest["checkpoint_dir_name"] if latest else None
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"cannot read Ray Train's checkpoint list {snapshot_path}: {exc}") from None
    if name is None:
        return None
    meta_path = f"{run_dir}/{name}/{META_FILE}"
    if not storage.exists(fs, meta_path):
        raise ValueError(
            f"run {run_name!r}: Ray Train's checkpoint list {snapshot_path} names {name}, but {meta_path} is missing; "
            f"restore that checkpoint, or delete {run_dir} to start the run over"
        )
    return f"{run_dir}/{name}", upgrade_meta(json.loads(storage.read_bytes(fs, meta_path)))
