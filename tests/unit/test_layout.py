"""CoreLayout: offsets, program headers, PN_XNUM and offset->piece lookup."""

from __future__ import annotations

import io
import random

import pytest
from elftools.elf.elffile import ELFFile

from corepeek_agent.arch import I386, X86_64
from corepeek_agent.elfcore.constants import PAGE_SIZE, PN_XNUM
from corepeek_agent.elfcore.layout import Bytes, CoreLayout, Memory, Zeros
from corepeek_agent.elfcore.model import DumpedMapping, Mapping
from corepeek_agent.elfcore.notes import encode_note


def _mapping(start: int, pages: int, perms: str = "rw-p", path: str = "") -> Mapping:
    return Mapping(start=start, end=start + pages * PAGE_SIZE, perms=perms, offset=0,
                   inode=0, path=path)


def _memory_of(layout: CoreLayout, mem: dict[int, int]) -> bytes:
    """Materialise the whole core with memory byte = fill value per segment."""
    out = bytearray()
    for p in layout.pieces(0, layout.total_size):
        if isinstance(p, Bytes):
            out += p.data
        elif isinstance(p, Zeros):
            out += bytes(p.length)
        else:
            out += bytes([mem[layout.segments[p.segment].vaddr]]) * p.length
    return bytes(out)


def test_given_three_mappings_when_built_then_pyelftools_reads_segments_back() -> None:
    maps = [DumpedMapping(_mapping(0x10000, 2), 2 * PAGE_SIZE),
            DumpedMapping(_mapping(0x20000, 3, "r-xp"), 0),
            DumpedMapping(_mapping(0x40000, 1, "r--p"), PAGE_SIZE)]
    notes = encode_note(6, b"\x00" * 16)
    layout = CoreLayout.build(X86_64, notes, maps)

    core = _memory_of(layout, {0x10000: 0xAA, 0x20000: 0xBB, 0x40000: 0xCC})

    assert len(core) == layout.total_size
    elf = ELFFile(io.BytesIO(core))
    assert elf.header.e_type == "ET_CORE" and elf.header.e_machine == "EM_X86_64"
    segs = list(elf.iter_segments())
    assert segs[0]["p_type"] == "PT_NOTE" and segs[0]["p_filesz"] == len(notes)
    loads = [s for s in segs if s["p_type"] == "PT_LOAD"]
    assert [(s["p_vaddr"], s["p_filesz"], s["p_memsz"], s["p_flags"]) for s in loads] == [
        (0x10000, 2 * PAGE_SIZE, 2 * PAGE_SIZE, 6), (0x20000, 0, 3 * PAGE_SIZE, 5),
        (0x40000, PAGE_SIZE, PAGE_SIZE, 4)]
    assert loads[0]["p_offset"] % PAGE_SIZE == 0
    assert loads[0].data() == b"\xaa" * 2 * PAGE_SIZE
    assert loads[2].data() == b"\xcc" * PAGE_SIZE


def test_given_random_ranges_when_pieced_then_they_equal_the_materialised_core() -> None:
    maps = [DumpedMapping(_mapping(0x100000 + i * 0x10000, 2), (i % 3) * PAGE_SIZE)
            for i in range(20)]
    layout = CoreLayout.build(X86_64, encode_note(6, b"x" * 100), maps)
    fills = {m.mapping.start: i + 1 for i, m in enumerate(maps)}
    whole = _memory_of(layout, fills)
    rng = random.Random(7)
    for _ in range(300):
        off = rng.randrange(0, layout.total_size + 100)
        n = rng.randrange(1, 3 * PAGE_SIZE)
        got = bytearray()
        for p in layout.pieces(off, n):
            if isinstance(p, Bytes):
                got += p.data
            elif isinstance(p, Zeros):
                got += bytes(p.length)
            else:
                assert isinstance(p, Memory)
                seg = layout.segments[p.segment]
                assert seg.vaddr <= p.vaddr and p.vaddr + p.length <= seg.vaddr + seg.file_size
                got += bytes([fills[seg.vaddr]]) * p.length
        assert bytes(got) == whole[off:off + n]


def test_given_past_end_read_then_no_pieces() -> None:
    layout = CoreLayout.build(X86_64, b"", [])
    assert layout.pieces(layout.total_size, 10) == []
    assert layout.pieces(layout.total_size + 1000, 10) == []


def test_given_more_than_65534_mappings_then_pn_xnum_and_section_header() -> None:
    count = PN_XNUM + 10
    maps = [DumpedMapping(_mapping(0x1000_0000 + i * 2 * PAGE_SIZE, 1), 0) for i in range(count)]
    layout = CoreLayout.build(X86_64, b"", maps)
    core = _memory_of(layout, {})
    elf = ELFFile(io.BytesIO(core))
    assert elf.header.e_phnum == PN_XNUM
    assert elf.header.e_shnum == 1
    # pyelftools resolves the real count from section 0's sh_info.
    assert elf.num_segments() == count + 1
    assert layout.section_header_offset == elf.header.e_shoff


def test_given_elf32_class_then_headers_are_32_bit() -> None:
    maps = [DumpedMapping(_mapping(0x8048000, 1, "r-xp"), PAGE_SIZE)]
    layout = CoreLayout.build(I386, b"", maps)
    elf = ELFFile(io.BytesIO(_memory_of(layout, {0x8048000: 1})))
    assert elf.elfclass == 32 and elf.header.e_machine == "EM_386"
    load = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"][0]
    assert (load["p_vaddr"], load["p_flags"], load["p_filesz"]) == (0x8048000, 5, PAGE_SIZE)


# -- ELF32 offsets ------------------------------------------------------------------------
#
# A 32-bit process maps less than 4 GiB, so only headers and notes on top of an
# almost full address space push a segment's p_offset past 2**32 - 1.  These
# synthetic layouts pin the limit exactly (tests/integration/test_compat32.py
# reaches it with a real i386 process).


def _filling(total_pages: int, maps: int) -> list[DumpedMapping]:
    """``maps`` - 1 adjacent anonymous mappings of ``total_pages`` - 1 pages and a
    one-page tail (the stack's place), all dumped."""
    per = (total_pages - 1) // (maps - 1)
    out = [DumpedMapping(_mapping(0x10000 + i * per * PAGE_SIZE, per), per * PAGE_SIZE)
           for i in range(maps - 1)]
    out.append(DumpedMapping(_mapping(0xFFFF0000, 1), PAGE_SIZE))
    return out


def test_elf32_core_whose_last_offset_passes_4_GiB_is_refused() -> None:
    from corepeek_agent.elfcore.layout import ELF32_MAX_OFFSET, CoreTooLarge
    maps = _filling((1 << 20) - 64, 4)          # 4 GiB - 256 KiB of dumped memory
    # Notes of 1 MiB put the last segment's offset beyond 2**32 - 1.
    with pytest.raises(CoreTooLarge) as exc:
        CoreLayout.build(I386, b"\0" * (1 << 20), maps)
    assert str(ELF32_MAX_OFFSET) in str(exc.value)
    # The same memory with small notes fits (the last offset stays below 4 GiB).
    layout = CoreLayout.build(I386, encode_note(1, b"\0" * 144), maps)
    assert layout.segments[-1].file_offset <= ELF32_MAX_OFFSET
    # And a 64-bit core has no such limit.
    assert CoreLayout.build(X86_64, b"\0" * (1 << 20), maps).segments[-1].file_offset > \
        ELF32_MAX_OFFSET


def test_elf32_limit_is_exact_at_the_last_segments_offset() -> None:
    from corepeek_agent.elfcore.layout import ELF32_MAX_OFFSET, CoreTooLarge
    tail = DumpedMapping(_mapping(0xF0000000, 1), PAGE_SIZE)
    body_pages = (1 << 20) - 2                  # data before the tail segment
    body = [DumpedMapping(_mapping(0x10000, body_pages), body_pages * PAGE_SIZE)]
    # Header block + notes padded to one page: the tail's offset is exactly
    # PAGE_SIZE + body = 2**32 - PAGE_SIZE: it fits ...
    fits = CoreLayout.build(I386, b"\0" * 1024, body + [tail])
    assert fits.segments[-1].file_offset == ELF32_MAX_OFFSET + 1 - PAGE_SIZE
    # ... and one more page of notes or memory before it does not.
    with pytest.raises(CoreTooLarge):
        CoreLayout.build(I386, b"\0" * PAGE_SIZE, body + [tail])
    more = [DumpedMapping(_mapping(0x10000, body_pages + 1), (body_pages + 1) * PAGE_SIZE)]
    with pytest.raises(CoreTooLarge):
        CoreLayout.build(I386, b"\0" * 1024, more + [tail])
