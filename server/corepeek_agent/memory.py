"""Reading a frozen target's memory in large blocks, skipping what was never populated.

``process_vm_readv`` is the fast path (it works from any thread, unlike
ptrace).  It pins pages (FOLL_PIN), and pinning an anonymous page the target
shares copy-on-write with another process (a pre-fork worker and its master,
KSM) makes the kernel copy it into the target first: ranges that may hold such
pages are read through ``/proc/PID/mem`` instead, which takes plain references
and copies nothing (:meth:`MemoryReader.read_via_proc_mem`).  Pages it cannot read (guard pages, [vvar], MADV_DONTFORK-less I/O
memory) are retried page by page and served as zeros, as the kernel's core
writer does.  For private anonymous memory, pages /proc/PID/pagemap reports
neither present nor swapped were never written: they are zeros, and reading
them would only install page tables in the target, so they become holes.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import errno
import fcntl
import os
import struct
from collections.abc import Iterator, Sequence

from .errors import ProcessGone

PAGE = os.sysconf("SC_PAGE_SIZE")
_PM_PRESENT = 1 << 63
_PM_SWAPPED = 1 << 62

# PAGEMAP_SCAN (Linux 6.7+): the kernel walks the page tables and returns
# runs of pages by category, about 50x faster than reading /proc/PID/pagemap.
_PAGEMAP_SCAN = 0xC0606610          # _IOWR('f', 16, struct pm_scan_arg)
_PAGE_IS_PRESENT = 1 << 3
_PAGE_IS_SWAPPED = 1 << 4
_PAGE_IS_PFNZERO = 1 << 5
_SCAN_ARG = struct.Struct("<12Q")   # struct pm_scan_arg
_REGIONS = 512
IOV_MAX = 1024                      # iovecs per process_vm_readv


class _PageRegion(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64),
                ("categories", ctypes.c_uint64)]

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc.process_vm_readv.argtypes = [ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong,
                                   ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.c_ulong]
_libc.process_vm_readv.restype = ctypes.c_ssize_t

# A fresh, uninitialised ``bytes`` object (CPython's PyBytes_FromStringAndSize
# with a NULL source), filled in place before anything else sees it: the
# cheapest way to hand target memory to gRPC, which wants ``bytes``.  Reading
# into a bytearray and converting costs a zero-fill and a copy per chunk.
_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
_new_bytes.restype = ctypes.py_object
_BYTES_DATA = bytes.__basicsize__ - 1      # offsetof(PyBytesObject, ob_sval)
_ZERO_PAGE = bytes(PAGE)


def fresh_bytes(n: int) -> tuple[bytes, memoryview]:
    """A new ``bytes`` of length n and a writable view of its storage.

    The caller owns the only reference: it must fill the view, drop it, and
    only then let the bytes escape (bytes are immutable to everyone else).
    """
    if n <= 0:
        return b"", memoryview(bytearray())
    b = _new_bytes(None, n)
    view = memoryview((ctypes.c_char * n).from_address(id(b) + _BYTES_DATA)).cast("B")
    return b, view


class MemoryReader:
    """Reads one target's memory through a live thread id (the mm is shared)."""

    def __init__(self, tid: int) -> None:
        self.tid = tid
        self._pagemap = os.open(f"/proc/{tid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        self._scan_ok = True
        self._mem = -1
        self._proc_mem_ranges: list[tuple[int, int]] = []
        self._proc_mem_starts: list[int] = []

    def close(self) -> None:
        if self._mem >= 0:
            os.close(self._mem)
            self._mem = -1
        if self._pagemap >= 0:
            os.close(self._pagemap)
            self._pagemap = -1

    def __enter__(self) -> MemoryReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- population --------------------------------------------------------------

    def populated_runs(self, vaddr: int, length: int) -> Iterator[tuple[int, int, bool]]:
        """Yield (start, length, populated) runs covering [vaddr, vaddr+length).

        Populated means present (not the shared zero page) or swapped out.
        """
        if self._scan_ok:
            try:
                yield from self._runs_from(vaddr, length, self._scan(vaddr, length))
                return
            except OSError:
                self._scan_ok = False       # kernel without PAGEMAP_SCAN
        yield from self._runs_from(vaddr, length, self._pagemap_populated(vaddr, length))

    @staticmethod
    def _runs_from(vaddr: int, length: int,
                   populated: Iterator[tuple[int, int]]) -> Iterator[tuple[int, int, bool]]:
        pos, end = vaddr, vaddr + length
        for start, stop in populated:
            start, stop = max(start, vaddr), min(stop, end)
            if start >= stop:
                continue
            if start > pos:
                yield pos, start - pos, False
            yield start, stop - start, True
            pos = stop
        if pos < end:
            yield pos, end - pos, False

    def _scan(self, vaddr: int, length: int) -> Iterator[tuple[int, int]]:
        """Populated (start, end) runs from the PAGEMAP_SCAN ioctl."""
        lo = vaddr // PAGE * PAGE
        end = -(-(vaddr + length) // PAGE) * PAGE
        vec = (_PageRegion * _REGIONS)()
        runs: list[tuple[int, int]] = []
        while lo < end:
            arg = bytearray(_SCAN_ARG.pack(
                _SCAN_ARG.size, 0, lo, end, 0, ctypes.addressof(vec), _REGIONS, 0,
                _PAGE_IS_PFNZERO,                        # category_inverted
                _PAGE_IS_PFNZERO,                        # category_mask: not the zero page
                _PAGE_IS_PRESENT | _PAGE_IS_SWAPPED,     # category_anyof_mask
                _PAGE_IS_PRESENT | _PAGE_IS_SWAPPED))    # return_mask
            n = fcntl.ioctl(self._pagemap, _PAGEMAP_SCAN, arg, True)
            runs.extend((vec[i].start, vec[i].end) for i in range(n))
            walk_end = _SCAN_ARG.unpack(arg)[4]
            if walk_end <= lo:
                break
            lo = walk_end
        return iter(runs)

    def _pagemap_populated(self, vaddr: int, length: int) -> Iterator[tuple[int, int]]:
        """Populated (start, end) runs from /proc/PID/pagemap entries."""
        first = vaddr // PAGE
        last = (vaddr + length + PAGE - 1) // PAGE
        raw = os.pread(self._pagemap, (last - first) * 8, first * 8)
        entries = struct.unpack(f"<{len(raw) // 8}Q", raw)
        run_start = None
        for i, e in enumerate(entries):
            page = (first + i) * PAGE
            if e & (_PM_PRESENT | _PM_SWAPPED):
                if run_start is None:
                    run_start = page
            elif run_start is not None:
                yield run_start, page
                run_start = None
        if run_start is not None:
            yield run_start, last * PAGE

    # -- reading -----------------------------------------------------------------

    def read_via_proc_mem(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Read [start, end) ranges through /proc/PID/mem (see the module doc)."""
        self._proc_mem_ranges = sorted(ranges)
        self._proc_mem_starts = [a for a, _ in self._proc_mem_ranges]
        if ranges and self._mem < 0:
            self._mem = os.open(f"/proc/{self.tid}/mem", os.O_RDONLY | os.O_CLOEXEC)

    def _needs_proc_mem(self, vaddr: int, n: int) -> bool:
        i = bisect.bisect_right(self._proc_mem_starts, vaddr + n - 1) - 1
        return i >= 0 and self._proc_mem_ranges[i][1] > vaddr

    def _pread(self, vaddr: int, view: memoryview) -> int:
        try:
            return os.preadv(self._mem, [view], vaddr)
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.EFAULT, errno.ENOMEM):
                return 0
            if exc.errno == errno.ESRCH:
                raise ProcessGone(f"process of thread {self.tid} exited during the capture")
            raise

    def read_into(self, vaddr: int, buf: bytearray | memoryview) -> int:
        """Read into buf; returns bytes read (stops at a fault)."""
        view = memoryview(buf)
        n = len(view)
        if n == 0:
            return 0
        if self._proc_mem_ranges and self._needs_proc_mem(vaddr, n):
            return self._pread(vaddr, view.cast("B"))
        c_buf = (ctypes.c_char * n).from_buffer(view)
        local = _Iovec(ctypes.addressof(c_buf), n)
        remote = _Iovec(vaddr, n)
        got = _libc.process_vm_readv(self.tid, ctypes.byref(local), 1,
                                     ctypes.byref(remote), 1, 0)
        del c_buf
        return self._pvr_result(got)

    def fill(self, vaddr: int, view: memoryview) -> list[tuple[int, int]]:
        """Read [vaddr, vaddr+len(view)) into view; unreadable pages become zeros.

        Returns the (offset, length) zero-filled gaps.
        """
        length = len(view)
        gaps: list[tuple[int, int]] = []
        pos = 0
        while pos < length:
            pos += self.read_into(vaddr + pos, view[pos:])
            if pos >= length:
                break
            # Fault at vaddr+pos: zero the unreadable page, then continue.
            page_end = min(length, (vaddr + pos) // PAGE * PAGE + PAGE - vaddr)
            view[pos:page_end] = _ZERO_PAGE[:page_end - pos]
            gaps.append((pos, page_end - pos))
            pos = page_end
        return gaps

    def read(self, vaddr: int, length: int) -> tuple[bytearray, list[tuple[int, int]]]:
        """Read [vaddr, vaddr+length); unreadable pages are zeros.

        Returns the data and the list of (offset, length) zero-filled gaps.
        """
        buf = bytearray(length)
        gaps = self.fill(vaddr, memoryview(buf))
        return buf, gaps

    def read_runs(self, runs: Sequence[tuple[int, int]], prefix: bytes = b"") -> bytes:
        """``prefix`` followed by the (vaddr, length) runs' bytes, concatenated.

        Up to IOV_MAX runs are read by one process_vm_readv (sparse memory:
        thousands of lone pages cost a few system calls, not one each).
        Unreadable pages are zeros.
        """
        head = len(prefix)
        total = sum(n for _, n in runs)
        out, view = fresh_bytes(head + total)
        try:
            view[:head] = prefix
            pos, i = head, 0
            vectored = (type(self).read_into is MemoryReader.read_into  # subclasses route reads
                        and not any(self._needs_proc_mem(v, n) for v, n in runs))
            while i < len(runs):
                batch = runs[i:i + IOV_MAX] if vectored else ()
                got = self._readv(view, pos, batch) if len(batch) > 1 else 0
                # Runs read whole by the vectored call; the one it stopped in
                # (a fault) and the rest go through fill().
                for vaddr, n in runs[i:i + max(1, len(batch))]:
                    if got >= n:
                        got -= n
                    else:
                        self.fill(vaddr, view[pos:pos + n])
                        got = 0
                    pos += n
                i += max(1, len(batch))
        finally:
            view.release()
        return out

    def _readv(self, view: memoryview, pos: int, runs: Sequence[tuple[int, int]]) -> int:
        """One process_vm_readv of runs into view[pos:]; bytes read (0 on a fault)."""
        count = len(runs)
        total = sum(n for _, n in runs)
        base = ctypes.addressof((ctypes.c_char * total).from_buffer(view[pos:pos + total]))
        local = (_Iovec * 1)(_Iovec(base, total))
        remote = (_Iovec * count)(*(_Iovec(v, n) for v, n in runs))
        got = _libc.process_vm_readv(self.tid, local, 1, remote, count, 0)
        return self._pvr_result(got)

    def _pvr_result(self, got: int) -> int:
        """Bytes process_vm_readv read; 0 at a fault (the caller zero-fills)."""
        if got < 0:
            err = ctypes.get_errno()
            if err in (errno.EFAULT, errno.EIO, errno.ENOMEM):
                return 0
            if err == errno.ESRCH:
                raise ProcessGone(f"process of thread {self.tid} exited during the capture")
            raise OSError(err, f"process_vm_readv({self.tid}): {os.strerror(err)}")
        return int(got)

    def read_bytes(self, vaddr: int, length: int, prefix: bytes = b"") -> bytes:
        """``prefix`` followed by [vaddr, vaddr+length) as one new ``bytes``.

        The memory is read straight into the result (no zero-fill, no copy);
        unreadable pages are zeros.  ``prefix`` lets a caller put a message
        header in front of the data without copying the data again.
        """
        head = len(prefix)
        out, view = fresh_bytes(head + length)
        try:
            view[:head] = prefix
            self.fill(vaddr, view[head:])
        finally:
            view.release()
        return out
