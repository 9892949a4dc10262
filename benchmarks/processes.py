"""Process helpers the benchmarks share: process trees, thread pinning, host steal, memory and CPU samplers.

Everything reads the operating system through `psutil`, so no benchmark parses `/proc` itself.
One memory sampler serves every benchmark that reports memory: it samples a set of named processes
on a thread (the set may change between samples, as when Ray starts workers) and keeps every
sample, so a caller can report the peak of one process, of a sum over processes, or of a part
of the run. The CPU sampler does the same for CPU time, by role: a Ray worker process changes role
as it runs different tasks (its title, `ray::<task>`, says which), so each interval's CPU time is
credited to the role the process has at the end of that interval.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable

import psutil


def process_tree(root: int) -> list[int]:
    """`root` and all its live descendants ([] if `root` is gone)."""
    try:
        process = psutil.Process(root)
        return [root] + [child.pid for child in process.children(recursive=True)]
    except psutil.Error:
        return []


def command_line(pid: int) -> str:
    """The process's command line joined by spaces ("" if it is gone or unreadable)."""
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def pin_threads(pid: int, cpus: set[int]) -> int:
    """Confine every thread of process `pid` to `cpus` (threads it starts later inherit the mask of the
    thread that starts them); returns how many threads were pinned (0 if the process is gone)."""
    try:
        threads = psutil.Process(pid).threads()
    except psutil.Error:
        return 0
    pinned = 0
    for thread in threads:
        try:  # a thread id is a valid target of sched_setaffinity on Linux; psutil only pins whole processes
            os.sched_setaffinity(thread.id, cpus)
            pinned += 1
        except OSError:  # the thread ended
            pass
    return pinned


class HostSteal:
    """Share of the machine's CPU time the hypervisor gave to other guests while the block ran (None
    where the platform reports no steal time). On a shared VM steal comes in spells that last minutes:
    a run inside one is slow for reasons that are not the code's, so benchmarks print it."""

    @staticmethod
    def _read() -> tuple | None:  # psutil's cpu_times namedtuple
        times = psutil.cpu_times()
        return times if hasattr(times, "steal") else None

    def __enter__(self) -> "HostSteal":
        self.start, self.share = self._read(), None
        return self

    def __exit__(self, *exc) -> None:
        end = self._read()
        if self.start is not None and end is not None:
            # guest time is already counted in user time
            fields = [f for f in end._fields if f not in ("guest", "guest_nice")]
            total = sum(getattr(end, f) - getattr(self.start, f) for f in fields)
            self.share = (end.steal - self.start.steal) / total if total > 0 else 0.0

    def note(self) -> str:
        """", host steal N%" for a result line, or "" where there is no figure."""
        return "" if self.share is None else f", host steal {100 * self.share:.0f}%"


class ProcessHandles:
    """One psutil handle per pid (psutil caches what it can per handle); `read` forgets a pid once its
    process is gone or unreadable and returns None for it."""

    def __init__(self):
        self._handles: dict[int, psutil.Process] = {}

    def read(self, pid: int, what: Callable[[psutil.Process], Any]) -> Any:
        try:
            return what(self._handles.get(pid) or self._handles.setdefault(pid, psutil.Process(pid)))
        except psutil.Error:
            self._handles.pop(pid, None)
            return None


class MemorySampler:
    """Resident memory of a set of named processes, sampled every `every_s` on a thread.

    `processes` is {name: pid}, or a function returning it (called at every sample, for sets that
    change while the run goes on). `private=True` counts RSS less shared pages: the Ray object store's
    pages are mapped into every process that reads an object, and they are not that process's own.
    `samples` holds (seconds since start, {name: bytes}) for every sample; a process that has ended
    is left out of the samples after its end.
    """

    def __init__(self, processes: dict[str, int] | Callable[[], dict[str, int]], every_s: float = 0.2,
                 private: bool = False):
        self.listing = processes if callable(processes) else (lambda: processes)
        self.every_s, self.private = every_s, private
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._handles = ProcessHandles()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.started = time.perf_counter()

    def _rss(self, pid: int) -> int | None:
        info = self._handles.read(pid, psutil.Process.memory_info)
        if info is None:
            return None
        return info.rss - info.shared if self.private else info.rss

    def sample(self) -> None:
        """Take one sample now (the thread calls this every `every_s`)."""
        values = {name: rss for name, pid in self.listing().items() if (rss := self._rss(pid)) is not None}
        self.samples.append((time.perf_counter() - self.started, values))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every_s)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()  # the state at the end counts too

    def peak(self) -> dict[str, int]:
        """{name: largest sample of that process}."""
        out: dict[str, int] = {}
        for _, values in self.samples:
            for name, rss in values.items():
                out[name] = max(out.get(name, 0), rss)
        return out

    def series(self, name: str) -> list[tuple[float, int]]:
        """(seconds, bytes) of one process over the run."""
        return [(t, values[name]) for t, values in self.samples if name in values]


class CpuSampler:
    """CPU seconds (user + system) of a changing set of processes, summed by role.

    `processes` returns {pid: role} at each sample (every `every_s`, on a thread); the CPU time a
    process used since the previous sample goes to its current role, and a process first seen
    mid-run counts from its start (its whole CPU time so far), so start-up imports are included.
    The CPU used by a process between its last sample and its exit is not seen: keep `every_s`
    short next to the life of the processes that matter. `seconds` is {role: CPU seconds}.
    """

    def __init__(self, processes: Callable[[], dict[int, str]], every_s: float = 0.25):
        self.listing, self.every_s = processes, every_s
        self.seconds: dict[str, float] = {}
        self._last: dict[int, float] = {}
        self._handles = ProcessHandles()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.started = self.ended = time.perf_counter()

    def _cpu(self, pid: int) -> float | None:
        times = self._handles.read(pid, psutil.Process.cpu_times)
        return None if times is None else times.user + times.system

    def sample(self) -> None:
        for pid, role in self.listing().items():
            used = self._cpu(pid)
            if used is None:
                continue
            self.seconds[role] = self.seconds.get(role, 0.0) + used - self._last.get(pid, 0.0)
            self._last[pid] = used

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def __enter__(self) -> "CpuSampler":
        self.sample()  # the baseline: CPU used before the block is not the block's
        self.seconds = {}
        self.started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
        self.ended = time.perf_counter()


def tree_by_pid(root: int, root_name: str = "driver") -> Callable[[], dict[str, int]]:
    """A `MemorySampler` listing: `root` under `root_name`, each live descendant under its pid."""

    def listing() -> dict[str, int]:
        pids = process_tree(root)
        return {(root_name if pid == root else str(pid)): pid for pid in pids}

    return listing


__all__ = ["process_tree", "command_line", "pin_threads", "HostSteal", "MemorySampler", "CpuSampler", "tree_by_pid"]
