"""The README's quickstart, extracted from the README and run as written in a copy of the repository:
shards -> tokenizer -> token cache -> transformer -> generated images -> evaluation, each step a
separate command with its own local Ray instance, as a new user runs it. The README cannot drift
from what runs.

The run itself is a chain end to end like the demo's smoke run (minutes of Ray start-ups and tiny
training): marked `smoke`, `make demo-smoke` (and so `.ci/run`) runs it beside the demo's chain, and
`make test` only checks that the block is found.
Run: .venv/bin/pytest -m smoke tests/test_readme_quickstart.py -q
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MARKER = "<!-- quickstart:"


def quickstart_block(readme: str) -> str:
    """The bash block right after the quickstart marker."""
    after = readme[readme.index(MARKER):]
    start = after.index("```bash\n") + len("```bash\n")
    return after[start : after.index("\n```", start)]


def test_the_quickstart_block_is_found():
    block = quickstart_block((REPO / "README.md").read_text())
    assert block.startswith("source .venv/bin/activate") and "hart-evaluate run" in block


@pytest.mark.smoke
def test_readme_quickstart_runs_as_written(tmp_path):
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO, checkout, ignore=shutil.ignore_patterns(
        ".venv", ".git", "runs", "tests", "__pycache__", ".pytest_cache", "*.egg-info", "mlruns"))
    (checkout / ".venv").symlink_to(Path(sys.prefix))  # the environment `make install` made
    script = checkout / "quickstart.sh"
    script.write_text("set -euo pipefail\n" + quickstart_block((REPO / "README.md").read_text()) + "\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")}
    done = subprocess.run(["bash", str(script)], cwd=checkout, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    runs = checkout / "runs"
    assert (runs / "train/tiny-tokenizer/export/tokenizer/config.json").is_file()
    assert json.loads((runs / "cache/shapes-tiny/manifest.json").read_text())["text_features_shape"] == [16, 384]
    assert {p.name for p in (runs / "train/tiny-joint/export").iterdir()} >= {"llm", "tokenizer"}
    assert [p.name for p in (runs / "samples").iterdir()] == ["000000-a-red-circle.png"]
    figures = json.loads((runs / "eval/metrics.json").read_text())["figures"]
    assert figures["images"] == 18 and 0 <= figures["joint_accuracy"] <= 1
    # every step reported its progress as it went
    assert "[train] step " in done.stdout and " ETA " in done.stdout and "committed shard-00003" in done.stdout
