"""Reading a frozen target's memory in large blocks, skipping what was never populated.

``process_vm_readv`` is the fast path (it works from any thread, unlike
ptrace); pages it cannot read (guard pages, [vvar], MADV_DONTFORK-less I/O
memory) are retried page by page and served as zeros, as the kernel's core
writer does.  For private anonymous memory, pages /proc/PID/pagemap reports
neither present nor swapped were never written: they are zeros, and reading
them would only install page tables in the target, so they become holes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from collections.abc import Iterator

PAGE = os.sysconf("SC_PAGE_SIZE")
_PM_PRESENT = 1 << 63
_PM_SWAPPED = 1 << 62

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc.process_vm_readv.argtypes = [ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong,
                                   ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.c_ulong]
_libc.process_vm_readv.restype = ctypes.c_ssize_t


class MemoryReader:
    """Reads one target's memory through a live thread id (the mm is shared)."""

    def __init__(self, tid: int) -> None:
        self.tid = tid
        self._pagemap = os.open(f"/proc/{tid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        if self._pagemap >= 0:
            os.close(self._pagemap)
            self._pagemap = -1

    def __enter__(self) -> MemoryReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- population --------------------------------------------------------------

    def populated_runs(self, vaddr: int, length: int) -> Iterator[tuple[int, int, bool]]:
        """Yield (start, length, populated) runs covering [vaddr, vaddr+length)."""
        first = vaddr // PAGE
        last = (vaddr + length + PAGE - 1) // PAGE
        raw = os.pread(self._pagemap, (last - first) * 8, first * 8)
        entries = struct.unpack(f"<{len(raw) // 8}Q", raw)
        end = vaddr + length
        run_start = vaddr
        run_state: bool | None = None
        for i, e in enumerate(entries):
            state = bool(e & (_PM_PRESENT | _PM_SWAPPED))
            page_start = max(vaddr, (first + i) * PAGE)
            if run_state is None:
                run_state = state
            elif state != run_state:
                yield run_start, page_start - run_start, run_state
                run_start, run_state = page_start, state
        if run_state is None:
            run_state = True
        if end > run_start:
            yield run_start, end - run_start, run_state

    # -- reading -----------------------------------------------------------------

    def read_into(self, vaddr: int, buf: bytearray | memoryview) -> int:
        """process_vm_readv into buf; returns bytes read (stops at a fault)."""
        view = memoryview(buf)
        n = len(view)
        if n == 0:
            return 0
        c_buf = (ctypes.c_char * n).from_buffer(view)
        local = _Iovec(ctypes.addressof(c_buf), n)
        remote = _Iovec(vaddr, n)
        got = _libc.process_vm_readv(self.tid, ctypes.byref(local), 1,
                                     ctypes.byref(remote), 1, 0)
        del c_buf
        if got < 0:
            err = ctypes.get_errno()
            if err in (errno.EFAULT, errno.EIO, errno.ENOMEM):
                return 0
            raise OSError(err, f"process_vm_readv({self.tid}): {os.strerror(err)}")
        return int(got)

    def read(self, vaddr: int, length: int) -> tuple[bytearray, list[tuple[int, int]]]:
        """Read [vaddr, vaddr+length); unreadable pages are zeros.

        Returns the data and the list of (offset, length) zero-filled gaps.
        """
        buf = bytearray(length)
        gaps: list[tuple[int, int]] = []
        pos = 0
        while pos < length:
            got = self.read_into(vaddr + pos, memoryview(buf)[pos:])
            pos += got
            if pos >= length:
                break
            # Fault at vaddr+pos: skip the unreadable page, then continue.
            page_end = min(length, (vaddr + pos) // PAGE * PAGE + PAGE - vaddr)
            gaps.append((pos, page_end - pos))
            pos = page_end
        return buf, gaps
