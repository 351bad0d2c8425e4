"""Which stored entries go: systemd-coredump's limits, oldest first.  Pure logic."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StoreLimits:
    max_use: int | None = None          # bytes the store may use in all
    keep_free: int | None = None        # bytes the file system must keep free
    max_per_program: int | None = None  # entries of one executable


@dataclass(frozen=True)
class EntrySize:
    id: str
    time: float
    stored_bytes: int
    program: str


def to_evict(entries: Sequence[EntrySize], limits: StoreLimits, free_bytes: int) -> list[str]:
    """Ids to remove, oldest first, until every limit holds (``free_bytes``: the
    file system's free space now)."""
    order = sorted(entries, key=lambda e: (e.time, e.id))
    gone: list[str] = []
    per_program = Counter(e.program for e in order)
    if limits.max_per_program is not None:
        for e in order:
            if per_program[e.program] > limits.max_per_program:
                per_program[e.program] -= 1
                gone.append(e.id)
    used = sum(e.stored_bytes for e in order if e.id not in gone)
    free = free_bytes
    for e in order:
        if e.id in gone:
            continue
        over_use = limits.max_use is not None and used > limits.max_use
        too_full = limits.keep_free is not None and free < limits.keep_free
        if not (over_use or too_full):
            break
        gone.append(e.id)
        used -= e.stored_bytes
        free += e.stored_bytes
    return gone
