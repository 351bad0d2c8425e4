"""Partial cores: the notes, or the notes and the thread stacks, of a capture.

A partial core is a valid ELF core that keeps every mapping of the full core
but only some of its bytes::

    Elf_Ehdr | PT_NOTE | PT_LOAD x M | notes, as the agent made them | pad to page
    | data of each kept sub-range, at an offset congruent to its vaddr
      modulo the page size | Elf_Shdr (only with PN_XNUM)

Each kept sub-range of a full-core segment becomes its own PT_LOAD with file
data; the rest of each mapping stays a PT_LOAD with ``p_filesz`` 0, so a
debugger knows the memory exists but is not in the file (gdb then reads the
file NT_FILE names for file-backed mappings, zeros otherwise).

The ELF work is pure and unit-tested on bytes (:func:`parse_core_header`,
:func:`plan_partial`); :func:`write_partial_core` does the I/O: it reads the
header block and notes through ``core.file``, decides which segment bytes a
mode needs (:func:`memory_plan`) and streams exactly those from the agent.
"""

from __future__ import annotations

import bisect
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from corepeek_format import dynlink, regions
from corepeek_format.elfstructs import (EHDR, ELFCLASS64, PAGE_SIZE, PHDR, PN_XNUM, PT_LOAD,
                                        PT_NOTE, SHDR, pack_phdr)
from corepeek_format.ranges import merge_ranges

from .errors import CaptureError
from .remote import RemoteCore, RemoteCoreFile
from .v1 import capture_pb2 as pb

DEFAULT_STACK_BYTES = 8 * 1024 * 1024   # the agent's default cap per thread

Range = tuple[int, int]     # (offset in the full core, length)

_EHDR, _PHDR, _SHDR = EHDR, PHDR, SHDR


class PartialCoreError(ValueError):
    """The full core's header cannot be turned into a partial core."""


# -- pure ELF ----------------------------------------------------------------------


@dataclass(frozen=True)
class ProgramHeader:
    p_type: int
    p_flags: int
    p_offset: int
    p_vaddr: int
    p_paddr: int
    p_filesz: int
    p_memsz: int
    p_align: int

    def pack(self, elf_class: int) -> bytes:
        return pack_phdr(elf_class, self.p_type, self.p_flags, self.p_offset, self.p_vaddr,
                         self.p_paddr, self.p_filesz, self.p_memsz, self.p_align)


@dataclass(frozen=True)
class CoreHeader:
    """The parts of a core's ELF header a partial core copies or recomputes."""

    elf_class: int
    ident: bytes
    e_type: int
    e_machine: int
    e_version: int
    e_flags: int
    phdrs: tuple[ProgramHeader, ...]

    @property
    def loads(self) -> tuple[ProgramHeader, ...]:
        return tuple(p for p in self.phdrs if p.p_type == PT_LOAD)


def parse_core_header(header: bytes, section_header: bytes = b"") -> CoreHeader:
    """Parse ``Elf_Ehdr`` + program headers (the core's first bytes).

    With ``e_phnum == PN_XNUM`` the real count is ``sh_info`` of the first
    section header, which must then be given.
    """
    if header[:4] != b"\x7fELF" or len(header) < 16:
        raise PartialCoreError("not an ELF file")
    cls = header[4]
    if cls not in _EHDR:
        raise PartialCoreError(f"unknown ELF class {cls}")
    if header[5] != 1:
        raise PartialCoreError("only little-endian cores are supported")
    ehdr = _EHDR[cls]
    if len(header) < ehdr.size:
        raise PartialCoreError("truncated ELF header")
    (ident, e_type, e_machine, e_version, _entry, e_phoff, _shoff, e_flags, _ehsize,
     e_phentsize, e_phnum, _shentsize, _shnum, _shstrndx) = ehdr.unpack_from(header)
    phdr = _PHDR[cls]
    if e_phnum == PN_XNUM:
        if len(section_header) < _SHDR[cls].size:
            raise PartialCoreError("PN_XNUM core without its section header")
        e_phnum = _SHDR[cls].unpack_from(section_header)[7]            # sh_info
    if e_phentsize != phdr.size:
        raise PartialCoreError(f"program header size {e_phentsize}, expected {phdr.size}")
    if len(header) < e_phoff + e_phnum * phdr.size:
        raise PartialCoreError("truncated program headers")
    phdrs = []
    for i in range(e_phnum):
        f = phdr.unpack_from(header, e_phoff + i * phdr.size)
        if cls == ELFCLASS64:
            p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align = f
        else:
            p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_flags, p_align = f
        phdrs.append(ProgramHeader(p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz,
                                   p_memsz, p_align))
    if e_type != 4:
        raise PartialCoreError(f"e_type {e_type} is not ET_CORE")
    return CoreHeader(cls, ident, e_type, e_machine, e_version, e_flags, tuple(phdrs))


@dataclass(frozen=True)
class Copy:
    """``length`` bytes at ``src`` in the full core go to ``dst`` in the partial one."""

    src: int
    dst: int
    length: int


@dataclass(frozen=True)
class PartialPlan:
    """Everything needed to write a partial core, apart from the copied bytes."""

    elf_class: int
    header: bytes                  # Ehdr + Phdrs of the partial core
    notes: tuple[Copy, ...]        # the PT_NOTE contents
    data: tuple[Copy, ...]         # kept segment bytes, in source (= address) order
    section_header: bytes          # b"" unless PN_XNUM
    section_header_offset: int
    size: int                      # file size
    phdrs: tuple[ProgramHeader, ...]

    @property
    def loads(self) -> int:
        return sum(1 for p in self.phdrs if p.p_type == PT_LOAD)

    @property
    def loads_with_data(self) -> int:
        return sum(1 for p in self.phdrs if p.p_type == PT_LOAD and p.p_filesz)

    @property
    def memory_bytes(self) -> int:
        return sum(c.length for c in self.data)

    def fetch_ranges(self) -> list[Range]:
        """The full-core ranges to fetch: ``data`` with touching copies joined."""
        return merge_ranges((c.src, c.length) for c in self.data)

    def destinations(self, src: int, length: int) -> list[Copy]:
        """Where full-core bytes [src, src+length) go (the parts that are kept)."""
        starts = [c.src for c in self.data]
        i = max(0, bisect.bisect_right(starts, src) - 1)
        out = []
        end = src + length
        for c in self.data[i:]:
            if c.src >= end:
                break
            lo, hi = max(src, c.src), min(end, c.src + c.length)
            if lo < hi:
                out.append(Copy(lo, c.dst + lo - c.src, hi - lo))
        return out


def _split_load(p: ProgramHeader, keep: Sequence[Range]) -> list[tuple[ProgramHeader, int]]:
    """Pieces of one PT_LOAD: (phdr with vaddr/memsz/filesz set, source offset or -1)."""
    out: list[tuple[ProgramHeader, int]] = []
    cur = p.p_vaddr
    end = p.p_vaddr + p.p_memsz
    lo_file, hi_file = p.p_offset, p.p_offset + p.p_filesz
    i = bisect.bisect_right(keep, (lo_file, float("inf"))) - 1
    for off, n in keep[max(i, 0):]:
        if off >= hi_file:
            break
        a, b = max(off, lo_file), min(off + n, hi_file)
        if a >= b:
            continue
        va = p.p_vaddr + (a - p.p_offset)
        if va > cur:
            out.append((_piece(p, cur, va - cur, 0), -1))
        out.append((_piece(p, va, b - a, b - a), a))
        cur = va + (b - a)
    if cur < end or not out:
        out.append((_piece(p, cur, end - cur, 0), -1))
    return out


def _piece(p: ProgramHeader, vaddr: int, memsz: int, filesz: int) -> ProgramHeader:
    return ProgramHeader(PT_LOAD, p.p_flags, 0, vaddr, 0, filesz, memsz, p.p_align)


def plan_partial(core: CoreHeader, keep: Iterable[Range]) -> PartialPlan:
    """Lay out a partial core holding the notes and the kept full-core ``keep`` ranges.

    ``keep`` may contain anything (header or notes ranges, bytes outside any
    segment's data); only bytes inside some PT_LOAD's file data are kept.
    """
    cls = core.elf_class
    ehdr, phdr = _EHDR[cls], _PHDR[cls]
    kept = merge_ranges(keep)
    # New program headers in the old order; PT_LOADs split into pieces.
    pieces: list[tuple[ProgramHeader, int]] = []
    for p in core.phdrs:
        if p.p_type == PT_LOAD:
            pieces += _split_load(p, kept)
        elif p.p_type == PT_NOTE:
            pieces.append((p, p.p_offset))
        else:
            pieces.append((ProgramHeader(p.p_type, p.p_flags, 0, p.p_vaddr, p.p_paddr, 0,
                                         p.p_memsz, p.p_align), -1))
    segs = len(pieces)
    xnum = segs >= PN_XNUM
    cursor = ehdr.size + segs * phdr.size
    notes: list[Copy] = []
    final: list[ProgramHeader] = []
    for p, src in pieces:                       # notes first, right after the headers
        if p.p_type == PT_NOTE:
            cursor = -(-cursor // 4) * 4
            notes.append(Copy(src, cursor, p.p_filesz))
            cursor += p.p_filesz
    cursor = -(-cursor // PAGE_SIZE) * PAGE_SIZE
    data: list[Copy] = []
    note_iter = iter(notes)
    for p, src in pieces:
        if p.p_type == PT_NOTE:
            final.append(_with_offset(p, next(note_iter).dst))
        elif p.p_type == PT_LOAD and p.p_filesz:
            # p_offset congruent to p_vaddr modulo the page, as loaders expect
            cursor += (p.p_vaddr - cursor) % PAGE_SIZE
            data.append(Copy(src, cursor, p.p_filesz))
            final.append(_with_offset(p, cursor))
            cursor += p.p_filesz
        else:
            final.append(_with_offset(p, cursor if p.p_type == PT_LOAD else 0))
    section_header = b""
    shoff = 0
    if xnum:
        shdr = _SHDR[cls]
        cursor = -(-cursor // 8) * 8
        shoff = cursor
        # sh_info carries the real program header count (fill_extnum_info()).
        section_header = shdr.pack(0, 0, 0, 0, 0, 1, 0, segs, 0, 0)
        cursor += shdr.size
    header = ehdr.pack(
        core.ident,                             # e_ident
        core.e_type,                            # e_type
        core.e_machine,                         # e_machine
        core.e_version,                         # e_version
        0,                                      # e_entry
        ehdr.size,                              # e_phoff
        shoff,                                  # e_shoff
        core.e_flags,                           # e_flags
        ehdr.size,                              # e_ehsize
        phdr.size,                              # e_phentsize
        PN_XNUM if xnum else segs,              # e_phnum
        _SHDR[cls].size if xnum else 0,         # e_shentsize
        1 if xnum else 0,                       # e_shnum
        0)                                      # e_shstrndx
    header += b"".join(p.pack(cls) for p in final)
    return PartialPlan(cls, header, tuple(notes), tuple(data), section_header, shoff, cursor,
                       tuple(final))


def _with_offset(p: ProgramHeader, offset: int) -> ProgramHeader:
    return ProgramHeader(p.p_type, p.p_flags, offset, p.p_vaddr, p.p_paddr, p.p_filesz,
                         p.p_memsz, p.p_align)


# -- which bytes a mode needs --------------------------------------------------------

_SESSION_MODES = {pb.CAPTURE_MODE_NOTES: "notes", pb.CAPTURE_MODE_STACKS: "stacks",
                  pb.CAPTURE_MODE_FULL: "full", pb.CAPTURE_MODE_UNSPECIFIED: "full"}


def session_mode(core: RemoteCore) -> str:
    return _SESSION_MODES.get(core.layout.mode, "full")


class VaddrReader:
    """Target memory as the full core holds it, read through the remote file.

    Dumped bytes come from the capture, through page-sized windows so a
    pointer walk pulls little more than it reads.  With ``local_files``, bytes
    of a file mapping the core does not hold are read from that file on this
    host, as gdb does (``xfer_memory_via_mappings``): symbol tables live there.
    A read stops where neither has the bytes, or where the session may not
    read (a STACKS session: the walk then sees what the agent's walk kept).
    """

    def __init__(self, core: RemoteCore, *, local_files: bool = True,
                 window: int = PAGE_SIZE) -> None:
        self._file = RemoteCoreFile(core, readahead=window)
        self._local = local_files
        self._segs = sorted((int(s.vaddr), int(s.mem_size), int(s.file_size),
                             int(s.file_offset), s.name, int(s.file_page_offset))
                            for s in core.layout.segments)
        self._starts = [s[0] for s in self._segs]
        self._open: dict[str, object] = {}

    def read(self, vaddr: int, length: int) -> bytes:
        out = bytearray()
        while len(out) < length:
            v = vaddr + len(out)
            i = bisect.bisect_right(self._starts, v) - 1
            if i < 0:
                break
            start, memsz, filesz, offset, name, page_off = self._segs[i]
            if v >= start + memsz:
                break
            if v < start + filesz:
                n = min(length - len(out), start + filesz - v)
                self._file.seek(offset + v - start)
                try:
                    got = self._file.read(n)
                except CaptureError as exc:
                    if exc.code != grpc.StatusCode.PERMISSION_DENIED:
                        raise
                    break                         # outside what the session may read
            else:
                n = min(length - len(out), start + memsz - v)
                got = self._read_local(name, page_off + v - start, n)
            out += got
            if len(got) < n:
                break
        return bytes(out)

    def _read_local(self, name: str, offset: int, n: int) -> bytes:
        if not self._local or not name.startswith("/"):
            return b""
        try:
            with open(name, "rb") as f:
                f.seek(offset)
                return f.read(n)
        except OSError:
            return b""


def memory_plan(core: RemoteCore, mode: str, stack_bytes: int = 0,
                notes: bytes | None = None, machine: int | None = None) -> list[Range]:
    """Full-core ranges of segment data a ``mode`` partial core keeps.

    ``notes``: nothing.  ``stacks`` in a STACKS session: what the agent lets
    this session read (it planned it at open).  ``stacks`` in a FULL session:
    :func:`local_stacks_plan` (so one frozen state can give both a full and a
    stacks core).
    """
    have = session_mode(core)
    if mode == "notes":
        return []
    if mode != "stacks":
        raise ValueError(f"a partial core is 'notes' or 'stacks', not {mode!r}")
    if have == "stacks":
        return merge_ranges((int(r.offset), int(r.length)) for r in core.layout.readable)
    if have != "full":
        raise ValueError(f"a {have} session cannot give a stacks core")
    return local_stacks_plan(core, stack_bytes, notes, machine)


def local_stacks_plan(core: RemoteCore, stack_bytes: int = 0, notes: bytes | None = None,
                      machine: int | None = None) -> list[Range]:
    """The segment ranges of a STACKS capture, planned on this side.

    The agent's own pure functions (:mod:`corepeek_format.dynlink`,
    :mod:`corepeek_format.regions`) over this session's layout, notes
    and memory (:class:`VaddrReader`): in the same frozen state and with the
    same mapped files on this host it gives what a STACKS session's
    ``readable`` would hold, minus the header block and notes.
    """
    lay = core.layout
    if notes is None:
        notes = _read_exact(core.file, lay.notes.offset, lay.notes.length)
    if machine is None:
        machine = parse_core_header(
            _read_exact(core.file, lay.headers.offset, lay.headers.length)).e_machine
    word = 4 if lay.elf_class == 32 else 8
    extra, _info = dynlink.debugger_ranges(VaddrReader(core).read, notes, word, machine)
    sps = [int(t.sp) for t in lay.threads if t.frozen]
    return regions.memory_ranges(list(lay.segments), sps, stack_bytes or DEFAULT_STACK_BYTES,
                                 extra)


# -- I/O ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PartialResult:
    """What :func:`write_partial_core` wrote and what it cost."""

    path: Path | None              # None when written to a caller's descriptor
    mode: str
    file_size: int                 # apparent size of the written core
    loads: int                     # PT_LOADs in it
    loads_with_data: int           # ... of which carry bytes
    memory_bytes: int              # segment bytes it holds (holes included)
    fetched: tuple[Range, ...]     # full-core ranges of segment data fetched
    data_bytes: int                # payload bytes received by this call
    hole_bytes: int                # zero bytes the agent described without sending
    requests: int
    seconds: float


def _read_exact(f: RemoteCoreFile, offset: int, length: int) -> bytes:
    f.seek(offset)
    data = f.read(length)
    if len(data) != length:
        raise PartialCoreError(f"short read of the core at {offset}: {len(data)} of {length}")
    return data


def write_partial_core(core: RemoteCore, out: Path | int, *, mode: str | None = None,
                       stack_bytes: int = 0) -> PartialResult:
    """Write a ``notes`` or ``stacks`` partial core of ``core`` to ``out``.

    ``mode`` defaults to the session's mode.  Fetches the header block and the
    notes through ``core.file`` and then exactly the kept segment bytes; holes
    the agent reports stay holes in ``out`` (it is written sparse).  ``out``
    is a path, or a writable file's descriptor (the caller keeps it open).
    """
    t0 = time.monotonic()
    stats = core.stats
    before = (stats.data_bytes, stats.hole_bytes, stats.requests)
    mode = mode or session_mode(core)
    lay = core.layout
    header = _read_exact(core.file, lay.headers.offset, lay.headers.length)
    shdr = b""
    if lay.section_headers.length:
        shdr = _read_exact(core.file, lay.section_headers.offset, lay.section_headers.length)
    hdr = parse_core_header(header, shdr)
    notes = b"".join(_read_exact(core.file, p.p_offset, p.p_filesz)
                     for p in hdr.phdrs if p.p_type == PT_NOTE)
    plan = plan_partial(hdr, memory_plan(core, mode, stack_bytes, notes, hdr.e_machine))
    fetched = plan.fetch_ranges()
    if isinstance(out, int):
        fd, path = os.dup(out), None
    else:
        path = Path(out)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.pwrite(fd, plan.header, 0)
        for c in plan.notes:
            os.pwrite(fd, _read_exact(core.file, c.src, c.length), c.dst)
        for offset, length in fetched:
            for piece in core.read_range(offset, length):
                if piece.data is None:
                    continue                      # a hole: zeros, left sparse
                for c in plan.destinations(piece.offset, len(piece.data)):
                    lo = c.src - piece.offset
                    os.pwrite(fd, piece.data[lo:lo + c.length], c.dst)
        if plan.section_header:
            os.pwrite(fd, plan.section_header, plan.section_header_offset)
        os.ftruncate(fd, plan.size)
    finally:
        os.close(fd)
    return PartialResult(
        path=path, mode=mode, file_size=plan.size, loads=plan.loads,
        loads_with_data=plan.loads_with_data, memory_bytes=plan.memory_bytes,
        fetched=tuple(fetched), data_bytes=stats.data_bytes - before[0],
        hole_bytes=stats.hole_bytes - before[1], requests=stats.requests - before[2],
        seconds=time.monotonic() - t0)
