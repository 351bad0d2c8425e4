"""Putting a received core on disk: sparse, and mostly around the page cache.

Why not plain ``pwrite``: copying a multi-GiB core into the page cache is the
client's largest cost (half its CPU at 4 GiB in ``bench/``: the kernel's
``copy_folio_from_iter_atomic``), and it leaves gigabytes of dirty pages on a
host that may be running the very service being debugged.  Large aligned runs
of the core therefore go to disk with ``O_DIRECT`` from page-aligned staging
buffers: one memcpy in user space, then DMA.  Everything else -- the headers
and notes, small or unaligned pieces, file systems that refuse ``O_DIRECT``
(tmpfs), and data that arrives while every staging buffer is still waiting for
the disk -- is written through the page cache.  The last rule makes the split
work-conserving: when the disk is the bottleneck, spare CPU absorbs the excess
instead of the stream stalling.

Direct and buffered writes never share a page (a direct write covers whole
aligned pages that no other piece touches), so the two file descriptors stay
coherent.  Holes are never written; ``finish`` sets the file size.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import threading
from dataclasses import dataclass

# Alignment of direct writes: offsets, lengths and buffers.  4 KiB satisfies
# every block device's logical block size and ext4/xfs block sizes on x86.
DIRECT_ALIGN = 4096
# A staging buffer; direct writes are at most this large.
STAGE_BYTES = 4 * 1024 * 1024
# Staging buffers: at most this many are filled or being written at once.
STAGE_COUNT = 4
# Pieces shorter than this go through the page cache: a direct write waits for
# the disk, which costs more than copying a few pages (sparse cores are many
# short runs).
DIRECT_MIN_PIECE = 256 * 1024
# Largest single buffered pwrite.  The page cache sizes its folios after the
# write: 1 MiB writes cost this kernel 2-3x the CPU of 256 KiB ones (bench/).
BUFFERED_PIECE = 256 * 1024


def pwrite_all(fd: int, data: bytes | memoryview | mmap.mmap, offset: int,
               piece: int = BUFFERED_PIECE) -> None:
    """pwrite until every byte is written (a short write is not an error)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view[:piece], offset)
        view, offset = view[n:], offset + n


@dataclass
class WriteStats:
    """Where the bytes went (for benchmarks and tests)."""

    direct_bytes: int = 0
    buffered_bytes: int = 0
    direct_writes: int = 0
    buffered_writes: int = 0
    direct_fallback: str = ""           # why direct I/O is not used, if it is not


@dataclass
class _Stage:
    buf: mmap.mmap
    offset: int = 0
    length: int = 0


class CoreFileWriter:
    """Writes (offset, data) pieces of a core file; call from one thread.

    ``write`` copies what it keeps, so the caller may reuse ``data`` at once.
    Errors of the background direct writes surface from the next ``write`` or
    from ``finish``.  ``close`` always releases everything (idempotent).
    """

    def __init__(self, path: str | os.PathLike[str], *, direct: bool = True,
                 stage_bytes: int = STAGE_BYTES, stage_count: int = STAGE_COUNT,
                 direct_min_piece: int = DIRECT_MIN_PIECE, spill: bool = True,
                 stats: WriteStats | None = None) -> None:
        self.stats = stats if stats is not None else WriteStats()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self._dfd = -1
        self._stage_bytes = stage_bytes
        self._spill = spill
        self._min_piece = max(direct_min_piece, DIRECT_ALIGN)
        self._free: queue.SimpleQueue[_Stage] = queue.SimpleQueue()
        self._pending: queue.SimpleQueue[_Stage | None] = queue.SimpleQueue()
        self._stages: list[_Stage] = []
        self._cur: _Stage | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._direct_ok = True              # cleared if the file system refuses a write
        self._stats_lock = threading.Lock()
        if direct:
            self._open_direct(path, stage_count)
        else:
            self.stats.direct_fallback = "disabled"

    def _open_direct(self, path: str | os.PathLike[str], stage_count: int) -> None:
        if not hasattr(os, "O_DIRECT"):
            self.stats.direct_fallback = "no O_DIRECT on this platform"
            return
        if not os.path.isfile(path):
            self.stats.direct_fallback = "not a regular file"
            return
        try:
            self._dfd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as exc:                    # tmpfs: EINVAL
            self.stats.direct_fallback = f"O_DIRECT refused: {os.strerror(exc.errno or 0)}"
            return
        for _ in range(stage_count):
            st = _Stage(mmap.mmap(-1, self._stage_bytes))   # anonymous: page-aligned
            self._stages.append(st)
            self._free.put(st)
        self._thread = threading.Thread(target=self._run_direct, name="core-direct-writer",
                                        daemon=True)
        self._thread.start()

    @property
    def direct(self) -> bool:
        return self._dfd >= 0

    # -- writing -------------------------------------------------------------------------

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Write ``data`` at ``offset`` (direct if it is large and aligned)."""
        self._check()
        n = len(data)
        if n == 0:
            return
        if self._dfd < 0 or not self._direct_ok or n < self._min_piece or offset % DIRECT_ALIGN:
            self._buffered(offset, data)
            return
        view = memoryview(data)
        tail = n % DIRECT_ALIGN
        if tail:                                  # aligned head direct, the rest buffered
            self._buffered(offset + n - tail, view[n - tail:])
            view = view[:n - tail]
        while view:
            cur = self._cur
            if cur is not None and (cur.offset + cur.length != offset
                                    or cur.length == self._stage_bytes):
                self._submit()
                cur = None
            if cur is None:
                try:
                    cur = self._free.get_nowait()
                except queue.Empty:               # the disk is behind: use the CPU instead
                    if self._spill:
                        self._buffered(offset, view)
                        return
                    cur = self._free.get()
                    self._check()
                cur.offset, cur.length = offset, 0
                self._cur = cur
            take = min(len(view), self._stage_bytes - cur.length)
            cur.buf[cur.length:cur.length + take] = view[:take]
            cur.length += take
            offset += take
            view = view[take:]

    def _buffered(self, offset: int, data: bytes | memoryview | mmap.mmap) -> None:
        pwrite_all(self._fd, data, offset)
        with self._stats_lock:
            self.stats.buffered_bytes += len(data)
            self.stats.buffered_writes += 1

    def _submit(self) -> None:
        if self._cur is not None:
            self._pending.put(self._cur)
            self._cur = None

    def _run_direct(self) -> None:
        while True:
            st = self._pending.get()
            if st is None:
                return
            try:
                if self._error is None:
                    self._write_stage(st)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                # Without its traceback: the frames would keep views of the
                # staging buffer alive, and close() could not unmap it.
                self._error = exc.with_traceback(None)
            finally:
                self._free.put(st)

    def _write_stage(self, st: _Stage) -> None:
        with memoryview(st.buf) as whole:
            if not self._direct_ok:
                self._buffered(st.offset, whole[:st.length])
                return
            pos, end = 0, st.length
            while pos < end:
                try:
                    n = os.pwrite(self._dfd, whole[pos:end], st.offset + pos)
                except OSError as exc:
                    # Some file systems (FUSE, NFS setups) accept O_DIRECT at
                    # open and refuse the writes: use the page cache from now on.
                    if exc.errno != errno.EINVAL:
                        raise
                    self._direct_ok = False
                    self.stats.direct_fallback = "direct write refused: EINVAL"
                    self.stats.direct_bytes += pos
                    self._buffered(st.offset + pos, whole[pos:end])
                    return
                if n <= 0 or n % DIRECT_ALIGN:
                    raise OSError(errno.EIO, f"short direct write ({n} bytes)")
                pos += n
        self.stats.direct_bytes += st.length
        self.stats.direct_writes += 1

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    # -- ending ---------------------------------------------------------------------------

    def finish(self, size: int) -> None:
        """Wait for every write, then set the file size to ``size``."""
        self._submit()
        self._stop_thread()
        self._check()
        os.ftruncate(self._fd, size)

    def _stop_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._pending.put(None)
            self._thread.join()

    def close(self) -> None:
        """Release the descriptors and buffers (after ``finish``, or to abandon)."""
        if self._error is None and self._thread is not None and self._thread.is_alive():
            self._error = OSError(errno.ECANCELED, "closed")   # skip what is queued
        self._cur = None
        self._stop_thread()
        for fd in (self._dfd, self._fd):
            if fd >= 0:
                os.close(fd)
        self._dfd = self._fd = -1
        for st in self._stages:
            st.buf.close()
        self._stages = []

    def __enter__(self) -> CoreFileWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
