"""trainer/resume.py: the checkpoint a run resumes from is the one Ray Train's snapshot names, read
from the run folder; a snapshot naming a deleted folder is refused before the workers start.

Run: .venv/bin/pytest tests/trainer/test_resume.py -q
"""

from __future__ import annotations

import json

import pyarrow.fs as pafs
import pytest

from hart.training.checkpoint import CHECKPOINT_FORMAT_VERSION, META_FILE
from trainer.resume import RAY_CHECKPOINT_SNAPSHOT, latest_checkpoint, resumable_checkpoint


def snapshot(run_dir, name):
    run_dir.mkdir(parents=True, exist_ok=True)
    latest = {"checkpoint_dir_name": name} if name else None
    (run_dir / RAY_CHECKPOINT_SNAPSHOT).write_text(json.dumps({"latest_checkpoint_result": latest}))


def test_the_snapshot_names_the_checkpoint(tmp_path):
    fs = pafs.LocalFileSystem()
    root = str(tmp_path)
    assert latest_checkpoint(fs, root, "run") is None  # no run folder: a fresh start
    snapshot(tmp_path / "run", None)
    assert resumable_checkpoint(fs, root, "run") is None  # a snapshot without a checkpoint yet
    for step in (10, 20):  # two checkpoints on disk; the snapshot names the later one
        folder = tmp_path / "run" / f"checkpoint_{step}"
        folder.mkdir()
        (folder / META_FILE).write_text(json.dumps({"step": step, "format_version": 1}))
    snapshot(tmp_path / "run", "checkpoint_20")
    folder, meta = latest_checkpoint(fs, root + "/", "run")
    assert folder == f"{root}/run/checkpoint_20"
    assert meta["step"] == 20 and meta["data_epoch"] == 0 and meta["format_version"] == CHECKPOINT_FORMAT_VERSION
    assert resumable_checkpoint(fs, root, "run") == meta
    assert latest_checkpoint(fs, root, "other-run") is None


def test_a_snapshot_naming_a_missing_or_unreadable_checkpoint_is_refused(tmp_path):
    fs = pafs.LocalFileSystem()
    snapshot(tmp_path / "run", "checkpoint_30")
    with pytest.raises(ValueError, match="names checkpoint_30, but .*meta.json is missing"):
        latest_checkpoint(fs, str(tmp_path), "run")
    (tmp_path / "run" / RAY_CHECKPOINT_SNAPSHOT).write_text("{not json")
    with pytest.raises(ValueError, match="cannot read Ray Train's checkpoint list"):
        latest_checkpoint(fs, str(tmp_path), "run")
    snapshot(tmp_path / "run", "checkpoint_40")
    (tmp_path / "run" / "checkpoint_40").mkdir()
    (tmp_path / "run" / "checkpoint_40" / META_FILE).write_text(json.dumps({"step": 1, "format_version": 99}))
    with pytest.raises(ValueError, match="newer than this code"):
        latest_checkpoint(fs, str(tmp_path), "run")
