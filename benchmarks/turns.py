"""Turn-taking between two sets of processes, for paired timing on a host whose speed drifts.

Why: a shared 2-core VM's speed moves 10-30% over minutes (hypervisor steal, neighbours), more than
the few percent `benchmarks/ray_overhead.py` measures (the Ray Train wrapper against a bare step
loop). Running A, then B, then A cancels only the slow part of that drift: bracketed whole runs put
the same ratio anywhere between 0.88 and 1.41. Here both sides run during the same minutes and take
turns: one side runs alone for `block_s` seconds while the other is frozen with SIGSTOP (SIGCONT
resumes it exactly where it stopped; no Ray timeout is shorter than the seconds a turn lasts), and
the sides swap. Every turn is logged on the wall clock, and a measurement window counts only if it
lies wholly inside one of its side's turns: no counted window holds a frozen spell, a switch, or the
other side's work.

A side is a function returning its current process ids (re-listed at every switch: Ray starts
workers as it goes; `benchmarks.processes.process_tree` lists a tree). Freezing re-lists until no
new process appears, so a child forked during the switch is caught too. The two vCPUs of such a VM
can differ in speed by 3-7% (two identical loops, each pinned to its own vCPU), so two processes
compared while the scheduler places them freely carry that difference as if it were theirs:
`benchmarks.processes.pin_threads` confines both to the same core(s). Whatever happens,
`resume_all()` (also on context exit) SIGCONTs both sides: a benchmark that dies must not leave
frozen processes behind.

Needs POSIX signals (Linux, macOS).
"""

from __future__ import annotations

import os
import signal
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable


def _signal(pids, sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:  # ended since it was listed
            pass


@dataclass(frozen=True)
class Turn:
    side: str
    start: float  # wall clock (time.time()), after the other side was frozen and this one resumed
    end: float  # wall clock, before this side was frozen again


class Turns:
    """Alternate two sides, `block_s` seconds each, until `done` is set; `turns` logs who ran when."""

    def __init__(self, sides: dict[str, Callable[[], list[int]]], block_s: float):
        if len(sides) != 2:
            raise ValueError(f"need exactly two sides, got {list(sides)}")
        if block_s <= 0:
            raise ValueError(f"block_s must be > 0, got {block_s}")
        self.sides, self.block_s = sides, block_s
        self.turns: list[Turn] = []
        self.done = threading.Event()
        self._frozen: dict[str, set[int]] = {name: set() for name in sides}
        self._thread = threading.Thread(target=self._run, daemon=True)

    def freeze(self, side: str) -> None:
        seen: set[int] = set()
        for _ in range(10):  # until no new process appears (a fork during the stop)
            pids = set(self.sides[side]()) - seen
            if not pids:
                break
            _signal(pids, signal.SIGSTOP)
            seen |= pids
        self._frozen[side] |= seen

    def resume(self, side: str) -> None:
        _signal(self._frozen[side] | set(self.sides[side]()), signal.SIGCONT)
        self._frozen[side] = set()

    def resume_all(self) -> None:
        for side in self.sides:
            self.resume(side)

    def start(self, first: str) -> "Turns":
        """Freeze the other side and give `first` the machine; the switching runs in a thread."""
        self._first = first
        self._thread.start()
        return self

    def _run(self) -> None:
        order = [self._first, next(s for s in self.sides if s != self._first)]
        self.freeze(order[1])
        self.resume(order[0])
        try:
            index = 0
            while not self.done.is_set():
                side, other = order[index % 2], order[(index + 1) % 2]
                started = time.time()
                self.done.wait(self.block_s)
                self.turns.append(Turn(side, started, time.time()))
                if self.done.is_set():
                    break
                self.freeze(side)
                self.resume(other)
                index += 1
        finally:
            self.resume_all()

    def stop(self) -> None:
        self.done.set()
        self._thread.join()
        self.resume_all()

    def __enter__(self) -> "Turns":
        return self

    def __exit__(self, *exc) -> None:
        if self._thread.is_alive():
            self.stop()
        else:
            self.resume_all()

    def inside(self, side: str, start: float, end: float, margin: float = 0.01) -> int | None:
        """Index (among `side`'s turns) of the turn holding [start, end] with `margin` s to spare, else None."""
        own = [turn for turn in self.turns if turn.side == side]
        for index, turn in enumerate(own):
            if turn.start + margin <= start and end <= turn.end - margin:
                return index
        return None


def windows_in_turns(turns: Turns, side: str, stamps: list[float], size: int) -> dict[int, list[float]]:
    """Mean step periods of `size`-step windows of `stamps` (each step's end, wall clock) that lie
    wholly inside one of `side`'s turns: {turn index: [window means]}. Windows do not overlap."""
    out: dict[int, list[float]] = {}
    j = 0
    while j + size < len(stamps):
        turn = turns.inside(side, stamps[j], stamps[j + size])
        if turn is None:
            j += 1
            continue
        out.setdefault(turn, []).append((stamps[j + size] - stamps[j]) / size)
        j += size
    return out


def paired_ratios(a_by_turn: dict[int, list[float]], b_by_turn: dict[int, list[float]], a_first: bool = True) -> list[float]:
    """Per turn of side a: its median window divided by the mean of the medians of the b turns just
    before and after it (turns alternate, so a's turn i sits between b's i-1 and i when a went first,
    between b's i and i+1 otherwise); turns without counted windows on either side are skipped."""
    ratios = []
    for index, values in sorted(a_by_turn.items()):
        around = (index - 1, index) if a_first else (index, index + 1)
        neighbours = [statistics.median(b_by_turn[i]) for i in around if b_by_turn.get(i)]
        if values and neighbours:
            ratios.append(statistics.median(values) / statistics.mean(neighbours))
    return ratios


__all__ = ["Turn", "Turns", "windows_in_turns", "paired_ratios"]
