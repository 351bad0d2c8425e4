"""Assertions that a target came out of a capture exactly as it went in."""
from __future__ import annotations

import ctypes
import os
import subprocess
import time
from pathlib import Path
from typing import Collection

from .targets import Target, TargetError, Value, proc_status_field

PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
WALL = 0x40000000


def assert_thawed_and_undisturbed(target: Target, *, expect_stopped: bool = False,
                                  heartbeat_window: float = 0.2, min_beats: int = 2,
                                  check_parent: bool = True) -> dict[str, Value] | None:
    """Fail unless the target is running untraced and noticed nothing.

    Checks: no thread in ptrace stop 't' (nor 'T' unless expect_stopped, in which case
    every thread must still be 'T'); every thread's TracerPid is 0; when running, the
    heartbeat advances by min_beats within heartbeat_window and no restartable call saw
    EINTR or an odd return; under parent_watch the parent saw no SIGCHLD and no
    stop/continue report. Returns the last status reply (None when expect_stopped).
    """
    states = target.thread_states()
    assert states, f"target {target.pid} is gone\n{target.describe()}"
    traced = {tid: t for tid, t in target.tracer_pids().items() if t != 0}
    assert not traced, f"threads still traced (tid: tracer): {traced}"
    ptrace_stopped = {tid: s for tid, s in states.items() if s == "t"}
    assert not ptrace_stopped, f"threads left in ptrace stop: {ptrace_stopped}"
    if expect_stopped:
        not_stopped = {tid: s for tid, s in states.items() if s != "T"}
        assert not not_stopped, f"expected the job-control stop to survive, but: {not_stopped}"
        return None
    stopped = {tid: s for tid, s in states.items() if s == "T"}
    assert not stopped, f"threads left job-control stopped: {stopped}"

    first = target.status()
    time.sleep(heartbeat_window)
    last = target.status()
    beats = last["heartbeat"] - first["heartbeat"]
    assert beats >= min_beats, (
        f"heartbeat advanced {beats} (< {min_beats}) in {heartbeat_window}s: target not running?")
    assert last["eintr"] == 0 and last["unexpected"] == 0, (
        f"target disturbed: eintr={last['eintr']} unexpected={last['unexpected']} "
        f"at {last['disturbed_at']}")
    if check_parent and target.watcher is not None:
        seen = target.watch_status()
        assert (seen["sigchld"], seen["wait_stopped"], seen["wait_continued"]) == (0, 0, 0), (
            f"the parent noticed the capture: {seen}")
    return last


def ptrace_available() -> tuple[bool, str]:
    """Can this process PTRACE_SEIZE + PTRACE_INTERRUPT a child? (ok, reason if not).

    Tries it for real on a `sleep` child, which catches seccomp filters, Yama
    ptrace_scope=3 and missing CAP_SYS_PTRACE alike.
    """
    scope = Path("/proc/sys/kernel/yama/ptrace_scope")
    if scope.exists() and scope.read_text().strip() == "3":
        return False, "Yama ptrace_scope is 3: ptrace is disabled on this machine"
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    libc.ptrace.restype = ctypes.c_long
    child = subprocess.Popen(["sleep", "30"])
    try:
        if libc.ptrace(PTRACE_SEIZE, child.pid, None, None) != 0:
            err = ctypes.get_errno()
            return False, f"PTRACE_SEIZE failed: {os.strerror(err)} (container without CAP_SYS_PTRACE or seccomp?)"
        try:
            if libc.ptrace(PTRACE_INTERRUPT, child.pid, None, None) != 0:
                return False, f"PTRACE_INTERRUPT failed: {os.strerror(ctypes.get_errno())}"
            _, status = os.waitpid(child.pid, WALL)
            if not os.WIFSTOPPED(status):
                return False, f"after PTRACE_INTERRUPT the child was not stopped (status {status:#x})"
        finally:
            libc.ptrace(PTRACE_DETACH, child.pid, None, None)
        return True, "ok"
    finally:
        child.kill()
        child.wait()


def _parents() -> dict[int, int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            ppid = proc_status_field(Path(f"/proc/{entry}/status"), "PPid")
            if ppid is not None:
                parents[int(entry)] = int(ppid)
    return parents


def _closure(roots: set[int], parents: dict[int, int]) -> set[int]:
    found = set(roots)
    while kids := {pid for pid, ppid in parents.items() if ppid in found} - found:
        found |= kids
    return found


def descendants(root: int | None = None) -> set[int]:
    """Pids below root (default: this process), e.g. to snapshot before a test."""
    root = os.getpid() if root is None else root
    return _closure({root}, _parents()) - {root}


def leftover_processes(root: int | None = None, ignore: Collection[int] = ()) -> list[str]:
    """Descendants of root (default: this process) still alive, plus any process traced by
    root or a descendant; pids in ignore (and their descendants) are allowed. [] = clean."""
    root = os.getpid() if root is None else root
    parents = _parents()
    family, allowed = _closure({root}, parents), _closure(set(ignore), parents)
    found = []
    for pid in parents:
        path = Path(f"/proc/{pid}/status")
        tracer = int(proc_status_field(path, "TracerPid") or 0)
        if pid == root or pid in allowed or not (pid in family or tracer in family):
            continue
        state = proc_status_field(path, "State")
        found.append(f"pid {pid} ({proc_status_field(path, 'Name')}) state {state} tracer {tracer}")
    return found


def assert_no_leftover_processes(root: int | None = None, ignore: Collection[int] = (),
                                 timeout: float = 2.0) -> None:
    """Fail if a process we spawned is still around or traced (brief grace period for reaping)."""
    deadline = time.monotonic() + timeout
    while (left := leftover_processes(root, ignore)) and time.monotonic() < deadline:
        time.sleep(0.05)
    if left:
        raise AssertionError("leftover processes:\n  " + "\n  ".join(left))


__all__ = ["assert_thawed_and_undisturbed", "ptrace_available", "leftover_processes",
           "assert_no_leftover_processes", "descendants", "TargetError"]


def wait_thawed(target: Target, timeout: float = 5.0) -> float:
    """Seconds until no thread of target is ptrace-stopped or traced.

    A client that cancels a stream does not wait for the agent to thaw; this
    bounds how long that takes. Raises AssertionError after ``timeout``.
    """
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if "t" not in target.thread_states().values() and not any(target.tracer_pids().values()):
            return time.monotonic() - t0
        time.sleep(0.005)
    raise AssertionError(f"target still frozen after {timeout}s: {target.thread_states()}")


def wait_parked_at(pid: int, sps: dict[int, int], timeout: float = 10.0) -> None:
    """Wait until each thread tid sits in a system call with stack pointer sps[tid]
    (/proc/PID/task/TID/syscall: "nr args... sp pc")."""
    deadline = time.monotonic() + timeout
    while True:
        now = {}
        for tid in sps:
            fields = open(f"/proc/{pid}/task/{tid}/syscall").read().split()
            now[tid] = int(fields[-2], 16) if len(fields) >= 3 else None
        if now == sps:
            return
        assert time.monotonic() < deadline, f"threads not back where they were captured: {now} != {sps}"
        time.sleep(0.01)
