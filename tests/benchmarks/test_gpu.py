"""benchmarks/gpu.py on the CPU: CI has no GPU, so its `--smoke` mode (tiny presets and sizes) is what keeps
every row's code path running where no GPU is available. The figures are not checked for
speed, only that each row produced finite, positive ones."""

from __future__ import annotations

import importlib.metadata
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

from benchmarks import gpu as gpu_script

REPO = Path(__file__).resolve().parents[2]

TRAIN = [f"train {res}px {mode}" for mode in ("eager", "compile", "flex+compile") for res in (256, 512, 1024)]
GENERATE = [f"generate {res}px b{batch} {mode}" for mode in ("eager", "compile") for res in (512, 1024) for batch in (1, 2)]
TOKENIZER = [f"tokenizer {res}px encode" for res in (256, 512, 1024)]
NUMBER = re.compile(r"[-+]?(?:\d[\d,]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")

# What a stock CUDA PyTorch image holds; the script must run with these alone (no Ray, MLflow, pydantic...).
STOCK_IMAGE = ("torch", "numpy", "pillow", "safetensors", "pyyaml")


def stock_image_site(folder: Path) -> Path:
    """A folder of links to the STOCK_IMAGE distributions installed here and everything they require
    (extras left out), so `python -S` with this folder on its path sees those packages and no others."""
    folder.mkdir()
    todo, seen = list(STOCK_IMAGE), set()
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:  # a platform-only requirement (e.g. CUDA libraries)
            continue
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
        for top in {file.parts[0] for file in dist.files or [] if file.parts[0] != ".."}:
            link = folder / top
            if not link.exists() and not top.endswith(".pth"):
                link.symlink_to(Path(dist.locate_file(top)).resolve())
    return folder


def first_number(cell: str) -> float:
    match = NUMBER.search(cell)
    assert match, f"no number in {cell!r}"
    return float(match.group().replace(",", ""))


def test_smoke_run_on_a_stock_image_prints_every_row_with_finite_positive_figures(tmp_path):
    """`python -m benchmarks.gpu --smoke` with only STOCK_IMAGE's packages importable (`-S`: no site-packages)."""
    started = time.monotonic()
    site = stock_image_site(tmp_path / "site")
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{REPO}"}
    done = subprocess.run([sys.executable, "-S", "-m", "benchmarks.gpu", "--smoke"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
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
    checks = out[out.index("| check | result | detail |"):].splitlines()[2:]
    assert [line.split("|")[1:3] for line in checks] == [
        [" flex = sdpa gradients, fp32 ", " n/a "], [" flex = sdpa gradients, bf16 autocast ", " n/a "],
        [" op checkpointing = none, nothing recomputed (sdpa, fp32) ", " pass "]]
    print(f"smoke run: {time.monotonic() - started:.1f} s")


def test_gradient_check_passes_equal_gradients_and_fails_a_difference():
    cpu = torch.device("cpu")
    plain, plain_calls = gpu_script.check_gradients(cpu, "sdpa")
    (op, op_calls), (block, block_calls) = (gpu_script.check_gradients(cpu, "sdpa", checkpointing=p) for p in ("op", "block"))
    assert gpu_script.gradients_match(op, plain, 1e-5)[0] and gpu_script.gradients_match(block, plain, 1e-5)[0]
    assert op_calls == plain_calls < block_calls  # what the op check tells apart
    name = next(iter(plain))
    off = {**plain, name: plain[name] + 1e-3 * (1 + plain[name].abs())}  # just outside 1e-4 abs + 1e-4 rel
    passed, summary = gpu_script.gradients_match(off, plain, 1e-4)
    assert not passed and name in summary
    passed, summary = gpu_script.gradients_match({k: v for k, v in plain.items() if k != name}, plain, 1.0)
    assert not passed and name in summary


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


def test_a_check_that_raises_fails_without_stopping_the_others(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated")

    monkeypatch.setattr(gpu_script, "check_gradients", broken)
    results = gpu_script.run_checks(torch.device("cpu"))
    assert [passed for _, passed, _ in results] == [None, None, False]
    assert results[-1][2] == "error (RuntimeError: simulated)"
    capsys.readouterr()
