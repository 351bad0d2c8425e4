"""gRPC servicer: thin translation between messages and sessions.

Errors become gRPC statuses here and only here, from ``CorepeekError.code``.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
from corepeek.v1 import capture_pb2 as pb
from google.protobuf.message import DecodeError, Message
from corepeek.v1 import capture_pb2_grpc as pb_grpc

from .authz import CaptureGuard, Guard
from .compress import ChunkCompressor
from .errors import CorepeekError, InvalidRequest, SessionExpired, as_corepeek_error
from .lifetime import Lifetimes, StreamWatch, Watchdog
from .listing import list_processes
from .mapped_files import FileServer
from .policy import local_default_policy
from .registry import SessionRegistry
from .snapshot import ledger
from .session import (DEFAULT_CHUNK, MAX_CHUNK, MODE_FULL, MODE_NOTES, MODE_STACKS,
                      CaptureSession, Chunk, SessionOptions)
from .sockbuf import DEFAULT_BUFFER_BYTES
from .storerpc import StoreRpcs
from .uploadrpc import UploadRpcs

if TYPE_CHECKING:
    from .store.store import Store
    from .triggers.engine import TriggerEngine

log = logging.getLogger(__name__)

MAX_READ_LENGTH = 1 << 44          # 16 TiB: larger than any core, rejects garbage
MAX_OFFSET = 1 << 62
MAX_THREAD_TIMEOUT_MS = 10_000
MAX_FILTER_LENGTH = 4096           # ListProcesses comm / exe_glob
MAX_WAIT_EXCLUSIVE = 300.0         # CaptureOptions.wait_exclusive_seconds

_MODES = {pb.CAPTURE_MODE_UNSPECIFIED: MODE_FULL, pb.CAPTURE_MODE_FULL: MODE_FULL,
          pb.CAPTURE_MODE_STACKS: MODE_STACKS, pb.CAPTURE_MODE_NOTES: MODE_NOTES}
_MODE_ENUM = {MODE_FULL: pb.CAPTURE_MODE_FULL, MODE_STACKS: pb.CAPTURE_MODE_STACKS,
              MODE_NOTES: pb.CAPTURE_MODE_NOTES}


@dataclass(frozen=True)
class AgentConfig:
    max_sessions: int = 16
    max_freeze_seconds: float = 300.0
    default_thread_timeout: float = 0.5
    # A client whose network path is cut silently is noticed within about
    # keepalive_seconds + keepalive_timeout_seconds (its session then thaws).
    keepalive_seconds: float = 10.0
    keepalive_timeout_seconds: float = 5.0
    # Stream admission and lifetimes (gate.py, lifetime.py): streams one TLS
    # identity may hold at once; seconds to the first request; idle and
    # total lifetime of every stream, in every mode.
    max_streams_per_client: int = 4
    first_request_seconds: float = 5.0
    idle_timeout_seconds: float = 60.0
    max_lifetime_seconds: float = 900.0
    # Upload (upload.py): the S3-compatible endpoint ("" = AWS, or AWS_ENDPOINT_URL).
    s3_endpoint_url: str = ""

    # Send buffer of every accepted connection (sockbuf.py); 0 keeps the kernel's.
    socket_buffer_bytes: int = DEFAULT_BUFFER_BYTES

    # Where snapshot clones are recorded for a restarted agent to clean up
    # (snapshot/ledger.py); COREPEEK_STATE_DIR overrides the default.
    clone_state_dir: str = field(
        default_factory=lambda: os.environ.get("COREPEEK_STATE_DIR", ledger.DEFAULT_DIR))

    @property
    def lifetimes(self) -> Lifetimes:
        return Lifetimes(first_request=self.first_request_seconds,
                         idle=self.idle_timeout_seconds, maximum=self.max_lifetime_seconds)


def session_options(opts: pb.CaptureOptions, config: AgentConfig) -> SessionOptions:
    """Validate the client's options and fill in the agent's defaults."""
    if opts.mode not in _MODES:
        raise InvalidRequest(f"unknown capture mode {opts.mode}")
    if opts.freeze_timeout_ms > MAX_THREAD_TIMEOUT_MS:
        raise InvalidRequest(f"freeze_timeout_ms must be at most {MAX_THREAD_TIMEOUT_MS}")
    if opts.max_chunk_bytes and not 4096 <= opts.max_chunk_bytes <= MAX_CHUNK:
        raise InvalidRequest(f"max_chunk_bytes must be between 4096 and {MAX_CHUNK}")
    stack = opts.stack_bytes_per_thread      # 0: the policy rule's cap
    return SessionOptions(
        thread_timeout=(opts.freeze_timeout_ms / 1000 if opts.freeze_timeout_ms
                        else config.default_thread_timeout),
        max_freeze=config.max_freeze_seconds,
        mode=_MODES[opts.mode],
        chunk_size=opts.max_chunk_bytes or DEFAULT_CHUNK,
        stack_bytes=min(stack, 1 << 30),       # the policy rule clamps it further
        snapshot=wants_snapshot(opts),
        clone_state_dir=config.clone_state_dir,
        packed=opts.packed_chunks)


def wants_snapshot(opts: pb.CaptureOptions) -> bool:
    """Snapshot or live: explicit (freeze_mode, or the older ``snapshot=true``),
    else the default: a snapshot for FULL and STACKS captures, live for NOTES
    (they read no memory and thaw once the notes are built)."""
    if opts.freeze_mode not in (pb.FREEZE_MODE_DEFAULT, pb.FREEZE_MODE_LIVE,
                                pb.FREEZE_MODE_SNAPSHOT):
        raise InvalidRequest(f"unknown freeze_mode {opts.freeze_mode}")
    if opts.freeze_mode == pb.FREEZE_MODE_LIVE:
        if opts.snapshot:
            raise InvalidRequest("freeze_mode LIVE contradicts snapshot=true")
        return False
    if opts.snapshot or opts.freeze_mode == pb.FREEZE_MODE_SNAPSHOT:
        return True
    return _MODES[opts.mode] != MODE_NOTES


def wait_exclusive(opts: pb.CaptureOptions) -> float:
    """Seconds the client waits for a freeze of its own (0: join one in progress)."""
    wait = opts.wait_exclusive_seconds
    if not 0 <= wait <= MAX_WAIT_EXCLUSIVE:      # also refuses NaN
        raise InvalidRequest(f"wait_exclusive_seconds must be between 0 and "
                             f"{MAX_WAIT_EXCLUSIVE:g}")
    return wait


def end_with_status(context: grpc.ServicerContext, err: CorepeekError) -> Callable[[], None]:
    """A callback that ends the RPC from any thread with ``err``'s status.

    ``context.abort`` works only in the handler's own thread, and
    ``context.cancel`` reaches the client as a bare CANCELLED.  The handler
    may be blocked in a send to a stalled client, so the call is cancelled
    with the status and details gRPC core sends in its place.
    """
    def end() -> None:
        call = getattr(getattr(context, "_rpc_event", None), "call", None)
        try:
            call.cancel(err.code.value[0], err.details())    # type: ignore[union-attr]
        except (AttributeError, TypeError, ValueError):
            context.cancel()                     # another gRPC: a bare CANCELLED
    return end


def chunk_compressor(opts: pb.CaptureOptions) -> ChunkCompressor | None:
    """The session's compressor for the client's ``compression`` (None: none)."""
    if opts.compression == pb.COMPRESSION_NONE:
        return None
    if opts.compression == pb.COMPRESSION_ZSTD:
        return ChunkCompressor()
    raise InvalidRequest(f"unknown compression {opts.compression}")


def layout_message(s: CaptureSession) -> pb.CoreLayout:
    lay, fr = s.layout, s.freeze
    assert lay is not None and fr is not None
    stack_tops = {lay.arch.sp(t.gpregs) for t in s.threads if t.frozen}
    segments = [pb.Segment(
        file_offset=g.file_offset, vaddr=g.vaddr, file_size=g.file_size, mem_size=g.mem_size,
        flags=g.flags, name=g.name, file_page_offset=g.file_page_offset, shared=g.shared,
        stack=any(g.vaddr <= sp < g.vaddr + g.mem_size for sp in stack_tops),
        read_after_thaw=i in s.read_after_thaw, file=s.files.file_at(g.vaddr))
        for i, g in enumerate(lay.segments)]
    files = [pb.MappedFile(id=f.id, path=f.path, size=f.size, build_id=f.build_id,
                           deleted=f.deleted, elf=f.elf, readable=f.readable(s.options.mode),
                           device=f.device, inode=f.inode) for f in s.files.files]
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
        readable=[pb.ByteRange(offset=o, length=n) for o, n in s.readable],
        snapshot=s.snapshot is not None, snapshot_status=s.snapshot_status,
        snapshot_reason=s.snapshot_reason,
        stopped_micros=int(s.frozen_seconds * 1e6), target_running=s.target_running,
        joined=s.joined, freeze_id=s.freeze_id, files=files)
    if s.options.mode == MODE_STACKS:
        msg.stack_bytes_per_thread = s.options.stack_bytes
        msg.environment_hidden = s.hide_environment
    if lay.section_header:
        msg.section_headers.CopyFrom(pb.ByteRange(offset=lay.section_header_offset,
                                                  length=len(lay.section_header)))
    return msg


# -- chunk messages -----------------------------------------------------------------
#
# Data chunks are the whole transfer, so they are encoded by hand: the framing
# of a CaptureResponse{chunk: CoreChunk{...}} goes in front of the payload, and
# the session reads target memory straight into the bytes after it (see
# ``CaptureSession.read(frame=...)``).  gRPC gets those bytes as they are (the
# serializer of ``add_capture_service`` passes bytes through): no protobuf
# copies.  Fields are written offset, request_id, last, then data or
# hole_length; protobuf parsers accept fields in any order.

_RESPONSE_CHUNK = 0x12          # CaptureResponse.chunk: field 2, length-delimited
_CHUNK_OFFSET = 0x08            # CoreChunk.offset: field 1, varint
_CHUNK_DATA = 0x12              # CoreChunk.data: field 2, length-delimited
_CHUNK_HOLE = 0x18              # CoreChunk.hole_length: field 3, varint
_CHUNK_REQUEST = 0x20           # CoreChunk.request_id: field 4, varint
_CHUNK_LAST = b"\x28\x01"       # CoreChunk.last = true: field 5, varint
_CHUNK_EXTENTS = 0x32           # CoreChunk.extents: field 6, packed varints
_CHUNK_RAW_LENGTH = 0x38        # CoreChunk.raw_length: field 7, varint


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _chunk_fields(offset: int, request_id: int, last: bool,
                  extents: Sequence[tuple[int, int]] = (), raw_length: int = 0) -> bytes:
    fields = bytes([_CHUNK_OFFSET]) + _varint(offset) if offset else b""
    if raw_length:
        fields += bytes([_CHUNK_RAW_LENGTH]) + _varint(raw_length)
    if request_id:
        fields += bytes([_CHUNK_REQUEST]) + _varint(request_id)
    if last:
        fields += _CHUNK_LAST
    if extents:
        packed = b"".join(_varint(v) for pair in extents for v in pair)
        fields += bytes([_CHUNK_EXTENTS]) + _varint(len(packed)) + packed
    return fields


def chunk_prefix(offset: int, request_id: int, last: bool, length: int,
                 extents: Sequence[tuple[int, int]] = (), raw_length: int = 0) -> bytes:
    """Encoded CaptureResponse with a chunk whose ``length`` data bytes follow
    (compressed ones if ``raw_length``)."""
    inner = (_chunk_fields(offset, request_id, last, extents, raw_length)
             + bytes([_CHUNK_DATA]) + _varint(length))
    return bytes([_RESPONSE_CHUNK]) + _varint(len(inner) + length) + inner


def encode_chunk(offset: int, request_id: int, last: bool, data: bytes | None = None,
                 hole: int = 0, extents: Sequence[tuple[int, int]] = (),
                 raw_length: int = 0) -> bytes:
    """Encoded CaptureResponse carrying one chunk (``data``, or a ``hole``)."""
    if data is not None:
        return chunk_prefix(offset, request_id, last, len(data), extents, raw_length) + data
    inner = _chunk_fields(offset, request_id, last)
    if hole:
        inner += bytes([_CHUNK_HOLE]) + _varint(hole)
    return bytes([_RESPONSE_CHUNK]) + _varint(len(inner)) + inner


class Undecodable:
    """A request that is not a valid protobuf message of its type.

    gRPC answers INTERNAL ("Exception deserializing request!") when a
    deserializer raises; the servicer turns this placeholder into
    INVALID_ARGUMENT instead, before anything is frozen.
    """

    def __init__(self, kind: str, error: str) -> None:
        self.kind, self.error = kind, error

    def refuse(self) -> InvalidRequest:
        return InvalidRequest(f"undecodable {self.kind}: {self.error}")


def _tolerant_parser(cls: type[Message]) -> Callable[[bytes], Message | Undecodable]:
    def parse(raw: bytes) -> Message | Undecodable:
        try:
            return cls.FromString(raw)
        except DecodeError as exc:
            return Undecodable(cls.DESCRIPTOR.name, str(exc) or "malformed message")
    return parse


def _serialize_response(msg: pb.CaptureResponse | bytes) -> bytes:
    """Capture's response serializer: pre-encoded chunks pass through."""
    return msg if type(msg) is bytes else msg.SerializeToString()


def add_capture_service(servicer: CoreCaptureServicer, server: grpc.Server) -> None:
    """Register ``servicer`` like the generated ``add_..._to_server``, except that
    Capture may yield pre-encoded chunk bytes (``servicer.raw_responses``)."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}

    class _Collect:
        def add_generic_rpc_handlers(self, _generic: object) -> None:
            pass

        def add_registered_method_handlers(self, _name: str,
                                           found: dict[str, grpc.RpcMethodHandler]) -> None:
            handlers.update(found)

    pb_grpc.add_CoreCaptureServiceServicer_to_server(servicer, _Collect())
    handlers["Capture"] = handlers["Capture"]._replace(  # type: ignore[attr-defined]
        response_serializer=_serialize_response,
        request_deserializer=_tolerant_parser(pb.CaptureRequest))
    for method, cls in (("ListProcesses", pb.ListProcessesRequest),
                        ("AddTrigger", pb.AddTriggerRequest),
                        ("ListTriggers", pb.ListTriggersRequest),
                        ("RemoveTrigger", pb.RemoveTriggerRequest),
                        ("ListCaptures", pb.ListCapturesRequest),
                        ("Upload", pb.UploadRequest)):
        handlers[method] = handlers[method]._replace(  # type: ignore[attr-defined]
            request_deserializer=_tolerant_parser(cls))
    name = pb.DESCRIPTOR.services_by_name["CoreCaptureService"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)
    servicer.raw_responses = True


def _chunk_message(c: Chunk, request_id: int, last: bool, raw: bool = False,
                   compressor: ChunkCompressor | None = None) -> pb.CaptureResponse | bytes:
    data, raw_length = c.data, 0
    if data is not None and c.head:
        if raw and compressor is None:
            return data     # type: ignore[return-value]  # framed by the session read
        data = data[c.head:]
    if data and compressor is not None:
        packed = compressor.compress(data)
        if packed is not None:
            data, raw_length = packed, len(data)
    if raw:
        return encode_chunk(c.offset, request_id, last, data, c.hole, c.extents, raw_length)
    chunk = pb.CoreChunk(offset=c.offset, request_id=request_id, last=last,
                         raw_length=raw_length)
    if data is not None:
        chunk.data = data
        chunk.extents.extend(v for pair in c.extents for v in pair)
    else:
        chunk.hole_length = c.hole
    return pb.CaptureResponse(chunk=chunk)


def _serve(guard: CaptureGuard, c: Chunk) -> None:
    """Account a chunk with the guard (budget, audit): data and holes apart."""
    if not c.extents:
        guard.serve(c.offset, c.length, hole=c.data is None)
        return
    pos = 0
    for start, n in c.extents:
        if start > pos:
            guard.serve(c.offset + pos, start - pos, hole=True)
        guard.serve(c.offset + start, n, hole=False)
        pos = start + n


def _audit_overdue(guard: CaptureGuard, watch: StreamWatch) -> None:
    """A stream the watchdog ended: a refusal before its `open`, else an expiry."""
    if watch.reason:
        guard.record.fail("refused" if watch.refused else "expired",
                          grpc.StatusCode.DEADLINE_EXCEEDED.name, watch.reason)


def _answer_file(files: FileServer, r: pb.ReadFile, guard: CaptureGuard
                 ) -> Iterator[pb.CaptureResponse]:
    """Answer a ``read_file``: chunks of the mapped file, the last one flagged."""
    if r.length == 0 or r.length > MAX_READ_LENGTH or r.offset > MAX_OFFSET:
        raise InvalidRequest(f"read_file length must be between 1 and {MAX_READ_LENGTH}, "
                             f"offset at most {MAX_OFFSET}")
    guard.record.requests += 1
    prev: tuple[int, bytes] | None = None
    for piece in files.read(r.file, r.offset, r.length):
        guard.serve_file(r.file, len(piece[1]))        # budget, audit
        if prev is not None:
            yield pb.CaptureResponse(file_chunk=pb.FileChunk(
                file=r.file, offset=prev[0], data=prev[1], request_id=r.request_id))
        prev = piece
    at, data = prev if prev is not None else (r.offset, b"")
    yield pb.CaptureResponse(file_chunk=pb.FileChunk(
        file=r.file, offset=at, data=data, request_id=r.request_id, last=True))


class CoreCaptureServicer(StoreRpcs, UploadRpcs, pb_grpc.CoreCaptureServiceServicer):
    # Capture yields pre-encoded chunk bytes: only with the serializer that
    # add_capture_service() registers (the generated one wants messages).
    raw_responses = False

    def __init__(self, config: AgentConfig, registry: SessionRegistry,
                 guard: Guard | None = None, store: Store | None = None,
                 engine: TriggerEngine | None = None) -> None:
        self.config = config
        self.store, self.engine = store, engine       # storerpc.py: None when not configured
        self.registry = registry
        # Policy, rate limits and audit log (authz.py); without one, local peers
        # may capture every dumpable process and TLS peers nothing.
        self.guard = guard or Guard(local_default_policy(), local_transport=True)
        self.watchdog = Watchdog(config.lifetimes)

    def ListProcesses(self, request: pb.ListProcessesRequest,
                      context: grpc.ServicerContext) -> pb.ListProcessesResponse:
        listing = self.guard.begin_list(context)
        procs: list[pb.ProcessInfo] = []
        try:
            if isinstance(request, Undecodable):
                raise request.refuse()
            listing.check()
            if request.pid < 0:
                raise InvalidRequest(f"invalid pid {request.pid}")
            if len(request.comm) > MAX_FILTER_LENGTH or len(request.exe_glob) > MAX_FILTER_LENGTH:
                raise InvalidRequest(f"filters are limited to {MAX_FILTER_LENGTH} characters")
            procs = [pb.ProcessInfo(pid=p.pid, ppid=p.ppid, uid=p.uid, comm=p.comm, exe=p.exe,
                                    cmdline=p.cmdline, threads=p.threads,
                                    rss_bytes=p.rss_bytes, start_time=p.start_time,
                                    cgroup=p.cgroup, state=p.state, elf_class=p.elf_class)
                     for p in list_processes(comm=request.comm, exe_glob=request.exe_glob,
                                             pid=request.pid)
                     if listing.may_see(p.pid)]
        except CorepeekError as exc:
            listing.failed(exc.code, exc.details())
            context.abort(exc.code, exc.details())
        finally:
            listing.finish(len(procs))
        return pb.ListProcessesResponse(processes=procs, hostname=socket.gethostname())

    def Capture(self, request_iterator: Iterator[pb.CaptureRequest],
                context: grpc.ServicerContext) -> Iterator[pb.CaptureResponse]:
        session: CaptureSession | None = None
        files: FileServer | None = None
        registered = False
        guard = self.guard.begin_capture(context)
        watch = self.watchdog.watch(context.cancel)     # first request, idle, lifetime
        try:
            first = next(request_iterator, None)
            watch.touch()
            if first is None:
                guard.record.fail("empty", "OK", "the stream ended before `open`")
                return
            if isinstance(first, Undecodable):
                raise first.refuse()
            if first.WhichOneof("request") != "open":
                raise InvalidRequest("the first message of a capture must be `open`")
            options = session_options(first.open.options, self.config)
            compressor = chunk_compressor(first.open.options)
            if first.open.capture_id:
                yield from self.serve_stored(first.open.capture_id, options, request_iterator,
                                             guard, watch, compressor)
                return
            if first.open.pid <= 0:
                raise InvalidRequest(f"invalid pid {first.open.pid}")
            wait = wait_exclusive(first.open.options)
            guard.admit(first.open.pid, first.open.start_time, options.mode)
            session = CaptureSession(
                first.open.pid, start_time=first.open.start_time, options=options,
                on_expire=end_with_status(context, SessionExpired.after(options.max_freeze)),
                admit=guard)
            self.registry.add(session, wait_exclusive=wait)
            registered = True
            if not context.add_callback(session.leave):
                return                      # the RPC already ended
            session.open()
            if options.mode != MODE_NOTES and session.hold is not None and session.hold.closing:
                # The stream ended while the target was being frozen: its leave
                # ran before there was a freeze to let go, so nobody else will.
                session.thaw()
                return
            if options.mode == MODE_NOTES:
                # Thawed already: the stream keeps neither the pid nor a slot.
                self.registry.remove(session)
            guard.record.snapshot = {"taken": session.snapshot is not None,
                                     "reason": session.snapshot_reason,
                                     "status": session.snapshot_status}
            if not session.joined:
                log.info("session %s: pid %d frozen (%d threads, %.1f ms), core %d bytes",
                         session.id, session.pid, len(session.threads),
                         session.freeze.freeze_seconds * 1000 if session.freeze else 0,
                         session.layout.total_size if session.layout else 0)
            layout = layout_message(session)
            if first.open.options.keep:
                layout.stored_capture_id = self.keep_capture(session, layout, guard)
            if compressor is not None:
                layout.compression = pb.COMPRESSION_ZSTD
            if options.mode == MODE_STACKS:
                guard.record.exposure = {
                    "stack_bytes": session.options.stack_bytes,
                    "stack_bytes_requested": session.stack_requested,
                    "environment": not session.hide_environment}
            yield pb.CaptureResponse(layout=layout)
            watch.touch()
            files = FileServer(session.pid, session.files, options.mode, options.chunk_size)
            for req in request_iterator:
                watch.touch()
                for msg in self._answer(session, req, guard, compressor, files):
                    yield msg
                    watch.touch()
        except CorepeekError as exc:
            guard.failed(exc.code, exc.details())
            context.abort(exc.code, exc.details())
        except grpc.RpcError:
            return      # the RPC was cancelled (client gone, max freeze, watchdog): finally leaves
        except OSError as exc:
            err = as_corepeek_error(exc)
            if err.code == grpc.StatusCode.INTERNAL:
                log.exception("capture failed")
            guard.failed(err.code, err.details())
            context.abort(err.code, err.details())
        except Exception as exc:
            log.exception("capture failed")
            guard.failed(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            context.abort(grpc.StatusCode.INTERNAL, f"agent error: {type(exc).__name__}: {exc}")
        finally:
            self.watchdog.forget(watch)
            _audit_overdue(guard, watch)
            if files is not None:
                files.close()
            frozen = self.registry.end(session, registered)
            if session is not None:
                log.info("session %s: pid %d %s after %.3f s, %d bytes served",
                         session.id, session.pid,
                         "thawed" if session.target_running else "left (another session "
                         "still reads the freeze)", session.frozen_seconds, session.bytes_served)
                guard.record.freeze_id = session.freeze_id
            guard.finish(
                session_id=session.id if session else "", frozen_seconds=frozen,
                stop_seconds=(session.freeze.freeze_seconds
                              if session and session.freeze and not session.joined else 0),
                expired=bool(session and session.expired), active=context.is_active())

    def _answer(self, session: CaptureSession, req: pb.CaptureRequest, guard: CaptureGuard,
                compressor: ChunkCompressor | None = None,
                files: FileServer | None = None) -> Iterator[pb.CaptureResponse]:
        if isinstance(req, Undecodable):
            raise req.refuse()
        kind = req.WhichOneof("request")
        if kind == "open":
            raise InvalidRequest("this stream already opened a capture; open another stream")
        if kind == "read_file" and files is not None:
            yield from _answer_file(files, req.read_file, guard)
            return
        if kind != "read":
            raise InvalidRequest("expected a `read` request")
        r = req.read
        if r.length == 0 or r.length > MAX_READ_LENGTH:
            raise InvalidRequest(f"read length must be between 1 and {MAX_READ_LENGTH}")
        if r.offset > MAX_OFFSET:
            raise InvalidRequest(f"read offset {r.offset} is out of range")
        guard.record.requests += 1
        rid, raw = r.request_id, self.raw_responses
        assert session.layout is not None
        end = min(r.offset + r.length, session.layout.total_size)

        def frame(offset: int, length: int, extents: tuple[tuple[int, int], ...]) -> bytes:
            span = extents[-1][0] + extents[-1][1] if extents else length
            return chunk_prefix(offset, rid, offset + span >= end, length, extents)

        # One chunk is held back: the session checks the target is still alive
        # after its last read, and an error must come before the `last` chunk.
        # Compressed chunks are framed after compression, not by the session.
        framer = frame if raw and compressor is None else None
        prev: Chunk | None = None
        with closing(session.read(r.offset, r.length, framer)) as chunks:
            for chunk in chunks:
                if prev is not None:
                    yield _chunk_message(prev, rid, last=False, raw=raw, compressor=compressor)
                _serve(guard, chunk)                  # budget, audit
                session.bytes_served += chunk.length
                prev = chunk
        yield _chunk_message(prev if prev is not None else Chunk(r.offset, b""),
                             rid, last=True, raw=raw, compressor=compressor)
