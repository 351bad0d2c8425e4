"""The core file's layout, computed once at freeze time, and offset lookup.

Layout (as fs/binfmt_elf.c writes it)::

    Elf_Ehdr | Elf_Phdr PT_NOTE | Elf_Phdr PT_LOAD x N | notes | zero pad to page
    | segment data in address order (p_filesz bytes each) | [Elf_Shdr if PN_XNUM]

Only the header block and the notes live in memory; every other byte is
described by :meth:`CoreLayout.pieces` as either memory to read from the
target or zeros, so any ``(offset, length)`` can be served without building
the core.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from corepeek_format.elfstructs import EHDR, PHDR, SHDR, pack_phdr

from ..arch.base import ArchSpec
from .constants import (ELFDATA2LSB, ELFMAG, ET_CORE, EV_CURRENT, PAGE_SIZE, PN_XNUM,
                        SHT_NULL, ElfClass, PFlags, PType)
from .model import DumpedMapping

@dataclass(frozen=True)
class SegmentLayout:
    """One PT_LOAD: where its bytes live in the file and in the target."""

    file_offset: int
    vaddr: int
    file_size: int
    mem_size: int
    flags: int
    name: str
    file_page_offset: int
    shared: bool


@dataclass(frozen=True)
class Bytes:
    """Literal core bytes (headers, notes, section header)."""

    data: bytes


@dataclass(frozen=True)
class Memory:
    """``length`` bytes of target memory at ``vaddr``, inside segment ``segment``."""

    vaddr: int
    length: int
    segment: int


@dataclass(frozen=True)
class Zeros:
    length: int


Piece = Bytes | Memory | Zeros

ELF32_MAX_OFFSET = 0xFFFFFFFF


class CoreTooLarge(ValueError):
    """A file offset of the core does not fit the ELF class's 32-bit fields."""


def _phdr(cls: ElfClass, ptype: int, flags: int, offset: int, vaddr: int,
          filesz: int, memsz: int, align: int) -> bytes:
    return pack_phdr(cls, ptype, flags, offset, vaddr, 0, filesz, memsz, align)


def _pflags(perms: str) -> int:
    return ((PFlags.PF_R if perms[0] == "r" else 0) | (PFlags.PF_W if perms[1] == "w" else 0)
            | (PFlags.PF_X if perms[2] == "x" else 0))


def _check_elf32_offsets(notes_offset: int, segments: Sequence[SegmentLayout],
                         e_shoff: int) -> None:
    """Every p_offset (and e_shoff) of an ELF32 core must fit 32 bits: the
    kernel's compat core writer would silently truncate them."""
    worst = max([notes_offset, e_shoff] + [s.file_offset for s in segments])
    if worst > ELF32_MAX_OFFSET:
        dumped = sum(s.file_size for s in segments)
        raise CoreTooLarge(
            f"its 32-bit core would need file offsets up to {worst} bytes, over the ELF32 "
            f"limit of {ELF32_MAX_OFFSET} ({dumped} bytes of memory to dump in "
            f"{len(segments)} segments)")


@dataclass(frozen=True)
class CoreLayout:
    """Header block, notes and segment table of one core."""

    arch: ArchSpec
    header: bytes                    # Ehdr + Phdrs
    notes: bytes
    notes_offset: int
    data_offset: int                 # first byte of segment data (page aligned)
    segments: tuple[SegmentLayout, ...]
    section_header: bytes            # b"" unless PN_XNUM
    total_size: int

    @property
    def section_header_offset(self) -> int:
        return self.total_size - len(self.section_header)

    @classmethod
    def build(cls, arch: ArchSpec, notes: bytes,
              mappings: Sequence[DumpedMapping]) -> CoreLayout:
        ec = arch.elf_class
        ehdr_size, phdr_size, shdr_size = EHDR[ec].size, PHDR[ec].size, SHDR[ec].size
        segs = len(mappings) + 1                     # + PT_NOTE
        e_phnum = PN_XNUM if segs > PN_XNUM else segs
        notes_offset = ehdr_size + segs * phdr_size
        data_offset = -(-(notes_offset + len(notes)) // PAGE_SIZE) * PAGE_SIZE

        segments: list[SegmentLayout] = []
        offset = data_offset
        for d in mappings:
            m = d.mapping
            segments.append(SegmentLayout(offset, m.start, d.dump_size, m.size,
                                          _pflags(m.perms), m.path, m.offset, m.shared))
            offset += d.dump_size
        e_shoff = offset if e_phnum == PN_XNUM else 0
        if ec == ElfClass.ELF32:
            _check_elf32_offsets(notes_offset, segments, e_shoff)
        section_header = b""
        if e_phnum == PN_XNUM:
            # sh_info carries the real program header count (fill_extnum_info()).
            section_header = SHDR[ec].pack(0, SHT_NULL, 0, 0, 0, 1, 0, segs, 0, 0)
        ident = ELFMAG + bytes([ec, ELFDATA2LSB, EV_CURRENT]) + bytes(9)
        ehdr = EHDR[ec].pack(ident, ET_CORE, arch.machine, EV_CURRENT, 0,
                           ehdr_size, e_shoff, 0, ehdr_size, phdr_size, e_phnum,
                           shdr_size if section_header else 0,
                           1 if section_header else 0, 0)
        phdrs = [_phdr(ec, PType.PT_NOTE, 0, notes_offset, 0, len(notes), 0, 4)]
        phdrs += [_phdr(ec, PType.PT_LOAD, s.flags, s.file_offset, s.vaddr, s.file_size,
                        s.mem_size, PAGE_SIZE) for s in segments]
        header = ehdr + b"".join(phdrs)
        total = offset + len(section_header)
        return cls(arch, header, notes, notes_offset, data_offset, tuple(segments),
                   section_header, total)

    # -- offset lookup -----------------------------------------------------

    def pieces(self, offset: int, length: int) -> list[Piece]:
        """Describe core bytes [offset, offset+length) clipped to the file size."""
        end = min(offset + length, self.total_size)
        out: list[Piece] = []
        pos = offset
        while pos < end:
            piece = self._piece_at(pos, end)
            out.append(piece)
            pos += len(piece.data) if isinstance(piece, Bytes) else piece.length
        return out

    def _piece_at(self, pos: int, end: int) -> Piece:
        if pos < len(self.header):
            return Bytes(self.header[pos:min(end, len(self.header))])
        notes_end = self.notes_offset + len(self.notes)
        if self.notes_offset <= pos < notes_end:
            return Bytes(self.notes[pos - self.notes_offset:min(end, notes_end) - self.notes_offset])
        if pos < self.data_offset:
            return Zeros(min(end, self.data_offset) - pos)
        shoff = self.section_header_offset
        if self.section_header and pos >= shoff:
            return Bytes(self.section_header[pos - shoff:end - shoff])
        index = bisect.bisect_right(self._starts, pos) - 1
        seg = self.segments[index]
        # Segments with file_size 0 share offsets with their successor; bisect
        # lands on the last segment starting at or before pos, which holds it.
        inner = pos - seg.file_offset
        return Memory(seg.vaddr + inner, min(end, seg.file_offset + seg.file_size) - pos, index)

    @cached_property
    def _starts(self) -> list[int]:
        return [s.file_offset for s in self.segments]
