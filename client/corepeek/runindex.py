"""Every ``collect`` run keeps its own record in a shared output directory.

A directory (or S3 prefix) used by several runs holds, besides the cores::

    manifest-20261206T051500Z.json   one per run, named after its start (UTC);
                                     never replaced (a clash gets -2, -3...)
    runs.json                        the index: one entry per run, appended
    manifest.json                    a copy of the newest run's manifest

The per-run manifests are the records; ``runs.json`` lists them in the order
the runs finished, with each run's summary, so a person sees every run at a
glance.  The pure part (names, index entries, the append) is here; the sinks
in :mod:`corepeek.collect` do the I/O (a local directory appends under an
exclusive ``flock`` and replaces the index atomically).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

INDEX_NAME = "runs.json"
LATEST_NAME = "manifest.json"
INDEX_VERSION = 1


def run_manifest_name(started: datetime) -> str:
    """``manifest-20261206T051500Z.json`` for a run started then."""
    return f"manifest-{started.astimezone(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"


def numbered(name: str, n: int) -> str:
    """``manifest-X.json`` -> ``manifest-X-2.json`` (the n-th run with that name)."""
    stem, dot, ext = name.rpartition(".")
    return f"{stem}-{n}.{ext}" if dot else f"{name}-{n}"


def index_entry(manifest: dict[str, Any], manifest_name: str) -> dict[str, Any]:
    """What ``runs.json`` says about one run."""
    return {"manifest": manifest_name, "started": manifest.get("started"),
            "finished": manifest.get("finished"), "selection": manifest.get("selection"),
            "summary": manifest.get("summary")}


def append_entry(existing: bytes | None, entry: dict[str, Any]) -> bytes:
    """The index with ``entry`` appended; a missing or unreadable index starts a
    new one, keeping the unreadable text under ``"damaged"`` rather than dropping it."""
    doc: dict[str, Any] = {"version": INDEX_VERSION, "runs": []}
    if existing:
        try:
            old = json.loads(existing)
            if not isinstance(old, dict) or not isinstance(old.get("runs"), list):
                raise ValueError("not an index")
            doc = old
        except ValueError:
            doc["damaged"] = existing.decode(errors="replace")
    doc["runs"].append(entry)
    return (json.dumps(doc, indent=2) + "\n").encode()
