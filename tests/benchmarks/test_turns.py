"""benchmarks/turns.py: two real processes take turns (SIGSTOP / SIGCONT), and the window
bookkeeping counts only what ran wholly inside a side's own turns."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from benchmarks.processes import process_tree
from benchmarks.turns import Turn, Turns, paired_ratios, windows_in_turns

# A process (and a child it forks, to check that freezing reaches descendants) appending the wall
# clock to a file every millisecond.
TICKER = """
import os, sys, time
path = sys.argv[1]
if os.fork() == 0:
    path += ".child"
with open(path, "w", buffering=1) as out:
    while True:
        out.write(f"{time.time():.6f}\\n")
        time.sleep(0.001)
"""


def stamps(path: Path) -> list[float]:
    return [float(v) for v in path.read_text().split()] if path.exists() else []


def state(pid: int) -> str:
    return psutil.Process(pid).status()


def test_two_processes_take_turns_and_are_resumed(tmp_path):
    procs = {name: subprocess.Popen([sys.executable, "-c", TICKER, str(tmp_path / name)]) for name in ("a", "b")}
    try:
        deadline = time.time() + 20
        while not all(stamps(tmp_path / f"{n}.child") and stamps(tmp_path / n) for n in procs):
            assert time.time() < deadline, "tickers did not start"
            time.sleep(0.05)
        sides = {name: (lambda p=proc: process_tree(p.pid)) for name, proc in procs.items()}
        with Turns(sides, block_s=0.25) as turns:
            turns.start("a")
            time.sleep(2.2)
            turns.stop()
        assert [t.side for t in turns.turns[:4]] == ["a", "b", "a", "b"]
        assert all(t.end > t.start for t in turns.turns)
        assert len(turns.turns) >= 6
        for name in procs:  # both processes and their children run again
            for pid in process_tree(procs[name].pid):
                assert state(pid) != psutil.STATUS_STOPPED, (name, pid)
        time.sleep(0.1)
        for name in procs:
            for path in (tmp_path / name, tmp_path / f"{name}.child"):
                ticks = stamps(path)
                other = [t for t in turns.turns if t.side != name]
                # nothing ran inside the other side's turns (10 ms for the signal to land)
                assert not [x for x in ticks for t in other if t.start + 0.01 < x < t.end - 0.01], path
                own = [t for t in turns.turns if t.side == name]
                assert all(any(t.start <= x <= t.end for x in ticks) for t in own), path
                assert ticks[-1] > turns.turns[-1].end  # still ticking after the stop
    finally:
        for proc in procs.values():
            for pid in process_tree(proc.pid):
                subprocess.run(["kill", "-CONT", str(pid)])
                subprocess.run(["kill", "-KILL", str(pid)])
            proc.wait()


def make_turns(spans: list[tuple[str, float, float]]) -> Turns:
    turns = Turns({"a": list, "b": list}, block_s=1.0)
    turns.turns = [Turn(*span) for span in spans]
    return turns


def test_windows_count_only_spans_inside_one_own_turn():
    turns = make_turns([("a", 0.0, 1.0), ("b", 1.0, 2.0), ("a", 2.0, 3.0)])
    # side a steps every 0.1 s over the whole 3 s: windows across the b turn must not count
    ticks = [round(0.1 * i, 3) for i in range(31)]
    by_turn = windows_in_turns(turns, "a", ticks, size=2)
    assert set(by_turn) == {0, 1}
    for values in by_turn.values():
        assert values and all(v == pytest.approx(0.1) for v in values)
    # margins: a window touching a turn's edge (within 10 ms) is not counted
    assert turns.inside("a", 0.0, 0.5) is None and turns.inside("a", 0.02, 0.5) == 0
    assert turns.inside("a", 0.5, 1.5) is None
    assert turns.inside("b", 1.2, 1.8) == 0


def test_paired_ratios_bracket_each_turn_with_its_neighbours():
    a = {0: [1.1], 1: [1.2, 1.2, 1.2]}
    b = {0: [1.0], 1: [2.0]}
    # a went first: a0 has no b turn before it, only b0 after; a1 sits between b0 and b1
    assert paired_ratios(a, b, a_first=True) == [pytest.approx(1.1 / 1.0), pytest.approx(1.2 / 1.5)]
    # a went second: a0 sits between b0 and b1, a1 after b1 only
    assert paired_ratios(a, b, a_first=False) == [pytest.approx(1.1 / 1.5), pytest.approx(1.2 / 2.0)]


def test_turns_reject_bad_arguments():
    with pytest.raises(ValueError, match="two sides"):
        Turns({"a": list}, block_s=1.0)
    with pytest.raises(ValueError, match="block_s"):
        Turns({"a": list, "b": list}, block_s=0)
