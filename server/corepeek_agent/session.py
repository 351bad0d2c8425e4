"""One capture session: open freezes, reads generate the core, close thaws.

This is the seed RFC's /proc/PID/core file in user space.  ``open`` pins the
target with a pidfd, freezes it on a tracer thread, and computes the whole
layout (headers, notes, segment table) once.  ``read`` maps any (offset,
length) onto that table and reads target memory on demand; nothing else of the
core is ever held in memory.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from . import procfs
from .arch import I386, X86_64, ArchSpec
from .elfcore import regions
from .elfcore.dumpfilter import vma_dump_size
from .elfcore.layout import Bytes, CoreLayout, Memory, Zeros
from .elfcore.model import DumpedMapping, Mapping, ProcessState, ThreadState
from .elfcore.notes import build_notes
from .errors import InvalidRequest, PermissionDenied, ProcessGone, SessionExpired, StaleTarget
from .freezer import Freezer, FreezeResult
from .memory import MemoryReader

log = logging.getLogger(__name__)

MODE_FULL, MODE_STACKS, MODE_NOTES = "full", "stacks", "notes"
MAX_CHUNK = 3 * 1024 * 1024      # stays under gRPC's 4 MiB default receive limit
DEFAULT_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class SessionOptions:
    thread_timeout: float = 0.5
    max_freeze: float = 300.0
    mode: str = MODE_FULL
    chunk_size: int = DEFAULT_CHUNK
    stack_bytes: int = 8 * 1024 * 1024


@dataclass(frozen=True)
class Chunk:
    """A piece of a read answer: data, or ``hole`` zero bytes when data is None."""

    offset: int
    data: bytes | None
    hole: int = 0

    @property
    def length(self) -> int:
        return len(self.data) if self.data is not None else self.hole


def choose_arch(pid: int, gpregs: bytes) -> ArchSpec:
    """The target's architecture, from the register set size ptrace returned.

    ptrace hands a tracer the tracee's own register view (68 bytes for an
    i386 task even to a 64-bit agent); the executable's ELF class decides when
    no register set could be read.
    """
    if len(gpregs) == I386.gpregs_size:
        return I386
    if len(gpregs) == X86_64.gpregs_size:
        return X86_64
    return I386 if procfs.exe_elf_class(pid) == 32 else X86_64


def pidfd_exited(pidfd: int) -> bool:
    """A pidfd polls readable once its process has exited."""
    return bool(select.select([pidfd], [], [], 0)[0])


class CaptureSession:
    """Freeze a process and serve its core by offset and length."""

    def __init__(self, pid: int, *, start_time: int = 0,
                 options: SessionOptions = SessionOptions(),
                 on_expire: Callable[[], None] | None = None) -> None:
        self.id = uuid.uuid4().hex[:16]
        self.pid = pid
        self.start_time = start_time
        self.options = options
        self._on_expire = on_expire
        self._pidfd = -1
        self._freezer: Freezer | None = None
        self._reader: MemoryReader | None = None
        self.layout: CoreLayout | None = None
        self.threads: tuple[ThreadState, ...] = ()
        self.freeze: FreezeResult | None = None
        self.readable: list[tuple[int, int]] = []
        self.comm = ""
        self.exe = ""
        self._anon_private: list[bool] = []
        self.bytes_served = 0
        self.opened_at = 0.0
        self.closed = threading.Event()

    # -- open ----------------------------------------------------------------

    def open(self) -> None:
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            raise ProcessGone(f"no process with pid {self.pid}") from None
        try:
            self._open_pinned()
        except BaseException:
            self.close()
            raise

    def _open_pinned(self) -> None:
        st = procfs.stat(self.pid)
        if self.start_time and st.start_time != self.start_time:
            raise StaleTarget(f"pid {self.pid} has start time {st.start_time}, not "
                              f"{self.start_time}: the process was replaced")
        self.start_time = st.start_time
        self.comm, self.exe = st.comm, procfs.exe(self.pid)
        self.opened_at = time.monotonic()
        self._freezer = Freezer(self.pid, choose_arch=choose_arch,
                                thread_timeout=self.options.thread_timeout,
                                max_freeze=self.options.max_freeze, on_expire=self._expired)
        self.freeze = self._freezer.freeze()
        # The pidfd was taken before any check: if it reports an exit now, the
        # pid we froze may be a reused one.
        if pidfd_exited(self._pidfd) or procfs.stat(self.pid).start_time != st.start_time:
            raise ProcessGone(f"process {self.pid} exited while being frozen")
        self._build(self.freeze)

    def _build(self, fr: FreezeResult) -> None:
        arch = fr.arch
        live = next((t.tid for t in fr.threads if t.stopped), self.pid)
        self._reader = MemoryReader(live)
        st = procfs.stat(self.pid)
        uid, gid = procfs.uid_gid(self.pid)
        threads = []
        for t in fr.threads:
            sigpend, sighold, ut, stt = 0, 0, 0, 0
            try:
                sigpend, sighold = procfs.signal_masks(self.pid, t.tid)
                tst = procfs.stat(self.pid, t.tid)
                ut, stt, tcomm = procfs.ticks_to_us(tst.utime), procfs.ticks_to_us(tst.stime), tst.comm
            except ProcessGone:
                tcomm = ""
            threads.append(ThreadState(
                tid=t.tid, frozen=t.stopped, gpregs=t.gpregs if t.stopped else b"",
                regsets=tuple(t.regsets), sigpend=sigpend, sighold=sighold,
                utime_us=ut, stime_us=stt, comm=tcomm, state=fr.states_before.get(t.tid, "")))
        self.threads = tuple(threads)
        proc = ProcessState(
            pid=self.pid, ppid=st.ppid, pgrp=st.pgrp, sid=st.session, uid=uid, gid=gid,
            state=fr.states_before.get(self.pid, st.state), nice=st.nice, flags=st.flags,
            comm=st.comm, psargs=_psargs(procfs.cmdline_bytes(self.pid)),
            utime_us=procfs.ticks_to_us(st.utime), stime_us=procfs.ticks_to_us(st.stime),
            cutime_us=procfs.ticks_to_us(st.cutime), cstime_us=procfs.ticks_to_us(st.cstime),
            auxv=procfs.auxv(self.pid, live))
        maps = procfs.mappings(self.pid, live)
        dump_filter = procfs.coredump_filter(self.pid)
        dumped = [DumpedMapping(m, vma_dump_size(m, dump_filter, self._read_head)) for m in maps]
        notes = build_notes(arch, proc, self.threads, dumped)
        self.layout = CoreLayout.build(arch, notes, dumped)
        self._anon_private = [not d.mapping.file_backed and not d.mapping.shared for d in dumped]
        self.readable = self._readable_ranges(arch)

    def _read_head(self, m: Mapping) -> bytes | None:
        assert self._reader is not None
        buf = bytearray(4)
        return bytes(buf) if self._reader.read_into(m.start, buf) == 4 else None

    def _readable_ranges(self, arch: ArchSpec) -> list[tuple[int, int]]:
        assert self.layout is not None
        if self.options.mode == MODE_NOTES:
            return regions.notes_ranges(self.layout)
        if self.options.mode == MODE_STACKS:
            sps = [arch.sp(t.gpregs) for t in self.threads if t.frozen]
            return regions.stacks_ranges(self.layout, sps, self.options.stack_bytes)
        return [(0, self.layout.total_size)]

    # -- read ------------------------------------------------------------------

    def read(self, offset: int, length: int) -> Iterator[Chunk]:
        """Answer one read request as chunks of at most ``chunk_size`` bytes."""
        if self.layout is None:
            raise InvalidRequest("read before the session was opened")
        if self._freezer is not None and self._freezer.expired:
            raise SessionExpired(f"the maximum freeze duration ({self.options.max_freeze:.0f}s) "
                                 "passed; the target was thawed")
        if self.closed.is_set():
            raise InvalidRequest("read after the session was closed")
        end = min(offset + length, self.layout.total_size)
        if end > offset and self.options.mode != MODE_FULL and not regions.contains(
                self.readable, offset, end - offset):
            raise PermissionDenied(
                f"range [{offset}, {end}) is outside what {self.options.mode} mode may read")
        for piece in self.layout.pieces(offset, length):
            if isinstance(piece, Bytes):
                yield from self._bytes_chunks(offset, piece.data)
                offset += len(piece.data)
            elif isinstance(piece, Zeros):
                yield Chunk(offset, None, piece.length)
                offset += piece.length
            else:
                yield from self._memory_chunks(offset, piece)
                offset += piece.length

    def _bytes_chunks(self, offset: int, data: bytes) -> Iterator[Chunk]:
        step = self.options.chunk_size
        for i in range(0, len(data), step):
            yield Chunk(offset + i, data[i:i + step])

    def _memory_chunks(self, offset: int, piece: Memory) -> Iterator[Chunk]:
        assert self._reader is not None
        runs: Iterator[tuple[int, int, bool]]
        if self._anon_private[piece.segment]:
            runs = self._reader.populated_runs(piece.vaddr, piece.length)
        else:
            runs = iter([(piece.vaddr, piece.length, True)])
        step = self.options.chunk_size
        for vaddr, length, populated in runs:
            file_off = offset + (vaddr - piece.vaddr)
            if not populated:
                yield Chunk(file_off, None, length)
                continue
            for i in range(0, length, step):
                n = min(step, length - i)
                data, _gaps = self._reader.read(vaddr + i, n)
                yield Chunk(file_off + i, bytes(data))

    # -- close -----------------------------------------------------------------

    def _expired(self) -> None:
        if self._on_expire is not None:
            self._on_expire()

    @property
    def frozen_seconds(self) -> float:
        return time.monotonic() - self.opened_at if self.opened_at else 0.0

    def thaw(self) -> None:
        """Thaw the target now; idempotent and safe from any thread."""
        if self._freezer is not None:
            self._freezer.thaw()

    def close(self) -> None:
        """Thaw and release the session's files (from the thread that reads)."""
        self.thaw()
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
        self.closed.set()


def _psargs(raw: bytes) -> bytes:
    return raw.rstrip(b"\0").replace(b"\0", b" ")
