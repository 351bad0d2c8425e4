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
from dataclasses import dataclass, replace

from corepeek_format import dynlink, regions

from . import mapped_files, precheck, procfs
from .arch import ARCHES, ArchSpec
from .arch.base import select_arch
from .elfcore.dumpfilter import vma_dump_size
from .elfcore.layout import Bytes, CoreLayout, CoreTooLarge, Memory, Zeros
from .elfcore.model import DumpedMapping, Mapping, ProcessState, ThreadState
from .elfcore.notes import build_notes
from .errors import (CoreTooLargeForElf32, InvalidRequest, PermissionDenied, ProcessGone,
                     SessionExpired, StaleTarget)
from .exposure import Exposure, subtract
from .freezer import Freezer, FreezeResult
from .memory import IOV_MAX, MemoryReader
from .shared import HeldState, SharedHold
from .snapshot import Snapshot
from .snapshot.attach import make_snapshot
from .snapshot.ledger import Ledger

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
    # Stacks mode, per thread; the admitting rule's grant clamps it (0: the
    # rule's cap).  See exposure.py.
    stack_bytes: int = 8 * 1024 * 1024
    # Snapshot mode (docs/snapshot.md): freeze only while a copy-on-write clone
    # is made; max_freeze then bounds the clone's lifetime.
    snapshot: bool = False
    # CLONE_FILES (share the fd table) rather than a copied table closed with
    # close_range() in the clone; agent-internal, for measurements.
    snapshot_share_files: bool = True
    # Where the agent records its clones for a restarted agent to clean up
    # (snapshot/ledger.py); "" records nothing (in-process use).
    clone_state_dir: str = ""
    # The client understands packed chunks (CoreChunk.extents): small
    # populated runs of sparse memory travel many to a message.
    packed: bool = False


@dataclass(frozen=True)
class Chunk:
    """A piece of a read answer: data, or ``hole`` zero bytes when data is None.

    With ``read(frame=...)`` the first ``head`` bytes of ``data`` are the
    message framing ``frame`` returned, and the payload follows.  A packed
    chunk (``extents``: (start relative to offset, length) pairs) carries the
    extents' bytes concatenated and covers offset up to the end of the last
    extent, zeros elsewhere.
    """

    offset: int
    data: bytes | None
    hole: int = 0
    head: int = 0
    extents: tuple[tuple[int, int], ...] = ()

    @property
    def length(self) -> int:
        """Core bytes covered."""
        if self.extents:
            return self.extents[-1][0] + self.extents[-1][1]
        return len(self.data) - self.head if self.data is not None else self.hole


# frame(core offset, payload bytes, extents) -> bytes to put before the payload.
Framer = Callable[[int, int, tuple[tuple[int, int], ...]], bytes]
# Populated runs shorter than this are packed (when the client allows it);
# at most IOV_MAX of them per chunk, so one process_vm_readv reads a chunk.
PACK_RUN_BELOW = 256 * 1024


def choose_arch(pid: int, gpregs: bytes) -> ArchSpec:
    """The target's architecture, from the register set size ptrace returned.

    ptrace hands a tracer the tracee's own register view (68 bytes for an
    i386 task even to a 64-bit agent); the executable's ELF class and machine
    decide when no register set could be read (see ``arch.select_arch``).
    """
    return select_arch(ARCHES.values(), len(gpregs), lambda: procfs.exe_elf_ident(pid))


def pidfd_exited(pidfd: int) -> bool:
    """A pidfd polls readable once its process has exited."""
    return bool(select.select([pidfd], [], [], 0)[0])


class CaptureSession:
    """Freeze a process and serve its core by offset and length."""

    def __init__(self, pid: int, *, start_time: int = 0,
                 options: SessionOptions = SessionOptions(),
                 on_expire: Callable[[], None] | None = None,
                 admit: Callable[[int, int], Exposure | None] | None = None) -> None:
        self.id = uuid.uuid4().hex[:16]
        self.pid = pid
        self.start_time = start_time
        self.options = options
        self._on_expire = on_expire
        # Policy check (pid, pidfd) -> the rule's grant, or raise: run once the
        # pid is pinned, before the freeze, and again once frozen (authz.CaptureGuard).
        self._admit = admit
        # Stacks mode: requested stack bytes per thread, and whether argv/env
        # strings are zeroed (no grant: they are).
        self.stack_requested = options.stack_bytes
        self.hide_environment = True
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
        self._dumped: list[DumpedMapping] = []
        self.files = mapped_files.FileTable()   # the files it maps (mapped_files.py)
        # Snapshot mode: the clone (None: live mode), why a requested one was
        # not made, and the segments read after the thaw (may be newer).
        self.snapshot: Snapshot | None = None
        self.snapshot_status = ""
        self.snapshot_reason = ""       # the fallback's code (snapshot/attach.py)
        self.read_after_thaw: frozenset[int] = frozenset()
        self.bytes_served = 0
        self.opened_at = 0.0
        self.closed = threading.Event()
        # The freeze this session reads (shared.py): its own (host) or one
        # another session made (joined); None until the registry attaches it.
        self.hold: SharedHold | None = None
        self.joined = False

    # -- open ----------------------------------------------------------------

    def attach(self, hold: SharedHold, *, host: bool) -> bool:
        """Read the freeze ``hold`` stands for: as its first session (``host``,
        which freezes) or as a joiner; False if the hold ended meanwhile."""
        if not hold.enter(self.id, self._on_expire):
            return False
        self.hold, self.joined = hold, not host
        if host:
            hold.set_release(self.thaw)
        return True

    def open(self) -> None:
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            raise ProcessGone(f"no process with pid {self.pid}") from None
        try:
            if self.joined:
                self._join()
            else:
                self._open_pinned()
                self._publish()
        except BaseException:
            self.close()
            raise

    def _open_pinned(self) -> None:
        if self._admit is not None:     # first: a refused client learns nothing of the pid
            self._admit(self.pid, self._pidfd)
        st = procfs.stat(self.pid)
        if self.start_time and st.start_time != self.start_time:
            raise StaleTarget(f"pid {self.pid} has start time {st.start_time}, not "
                              f"{self.start_time}: the process was replaced")
        self.start_time = st.start_time
        self.comm, self.exe = st.comm, procfs.exe(self.pid)
        precheck.check_untraced(self.pid)
        precheck.check_fits_elf_class(self.pid)
        self.opened_at = time.monotonic()
        self._freezer = Freezer(self.pid, choose_arch=choose_arch,
                                thread_timeout=self.options.thread_timeout,
                                max_freeze=self.options.max_freeze, on_expire=self._expired)
        self.freeze = self._freezer.freeze()
        # The pidfd was taken before any check: if it reports an exit now, the
        # pid we froze may be a reused one.
        if pidfd_exited(self._pidfd) or procfs.stat(self.pid).start_time != st.start_time:
            raise ProcessGone(f"process {self.pid} exited while being frozen")
        if self._admit is not None:
            self._grant(self._admit(self.pid, self._pidfd))
        self._build(self.freeze)
        if self.options.mode == MODE_NOTES:
            # Everything a notes capture may read (headers and notes) was
            # built while frozen: the target need not wait for the client.
            if self.options.snapshot:
                self.snapshot_status = ("not needed: a notes capture reads no memory, and the "
                                        "target is thawed as soon as the notes are built")
            self._freezer.thaw()
            return
        if self.options.snapshot:
            self._take_snapshot()

    def _grant(self, exposure: Exposure | None) -> None:
        """Keep a stacks capture within what the admitting rule allows."""
        if exposure is not None:
            self.options = replace(self.options,
                                   stack_bytes=exposure.clamp(self.stack_requested))
            self.hide_environment = not exposure.environment

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
            comm=st.comm, psargs=_psargs(procfs.cmdline_bytes(self.pid, live)),
            utime_us=procfs.ticks_to_us(st.utime), stime_us=procfs.ticks_to_us(st.stime),
            cutime_us=procfs.ticks_to_us(st.cutime), cstime_us=procfs.ticks_to_us(st.cstime),
            auxv=procfs.auxv(self.pid, live))
        maps = procfs.mappings(self.pid, live)
        self.files = mapped_files.scan(self.pid, live, maps)
        dump_filter = procfs.coredump_filter(self.pid)
        dumped = [DumpedMapping(m, vma_dump_size(m, dump_filter, self._read_head)) for m in maps]
        notes = build_notes(arch, proc, self.threads, dumped)
        try:
            self.layout = CoreLayout.build(arch, notes, dumped)
        except CoreTooLarge as exc:     # open() thaws at once
            raise CoreTooLargeForElf32(f"pid {self.pid}: {exc}") from None
        self._dumped = dumped
        # Holes come from the pagemap of private anonymous memory only; the
        # [vdso] is read whole (the kernel's dump faults in its pages too).
        self._anon_private = [not d.mapping.file_backed and not d.mapping.shared
                              and d.mapping.path != "[vdso]" for d in dumped]
        # Reading pages the target shares copy-on-write with another process
        # through process_vm_readv would make the kernel copy them into the
        # target (FOLL_PIN unshares): such mappings are read via /proc/PID/mem.
        self._reader.read_via_proc_mem(
            [(m.start, m.end) for m in maps if m.may_hold_cow_shared_pages])
        self.readable = self._readable_ranges(arch)

    def _take_snapshot(self) -> None:
        """Snapshot mode: clone the frozen target, thaw it, serve memory from the
        clone (snapshot/attach.py); if no clone is made, the target stays frozen
        and this is a live capture, ``snapshot_status`` and ``snapshot_reason`` say why."""
        assert self._freezer is not None and self.freeze is not None and self._reader is not None
        ledger = Ledger(self.options.clone_state_dir) if self.options.clone_state_dir else None
        out = make_snapshot(self.pid, self._freezer, self.freeze, self._dumped, self._reader,
                            thread_timeout=self.options.thread_timeout,
                            share_files=self.options.snapshot_share_files, ledger=ledger,
                            opened_at=self.opened_at)
        if out.snapshot is None:
            self._snapshot_fallback(out.reason, out.status)
            return
        self.snapshot, self._reader = out.snapshot, out.reader
        self.read_after_thaw = out.read_after_thaw

    # -- sharing (shared.py) ------------------------------------------------------

    def _publish(self) -> None:
        """Offer this session's freeze to later sessions on the same pid."""
        if self.hold is None:
            return                      # a session used without a registry
        notes_only = self.options.mode == MODE_NOTES
        reader = self._reader
        self.hold.publish(HeldState(
            freeze_id=self.id, start_time=self.start_time, comm=self.comm, exe=self.exe,
            opened_at=self.opened_at, freezer=self._freezer, reader=reader,
            layout=self.layout, threads=self.threads, freeze=self.freeze,
            dumped=self._dumped, anon_private=self._anon_private, snapshot=self.snapshot,
            read_after_thaw=self.read_after_thaw, holds_memory=not notes_only, files=self.files),
            dispose=reader.close if reader is not None else (lambda: None))

    def _join(self) -> None:
        """Read the freeze another session holds: check, then borrow its state.

        The policy check and the client's start-time pin run as for a fresh
        freeze; the mode, and so the readable ranges, are this session's own.
        """
        assert self.hold is not None and self.hold.state is not None
        held = self.hold.state
        if self._admit is not None:
            self._admit(self.pid, self._pidfd)
        if self.start_time and held.start_time != self.start_time:
            raise StaleTarget(f"pid {self.pid} has start time {held.start_time}, not "
                              f"{self.start_time}: the process was replaced")
        if pidfd_exited(self._pidfd) or procfs.stat(self.pid).start_time != held.start_time:
            raise ProcessGone(f"process {self.pid} exited during the capture in progress")
        self.start_time, self.comm, self.exe = held.start_time, held.comm, held.exe
        self.opened_at, self._freezer, self._reader = held.opened_at, held.freezer, held.reader
        self.layout, self.threads, self.freeze = held.layout, held.threads, held.freeze
        self._dumped, self._anon_private, self.files = held.dumped, held.anon_private, held.files
        self.snapshot, self.read_after_thaw = held.snapshot, held.read_after_thaw
        if self.options.snapshot and held.snapshot is None:
            self._snapshot_fallback("joined_live", "snapshot not taken: joined a live capture "
                                    "of this pid already in progress")
        assert held.freeze is not None
        self.readable = self._readable_ranges(held.freeze.arch)
        if self.options.mode == MODE_NOTES:
            self.hold.leave(self.id)        # its notes are built: the target need not wait
        log.info("session %s joined the capture of pid %d by session %s (%s mode)",
                 self.id, self.pid, held.freeze_id, self.options.mode)

    @property
    def freeze_id(self) -> str:
        """Id of the session that froze the target this session reads."""
        return self.hold.freeze_id if self.hold is not None else self.id

    @property
    def target_running(self) -> bool:
        """The target runs again (snapshot clone made, notes built, or thawed)."""
        fr = self._freezer
        return fr is not None and bool(fr.target_detached_at or fr.thawed.is_set())

    def leave(self) -> None:
        """This session's stream ended: the target thaws if no other session holds it."""
        if self.hold is not None:
            self.hold.leave(self.id)
        else:
            self.thaw()

    def _snapshot_fallback(self, reason: str, status: str) -> None:
        self.snapshot_reason, self.snapshot_status = reason, status
        log.warning("pid %d: %s", self.pid, self.snapshot_status)

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
            # The dynamic linker's library list and the thread descriptors,
            # walked in the frozen target from the notes (auxv, registers), so
            # a debugger can name the libraries and the threads.
            reader = self._reader
            assert reader is not None

            def read(vaddr: int, length: int) -> bytes:
                buf = bytearray(length)
                return bytes(buf[:reader.read_into(vaddr, buf)])

            try:
                extra, found = dynlink.debugger_ranges(read, self.layout.notes,
                                                       arch.word_size, arch.machine)
            except Exception:   # a strange target must not fail the capture
                log.exception("pid %d: dynamic linker walk failed", self.pid)
                extra = ()
            else:
                if found.problems:
                    log.info("pid %d: dynamic linker walk: %s", self.pid,
                             "; ".join(found.problems))
            ranges = regions.stacks_ranges(self.layout, sps, self.options.stack_bytes,
                                           extra_vaddr_ranges=extra)
            st = procfs.stat(self.pid)
            if self.hide_environment and st.arg_start and st.env_end > st.arg_start:
                # argv and environment strings: served as zeros (exposure.py)
                ranges = subtract(ranges, regions.vaddr_range_to_file(
                    self.layout, st.arg_start, st.env_end - st.arg_start))
            return ranges
        return [(0, self.layout.total_size)]

    # -- read ------------------------------------------------------------------

    def read(self, offset: int, length: int, frame: Framer | None = None) -> Iterator[Chunk]:
        """Answer one read request as chunks of at most ``chunk_size`` bytes.

        With ``frame``, every data chunk's ``data`` starts with
        ``frame(offset, payload length)`` (``Chunk.head`` bytes), so a message
        header costs no copy of the payload; holes stay ``data=None``.
        """
        if self.layout is None:
            raise InvalidRequest("read before the session was opened")
        if self._freezer is not None and self._freezer.expired:
            raise SessionExpired.after(self.options.max_freeze)
        if self.closed.is_set():
            raise InvalidRequest("read after the session was closed")
        end = min(offset + length, self.layout.total_size)
        if end > offset and self.options.mode != MODE_FULL and not regions.contains(
                self.readable, offset, end - offset):
            raise PermissionDenied(
                f"range [{offset}, {end}) is outside what {self.options.mode} mode may read")
        for piece in self.layout.pieces(offset, length):
            if isinstance(piece, Bytes):
                yield from self._bytes_chunks(offset, piece.data, frame)
                offset += len(piece.data)
            elif isinstance(piece, Zeros):
                yield Chunk(offset, None, piece.length)
                offset += piece.length
            else:
                self._check_alive()
                yield from self._memory_chunks(offset, piece, frame)
                offset += piece.length
        # Memory of a process that died meanwhile reads as holes (its page
        # tables are gone): fail the request before its last chunk instead.
        self._check_alive()

    def _check_alive(self) -> None:
        """Fail if the target died (SIGKILL wakes even a frozen process).

        Its traced threads stay zombies until the tracer reaps them, so the
        pidfd alone does not tell; the thread memory is read through does.
        A snapshot outlives its target (exit or exec): the clone still holds
        the image, so only the clone's death fails a snapshot capture.
        """
        if self.snapshot is not None:
            if self.expired:
                raise SessionExpired.after(self.options.max_freeze)
            return                  # the clone's reader raises ProcessGone if it died
        dead = self._pidfd >= 0 and pidfd_exited(self._pidfd)
        if not dead and self._reader is not None:
            try:
                dead = procfs.stat(self.pid, self._reader.tid).state in ("Z", "X")
            except ProcessGone:
                dead = True
        if dead:
            raise ProcessGone(f"process {self.pid} exited during the capture")

    def _bytes_chunks(self, offset: int, data: bytes,
                      frame: Framer | None = None) -> Iterator[Chunk]:
        step = self.options.chunk_size
        for i in range(0, len(data), step):
            part = data[i:i + step]
            if frame is None:
                yield Chunk(offset + i, part)
            else:
                head = frame(offset + i, len(part), ())
                yield Chunk(offset + i, head + part, head=len(head))

    def _memory_chunks(self, offset: int, piece: Memory,
                       frame: Framer | None = None) -> Iterator[Chunk]:
        reader = self._reader
        assert reader is not None
        runs: Iterator[tuple[int, int, bool]]
        if self._anon_private[piece.segment]:
            runs = reader.populated_runs(piece.vaddr, piece.length)
        else:
            runs = iter([(piece.vaddr, piece.length, True)])
        step = self.options.chunk_size
        packing = self.options.packed
        pack: list[tuple[int, int]] = []      # small populated runs not sent yet
        pack_bytes = 0
        pack_from = covered = piece.vaddr     # below `covered`: sent, or in the pack
        for vaddr, length, populated in runs:
            if not populated:
                continue                      # a hole: covered by what follows it
            if packing and length < PACK_RUN_BELOW and length <= step:
                if pack and (pack_bytes + length > step or len(pack) >= IOV_MAX):
                    yield self._packed_chunk(offset + (pack_from - piece.vaddr), pack_from,
                                             pack, frame)
                    pack, pack_bytes = [], 0
                if not pack:
                    pack_from = covered
                pack.append((vaddr, length))
                pack_bytes += length
                covered = vaddr + length
                continue
            if pack:
                yield self._packed_chunk(offset + (pack_from - piece.vaddr), pack_from,
                                         pack, frame)
                pack, pack_bytes = [], 0
            if vaddr > covered:
                yield Chunk(offset + (covered - piece.vaddr), None, vaddr - covered)
            file_off = offset + (vaddr - piece.vaddr)
            for i in range(0, length, step):
                n = min(step, length - i)
                # Read straight into the bytes that will be sent (after the
                # framing): no zero-fill, no bytearray-to-bytes copy.
                head = frame(file_off + i, n, ()) if frame is not None else b""
                yield Chunk(file_off + i, reader.read_bytes(vaddr + i, n, head), head=len(head))
            covered = vaddr + length
        if pack:
            yield self._packed_chunk(offset + (pack_from - piece.vaddr), pack_from, pack, frame)
        end = piece.vaddr + piece.length
        if covered < end:
            yield Chunk(offset + (covered - piece.vaddr), None, end - covered)

    def _packed_chunk(self, file_off: int, start: int, pack: list[tuple[int, int]],
                      frame: Framer | None) -> Chunk:
        """One chunk covering [start, end of the last run): the runs' bytes, zeros between."""
        reader = self._reader
        assert reader is not None
        extents = tuple((v - start, n) for v, n in pack)
        head = frame(file_off, sum(n for _, n in pack), extents) if frame is not None else b""
        return Chunk(file_off, reader.read_runs(pack, head), head=len(head), extents=extents)

    # -- close -----------------------------------------------------------------

    def _expired(self) -> None:
        """--max-freeze ended the freeze: every session reading it ends."""
        if self.hold is not None:
            self.hold.expire()
        elif self._on_expire is not None:
            self._on_expire()

    @property
    def expired(self) -> bool:
        """The maximum freeze duration ended this session."""
        return self._freezer is not None and self._freezer.expired

    @property
    def frozen_seconds(self) -> float:
        """How long the target has been (or was) frozen."""
        if not self.opened_at:
            return 0.0
        if self._freezer is not None and self._freezer.target_detached_at:
            return self._freezer.target_detached_at - self.opened_at   # thawed already
        return time.monotonic() - self.opened_at

    def thaw(self) -> None:
        """Thaw the target now, whoever else reads it (the last member leaving,
        agent shutdown); idempotent and safe from any thread."""
        if self._freezer is not None:
            self._freezer.thaw()

    def close(self) -> None:
        """Leave the freeze and release the session's files (from the thread that reads).

        The last session to leave a shared freeze thaws the target; in
        snapshot mode the tracer thread's exit kills the clone, reaps it and
        removes its zombie from the target (``Snapshot.release``) before
        ``thaw`` returns.  The reader of a published freeze is closed by the
        last session done with it.
        """
        published = self.hold is not None and self.hold.state is not None
        if self.hold is not None:
            self.hold.done(self.id)
        else:
            self.thaw()
        if self._reader is not None and not published:
            self._reader.close()
        self._reader = None
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
        self.closed.set()


def _psargs(raw: bytes) -> bytes:
    """argv joined by spaces as fill_psinfo() does: every NUL, the last one too."""
    return raw.replace(b"\0", b" ")
