"""Write an open session's core into the store: what a trigger firing does,
and what ``CaptureOptions.keep`` asks of an interactive capture.

The session's readable ranges (its mode's) are copied, zeros elsewhere; the
metadata keeps what the policy needs to decide later reads (the target's
facts as the admission saw them) and what ``ListCaptures`` shows.
"""

from __future__ import annotations

from typing import Any

from corepeek.v1 import capture_pb2 as pb

from corepeek_format.buildid import build_id

from . import procfs
from .authz import CaptureGuard
from .session import MODE_FULL, CaptureSession
from .store.frames import FrameWriter
from .store.index import Entry
from .store.store import Store


def copy_readable(session: CaptureSession, writer: FrameWriter,
                  guard: CaptureGuard | None = None) -> None:
    """The core into ``writer``: the session's readable ranges, zeros elsewhere
    (``guard``: account the bytes as served, as a trigger's capture does)."""
    assert session.layout is not None
    pos, total = 0, session.layout.total_size
    for off, length in sorted(session.readable):
        if off > pos:
            writer.zeros(off - pos)
        for chunk in session.read(off, length):
            if guard is not None:
                guard.serve(chunk.offset, chunk.length, hole=chunk.data is None)
            if chunk.data is None:
                writer.zeros(chunk.hole)
            elif chunk.extents:             # packed: the extents' bytes, zeros between
                pos_in, data = 0, memoryview(chunk.data)[chunk.head:]
                at = 0
                for start, n in chunk.extents:
                    if start > pos_in:
                        writer.zeros(start - pos_in)
                    writer.data(data[at:at + n])
                    at, pos_in = at + n, start + n
            else:
                writer.data(memoryview(chunk.data)[chunk.head:])
        pos = off + length
    if total > pos:
        writer.zeros(total - pos)


def build_ids(pid: int, layout: pb.CoreLayout) -> list[dict[str, str]]:
    """Build-ids of the ELF objects the target maps (first mapping of each file)."""
    out: dict[str, str] = {}
    for seg in layout.segments:
        if seg.name.startswith("/") and seg.file_page_offset == 0 and seg.name not in out:
            head = procfs.map_file_head(pid, seg.vaddr, seg.vaddr + seg.mem_size)
            bid = build_id(lambda off, n, head=head: head[off:off + n])
            if bid:
                out[seg.name] = bid
    return [{"path": p, "build_id": b} for p, b in out.items()]


def keep_session(session: CaptureSession, layout: pb.CoreLayout, guard: CaptureGuard,
                 store: Store, extra: dict[str, Any], charge: bool = True) -> Entry:
    """Store the open ``session`` (admitted by ``guard``); returns the new entry."""
    ids = build_ids(session.pid, layout)
    with store.writing() as pending:
        copy_readable(session, pending.writer, guard if charge else None)
        written = pending.writer.finish()
    facts, mode = guard.facts, session.options.mode
    meta = {"pid": session.pid, "start_time": session.start_time, "comm": session.comm,
            "exe": session.exe, "mode": mode, "readable": [list(r) for r in session.readable],
            "build_ids": ids, "owner": list(guard.identity.names),
            "facts": {"uids": list(facts.uids), "cgroup": facts.cgroup,
                      "container": facts.container_id, "dumpable": facts.dumpable}
            if facts else {},
            "stack_bytes": session.options.stack_bytes if mode != MODE_FULL else 0,
            "environment_hidden": session.hide_environment, **extra}
    return store.commit(pending, written, layout.SerializeToString(), meta,
                        program=session.exe or session.comm)
