"""A session's snapshot: decide, make the clone, and build the reader that serves it.

Owns :func:`make_snapshot`, what ``CaptureSession`` calls once the frozen
target's layout is built (snapshot mode): every fallback check (obstacles,
the memory rule), the pre-read of what the clone lacks, the clone itself on
the tracer thread, and the :class:`SnapshotReader`.  The outcome says either
which clone serves the memory or why the capture stays live (a reason code
and a sentence, for the layout, the audit line and the fallback counter).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ProcessGone
from ..freezer import Freezer, FreezeResult
from ..elfcore.model import DumpedMapping
from ..memory import MemoryReader
from .clone import Snapshot, take_snapshot
from .ledger import Ledger
from .memrule import host_memory, memory_obstacle
from .obstacles import SnapshotUnavailable, obstacle_reason, read_after_thaw
from .reader import SnapshotReader, preread

log = logging.getLogger(__name__)

FALLBACK_PREFIX = "snapshot not taken, live capture instead: "


@dataclass
class SnapshotOutcome:
    """A clone and its reader, or the reason the capture stays live."""

    snapshot: Snapshot | None = None
    reader: MemoryReader | None = None
    read_after_thaw: frozenset[int] = frozenset()
    reason: str = ""            # fallback code ("" when the snapshot was made)
    status: str = ""            # CoreLayout.snapshot_status

    @classmethod
    def fallback(cls, reason: str, why: str) -> SnapshotOutcome:
        return cls(reason=reason, status=FALLBACK_PREFIX + why)


def make_snapshot(pid: int, freezer: Freezer, fr: FreezeResult,
                  dumped: Sequence[DumpedMapping], original: MemoryReader, *,
                  thread_timeout: float, share_files: bool = True,
                  ledger: Ledger | None = None, opened_at: float = 0.0) -> SnapshotOutcome:
    """Clone the frozen target and thaw it, or say why not (target still frozen).

    The layout and notes are the original's (built while frozen).  Private
    memory the clone lacks (MADV_DONTFORK / MADV_WIPEONFORK) is read from the
    original first, up to ``PREREAD_BUDGET``; the rest of it is read from the
    running original later and flagged read_after_thaw, as MAP_SHARED memory is.
    """
    maps = [d.mapping for d in dumped]
    reason, why = obstacle_reason(fr.arch, fr.threads, maps)
    if not why:
        why = memory_obstacle(maps, host_memory(pid))
        reason = "memory" if why else ""
    if why:
        return SnapshotOutcome.fallback(reason, why)
    held, later = preread(original, dumped)

    def read(addr: int, n: int) -> bytes:
        buf = bytearray(n)
        return bytes(buf[:original.read_into(addr, buf)])

    try:
        snap = freezer.run_on_tracer(lambda: take_snapshot(
            freezer, fr, maps, read, thread_timeout=thread_timeout,
            share_files=share_files, ledger=ledger))
    except SnapshotUnavailable as exc:
        return SnapshotOutcome.fallback(exc.reason, str(exc))
    try:
        reader = SnapshotReader(
            snap.clone_pid, original, held,
            [(dumped[i].mapping.start, dumped[i].mapping.start + dumped[i].dump_size)
             for i in later])
    except OSError:
        # The session ended meanwhile (its tracer thread killed the clone).
        raise ProcessGone(f"snapshot clone {snap.clone_pid} of pid {pid} is gone") from None
    log.info("pid %d: snapshot clone %d made; target frozen %.1f ms (clone() %.1f ms), "
             "%d bytes of private copies held, %d regions read after the thaw",
             pid, snap.clone_pid, (freezer.target_detached_at - (opened_at or time.monotonic()))
             * 1e3, snap.clone_seconds * 1e3, sum(h.held_bytes for h in held), len(later))
    return SnapshotOutcome(snap, reader, frozenset(read_after_thaw(dumped, later)))
