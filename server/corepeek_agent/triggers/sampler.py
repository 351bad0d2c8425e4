"""Reads what the triggers watch from /proc, through ``procfs``.

One sweep reads /proc/PID/stat of every process (``procfs.usage``) (comm, RSS, CPU ticks,
threads) and only then, for processes some selector's pid and comm let
through, what a trigger needs beyond that: the exe link, the cgroup, the fd
count.  A process that vanishes mid-sweep is skipped.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

from .. import procfs
from ..authz import container_id
from ..errors import ProcessGone
from .evaluate import Sample
from .spec import Selector, Trigger


def _prefilter(triggers: list[Trigger], pid: int, comm: str) -> list[Trigger]:
    out = []
    for t in triggers:
        sel = t.spec.selector
        if sel.pid and sel.pid != pid:
            continue
        if sel.comm and not Selector(comm=sel.comm).matches(pid, comm):
            continue                    # comm rules it out; other selectors need more reads
        out.append(t)
    return out


def sample(triggers: Iterable[Trigger], *, own_pid: int | None = None) -> list[Sample]:
    """Samples of the processes any of ``triggers`` may select (never the agent)."""
    watch = list(triggers)
    if not watch:
        return []
    me = os.getpid() if own_pid is None else own_pid
    pinned = {t.spec.selector.pid for t in watch}
    pids = sorted(pinned) if 0 not in pinned else procfs.pids()
    out: list[Sample] = []
    for pid in pids:
        if pid == me:
            continue
        try:
            st = procfs.usage(pid)
            now = time.monotonic()
            wanted = _prefilter(watch, pid, st.comm)
            if not wanted or st.state == "Z":
                continue
            exe = procfs.exe(pid) if any(t.spec.selector.needs_exe for t in wanted) else ""
            cg = (procfs.cgroup(pid) if any(t.spec.selector.needs_cgroup for t in wanted)
                  else "")
            fds = procfs.fd_count(pid) if any(t.spec.fds_above for t in wanted) else -1
        except (ProcessGone, PermissionError, ValueError, IndexError):
            continue
        out.append(Sample(pid=pid, start_time=st.start_time, comm=st.comm, time=now,
                          rss_bytes=st.rss_pages * procfs.PAGE_SIZE,
                          cpu_ticks=st.cpu_ticks, threads=st.num_threads, fds=fds,
                          exe=exe, cgroup=cg, container=container_id(cg)))
    return out
