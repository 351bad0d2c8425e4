"""Writing a remote core to a file: sparse where the agent sent holes."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path

from .remote import RemoteCore

Progress = Callable[[int], None]

# Each read request asks for this much of the core; the next request is sent
# before the current one is answered (RemoteCore.read_ranges), so the agent
# never waits for it.  Bounded so that an error on this side (disk full)
# leaves little to drain when the capture closes.
REQUEST_BYTES = 256 * 1024 * 1024
# Received data waiting for the writer thread: batches of at least
# WRITE_BATCH bytes (or one message), at most WRITE_QUEUE batches.
WRITE_BATCH = 1024 * 1024
WRITE_QUEUE = 8
# Largest single pwrite.  The page cache sizes its folios after the write:
# 1 MiB writes cost this kernel 2-3x the CPU of 256 KiB ones (bench/).
WRITE_PIECE = 256 * 1024


def write_full_core(core: RemoteCore, out: Path | str, progress: Progress | None = None,
                    request_bytes: int = REQUEST_BYTES, writer_thread: bool = True,
                    tune_malloc: bool = True) -> int:
    """Stream the whole core into ``out``; returns the core size.

    Holes are skipped with pwrite offsets and the file is extended with
    ftruncate, so untouched memory takes no disk space.  Data is written
    straight from the received messages (no copy), by a writer thread so that
    copying into the page cache overlaps with receiving the next messages.
    ``tune_malloc`` raises glibc's mmap and trim thresholds for this process
    (see :func:`raise_malloc_thresholds`).
    """
    if tune_malloc:
        raise_malloc_thresholds()
    size = core.size
    ranges = ((start, min(request_bytes, size - start)) for start in range(0, size, request_bytes))
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    writer = _Writer(fd) if writer_thread else None
    try:
        batch: list[tuple[int, bytes | memoryview]] = []
        batch_bytes = 0
        for piece in core.read_ranges(ranges, views=True):
            if piece.data is not None:
                if writer is None:
                    pwrite_all(fd, piece.data, piece.offset)
                else:
                    batch.append((piece.offset, piece.data))
                    batch_bytes += len(piece.data)
                    if batch_bytes >= WRITE_BATCH:
                        writer.put(batch)
                        batch, batch_bytes = [], 0
            if progress is not None:
                progress(piece.length)
        if writer is not None:
            if batch:
                writer.put(batch)
            writer.finish()
        os.ftruncate(fd, size)
    finally:
        if writer is not None:
            writer.abort()
        os.close(fd)
    return size


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """pwrite until every byte is written (a short write is not an error)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view[:WRITE_PIECE], offset)
        view, offset = view[n:], offset + n


class _Writer:
    """A thread doing the pwrites of (offset, data) batches from a bounded queue."""

    def __init__(self, fd: int, depth: int = WRITE_QUEUE) -> None:
        self._fd = fd
        self._queue: queue.Queue[list[tuple[int, bytes | memoryview]] | None] = \
            queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="core-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            if self._error is not None or self._stop:
                continue                          # drain without writing
            try:
                for offset, data in batch:
                    pwrite_all(self._fd, data, offset)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                self._error = exc

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, batch: list[tuple[int, bytes | memoryview]]) -> None:
        self._check()
        self._queue.put(batch)

    def finish(self) -> None:
        """Wait until everything queued is written; raise the writer's error."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._check()

    def abort(self) -> None:
        """Stop without writing what is still queued (idempotent)."""
        if self._thread.is_alive():
            self._stop = True
            self._queue.put(None)
            self._thread.join()


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_malloc_tuned = False


def raise_malloc_thresholds() -> None:
    """Keep message-sized buffers on the heap (once per process).

    Every received message is a fresh multi-megabyte ``bytes``; with glibc's
    defaults the heap top is trimmed and regrown (page faults and zeroing) for
    each.  Measured in bench/ (``client-mallopt``): about 25% less client CPU
    for a 1 GiB core.  The process then keeps up to 128 MiB of freed heap.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return
    _malloc_tuned = True
    name = ctypes.util.find_library("c")
    if not name:
        return
    libc = ctypes.CDLL(name)
    if hasattr(libc, "mallopt"):                  # glibc only
        libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024 * 1024)
