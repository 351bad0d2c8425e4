"""The audit log: one JSON object per line, per session (and per listing).

Written to a file (``--audit-log PATH``, created 0600, appended, reopened on
SIGHUP for log rotation) or to stderr (``-``, the default).  A line carries who
(identities, peer), what (pid, exe, uids, start time, mode, merged byte ranges,
bytes served), how long the target was frozen, and the outcome with its gRPC
status code.  Refused sessions get a line too.  Never any memory contents.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

MAX_RANGES = 256          # merged ranges listed per line; the rest are summarised


class RangeSet:
    """Merged, sorted (offset, length) ranges; sequential reads merge in O(1)."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def add(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        end = offset + length
        if self._ends and self._starts[-1] <= offset <= self._ends[-1]:
            self._ends[-1] = max(self._ends[-1], end)       # fast path: appending
            return
        i = bisect.bisect_left(self._ends, offset)            # first range ending at/after offset
        j = bisect.bisect_right(self._starts, end)            # ranges starting at/before end
        if i < j:
            offset = min(offset, self._starts[i])
            end = max(end, self._ends[j - 1])
        self._starts[i:j] = [offset]
        self._ends[i:j] = [end]

    def ranges(self) -> list[tuple[int, int]]:
        return [(s, e - s) for s, e in zip(self._starts, self._ends)]

    def __len__(self) -> int:
        return len(self._starts)


@dataclass
class SessionRecord:
    """Everything the audit line of one Capture (or ListProcesses) call says."""

    kind: str                                   # "capture", "list", "rpc" or "policy"
    identities: list[str]
    peer: str
    method: str = ""                            # the gRPC method (refusals at stream start)
    started: float = field(default_factory=time.time)
    session_id: str = ""
    pid: int = 0
    requested_start_time: int = 0
    mode: str = ""
    rule: str = ""
    target: dict[str, Any] = field(default_factory=dict)
    ranges: RangeSet = field(default_factory=RangeSet)
    data_bytes: int = 0
    hole_bytes: int = 0
    # Mapped files read (read_file): bytes, and the ids of the files read.
    file_bytes: int = 0
    files_read: set[int] = field(default_factory=set)
    requests: int = 0
    freeze_seconds: float = 0.0       # from the freeze until the thaw
    stop_micros: int = 0              # time the agent took to stop every thread
    # The session that froze the target this one read (itself unless it
    # joined a capture in progress: docs/design.md, shared captures).
    freeze_id: str = ""
    listed: int = 0
    # stacks mode: what the rule let through (stack bytes per thread, requested
    # vs granted; whether argv/environment strings were served)
    exposure: dict[str, Any] = field(default_factory=dict)
    # A capture a trigger made (its id, what crossed, the store entry), or a
    # trigger added or removed over RPC.
    trigger: dict[str, Any] = field(default_factory=dict)
    upload: str = ""                  # Upload: the destination (s3://bucket/key)
    # snapshot mode: taken, or the fallback's reason code and status
    snapshot: dict[str, Any] = field(default_factory=dict)
    outcome: str = "ok"
    code: str = "OK"
    details: str = ""

    def served(self, offset: int, length: int, hole: bool) -> None:
        self.ranges.add(offset, length)
        if hole:
            self.hole_bytes += length
        else:
            self.data_bytes += length

    def fail(self, outcome: str, code: str, details: str) -> None:
        if self.code == "OK":            # the first cause wins
            self.outcome, self.code, self.details = outcome, code, details

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.started))
                    + f".{int(self.started % 1 * 1000):03d}Z",
            "kind": self.kind, "identities": self.identities, "peer": self.peer,
        }
        if self.method:
            out["method"] = self.method
        if self.kind == "capture":
            ranges = self.ranges.ranges()
            out.update({
                "session": self.session_id, "pid": self.pid,
                "requested_start_time": self.requested_start_time, "mode": self.mode,
                "rule": self.rule, "target": self.target,
                "ranges": [list(r) for r in ranges[:MAX_RANGES]],
                "ranges_total": len(ranges), "requests": self.requests,
                "data_bytes": self.data_bytes, "hole_bytes": self.hole_bytes,
                "file_bytes": self.file_bytes, "files_read": len(self.files_read),
                "freeze_seconds": round(self.freeze_seconds, 6),
                "stop_micros": self.stop_micros,
                "freeze_id": self.freeze_id or self.session_id,
            })
            if self.exposure:
                out["exposure"] = self.exposure
            if self.snapshot:
                out["snapshot"] = self.snapshot
        if self.trigger:
            out["trigger"] = self.trigger
        if self.upload:
            out["upload"] = self.upload
        elif self.kind == "list":
            out["listed"] = self.listed
        out.update({"duration_seconds": round(time.time() - self.started, 6),
                    "outcome": self.outcome, "code": self.code})
        if self.details:
            out["details"] = self.details
        return out


class AuditLog:
    """Appends JSON lines; each line is one write(2) on an O_APPEND descriptor."""

    def __init__(self, path: str | None = None) -> None:
        self.path = None if path in (None, "", "-") else path
        self._lock = threading.Lock()
        self._fd = 2
        self._open()

    def _open(self) -> None:
        if self.path is None:
            self._fd = 2
            return
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                           0o600)

    def reopen(self) -> None:
        """For log rotation (SIGHUP): close and open the path again."""
        if self.path is None:
            return
        with self._lock:
            old = self._fd
            try:
                self._open()
            except OSError as exc:
                log.error("cannot reopen audit log %s: %s; keeping the old one", self.path, exc)
                self._fd = old
                return
            os.close(old)

    def write(self, record: SessionRecord | dict[str, Any]) -> None:
        doc = record.to_json() if isinstance(record, SessionRecord) else record
        line = (json.dumps(doc, separators=(",", ":"), default=str) + "\n").encode()
        with self._lock:
            view = memoryview(line)
            try:
                while view:
                    n = os.write(self._fd, view)
                    view = view[n:]
            except OSError as exc:
                log.error("cannot write the audit log: %s: %s", exc, line.decode().strip())

    def close(self) -> None:
        with self._lock:
            if self._fd > 2:
                os.close(self._fd)
            self._fd = 2
