"""The store's index: one SQLite database (WAL) in the store directory.

One row per entry: its metadata as JSON (what ListCaptures shows and what the
policy looks at), the block table of its frames, and its checksum state.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id TEXT PRIMARY KEY,
    time REAL NOT NULL,
    program TEXT NOT NULL,
    core_size INTEGER NOT NULL,
    stored_bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    blocks BLOB NOT NULL,
    meta TEXT NOT NULL,
    layout BLOB NOT NULL,
    corrupt TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS entries_time ON entries(time);
"""


@dataclass
class Entry:
    id: str
    time: float
    program: str                    # the exe: max_per_program counts by it
    core_size: int
    stored_bytes: int
    sha256: str
    blocks: bytes
    layout: bytes                   # serialized corepeek.v1.CoreLayout of the capture
    meta: dict[str, Any] = field(default_factory=dict)
    corrupt: str = ""               # why it failed its checksum ("" = not known bad)


class Index:
    def __init__(self, path: str) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)

    def add(self, e: Entry) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO entries (id, time, program, core_size, stored_bytes, sha256, "
                "blocks, meta, layout, corrupt) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (e.id, e.time, e.program, e.core_size, e.stored_bytes, e.sha256, e.blocks,
                 json.dumps(e.meta), e.layout, e.corrupt))

    def get(self, entry_id: str) -> Entry | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, time, program, core_size, stored_bytes, sha256, blocks, layout, "
                "meta, corrupt FROM entries WHERE id = ?", (entry_id,)).fetchone()
        return _entry(row) if row else None

    def all(self) -> list[Entry]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, time, program, core_size, stored_bytes, sha256, blocks, layout, "
                "meta, corrupt FROM entries ORDER BY time, id").fetchall()
        return [_entry(r) for r in rows]

    def mark_corrupt(self, entry_id: str, why: str) -> None:
        with self._lock:
            self._db.execute("UPDATE entries SET corrupt = ? WHERE id = ?", (why, entry_id))

    def remove(self, entry_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM entries WHERE id = ?", (entry_id,))

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _entry(row: tuple[Any, ...]) -> Entry:
    return Entry(id=row[0], time=row[1], program=row[2], core_size=row[3], stored_bytes=row[4],
                 sha256=row[5], blocks=bytes(row[6]), layout=bytes(row[7]),
                 meta=json.loads(row[8]), corrupt=row[9])


__all__ = ["Entry", "Index", "asdict"]
