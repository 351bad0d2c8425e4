"""What to capture and what to call it (pure).

Owns the selection sent to every agent's ``ListProcesses``, the matches it
returns (:class:`Match`, :class:`AgentResult`), the capture plan (round robin
over agents) and the file names of the cores (``HOST_COMM_PID_UTCTIME...``,
made unique by :class:`NameClaims`).
"""

from __future__ import annotations

import re
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from ..v1 import capture_pb2 as pb
from .endpoints import Endpoint

MODES = ("full", "stacks", "notes")


@dataclass(frozen=True)
class Selection:
    """Which processes to capture; applied by every agent's ``ListProcesses``."""

    comm: str = ""
    exe_glob: str = ""
    pid: int = 0

    def request(self) -> pb.ListProcessesRequest:
        return pb.ListProcessesRequest(comm=self.comm, exe_glob=self.exe_glob, pid=self.pid)

    @property
    def empty(self) -> bool:
        return not (self.comm or self.exe_glob or self.pid)

    def to_json(self) -> dict[str, Any]:
        return {"comm": self.comm or None, "exe": self.exe_glob or None, "pid": self.pid or None}


@dataclass(frozen=True)
class Match:
    """A process an agent listed: one capture to make."""

    agent: str          # the endpoint's address
    host: str           # the hostname the agent reported (or the endpoint's label)
    pid: int
    comm: str
    exe: str
    start_time: int = 0
    threads: int = 0
    rss_bytes: int = 0
    capture_id: str = ""    # collect --stored: an entry of the agent's store


@dataclass
class AgentResult:
    """The listing of one agent: its matches, or why it could not be listed."""

    endpoint: Endpoint
    host: str = ""
    matches: list[Match] = field(default_factory=list)
    error: str = ""
    code: str | None = None
    attempts: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.error

    def to_json(self) -> dict[str, Any]:
        return {"agent": self.endpoint.address, "label": self.endpoint.label or None,
                "host": self.host or None, "status": "ok" if self.ok else "error",
                "error": self.error or None, "code": self.code, "matched": len(self.matches),
                "attempts": self.attempts, "seconds": round(self.seconds, 6)}


def host_of(endpoint: Endpoint, resp: pb.ListProcessesResponse) -> str:
    return endpoint.host or resp.hostname or endpoint.name


def matches_from_listing(endpoint: Endpoint, resp: pb.ListProcessesResponse) -> list[Match]:
    host = host_of(endpoint, resp)
    return [Match(agent=endpoint.address, host=host, pid=p.pid, comm=p.comm, exe=p.exe,
                  start_time=p.start_time, threads=p.threads, rss_bytes=p.rss_bytes)
            for p in resp.processes]


def plan_captures(listings: Sequence[AgentResult]) -> list[Match]:
    """Every match of every listed agent, interleaved across agents (round robin)
    so that the first captures started are spread over the fleet."""
    queues = [deque(sorted(r.matches, key=lambda m: m.pid)) for r in listings if r.ok]
    out: list[Match] = []
    while any(queues):
        for q in queues:
            if q:
                out.append(q.popleft())
    return out


def progress_hosts(plan: Sequence[Match]) -> tuple[dict[str, int], dict[str, str]]:
    """Captures per agent, and each agent's display name: its host, or
    ``host (address)`` when several agents report the same host name."""
    counts: dict[str, int] = {}
    hosts: dict[str, str] = {}
    for m in plan:
        counts[m.agent] = counts.get(m.agent, 0) + 1
        hosts[m.agent] = m.host
    dup = {h for h in hosts.values() if list(hosts.values()).count(h) > 1}
    return counts, {a: f"{h} ({a})" if h in dup else h for a, h in hosts.items()}


# -- naming ---------------------------------------------------------------------------

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_component(text: str, limit: int = 64) -> str:
    """A file-name component: runs of anything but ``[A-Za-z0-9._-]`` become ``-``;
    never empty, never hidden, never ``.``/``..``."""
    s = _UNSAFE.sub("-", text).strip("-.")[:limit].strip("-.")
    return s or "unknown"


def utc_stamp(when: datetime) -> str:
    """``20261126T132700Z`` (UTC, second resolution)."""
    return when.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def capture_name(host: str, comm: str, pid: int, when: datetime, mode: str = "full",
                 compress: bool = False) -> str:
    """``HOST_COMM_PID_UTCTIME[.MODE].core[.zst]``: a full core has no mode part."""
    mode_part = "" if mode == "full" else f".{mode}"
    return (f"{safe_component(host)}_{safe_component(comm)}_{pid}_{utc_stamp(when)}"
            f"{mode_part}.core{'.zst' if compress else ''}")


class NameClaims:
    """Hands out unique names: a taken one gets ``-2``, ``-3``... before its suffixes."""

    def __init__(self, taken: Iterable[str] = ()) -> None:
        self._taken = set(taken)
        self._lock = threading.Lock()

    def claim(self, name: str) -> str:
        with self._lock:
            if name not in self._taken:
                self._taken.add(name)
                return name
            stem, dot, rest = name.partition(".")
            n = 2
            while f"{stem}-{n}{dot}{rest}" in self._taken:
                n += 1
            unique = f"{stem}-{n}{dot}{rest}"
            self._taken.add(unique)
            return unique


def default_out_dir(now: datetime) -> str:
    return f"corepeek-collect-{utc_stamp(now)}"
