"""benchmarks/gpu.py on the CPU: CI has no GPU, so its `--smoke` mode (tiny presets and sizes) is what keeps
every row's code path running where no GPU is available. The figures are not checked for
speed, only that each row produced finite, positive ones."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import gpu as gpu_script

REPO = Path(__file__).resolve().parents[2]

TRAIN = [f"train {res}px {mode}" for mode in ("eager", "compile", "flex+compile") for res in (256, 512, 1024)]
GENERATE = [f"generate {res}px b{batch} {mode}" for mode in ("eager", "compile") for res in (512, 1024) for batch in (1, 2)]
TOKENIZER = [f"tokenizer {res}px encode" for res in (256, 512, 1024)]
NUMBER = re.compile(r"[-+]?(?:\d[\d,]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")

# Runs the script as `python -m benchmarks.gpu --smoke` would, then says whether Ray or MLflow got imported.
RUN_AND_CHECK_IMPORTS = """
import runpy, sys
sys.argv = ["benchmarks/gpu.py", "--smoke"]
try:
    runpy.run_module("benchmarks.gpu", run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as exit:
    code = exit.code
print("imported:", sorted(m for m in ("ray", "mlflow") if m in sys.modules))
sys.exit(code)
"""


def first_number(cell: str) -> float:
    match = NUMBER.search(cell)
    assert match, f"no number in {cell!r}"
    return float(match.group().replace(",", ""))


def test_smoke_run_prints_every_row_with_finite_positive_figures():
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", RUN_AND_CHECK_IMPORTS], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "imported: []" in out  # no Ray, no MLflow
    assert "no figure here is a GPU figure" in out
    lines = out[out.index("| row | setting |"):].splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["row", "setting", "time", "throughput", "FLOP/step (counted)", "MFU", "peak GiB", "warm-up s",
                      "row s"]
    rows = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    assert list(rows) == TRAIN + GENERATE + TOKENIZER
    for name, row in rows.items():
        if "flex" in name:  # FlexAttention has no CPU backward
            assert row["time"] == "n/a (CPU: flex has no backward)", row
            continue
        assert not any(word in row["time"] for word in ("skipped", "OOM", "error")), row
        for column in ("time", "throughput"):
            value = first_number(row[column])
            assert math.isfinite(value) and value > 0, (name, column, row[column])
        for column in ("warm-up s", "row s"):  # printed to 0.1 s: a tiny row may show 0.0
            value = first_number(row[column])
            assert math.isfinite(value) and value >= 0, (name, column, row[column])
        if name.startswith("train"):
            flops = first_number(row["FLOP/step (counted)"])
            assert math.isfinite(flops) and flops > 0, row
            assert row["MFU"].startswith("n/a"), row  # no bf16 peak for a CPU
    print(f"smoke run: {time.monotonic() - started:.1f} s")


def test_flex_rows_train_with_flex():
    """The flex rows hand attention="flex" to the worker's `parallelize` (which refuses it on the CPU:
    FlexAttention has no CPU backward), not a silent sdpa under a flex label."""
    args = gpu_script.parse_args(["--smoke"])
    with pytest.raises(ValueError, match="trains on CUDA only"):
        gpu_script.train_row(args, 256, 1, "flex+compile", torch.device("cpu"), None)


def test_rows_out_of_memory_failing_or_over_budget_do_not_stop_the_run(capsys):
    Row = gpu_script.Row

    def out_of_memory():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    def broken():
        raise RuntimeError("simulated")

    def fine():
        return {"time": "1.0 ms/step", "throughput": "2.00 img/s", "FLOP/step (counted)": "-", "MFU": "-",
                "peak GiB": "n/a (CPU)", "warm-up s": "0.0"}

    rows = [Row("train", "oom", "s", "a", out_of_memory), Row("train", "broken", "s", "a", broken),
            Row("train", "fine", "s", "a", fine), Row("generate", "too long", "s", "b", fine),
            Row("tokenizer", "n/a", "s", "c", None, status="n/a (CPU: flex has no backward)")]
    # Kind "b" is estimated at 100 s, more than the 50 s left: skipped; the others have no estimate.
    gpu_script.run_rows(rows, 50.0, time.monotonic(), torch.device("cpu"), {"b": 100.0})
    assert [row.status for row in rows] == ["OOM", "error (RuntimeError)", None, "skipped (budget)",
                                            "n/a (CPU: flex has no backward)"]
    table = gpu_script.table(rows)
    assert "| fine | s | 1.0 ms/step | 2.00 img/s |" in table
    assert "| oom | s | OOM |" in table and "| too long | s | skipped (budget) |" in table
    # Past the budget nothing starts, whatever the estimates.
    late = [Row("train", "late", "s", "a", fine)]
    gpu_script.run_rows(late, 10.0, time.monotonic() - 11.0, torch.device("cpu"), {})
    assert late[0].status == "skipped (budget)"
    capsys.readouterr()
