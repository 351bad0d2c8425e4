"""Process listing for ListProcesses (read from /proc, filtered)."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass

from . import procfs
from .errors import ProcessGone


@dataclass(frozen=True)
class ProcessSummary:
    pid: int
    ppid: int
    uid: int
    comm: str
    exe: str
    cmdline: list[str]
    threads: int
    rss_bytes: int
    start_time: int
    cgroup: str
    state: str
    elf_class: int


def summarize(pid: int) -> ProcessSummary:
    st = procfs.stat(pid)
    uid, _ = procfs.uid_gid(pid)
    return ProcessSummary(
        pid=pid, ppid=st.ppid, uid=uid, comm=st.comm, exe=procfs.exe(pid),
        cmdline=procfs.cmdline(pid), threads=st.num_threads,
        rss_bytes=st.rss_pages * procfs.PAGE_SIZE, start_time=st.start_time,
        cgroup=procfs.cgroup(pid), state=st.state, elf_class=procfs.exe_elf_class(pid))


def list_processes(*, comm: str = "", exe_glob: str = "", pid: int = 0) -> Iterator[ProcessSummary]:
    """Every process matching the filters; kernel threads (no exe) included."""
    for p in ([pid] if pid else procfs.pids()):
        try:
            s = summarize(p)
        except (ProcessGone, KeyError, ValueError, PermissionError):
            continue
        if comm and s.comm != comm:
            continue
        if exe_glob and not fnmatch.fnmatch(s.exe, exe_glob):
            continue
        yield s
