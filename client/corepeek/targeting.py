"""Which agent, and which process: the CLI's defaults and name-based selection.

``--agent`` falls back to ``$COREPEEK_AGENT``, then to the local socket the
README's ``corepeek agent --listen unix:/run/corepeek.sock`` creates, when it
exists.  ``dump --comm NAME`` / ``--exe GLOB`` asks the agent's
``ListProcesses`` (the policy decides what it shows) and captures the one
process that matches, pinned to its start time, the way ``pgrep`` users name
a target.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence

from .errors import CaptureError
from .textsafe import safe
from .v1 import capture_pb2 as pb

AGENT_ENV = "COREPEEK_AGENT"
LOCAL_SOCKET = "/run/corepeek.sock"


class UsageError(CaptureError):
    """The command line cannot be acted on (exit status 2)."""


class AmbiguousTarget(UsageError):
    """Several processes match a name; the message lists them (exit status 2)."""


def resolve_agent(given: str | None, env: dict[str, str] | None = None,
                  local_socket: str = LOCAL_SOCKET) -> str:
    """``--agent``, else ``$COREPEEK_AGENT``, else ``unix:LOCAL_SOCKET`` if it is a socket."""
    if given:
        return given
    environ = os.environ if env is None else env
    if environ.get(AGENT_ENV):
        return environ[AGENT_ENV]
    try:
        if stat.S_ISSOCK(os.stat(local_socket).st_mode):
            return f"unix:{local_socket}"
    except OSError:
        pass
    raise UsageError(f"no agent: give --agent ADDR or set {AGENT_ENV} (there is no local "
                     f"agent socket at {local_socket})")


def describe_selector(comm: str, exe_glob: str) -> str:
    parts = ([f"--comm {comm!r}"] if comm else []) + ([f"--exe {exe_glob!r}"] if exe_glob else [])
    return " ".join(safe(p) for p in parts)


def process_table(processes: Sequence[pb.ProcessInfo]) -> str:
    """Candidates, one per line: pid, comm, exe, start time (remote strings escaped)."""
    lines = [f"{'PID':>7}  {'START':>10}  {'COMM':16} EXE"]
    for p in processes:
        lines.append(f"{p.pid:>7}  {p.start_time:>10}  {safe(p.comm):16} {safe(p.exe)}")
    return "\n".join(lines)


def pick_process(processes: Sequence[pb.ProcessInfo], comm: str, exe_glob: str,
                 agent: str) -> pb.ProcessInfo:
    """The single listed process, or an error naming what matched (several: exit 2)."""
    what = describe_selector(comm, exe_glob)
    if not processes:
        raise CaptureError(f"no process matches {what} on {agent}")
    if len(processes) > 1:
        raise AmbiguousTarget(f"{len(processes)} processes match {what} on {agent}; "
                              f"give one pid:\n{process_table(processes)}")
    return processes[0]
