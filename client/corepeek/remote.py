"""A capture session seen from the client: layout, ranged reads, a file object.

``open_capture`` opens the bidirectional Capture stream; the agent freezes the
target and answers with the core's layout.  Reads are (offset, length)
requests answered by chunks; ``RemoteCoreFile`` turns them into a seekable
read-only file, so ``ELFFile(remote.file)`` parses a remote core while only
the bytes it touches cross the wire.  Closing (or leaving the ``with`` block)
half-closes the stream, which thaws the target.
"""

from __future__ import annotations

import bisect
import collections
import io
import itertools
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import grpc
from corepeek_format.ranges import merge_ranges
from google.protobuf.message import DecodeError

from .channel import TLSOptions, open_channel
from .errors import CaptureError
from .inflate import Inflate, zstd_inflater
from .v1 import capture_pb2 as pb

MODES = {"full": pb.CAPTURE_MODE_FULL, "stacks": pb.CAPTURE_MODE_STACKS,
         "notes": pb.CAPTURE_MODE_NOTES}
COMPRESSIONS = {"none": pb.COMPRESSION_NONE, "zstd": pb.COMPRESSION_ZSTD}
# open_capture(snapshot=...): None the agent's default, True snapshot, False live.
_FREEZE_MODES = {None: pb.FREEZE_MODE_DEFAULT, True: pb.FREEZE_MODE_SNAPSHOT,
                 False: pb.FREEZE_MODE_LIVE}
# Largest chunk the agent may send (its MAX_CHUNK) when the layout names none.
_MAX_CHUNK = 3 * 1024 * 1024


@dataclass(frozen=True)
class Piece:
    """Part of a read answer: ``data``, or ``hole`` zero bytes when data is None."""

    offset: int
    data: bytes | memoryview | None     # memoryview from read_ranges(views=True)
    hole: int = 0

    @property
    def length(self) -> int:
        return len(self.data) if self.data is not None else self.hole


@dataclass
class TransferStats:
    """What crossed the wire for one capture (payload bytes, not framing)."""

    requests: int = 0
    data_bytes: int = 0             # core bytes received as data (decompressed)
    hole_bytes: int = 0
    messages: int = 0
    wire_bytes: int = 0             # data payload as it crossed the wire (compressed)
    file_bytes: int = 0             # mapped-file bytes received (read_file)
    _ranges: list[tuple[int, int]] = field(default_factory=list, repr=False)

    def record(self, offset: int, length: int) -> None:
        if length > 0:
            self._ranges.append((offset, length))

    @property
    def fetched(self) -> list[tuple[int, int]]:
        """Merged (offset, length) ranges received so far (merged on demand,
        not once per chunk)."""
        self._ranges = merge_ranges(self._ranges)
        return list(self._ranges)


_CAPTURE_METHOD = "/corepeek.v1.CoreCaptureService/Capture"


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


class ChunkFields(NamedTuple):
    """A chunk response's fields; its data is ``raw[data_start:data_end]``."""

    request_id: int
    offset: int
    data_start: int
    data_end: int
    hole: int
    last: bool
    extents: tuple[int, ...]          # flat (start, length) pairs of a packed chunk
    raw_length: int = 0               # data is compressed; this long decompressed


def parse_chunk(raw: bytes) -> ChunkFields | None:
    """Fields of an encoded ``CaptureResponse{chunk}`` without copying its data.

    None if ``raw`` holds anything else (another response, or fields this
    parser does not know): decode it with protobuf then.
    """
    if not raw or raw[0] != 0x12:                  # CaptureResponse.chunk
        return None
    try:
        n, i = _varint(raw, 1)
        if i + n != len(raw):
            return None
        rid = offset = hole = start = end = raw_length = 0
        last = False
        extents: list[int] = []
        while i < len(raw):
            tag = raw[i]
            i += 1
            if tag == 0x12:                        # data
                n, i = _varint(raw, i)
                start, end, i = i, i + n, i + n
            elif tag == 0x32:                      # extents, packed
                n, i = _varint(raw, i)
                stop = i + n
                while i < stop:
                    value, i = _varint(raw, i)
                    extents.append(value)
            elif tag in (0x08, 0x18, 0x20, 0x28, 0x30, 0x38):
                # offset, hole, request_id, last, an unpacked extent, raw_length
                value, i = _varint(raw, i)
                if tag == 0x08:
                    offset = value
                elif tag == 0x18:
                    hole = value
                elif tag == 0x20:
                    rid = value
                elif tag == 0x28:
                    last = bool(value)
                elif tag == 0x38:
                    raw_length = value
                else:
                    extents.append(value)
            else:
                return None
        if i != len(raw) or end > len(raw) or len(extents) % 2:
            return None
    except (IndexError, ValueError):
        return None
    return ChunkFields(rid, offset, start, end, hole, last, tuple(extents), raw_length)


def _decode_response(raw: bytes) -> pb.CaptureResponse:
    try:
        return pb.CaptureResponse.FromString(raw)
    except DecodeError:
        raise CaptureError("protocol error: the agent sent an undecodable message") from None


def _chunk_pieces(raw: bytes, views: bool,
                  inflate: Inflate | None = None) -> tuple[int, bool, list[Piece], int]:
    """(request_id, last, pieces, payload bytes on the wire) of a chunk
    response; a packed chunk becomes its data extents and the holes between
    them, a compressed one is inflated first."""
    fields = parse_chunk(raw)
    if fields is None:
        resp = _decode_response(raw)
        if resp.WhichOneof("response") != "chunk":
            raise CaptureError("protocol error: expected a chunk")
        c = resp.chunk
        raw = c.data
        fields = ChunkFields(c.request_id, c.offset, 0, len(raw), c.hole_length, c.last,
                             tuple(c.extents), c.raw_length)
    rid, offset, start, end, hole, last, extents, raw_length = fields
    wire = end - start
    buf: bytes | memoryview = memoryview(raw) if views else raw
    if raw_length:
        if inflate is None:
            raise CaptureError("protocol error: a compressed chunk that was not asked for")
        buf = inflate(buf[start:end], raw_length)
        start, end = 0, len(buf)
        if views:
            buf = memoryview(buf)
    if not extents:
        if end > start:
            return rid, last, [Piece(offset, buf[start:end])], wire
        return rid, last, ([Piece(offset, None, hole)] if hole else []), wire
    pieces: list[Piece] = []
    pos = data = 0
    for i in range(0, len(extents), 2):
        at, n = extents[i], extents[i + 1]
        if at < pos or start + data + n > end:
            raise CaptureError("protocol error: malformed packed chunk")
        if at > pos:
            pieces.append(Piece(offset + pos, None, at - pos))
        pieces.append(Piece(offset + at, buf[start + data:start + data + n]))
        pos, data = at + n, data + n
    return rid, last, pieces, wire


class RemoteCore:
    """An open capture: the target stays frozen until :meth:`close`."""

    def __init__(self, channel: grpc.Channel, pid: int, *, start_time: int = 0,
                 mode: str = "full", freeze_timeout_ms: int = 0, chunk_bytes: int = 0,
                 stack_bytes: int = 0, snapshot: bool | None = None, own_channel: bool = False,
                 metadata: tuple[tuple[str, str], ...] = (), compression: str = "none",
                 wait_exclusive: float = 0.0, capture_id: str = "", keep: bool = False) -> None:
        """``wait_exclusive`` > 0: want a freeze of its own rather than join a
        capture of ``pid`` in progress, waiting up to that many seconds.
        ``capture_id``: open this entry of the agent's store instead of ``pid``;
        ``keep``: ask the agent to keep this capture in its store as well.
        ``snapshot``: None leaves it to the agent (a snapshot for full and
        stacks captures), True asks for one, False for a live capture (the
        target frozen for the whole transfer); docs/snapshot.md."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}")
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {sorted(COMPRESSIONS)}")
        self._channel = channel
        self._own_channel = own_channel
        self._requests: queue.Queue[pb.CaptureRequest | None] = queue.Queue()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.stats = TransferStats()
        self._closed = False
        self._closed_at = 0.0
        opts = pb.CaptureOptions(mode=MODES[mode], freeze_timeout_ms=freeze_timeout_ms,
                                 max_chunk_bytes=chunk_bytes, stack_bytes_per_thread=stack_bytes,
                                 snapshot=bool(snapshot), freeze_mode=_FREEZE_MODES[snapshot],
                                 packed_chunks=True,
                                 compression=COMPRESSIONS[compression],
                                 wait_exclusive_seconds=wait_exclusive, keep=keep)
        self._requests.put(pb.CaptureRequest(open=pb.OpenCapture(
            pid=pid, start_time=start_time, options=opts, capture_id=capture_id)))
        # Responses arrive undecoded: chunks are parsed by parse_chunk (their
        # data is not copied by protobuf), the layout by protobuf.
        capture = channel.stream_stream(_CAPTURE_METHOD,
                                        request_serializer=pb.CaptureRequest.SerializeToString,
                                        response_deserializer=None, _registered_method=True)
        self._stale: set[int] = set()   # requests whose remaining chunks nobody reads
        self._call = capture(iter(self._requests.get, None), metadata=metadata)
        try:
            first = _decode_response(next(self._call))
        except grpc.RpcError as exc:
            self._shutdown()
            raise CaptureError.from_rpc(exc, f"cannot capture pid {pid}") from None
        except StopIteration:
            self._shutdown()
            raise CaptureError(f"cannot capture pid {pid}: the agent closed the stream") from None
        if first.WhichOneof("response") != "layout":
            self.close()
            raise CaptureError("protocol error: the agent did not answer with a layout")
        self.layout: pb.CoreLayout = first.layout
        self.layout_at = time.monotonic()       # for stopped_seconds()
        # Only what the agent said it would send is decoded (the agent may
        # decline compression; it may not start it unasked).
        self._inflate: Inflate | None = None
        if self.layout.compression == pb.COMPRESSION_ZSTD and compression == "zstd":
            self._inflate = zstd_inflater(self.layout.max_chunk_bytes or _MAX_CHUNK)
        self.file = RemoteCoreFile(self)

    def stopped_seconds(self) -> float:
        """How long the target has been (or was) stopped for this capture: the
        agent's figure when the layout came, plus the time since if the target
        was still stopped then (a live capture stays frozen until the close;
        another session may keep it frozen longer)."""
        stopped = self.layout.stopped_micros / 1e6
        if self.layout.target_running:
            return stopped
        return stopped + (self._closed_at or time.monotonic()) - self.layout_at

    # -- reading -------------------------------------------------------------

    @property
    def size(self) -> int:
        return int(self.layout.total_size)

    def read_range(self, offset: int, length: int, *, views: bool = False) -> Iterator[Piece]:
        """Stream the answer to one (offset, length) request, in order."""
        return self.read_ranges([(offset, length)], views=views)

    def read_ranges(self, ranges: Iterable[tuple[int, int]], *, ahead: int = 1,
                    views: bool = False) -> Iterator[Piece]:
        """Stream the answers to several (offset, length) requests, in order.

        Up to ``1 + ahead`` requests are outstanding, so the agent has the next
        one before it finishes the current one (no round trip between them).
        With ``views`` the pieces' data are memoryviews of the received
        messages instead of copies.  A reader that stops early leaves its
        outstanding requests to be skipped by the next read.
        """
        with self._lock:
            if self._closed:
                raise CaptureError("the capture is closed")
            todo = iter(ranges)
            pending: collections.deque[tuple[int, int, int]] = collections.deque()

            def send_next() -> None:
                r = next(todo, None)
                if r is None:
                    return
                rid = next(self._ids)
                self.stats.requests += 1
                self._requests.put(pb.CaptureRequest(read=pb.ReadRange(
                    offset=r[0], length=r[1], request_id=rid)))
                pending.append((rid, r[0], r[1]))

            for _ in range(1 + max(0, ahead)):
                send_next()
            try:
                while pending:
                    rid, offset, length = pending[0]
                    try:
                        raw = next(self._call)
                    except StopIteration:
                        raise CaptureError("the agent ended the capture stream unexpectedly") from None
                    except grpc.RpcError as exc:
                        raise CaptureError.from_rpc(exc, f"read of [{offset}, +{length})") from None
                    self.stats.messages += 1
                    got_rid, last, pieces, wire = _chunk_pieces(raw, views, self._inflate)
                    if got_rid != rid:
                        if got_rid in self._stale:          # left over by an abandoned read
                            if last:
                                self._stale.discard(got_rid)
                            continue
                        raise CaptureError(f"protocol error: chunk for request "
                                           f"{got_rid}, expected {rid}")
                    self.stats.wire_bytes += wire
                    for piece in pieces:
                        if piece.data is not None:
                            self.stats.data_bytes += len(piece.data)
                        else:
                            self.stats.hole_bytes += piece.hole
                    if pieces:
                        self.stats.record(pieces[0].offset,
                                          pieces[-1].offset + pieces[-1].length - pieces[0].offset)
                    yield from pieces
                    if last:
                        pending.popleft()
                        send_next()
            finally:
                self._stale.update(rid for rid, _, _ in pending)

    def read_file(self, file_id: int, offset: int, length: int) -> bytes:
        """Bytes [offset, offset + length) of mapped file ``file_id``
        (``layout.files``); short at the end of the file."""
        with self._lock:
            if self._closed:
                raise CaptureError("the capture is closed")
            rid = next(self._ids)
            self.stats.requests += 1
            self._requests.put(pb.CaptureRequest(read_file=pb.ReadFile(
                file=file_id, offset=offset, length=length, request_id=rid)))
            out = bytearray()
            while True:
                try:
                    raw = next(self._call)
                except StopIteration:
                    raise CaptureError("the agent ended the capture stream unexpectedly") from None
                except grpc.RpcError as exc:
                    raise CaptureError.from_rpc(exc, f"read of mapped file {file_id}") from None
                resp = _decode_response(raw)
                c = resp.file_chunk
                if resp.WhichOneof("response") != "file_chunk" or c.request_id != rid:
                    if resp.WhichOneof("response") == "chunk" and resp.chunk.request_id in self._stale:
                        if resp.chunk.last:         # left over by an abandoned core read
                            self._stale.discard(resp.chunk.request_id)
                        continue
                    raise CaptureError("protocol error: expected a file chunk")
                out += c.data
                self.stats.file_bytes += len(c.data)
                if c.last:
                    return bytes(out)

    def read_bytes(self, offset: int, length: int) -> bytes:
        """Read a range into memory (holes become zeros); short at end of file."""
        out = bytearray()
        for p in self.read_range(offset, length):
            out += p.data if p.data is not None else bytes(p.hole)
        return bytes(out)

    # -- closing -------------------------------------------------------------

    def _shutdown(self) -> None:
        self._closed = True
        self._requests.put(None)
        if self._own_channel:
            self._channel.close()

    def close(self) -> None:
        """Half-close the stream (the agent thaws the target) and wait for its end."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._requests.put(None)
            try:
                for _ in self._call:
                    pass
            except grpc.RpcError:
                pass
            self._closed_at = time.monotonic()
            if self._own_channel:
                self._channel.close()

    def abort(self) -> None:
        """Cancel the stream without reading what is still on its way (the agent
        thaws the target when it sees the cancellation); idempotent."""
        if self._closed:
            return
        self._closed = True
        self._requests.put(None)
        self._call.cancel()
        self._closed_at = time.monotonic()
        if self._own_channel:
            self._channel.close()

    def __enter__(self) -> RemoteCore:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # After a failure (Ctrl-C, disk full) the rest of the stream is of no
        # use: up to two read requests of data would be drained first.
        if exc_type is None:
            self.close()
        else:
            self.abort()


def open_capture(agent: str | grpc.Channel, pid: int, *, tls: TLSOptions | None = None,
                 **kwargs: object) -> RemoteCore:
    """Open a capture of ``pid`` on ``agent`` (an address or an open channel).

    ``tls`` (client certificate, key, CA) is needed for a TCP agent; see
    :mod:`corepeek.channel` for the environment variables that can supply it.
    """
    if isinstance(agent, str):
        return RemoteCore(open_channel(agent, tls), pid, own_channel=True, **kwargs)  # type: ignore[arg-type]
    return RemoteCore(agent, pid, **kwargs)  # type: ignore[arg-type]


class RemoteCoreFile(io.RawIOBase):
    """Seekable read-only view of a remote core.

    ``ELFFile(core.file)`` parses a remote core while only the bytes it
    touches cross the wire.  Reads are served from a cache of fetched,
    non-overlapping windows; a miss fetches only the part of its window not
    already cached.  A read inside the header block, the notes or the section
    header fetches that whole region at once (parsers walk notes in many small
    reads) and keeps it; elsewhere it fetches ``readahead``-byte aligned
    windows clipped to the segment and to what the session may read, and
    evicts the oldest of those beyond ``cache_bytes``.

    In a NOTES or STACKS session a read that starts outside the session's
    readable ranges raises :class:`CaptureError` (PERMISSION_DENIED) without a
    round trip; one that runs past a readable range stops there (a short read).
    """

    def __init__(self, core: RemoteCore, readahead: int = 256 * 1024,
                 cache_bytes: int = 64 * 1024 * 1024) -> None:
        super().__init__()
        self._core = core
        self._pos = 0
        self.readahead = max(1, readahead)
        self.cache_bytes = cache_bytes
        lay = core.layout
        self._size = int(lay.total_size)
        regions = [(lay.headers.offset, lay.headers.length), (lay.notes.offset, lay.notes.length),
                   (lay.section_headers.offset, lay.section_headers.length)]
        self._regions = sorted((int(o), int(n)) for o, n in regions if n > 0)
        self._readable = _merged((int(r.offset), int(r.length)) for r in lay.readable)
        self._restricted = lay.mode not in (pb.CAPTURE_MODE_FULL, pb.CAPTURE_MODE_UNSPECIFIED)
        self._seg_bounds = sorted((int(s.file_offset), int(s.file_size)) for s in lay.segments
                                  if s.file_size)
        self._starts: list[int] = []              # sorted window starts
        self._windows: dict[int, bytes] = {}      # start -> bytes (non-overlapping)
        self._pinned: set[int] = set()            # header/notes windows, never evicted
        self._evictable_bytes = 0

    # -- io.RawIOBase ------------------------------------------------------------

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        pos = base + offset
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        return pos

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(b).cast("B")
        want = min(len(view), max(0, self._size - self._pos))
        done = 0
        while done < want:
            pos = self._pos + done
            chunk = self._cached(pos, want - done)
            if chunk is None:
                if self._restricted and not _inside(self._readable, pos):
                    if done:
                        break                     # short read up to the boundary
                    raise CaptureError(
                        f"offset {pos} of the core is outside what this capture may read "
                        f"({pb.CaptureMode.Name(self._core.layout.mode)})",
                        grpc.StatusCode.PERMISSION_DENIED)
                self._fill(*self._window(pos, want - done))
                chunk = self._cached(pos, want - done)
                if chunk is None:
                    break
            view[done:done + len(chunk)] = chunk
            done += len(chunk)
        self._pos += done
        return done

    # -- cache -----------------------------------------------------------------------

    def _cached(self, pos: int, n: int) -> bytes | None:
        i = bisect.bisect_right(self._starts, pos) - 1
        if i < 0:
            return None
        start = self._starts[i]
        data = self._windows[start]
        if pos >= start + len(data):
            return None
        return data[pos - start:pos - start + n]

    def _window(self, pos: int, n: int) -> tuple[int, int]:
        """The [lo, hi) to fetch for a miss at ``pos``."""
        for off, length in self._regions:
            if off <= pos < off + length:
                return off, off + length
        lo = pos // self.readahead * self.readahead
        hi = max(pos + n, lo + self.readahead)
        for off, length in self._seg_bounds:
            if off <= pos < off + length:
                lo, hi = max(lo, off), min(hi, off + length)
                break
        for off, length in self._readable:
            if off <= pos < off + length:
                lo, hi = max(lo, off), min(hi, off + length)
                break
        return lo, min(hi, self._size)

    def _fill(self, lo: int, hi: int) -> None:
        """Fetch the parts of [lo, hi) not cached yet."""
        pinned = any(off <= lo and hi <= off + n for off, n in self._regions)
        pos = lo
        i = bisect.bisect_right(self._starts, lo) - 1
        if i >= 0:
            pos = max(pos, self._starts[i] + len(self._windows[self._starts[i]]))
        for start in self._starts[i + 1:] if i >= 0 else self._starts:
            if start >= hi or pos >= hi:
                break
            if start > pos:
                self._store(pos, self._core.read_bytes(pos, start - pos), pinned)
            pos = max(pos, start + len(self._windows[start]))
        if pos < hi:
            self._store(pos, self._core.read_bytes(pos, hi - pos), pinned)
        self._evict()

    def _store(self, start: int, data: bytes, pinned: bool) -> None:
        if not data:
            return
        bisect.insort(self._starts, start)
        self._windows[start] = data
        if pinned:
            self._pinned.add(start)
        else:
            self._evictable_bytes += len(data)

    def _evict(self) -> None:
        if self._evictable_bytes <= self.cache_bytes:
            return
        # dicts keep insertion order: the first unpinned windows are the oldest;
        # the newest one stays, it answers the read in progress.
        for start in [s for s in self._windows if s not in self._pinned][:-1]:
            if self._evictable_bytes <= self.cache_bytes:
                break
            self._evictable_bytes -= len(self._windows.pop(start))
            self._starts.remove(start)

    # -- what crossed the wire -----------------------------------------------------

    def fetched_ranges(self) -> list[tuple[int, int]]:
        """The merged (offset, length) ranges of the core fetched so far in this capture
        (by this file object or any other reader of the same :class:`RemoteCore`)."""
        return list(self._core.stats.fetched)


def _merged(ranges: Iterator[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for off, n in sorted(r for r in ranges if r[1] > 0):
        if out and off <= out[-1][0] + out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], off + n - out[-1][0]))
        else:
            out.append((off, n))
    return out


def _inside(ranges: list[tuple[int, int]], pos: int) -> bool:
    i = bisect.bisect_right(ranges, (pos, float("inf"))) - 1
    return i >= 0 and ranges[i][0] <= pos < ranges[i][0] + ranges[i][1]
