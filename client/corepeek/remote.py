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
import io
import itertools
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from .channel import open_channel
from .errors import CaptureError
from .v1 import capture_pb2 as pb
from .v1 import capture_pb2_grpc as pb_grpc

MODES = {"full": pb.CAPTURE_MODE_FULL, "stacks": pb.CAPTURE_MODE_STACKS,
         "notes": pb.CAPTURE_MODE_NOTES}


@dataclass(frozen=True)
class Piece:
    """Part of a read answer: ``data``, or ``hole`` zero bytes when data is None."""

    offset: int
    data: bytes | None
    hole: int = 0

    @property
    def length(self) -> int:
        return len(self.data) if self.data is not None else self.hole


@dataclass
class TransferStats:
    """What crossed the wire for one capture (payload bytes, not framing)."""

    requests: int = 0
    data_bytes: int = 0
    hole_bytes: int = 0
    messages: int = 0
    fetched: list[tuple[int, int]] = field(default_factory=list)  # merged (offset, length)

    def record(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        i = bisect.bisect_left(self.fetched, (offset, 0))
        self.fetched.insert(i, (offset, length))
        merged: list[tuple[int, int]] = []
        for off, n in self.fetched:
            if merged and off <= merged[-1][0] + merged[-1][1]:
                last_off, last_n = merged[-1]
                merged[-1] = (last_off, max(last_n, off + n - last_off))
            else:
                merged.append((off, n))
        self.fetched = merged


class RemoteCore:
    """An open capture: the target stays frozen until :meth:`close`."""

    def __init__(self, channel: grpc.Channel, pid: int, *, start_time: int = 0,
                 mode: str = "full", freeze_timeout_ms: int = 0, chunk_bytes: int = 0,
                 stack_bytes: int = 0, own_channel: bool = False,
                 metadata: tuple[tuple[str, str], ...] = ()) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}")
        self._channel = channel
        self._own_channel = own_channel
        self._requests: queue.Queue[pb.CaptureRequest | None] = queue.Queue()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.stats = TransferStats()
        self._closed = False
        opts = pb.CaptureOptions(mode=MODES[mode], freeze_timeout_ms=freeze_timeout_ms,
                                 max_chunk_bytes=chunk_bytes, stack_bytes_per_thread=stack_bytes)
        self._requests.put(pb.CaptureRequest(open=pb.OpenCapture(
            pid=pid, start_time=start_time, options=opts)))
        stub = pb_grpc.CoreCaptureServiceStub(channel)
        self._call = stub.Capture(iter(self._requests.get, None), metadata=metadata)
        try:
            first = next(self._call)
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
        self.file = RemoteCoreFile(self)

    # -- reading -------------------------------------------------------------

    @property
    def size(self) -> int:
        return int(self.layout.total_size)

    def read_range(self, offset: int, length: int) -> Iterator[Piece]:
        """Stream the answer to one (offset, length) request, in order."""
        with self._lock:
            if self._closed:
                raise CaptureError("the capture is closed")
            rid = next(self._ids)
            self.stats.requests += 1
            self._requests.put(pb.CaptureRequest(read=pb.ReadRange(
                offset=offset, length=length, request_id=rid)))
            try:
                for resp in self._call:
                    chunk = resp.chunk
                    self.stats.messages += 1
                    if chunk.request_id != rid:
                        raise CaptureError(f"protocol error: chunk for request "
                                           f"{chunk.request_id}, expected {rid}")
                    if chunk.data:
                        self.stats.data_bytes += len(chunk.data)
                        self.stats.record(chunk.offset, len(chunk.data))
                        yield Piece(chunk.offset, chunk.data)
                    elif chunk.hole_length:
                        self.stats.hole_bytes += chunk.hole_length
                        self.stats.record(chunk.offset, chunk.hole_length)
                        yield Piece(chunk.offset, None, chunk.hole_length)
                    if chunk.last:
                        return
            except grpc.RpcError as exc:
                raise CaptureError.from_rpc(exc, f"read of [{offset}, +{length})") from None
            raise CaptureError("the agent ended the capture stream unexpectedly")

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
            if self._own_channel:
                self._channel.close()

    def __enter__(self) -> RemoteCore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_capture(agent: str | grpc.Channel, pid: int, **kwargs: object) -> RemoteCore:
    """Open a capture of ``pid`` on ``agent`` (an address or an open channel)."""
    if isinstance(agent, str):
        return RemoteCore(open_channel(agent), pid, own_channel=True, **kwargs)  # type: ignore[arg-type]
    return RemoteCore(agent, pid, **kwargs)  # type: ignore[arg-type]


class RemoteCoreFile(io.RawIOBase):
    """Seekable read-only view of a remote core.

    Reads are served from a cache of fetched windows.  A read inside the
    header block or the notes fetches that whole region at once (parsers walk
    notes in many small reads); elsewhere it fetches ``readahead``-byte aligned
    windows clipped to the segment and to what the session may read.
    """

    def __init__(self, core: RemoteCore, readahead: int = 256 * 1024) -> None:
        super().__init__()
        self._core = core
        self._pos = 0
        self.readahead = readahead
        lay = core.layout
        self._regions = sorted(
            [(lay.headers.offset, lay.headers.length), (lay.notes.offset, lay.notes.length)])
        self._readable = sorted((r.offset, r.length) for r in lay.readable)
        self._seg_bounds = sorted((s.file_offset, s.file_size) for s in lay.segments
                                  if s.file_size)
        self._windows: dict[int, bytes] = {}      # start -> bytes
        self._starts: list[int] = []

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._core.size}[whence]
        pos = base + offset
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        return pos

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(b).cast("B")
        want = min(len(view), max(0, self._core.size - self._pos))
        done = 0
        while done < want:
            chunk = self._cached(self._pos + done, want - done)
            if chunk is None:
                self._fetch(self._pos + done, want - done)
                chunk = self._cached(self._pos + done, want - done)
                if chunk is None:
                    break
            view[done:done + len(chunk)] = chunk
            done += len(chunk)
        self._pos += done
        return done

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
        return lo, min(hi, self._core.size)

    def _fetch(self, pos: int, n: int) -> None:
        lo, hi = self._window(pos, n)
        data = self._core.read_bytes(lo, hi - lo)
        if not data:
            return
        i = bisect.bisect_left(self._starts, lo)
        if i < len(self._starts) and self._starts[i] == lo:
            self._windows[lo] = data if len(data) > len(self._windows[lo]) else self._windows[lo]
        else:
            self._starts.insert(i, lo)
            self._windows[lo] = data

    def fetched_ranges(self) -> list[tuple[int, int]]:
        """The (offset, length) ranges of the core fetched so far in this capture."""
        return list(self._core.stats.fetched)
