"""The clones an agent holds, on disk, so a restarted agent can clean up after a dead one.

If the agent dies (SIGKILL, OOM), ``PTRACE_O_EXITKILL`` kills its clones, but
each leaves a zombie under its target (exit signal 0: invisible to ``wait()``)
that only a ``wait4`` injected into the target removes; and a clone made in
the microseconds before EXITKILL was set on it survives its agent.  So every
clone gets an entry in the agent's state directory (default
``/run/corepeek``) from the moment it exists until it was killed and reaped:
``clone-<agent pid>-<clone pid>.json`` with the agent's, the target's and the
clone's pids and start times.

At start-up, :func:`sweep` handles the entries of agents that no longer run
(pid gone, or reused: start time differs).  A process is touched only when
every fact still matches: the clone's pid has the recorded start time, its
parent is the recorded target (same start time) and its exit signal is 0 —
a pid reused by anything else fails the start-time test, and the target's
own children never match a recorded clone.  The clone, if still running, is
SIGKILLed; its zombie is reaped by injecting ``wait4`` into the target
(:func:`.clone.reap_in_target`).  Agents sharing the directory never touch
each other's entries while both live.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import procfs
from ..errors import ProcessGone

log = logging.getLogger(__name__)

DEFAULT_DIR = "/run/corepeek"


@dataclass(frozen=True)
class CloneEntry:
    agent_pid: int
    agent_start: int
    target_pid: int
    target_start: int
    clone_pid: int
    clone_start: int
    clone_pid_in_target: int
    abi: str
    insn_addr: int


def _start(pid: int) -> int:
    try:
        return procfs.stat(pid).start_time
    except ProcessGone:
        return -1


class Ledger:
    """This agent's entries in ``directory`` (created 0700 on first use)."""

    def __init__(self, directory: str) -> None:
        self.dir = Path(directory)
        self.agent_pid = os.getpid()
        self.agent_start = _start(self.agent_pid)

    def _path(self, clone_pid: int) -> Path:
        return self.dir / f"clone-{self.agent_pid}-{clone_pid}.json"

    def record(self, target_pid: int, clone_pid: int, clone_pid_in_target: int,
               abi: str, insn_addr: int) -> None:
        """Write the clone's entry (atomically: a torn entry is never read)."""
        entry = CloneEntry(self.agent_pid, self.agent_start, target_pid, _start(target_pid),
                           clone_pid, _start(clone_pid), clone_pid_in_target, abi, insn_addr)
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = self._path(clone_pid).with_suffix(".tmp")
            tmp.write_text(json.dumps(asdict(entry)))
            os.replace(tmp, self._path(clone_pid))
        except OSError as exc:
            log.warning("pid %d: cannot record snapshot clone %d in %s: %s", target_pid,
                        clone_pid, self.dir, exc)

    def forget(self, clone_pid: int) -> None:
        try:
            self._path(clone_pid).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove the entry of snapshot clone %d: %s", clone_pid, exc)


def entries(directory: str) -> list[tuple[Path, CloneEntry]]:
    out = []
    for path in sorted(Path(directory).glob("clone-*.json")):
        try:
            out.append((path, CloneEntry(**json.loads(path.read_text()))))
        except (OSError, ValueError, TypeError) as exc:
            log.warning("ignoring unreadable clone entry %s: %s", path, exc)
    return out


def is_our_clone(e: CloneEntry) -> bool:
    """The recorded clone still exists as that very process: same start time,
    child of the recorded target (same start time), exit signal 0."""
    try:
        st = procfs.stat(e.clone_pid)
    except ProcessGone:
        return False
    return (st.start_time == e.clone_start and st.ppid == e.target_pid and st.exit_signal == 0
            and _start(e.target_pid) == e.target_start)


def sweep(directory: str, thread_timeout: float = 0.5) -> list[str]:
    """Clean up the clones of agents that no longer run; returns what was done."""
    from .abi import ABIS
    from .clone import reap_in_target

    done = []
    me = os.getpid()
    for path, e in entries(directory):
        if e.agent_pid == me or _start(e.agent_pid) == e.agent_start:
            continue                    # a live agent's clone (maybe this one's)
        if not is_our_clone(e):
            done.append(f"clone {e.clone_pid} of pid {e.target_pid}: gone already")
            path.unlink(missing_ok=True)
            continue
        if procfs.stat(e.clone_pid).state not in ("Z", "X"):
            os.kill(e.clone_pid, signal.SIGKILL)
            _wait_zombie(e.clone_pid)
        abi = ABIS.get(e.abi)
        reaped = False
        if abi is not None and is_our_clone(e):
            reaped, _ = reap_in_target(e.target_pid, e.clone_pid, abi, e.insn_addr,
                                       thread_timeout, child_in_target=e.clone_pid_in_target)
        done.append(f"clone {e.clone_pid} of pid {e.target_pid}: killed, zombie "
                    f"{'removed' if reaped else 'left'}")
        path.unlink(missing_ok=True)
    for line in done:
        log.warning("snapshot clone left by a previous agent: %s", line)
    return done


def _wait_zombie(pid: int, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if procfs.stat(pid).state in ("Z", "X"):
                return
        except ProcessGone:
            return
        time.sleep(0.005)
