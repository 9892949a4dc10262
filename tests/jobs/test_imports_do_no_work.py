"""Importing an entry point does no work: no module of this repository sets an environment variable or
reads a file of the repository (a config, a recipe) while `jobs/*` is imported; that happens when a job
runs (`trainer.ray_session.offline_models`, `demo.config.recipe`).

Design: a fresh interpreter imports every `jobs` module under an audit hook (`sys.addaudithook`).
`os.putenv` events are attributed to the first frame outside the standard library's mapping code;
third-party libraries may set their own variables at import (torch, Ray and MLflow do), so only a
frame in a file of this repository counts. `open` events count for files of the repository other
than Python sources and their caches (the import system also opens folders and path-hook names).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENTRY_MODULES = sorted(f"jobs.{p.stem}" for p in (REPO / "jobs").glob("*.py") if p.name != "__init__.py")

PROBE = r"""
import importlib, json, os, sys

repo, modules = sys.argv[1], sys.argv[2:]
mapping_code = ("os.py", "<frozen os>", "_collections_abc.py", "<frozen _collections_abc>")
found = {"environment": [], "files": []}


def ours(filename):
    return filename.startswith(repo + os.sep) and "site-packages" not in filename


def hook(event, args):
    if event == "os.putenv":
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename.endswith(mapping_code):
            frame = frame.f_back
        if frame is not None and ours(frame.f_code.co_filename):
            name = os.fsdecode(args[0])
            found["environment"].append(f"{name} set by {frame.f_code.co_filename}:{frame.f_lineno}")
    elif event == "open" and isinstance(args[0], str) and ours(os.path.abspath(args[0])):
        path = os.path.abspath(args[0])
        # not the import system's folder probes, nor the package metadata an editable install leaves in the
        # repository (`*.egg-info`), which libraries read when they list entry points (MLflow's plugins)
        if not path.endswith((".py", ".pyc")) and ".egg-info" + os.sep not in path and os.path.isfile(path):
            found["files"].append(path)


before = dict(os.environ)
sys.addaudithook(hook)
for name in modules:
    importlib.import_module(name)
found["changed"] = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
print(json.dumps(found))
"""


# Variables the jobs set when they run: unset in the probe, since `setdefault` sets nothing where they are set.
JOB_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "RAY_AUTH_MODE", "RAY_worker_niceness")


def probe(root: Path, modules: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in JOB_VARIABLES} | {"PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, "-c", PROBE, str(root), *modules], cwd=root, capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_importing_the_entry_points_sets_no_variable_and_reads_no_file():
    assert {"jobs.demo", "jobs.evaluate", "jobs.generate", "jobs.precompute", "jobs.train"} <= set(ENTRY_MODULES)
    found = probe(REPO, ENTRY_MODULES)
    assert found["environment"] == [] and found["files"] == [], found
    # what did change was set by the libraries themselves, never a variable the jobs own
    assert not set(JOB_VARIABLES) & set(found["changed"]), found["changed"]


def test_the_probe_sees_a_variable_set_and_a_file_read_at_import(tmp_path):
    """The check's teeth: a module that does both at import, in a stand-in repository."""
    (tmp_path / "recipe.yaml").write_text("a: 1\n")
    (tmp_path / "stand_in.py").write_text("import os\nos.environ.setdefault('HF_HUB_OFFLINE', '1')\n"
                                          "RECIPE = open(os.path.join(os.path.dirname(__file__), 'recipe.yaml')).read()\n")
    found = probe(tmp_path, ["stand_in"])
    assert len(found["environment"]) == 1 and "HF_HUB_OFFLINE set by" in found["environment"][0], found
    assert found["files"] == [str(tmp_path / "recipe.yaml")] and "HF_HUB_OFFLINE" in found["changed"]
