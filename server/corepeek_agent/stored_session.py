"""A session over a stored capture: what the Capture handler needs of a session
(``layout``, ``read``, ``bytes_served``) served from the store's frames.

The policy is the live one's, on the stored target's facts: the client's rule
must cover that target for the mode it asks; a notes-only identity reads only
headers and notes; bytes the capture itself did not keep (a notes or stacks
capture) are never readable.  Stacks-mode reads of a stored full core are
refused: the per-thread windows and argv/environment cut need the live
target (read it in notes mode, or in full where the policy allows).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from corepeek.v1 import capture_pb2 as pb
from corepeek_format import regions

from .errors import InvalidRequest, PermissionDenied
from .policy import MODE_FULL, MODE_NOTES, MODE_STACKS, Decision, Policy, TargetFacts
from .session import Chunk
from .store.frames import Corrupt, FrameReader
from .store.index import Entry
from .store.store import EntryCorrupt, Store

_MODE_ENUM = {MODE_FULL: pb.CAPTURE_MODE_FULL, MODE_STACKS: pb.CAPTURE_MODE_STACKS,
              MODE_NOTES: pb.CAPTURE_MODE_NOTES}


def stored_facts(entry: Entry) -> TargetFacts:
    m, f = entry.meta, entry.meta.get("facts", {})
    return TargetFacts(pid=m.get("pid", 0), uids=tuple(f.get("uids", ())), exe=m.get("exe", ""),
                       comm=m.get("comm", ""), cgroup=f.get("cgroup", ""),
                       container_id=f.get("container", ""), dumpable=f.get("dumpable"),
                       start_time=m.get("start_time", 0))


def _notes_ranges(lay: pb.CoreLayout) -> list[tuple[int, int]]:
    return regions.merge((r.offset, r.length) for r in (lay.headers, lay.notes,
                                                          lay.section_headers) if r.length)


def readable_for(entry: Entry, lay: pb.CoreLayout, mode: str,
                 decision: Decision) -> list[tuple[int, int]]:
    """What a session in ``mode`` may read of the entry (the rule admitted the mode)."""
    kept = [tuple(r) for r in entry.meta.get("readable", [(0, entry.core_size)])]
    stored_mode = entry.meta.get("mode", MODE_FULL)
    if mode == MODE_NOTES:
        notes = _notes_ranges(lay)
        return [r for r in notes if regions.contains(kept, r[0], r[1])]
    if mode == MODE_STACKS:
        rule = decision.rule
        assert rule is not None
        if stored_mode == MODE_NOTES:
            return kept
        if (stored_mode == MODE_STACKS and rule.stack_bytes >= entry.meta.get("stack_bytes", 0)
                and (rule.environment or entry.meta.get("environment_hidden", True))):
            return kept
        raise PermissionDenied(f"stored capture {entry.id} was captured in {stored_mode} mode; "
                               "stacks-mode reads of it are not served (read it in notes "
                               "mode, or in full mode if the policy allows)")
    return kept


@dataclass
class _Size:
    total_size: int


class StoredSession:
    """Serve one stored entry by offset and length."""

    def __init__(self, store: Store, entry_id: str, policy: Policy,
                 identities: tuple[str, ...], mode: str, chunk_size: int) -> None:
        self.id = uuid.uuid4().hex[:16]
        self.entry = store.get(entry_id)
        self.facts = stored_facts(self.entry)
        self.decision = policy.decide(identities, self.facts, mode)
        if not self.decision.allowed:
            raise PermissionDenied(f"{','.join(identities) or 'this client'} may not read "
                                   f"stored capture {entry_id}: {self.decision.reason}")
        self._store = store
        self._stored = pb.CoreLayout.FromString(self.entry.layout)
        self.mode = mode
        self.readable = readable_for(self.entry, self._stored, mode, self.decision)
        self.chunk_size = chunk_size
        self.layout = _Size(self.entry.core_size)
        self.bytes_served = 0
        self._reader: FrameReader | None = store.open(self.entry)    # checksums first

    def layout_message(self) -> pb.CoreLayout:
        lay = pb.CoreLayout()
        lay.CopyFrom(self._stored)
        lay.session_id = self.id
        lay.mode = _MODE_ENUM[self.mode]
        del lay.readable[:]
        lay.readable.extend(pb.ByteRange(offset=o, length=n) for o, n in self.readable)
        lay.target_running = True
        lay.joined = False
        lay.max_chunk_bytes = self.chunk_size
        return lay

    def read(self, offset: int, length: int, frame: object = None) -> Iterator[Chunk]:
        if self._reader is None:
            raise InvalidRequest("read after the session was closed")
        end = min(offset + length, self.entry.core_size)
        if end > offset and not regions.contains(self.readable, offset, end - offset):
            raise PermissionDenied(f"range [{offset}, {end}) is outside what this session "
                                   f"may read of stored capture {self.entry.id} "
                                   f"({self.mode} mode)")
        try:
            for off, data, n in self._reader.read(offset, end - offset):
                for pos in range(0, n, self.chunk_size):
                    k = min(self.chunk_size, n - pos)
                    yield Chunk(off + pos, None if data is None else data[pos:pos + k],
                                0 if data is not None else k)
        except Corrupt as exc:
            self._store.mark_corrupt(self.entry.id, str(exc))
            raise EntryCorrupt(f"stored capture {self.entry.id} is corrupt: {exc}") from None

    def close(self) -> None:
        if self._reader is not None:
            os.close(self._reader.fd)
            self._reader = None
