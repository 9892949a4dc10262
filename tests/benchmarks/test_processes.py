"""benchmarks/processes.py on real child processes: trees, pinning, the memory and CPU samplers."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest

from benchmarks.processes import CpuSampler, HostSteal, MemorySampler, command_line, pin_threads, process_tree, tree_by_pid

# A parent that starts a child; each holds `MB` megabytes (touched, so resident) and sleeps.
HOLDER = """
import subprocess, sys, time
mb = int(sys.argv[1])
block = bytearray(mb * 2**20)
for i in range(0, len(block), 4096):
    block[i] = 1
if sys.argv[2] == "parent":
    child = subprocess.Popen([sys.executable, "-c", sys.argv[3], str(mb), "child", ""])
print("ready", flush=True)
time.sleep(60)
"""


@pytest.fixture
def holder():
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, "64", "parent", HOLDER], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    try:
        deadline = time.time() + 20
        while len(process_tree(proc.pid)) < 2:  # the child is started before "ready"; wait for it to exist
            assert time.time() < deadline
            time.sleep(0.05)
        yield proc
    finally:
        for pid in reversed(process_tree(proc.pid)):
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait()


def test_process_tree_lists_root_and_descendants(holder):
    tree = process_tree(holder.pid)
    assert tree[0] == holder.pid and len(tree) == 2
    assert "parent" in command_line(tree[0]) and "child" in command_line(tree[1])
    assert psutil.Process(tree[1]).ppid() == holder.pid


def test_a_process_that_ended_has_no_tree_and_no_command_line():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    deadline = time.monotonic() + 10
    while "time.sleep(60)" not in command_line(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)  # between fork and exec the child's command line is still empty (or the parent's)
    assert process_tree(proc.pid) == [proc.pid] and "time.sleep(60)" in command_line(proc.pid)
    proc.kill()
    proc.wait()
    assert process_tree(proc.pid) == [] and command_line(proc.pid) == ""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_pin_threads_confines_every_thread(holder):
    cpu = max(os.sched_getaffinity(0))
    assert pin_threads(holder.pid, {cpu}) == psutil.Process(holder.pid).num_threads()
    for thread in psutil.Process(holder.pid).threads():
        assert os.sched_getaffinity(thread.id) == {cpu}
    assert pin_threads(2**22 + 12345, {cpu}) == 0  # no such process


def test_memory_sampler_sees_each_process_of_a_tree(holder):
    with MemorySampler(tree_by_pid(holder.pid, "parent"), every_s=0.05) as sampler:
        time.sleep(0.3)
    peak = sampler.peak()
    child = process_tree(holder.pid)[1]
    assert set(peak) == {"parent", str(child)}
    assert all(value >= 64 * 2**20 for value in peak.values()), peak  # each holds 64 MB, touched
    assert len(sampler.samples) >= 3
    series = sampler.series("parent")
    assert [t for t, _ in series] == sorted(t for t, _ in series) and len(series) == len(sampler.samples)


def test_private_memory_leaves_out_shared_pages(holder):
    with MemorySampler({"parent": holder.pid}, private=True) as private, \
            MemorySampler({"parent": holder.pid}) as whole:
        time.sleep(0.1)
    shared = psutil.Process(holder.pid).memory_info().shared
    assert shared > 0  # the interpreter's own mapped libraries at least
    assert 64 * 2**20 <= private.peak()["parent"] <= whole.peak()["parent"] - shared // 2


def test_memory_sampler_drops_a_process_that_ended():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    sampler = MemorySampler({"sleeper": proc.pid})
    sampler.sample()
    proc.kill()
    proc.wait()
    sampler.sample()
    assert "sleeper" in sampler.samples[0][1] and sampler.samples[1][1] == {}


def test_host_steal_note():
    steal = HostSteal()
    steal.share = None
    assert steal.note() == ""
    steal.share = 0.47
    assert steal.note() == ", host steal 47%"
    with HostSteal() as measured:
        sum(range(10**6))
    assert measured.share is None or 0.0 <= measured.share <= 1.0


SPINNER = "import sys, time\nend = time.process_time() + float(sys.argv[1])\nwhile time.process_time() < end:\n    pass\nprint('done', flush=True)\ntime.sleep(60)\n"


def test_cpu_sampler_credits_each_role_with_its_own_cpu_time():
    # Two children: one burns 0.6 s of CPU inside the block, one sleeps; the block's own CPU (this
    # process, idle in sleep) is its third role. A process started inside the block counts from its start.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    spinner = None
    try:
        roles = {sleeper.pid: "sleeper"}
        with CpuSampler(lambda: dict(roles), every_s=0.05) as sampler:
            spinner = subprocess.Popen([sys.executable, "-c", SPINNER, "0.6"], stdout=subprocess.PIPE, text=True)
            roles[spinner.pid] = "spinner"
            assert spinner.stdout.readline().strip() == "done"
        assert 0.6 <= sampler.seconds["spinner"] < 2.0  # its loop, plus the interpreter's start
        assert sampler.seconds.get("sleeper", 0.0) < 0.1
        assert sampler.ended > sampler.started
    finally:
        for proc in (sleeper, spinner):
            if proc is not None:
                proc.kill()
                proc.wait()


def test_cpu_sampler_leaves_out_cpu_used_before_the_block():
    spinner = subprocess.Popen([sys.executable, "-c", SPINNER, "0.5"], stdout=subprocess.PIPE, text=True)
    try:
        assert spinner.stdout.readline().strip() == "done"  # its CPU is spent before the block starts
        with CpuSampler(lambda: {spinner.pid: "spinner"}, every_s=0.05) as sampler:
            time.sleep(0.2)
        assert sampler.seconds["spinner"] < 0.1
    finally:
        spinner.kill()
        spinner.wait()
