"""Which byte ranges of a core a partial capture needs (pure, from the layout).

``NOTES`` needs the header block and the notes.  ``STACKS`` adds, per frozen
thread, its stack from just below the stack pointer (the x86-64 red zone) up
to the end of the stack's mapping, capped; the first page of every mapped
ELF object (headers and build-id, as coredump_filter bit 4 keeps); special
mappings such as [vdso]; and ranges the caller found the dynamic linker's
shared-library list in, so a debugger can name the libraries.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .constants import PAGE_SIZE
from .layout import CoreLayout, SegmentLayout

RED_ZONE = 128

Range = tuple[int, int]   # (file offset, length)


def merge(ranges: Iterable[Range]) -> list[Range]:
    """Sort and coalesce overlapping or touching ranges; drop empty ones."""
    out: list[list[int]] = []
    for off, length in sorted(r for r in ranges if r[1] > 0):
        if out and off <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], off + length - out[-1][0])
        else:
            out.append([off, length])
    return [(a, b) for a, b in out]


def contains(ranges: Sequence[Range], offset: int, length: int) -> bool:
    """True if [offset, offset+length) lies inside the merged ``ranges``."""
    for off, n in ranges:
        if off <= offset and offset + length <= off + n:
            return True
    return False


def segment_for(layout: CoreLayout, vaddr: int) -> SegmentLayout | None:
    for seg in layout.segments:
        if seg.vaddr <= vaddr < seg.vaddr + seg.mem_size:
            return seg
    return None


def vaddr_range_to_file(layout: CoreLayout, vaddr: int, length: int) -> list[Range]:
    """File ranges holding target memory [vaddr, vaddr+length) (dumped bytes only)."""
    out: list[Range] = []
    end = vaddr + length
    for seg in layout.segments:
        lo, hi = max(vaddr, seg.vaddr), min(end, seg.vaddr + seg.file_size)
        if lo < hi:
            out.append((seg.file_offset + lo - seg.vaddr, hi - lo))
    return out


def notes_ranges(layout: CoreLayout) -> list[Range]:
    ranges = [(0, len(layout.header)), (layout.notes_offset, len(layout.notes))]
    if layout.section_header:
        ranges.append((layout.section_header_offset, len(layout.section_header)))
    return merge(ranges)


def stack_ranges(layout: CoreLayout, stack_pointers: Iterable[int], cap: int) -> list[Range]:
    out: list[Range] = []
    for sp in stack_pointers:
        seg = segment_for(layout, sp)
        if seg is None:
            continue
        lo = max(seg.vaddr, (sp - RED_ZONE) // PAGE_SIZE * PAGE_SIZE)
        hi = min(seg.vaddr + seg.mem_size, lo + cap)
        out += vaddr_range_to_file(layout, lo, hi - lo)
    return out


def object_header_ranges(layout: CoreLayout) -> list[Range]:
    """First page of file mappings at offset 0, and whole special mappings."""
    out: list[Range] = []
    for seg in layout.segments:
        if seg.file_size == 0:
            continue
        if seg.name.startswith("/") and seg.file_page_offset == 0:
            out.append((seg.file_offset, min(PAGE_SIZE, seg.file_size)))
        elif seg.name in ("[vdso]", "[vsyscall]"):
            out.append((seg.file_offset, seg.file_size))
    return out


def stacks_ranges(layout: CoreLayout, stack_pointers: Iterable[int], cap: int,
                  extra_vaddr_ranges: Iterable[tuple[int, int]] = ()) -> list[Range]:
    ranges = notes_ranges(layout) + stack_ranges(layout, stack_pointers, cap)
    ranges += object_header_ranges(layout)
    for vaddr, length in extra_vaddr_ranges:
        ranges += vaddr_range_to_file(layout, vaddr, length)
    return merge(ranges)
