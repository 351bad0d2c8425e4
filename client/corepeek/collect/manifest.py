"""The manifest: one document that says what a collection did (pure).

Owns :class:`CaptureRecord` (one capture, or one agent that could not be
listed) and :func:`build_manifest` (entries, agents, summary); its format is
documented in docs/fleet.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from .plan import AgentResult, Selection

MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass
class CaptureRecord:
    """One line of the manifest's ``captures`` list."""

    agent: str
    host: str | None
    pid: int | None
    comm: str | None
    exe: str | None
    status: str                      # "ok" | "error"
    error: str | None = None
    code: str | None = None          # gRPC status name of the failure
    path: str | None = None          # relative to the manifest's directory, or s3://...
    bytes: int | None = None         # size of the stored object (compressed if .zst)
    sha256: str | None = None        # of the stored object
    seconds: float | None = None     # the capture: open .. close, without storing
    mode: str | None = None
    start_time: int | None = None    # the process's start time (clock ticks), pinned
    time: str | None = None          # UTC start of the capture
    core_bytes: int | None = None    # size of the core file before compression
    compressed: bool = False
    wire_bytes: int | None = None    # memory payload received (compressed on the wire)
    threads: int | None = None
    unfrozen_threads: list[int] | None = None
    freeze_micros: int | None = None   # the agent's time to stop every thread
    store_seconds: float | None = None
    attempts: int = 0
    # The ELF files the target maps: path, size, GNU build-id (for debuginfod-
    # style stores); with --with-files, where the run stored each (files/).
    files: list[dict[str, Any]] | None = None

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.seconds is not None:
            d["seconds"] = round(self.seconds, 6)
        if self.store_seconds is not None:
            d["store_seconds"] = round(self.store_seconds, 6)
        return d


def unreachable_record(result: AgentResult) -> CaptureRecord:
    """The manifest entry of an agent that could not be listed."""
    return CaptureRecord(agent=result.endpoint.address,
                         host=result.host or result.endpoint.host or None, pid=None,
                         comm=None, exe=None, status="error",
                         error=result.error or "unknown error", code=result.code,
                         seconds=result.seconds, attempts=result.attempts)


def iso_utc(when: datetime) -> str:
    return when.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def build_manifest(*, started: datetime, finished: datetime, selection: Selection, mode: str,
                   compress: bool, destination: str, agents: Sequence[AgentResult],
                   captures: Sequence[CaptureRecord],
                   files: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The manifest document: the captures (unreachable agents first), the agents, a
    summary; with ``files`` (collect --with-files), where each build-id was stored."""
    entries = [unreachable_record(a) for a in agents if not a.ok] + list(captures)
    entries.sort(key=lambda r: (r.status != "error" or r.pid is not None, r.host or "",
                                r.agent, r.pid or 0))
    ok = [r for r in entries if r.status == "ok"]
    doc = {
        "version": MANIFEST_VERSION,
        "tool": f"corepeek collect {_version()}",
        "started": iso_utc(started),
        "finished": iso_utc(finished),
        "seconds": round((finished - started).total_seconds(), 6),
        "destination": destination,
        "selection": {**selection.to_json(), "mode": mode, "compress": "zstd" if compress else None},
        "summary": {
            "agents": len(agents), "agents_unreachable": sum(1 for a in agents if not a.ok),
            "captures": len(entries), "ok": len(ok), "error": len(entries) - len(ok),
            "bytes": sum(r.bytes or 0 for r in ok),
            "core_bytes": sum(r.core_bytes or 0 for r in ok),
        },
        "agents": [a.to_json() for a in agents],
        "captures": [r.to_json() for r in entries],
    }
    if files is not None:
        doc["files"] = dict(sorted(files.items()))
    return doc


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("corepeek")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "dev"
