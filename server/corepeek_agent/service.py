"""gRPC servicer: thin translation between messages and sessions.

Errors become gRPC statuses here and only here, from ``CorepeekError.code``.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
from corepeek.v1 import capture_pb2 as pb
from corepeek.v1 import capture_pb2_grpc as pb_grpc

from .errors import CorepeekError, InvalidRequest
from .listing import list_processes
from .registry import SessionRegistry
from .session import (DEFAULT_CHUNK, MAX_CHUNK, MODE_FULL, MODE_NOTES, MODE_STACKS,
                      CaptureSession, Chunk, SessionOptions)

log = logging.getLogger(__name__)

MAX_READ_LENGTH = 1 << 44          # 16 TiB: larger than any core, rejects garbage
MAX_OFFSET = 1 << 62
MAX_THREAD_TIMEOUT_MS = 10_000

_MODES = {pb.CAPTURE_MODE_UNSPECIFIED: MODE_FULL, pb.CAPTURE_MODE_FULL: MODE_FULL,
          pb.CAPTURE_MODE_STACKS: MODE_STACKS, pb.CAPTURE_MODE_NOTES: MODE_NOTES}
_MODE_ENUM = {MODE_FULL: pb.CAPTURE_MODE_FULL, MODE_STACKS: pb.CAPTURE_MODE_STACKS,
              MODE_NOTES: pb.CAPTURE_MODE_NOTES}


@dataclass(frozen=True)
class AgentConfig:
    max_sessions: int = 16
    max_freeze_seconds: float = 300.0
    default_thread_timeout: float = 0.5


def session_options(opts: pb.CaptureOptions, config: AgentConfig) -> SessionOptions:
    """Validate the client's options and fill in the agent's defaults."""
    if opts.mode not in _MODES:
        raise InvalidRequest(f"unknown capture mode {opts.mode}")
    if opts.freeze_timeout_ms > MAX_THREAD_TIMEOUT_MS:
        raise InvalidRequest(f"freeze_timeout_ms must be at most {MAX_THREAD_TIMEOUT_MS}")
    if opts.max_chunk_bytes and not 4096 <= opts.max_chunk_bytes <= MAX_CHUNK:
        raise InvalidRequest(f"max_chunk_bytes must be between 4096 and {MAX_CHUNK}")
    stack = opts.stack_bytes_per_thread or SessionOptions.stack_bytes
    return SessionOptions(
        thread_timeout=(opts.freeze_timeout_ms / 1000 if opts.freeze_timeout_ms
                        else config.default_thread_timeout),
        max_freeze=config.max_freeze_seconds,
        mode=_MODES[opts.mode],
        chunk_size=opts.max_chunk_bytes or DEFAULT_CHUNK,
        stack_bytes=min(stack, 1 << 30))


def layout_message(s: CaptureSession) -> pb.CoreLayout:
    lay, fr = s.layout, s.freeze
    assert lay is not None and fr is not None
    stack_tops = {lay.arch.sp(t.gpregs) for t in s.threads if t.frozen}
    segments = [pb.Segment(
        file_offset=g.file_offset, vaddr=g.vaddr, file_size=g.file_size, mem_size=g.mem_size,
        flags=g.flags, name=g.name, file_page_offset=g.file_page_offset, shared=g.shared,
        stack=any(g.vaddr <= sp < g.vaddr + g.mem_size for sp in stack_tops))
        for g in lay.segments]
    threads = [pb.ThreadInfo(tid=t.tid, frozen=t.frozen, pc=lay.arch.pc(t.gpregs),
                             sp=lay.arch.sp(t.gpregs), comm=t.comm, state=t.state)
               for t in s.threads]
    msg = pb.CoreLayout(
        session_id=s.id, total_size=lay.total_size,
        headers=pb.ByteRange(offset=0, length=len(lay.header)),
        notes=pb.ByteRange(offset=lay.notes_offset, length=len(lay.notes)),
        segments=segments, threads=threads, elf_class=lay.arch.word_size * 8,
        arch=lay.arch.name, pid=s.pid, start_time=s.start_time, comm=s.comm, exe=s.exe,
        freeze_micros=int(fr.freeze_seconds * 1e6), max_chunk_bytes=s.options.chunk_size,
        mode=_MODE_ENUM[s.options.mode],
        readable=[pb.ByteRange(offset=o, length=n) for o, n in s.readable])
    if lay.section_header:
        msg.section_headers.CopyFrom(pb.ByteRange(offset=lay.section_header_offset,
                                                  length=len(lay.section_header)))
    return msg


def _chunk_message(c: Chunk, request_id: int, last: bool) -> pb.CaptureResponse:
    chunk = pb.CoreChunk(offset=c.offset, request_id=request_id, last=last)
    if c.data is not None:
        chunk.data = c.data
    else:
        chunk.hole_length = c.hole
    return pb.CaptureResponse(chunk=chunk)


class CoreCaptureServicer(pb_grpc.CoreCaptureServiceServicer):
    def __init__(self, config: AgentConfig, registry: SessionRegistry) -> None:
        self.config = config
        self.registry = registry

    def ListProcesses(self, request: pb.ListProcessesRequest,
                      context: grpc.ServicerContext) -> pb.ListProcessesResponse:
        procs = [pb.ProcessInfo(pid=p.pid, ppid=p.ppid, uid=p.uid, comm=p.comm, exe=p.exe,
                                cmdline=p.cmdline, threads=p.threads, rss_bytes=p.rss_bytes,
                                start_time=p.start_time, cgroup=p.cgroup, state=p.state,
                                elf_class=p.elf_class)
                 for p in list_processes(comm=request.comm, exe_glob=request.exe_glob,
                                         pid=request.pid)]
        return pb.ListProcessesResponse(processes=procs, hostname=socket.gethostname())

    def Capture(self, request_iterator: Iterator[pb.CaptureRequest],
                context: grpc.ServicerContext) -> Iterator[pb.CaptureResponse]:
        session: CaptureSession | None = None
        registered = False
        try:
            first = next(request_iterator, None)
            if first is None:
                return
            if first.WhichOneof("request") != "open":
                raise InvalidRequest("the first message of a capture must be `open`")
            if first.open.pid <= 0:
                raise InvalidRequest(f"invalid pid {first.open.pid}")
            options = session_options(first.open.options, self.config)
            session = CaptureSession(first.open.pid, start_time=first.open.start_time,
                                     options=options, on_expire=context.cancel)
            self.registry.add(session)
            registered = True
            if not context.add_callback(session.thaw):
                return                      # the RPC already ended
            session.open()
            log.info("session %s: pid %d frozen (%d threads, %.1f ms), core %d bytes",
                     session.id, session.pid, len(session.threads),
                     session.freeze.freeze_seconds * 1000 if session.freeze else 0,
                     session.layout.total_size if session.layout else 0)
            yield pb.CaptureResponse(layout=layout_message(session))
            for req in request_iterator:
                yield from self._answer(session, req)
        except CorepeekError as exc:
            context.abort(exc.code, exc.details())
        finally:
            if session is not None:
                session.close()
                if registered:
                    self.registry.remove(session)
                log.info("session %s: pid %d thawed after %.3f s, %d bytes served",
                         session.id, session.pid, session.frozen_seconds, session.bytes_served)

    def _answer(self, session: CaptureSession,
                req: pb.CaptureRequest) -> Iterator[pb.CaptureResponse]:
        kind = req.WhichOneof("request")
        if kind == "open":
            raise InvalidRequest("this stream already opened a capture; open another stream")
        if kind != "read":
            raise InvalidRequest("expected a `read` request")
        r = req.read
        if r.length == 0 or r.length > MAX_READ_LENGTH:
            raise InvalidRequest(f"read length must be between 1 and {MAX_READ_LENGTH}")
        if r.offset > MAX_OFFSET:
            raise InvalidRequest(f"read offset {r.offset} is out of range")
        prev: Chunk | None = None
        for chunk in session.read(r.offset, r.length):
            if prev is not None:
                yield _chunk_message(prev, r.request_id, last=False)
            session.bytes_served += chunk.length
            prev = chunk
        yield _chunk_message(prev if prev is not None else Chunk(r.offset, b""),
                             r.request_id, last=True)
