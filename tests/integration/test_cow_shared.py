"""Capturing a pre-fork worker must not copy the memory it shares with its parent.

process_vm_readv pins the pages it reads, and the kernel unshares a pinned
anonymous page that is still copy-on-write shared (gup_must_unshare): the
worker would silently get a private copy of every shared page — RAM and
cgroup charge the target never asked for. corepeek reads such mappings
through /proc/PID/mem, which copies nothing.
"""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import textwrap
import time

from corepeek.remote import open_capture

SIZE_MIB = 128
CLOCK_NANOSLEEP = {"x86_64": 230, "aarch64": 115}[platform.machine()]

PROGRAM = textwrap.dedent(f"""
    import mmap, os, sys, time
    region = mmap.mmap(-1, {SIZE_MIB} << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for off in range(0, len(region), 4096):
        region[off:off + 8] = off.to_bytes(8, "little")
    child = os.fork()
    if child == 0:
        print(f"{{os.getpid()}} {{id(region)}}", flush=True)
        time.sleep(600)
        os._exit(0)
    os.waitpid(child, 0)
""")


def _shared_kib(pid: int, size: int) -> int:
    """Shared_Dirty of the mapping of exactly ``size`` bytes in pid: the pages
    it still shares copy-on-write with its parent."""
    lines = open(f"/proc/{pid}/smaps").read().splitlines()
    for i, line in enumerate(lines):
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            start, end = (int(x, 16) for x in head.split("-"))
            if end - start == size:
                for field in lines[i + 1:i + 25]:
                    if field.startswith("Shared_Dirty:"):
                        return int(field.split()[1])
    raise AssertionError("mapping not found")


def _wait_in_nanosleep(pid: int, timeout: float = 10.0) -> None:
    """Readiness: the worker has reached its time.sleep (blocked in clock_nanosleep)."""
    deadline = time.monotonic() + timeout
    while True:
        syscall = open(f"/proc/{pid}/syscall").read().split()[0]
        if syscall == str(CLOCK_NANOSLEEP):
            return
        assert time.monotonic() < deadline, f"worker {pid} never slept (syscall {syscall})"
        time.sleep(0.01)


def test_full_capture_of_a_forked_worker_copies_none_of_its_shared_pages(agent,
                                                                         require_root) -> None:
    # Its own process group, so the worker dies with the parent whatever happens.
    parent = subprocess.Popen([sys.executable, "-c", PROGRAM], stdout=subprocess.PIPE,
                              start_new_session=True)
    try:
        worker = int(parent.stdout.readline().split()[0])
        _wait_in_nanosleep(worker)
        size = SIZE_MIB << 20
        before = _shared_kib(worker, size)

        with open_capture(agent.address, worker) as core:
            seg = next(s for s in core.layout.segments if s.mem_size == size)
            data = core.read_bytes(seg.file_offset, seg.file_size)

        after = _shared_kib(worker, size)
        assert data[4096 * 5:4096 * 5 + 8] == (4096 * 5).to_bytes(8, "little")
        assert before > (SIZE_MIB - 1) * 1024, before
        assert before - after < 1024, f"the capture unshared {before - after} KiB in the worker"
        # Thawed: untraced and asleep again (a thawed task is briefly R on its
        # way back into clock_nanosleep), never killed or woken for good.
        deadline = time.monotonic() + 5
        while not ("TracerPid:\t0" in (status := open(f"/proc/{worker}/status").read())
                   and "State:\tS" in status):
            assert time.monotonic() < deadline, status
            time.sleep(0.01)
        _wait_in_nanosleep(worker)
    finally:
        os.killpg(parent.pid, signal.SIGKILL)   # worker and parent together
        parent.wait()
        parent.stdout.close()
