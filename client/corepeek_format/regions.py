"""Which byte ranges of a core a partial capture needs (pure, from the layout).

``NOTES`` needs the header block and the notes.  ``STACKS`` adds, per frozen
thread, its stack from just below the stack pointer (the x86-64 red zone) up
to the end of the stack's mapping, capped; the first page of every mapped
ELF object (headers and build-id, as coredump_filter bit 4 keeps); special
mappings such as [vdso]; and ranges the caller found the dynamic linker's
shared-library list in (:mod:`corepeek_format.dynlink`), so a debugger can name
the libraries.

Ranges are ``(file offset, length)`` in the *full* core and only ever cover
bytes the full core holds (``file_size`` of a segment, never past it).  The
segment helpers take any objects with the :class:`SegmentLike` attributes and
a layout is anything with the :class:`LayoutLike` attributes (the agent's
``CoreLayout``), so the client can plan the same ranges from the protobuf
layout it received.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from typing import Protocol

from .elfstructs import PAGE_SIZE
from .ranges import merge_ranges

RED_ZONE = 128
SPECIAL_WHOLE = ("[vdso]", "[vsyscall]")

Range = tuple[int, int]   # (file offset, length)


class SegmentLike(Protocol):
    """What the range planning needs of a PT_LOAD (SegmentLayout, pb Segment)."""

    @property
    def file_offset(self) -> int: ...
    @property
    def vaddr(self) -> int: ...
    @property
    def file_size(self) -> int: ...
    @property
    def mem_size(self) -> int: ...
    @property
    def name(self) -> str: ...
    @property
    def file_page_offset(self) -> int: ...


class LayoutLike(Protocol):
    """What the planning needs of a whole core's layout (the agent's CoreLayout)."""

    @property
    def header(self) -> bytes: ...
    @property
    def notes_offset(self) -> int: ...
    @property
    def notes(self) -> bytes: ...
    @property
    def section_header(self) -> bytes: ...
    @property
    def section_header_offset(self) -> int: ...
    @property
    def segments(self) -> Sequence[SegmentLike]: ...


def merge(ranges: Iterable[Range]) -> list[Range]:
    """Sort and coalesce overlapping or touching ranges; drop empty ones."""
    return merge_ranges(ranges)


def contains(ranges: Sequence[Range], offset: int, length: int) -> bool:
    """True if [offset, offset+length) lies inside one of the merged, sorted ``ranges``."""
    i = bisect.bisect_right(ranges, (offset, float("inf"))) - 1
    if i < 0:
        return False
    off, n = ranges[i]
    return off <= offset and offset + length <= off + n


def total(ranges: Iterable[Range]) -> int:
    return sum(n for _, n in ranges)


class SegmentIndex:
    """Segments sorted by address, for vaddr lookups in O(log n)."""

    def __init__(self, segments: Sequence[SegmentLike]) -> None:
        self.segments = sorted(segments, key=lambda s: s.vaddr)
        self._starts = [s.vaddr for s in self.segments]

    def find(self, vaddr: int) -> SegmentLike | None:
        i = bisect.bisect_right(self._starts, vaddr) - 1
        if i >= 0 and vaddr < self.segments[i].vaddr + self.segments[i].mem_size:
            return self.segments[i]
        return None

    def to_file(self, vaddr: int, length: int) -> list[Range]:
        out: list[Range] = []
        end = vaddr + length
        i = max(0, bisect.bisect_right(self._starts, vaddr) - 1)
        for seg in self.segments[i:]:
            if seg.vaddr >= end:
                break
            lo, hi = max(vaddr, seg.vaddr), min(end, seg.vaddr + seg.file_size)
            if lo < hi:
                out.append((seg.file_offset + lo - seg.vaddr, hi - lo))
        return out


def segment_for(layout: LayoutLike | Sequence[SegmentLike], vaddr: int) -> SegmentLike | None:
    return _index(layout).find(vaddr)


def vaddr_range_to_file(layout: LayoutLike | Sequence[SegmentLike], vaddr: int,
                        length: int) -> list[Range]:
    """File ranges holding target memory [vaddr, vaddr+length) (dumped bytes only)."""
    return _index(layout).to_file(vaddr, length)


def notes_ranges(layout: LayoutLike) -> list[Range]:
    ranges = [(0, len(layout.header)), (layout.notes_offset, len(layout.notes))]
    if layout.section_header:
        ranges.append((layout.section_header_offset, len(layout.section_header)))
    return merge(ranges)


def stack_ranges(layout: LayoutLike | Sequence[SegmentLike] | SegmentIndex,
                 stack_pointers: Iterable[int], cap: int) -> list[Range]:
    """Per stack pointer: from just below it (red zone, page aligned) to its mapping's end."""
    out: list[Range] = []
    index = _index(layout)
    for sp in stack_pointers:
        seg = index.find(sp)
        if seg is None or cap <= 0:
            continue
        lo = max(seg.vaddr, (sp - RED_ZONE) // PAGE_SIZE * PAGE_SIZE)
        hi = min(seg.vaddr + seg.mem_size, lo + cap)
        out += index.to_file(lo, hi - lo)
    return out


def object_header_ranges(layout: LayoutLike | Sequence[SegmentLike]) -> list[Range]:
    """First page of file mappings at offset 0, and whole special mappings."""
    out: list[Range] = []
    for seg in _segments(layout):
        if seg.file_size == 0:
            continue
        if seg.name.startswith("/") and seg.file_page_offset == 0:
            out.append((seg.file_offset, min(PAGE_SIZE, seg.file_size)))
        elif seg.name in SPECIAL_WHOLE:
            out.append((seg.file_offset, seg.file_size))
    return out


def memory_ranges(segments: Sequence[SegmentLike], stack_pointers: Iterable[int], cap: int,
                  extra_vaddr_ranges: Iterable[tuple[int, int]] = ()) -> list[Range]:
    """The segment-data part of a STACKS capture (no header, no notes), merged."""
    index = SegmentIndex(segments)
    ranges = stack_ranges(index, stack_pointers, cap) + object_header_ranges(segments)
    for vaddr, length in extra_vaddr_ranges:
        ranges += index.to_file(vaddr, length)
    return merge(ranges)


def stacks_ranges(layout: LayoutLike, stack_pointers: Iterable[int], cap: int,
                  extra_vaddr_ranges: Iterable[tuple[int, int]] = ()) -> list[Range]:
    return merge(notes_ranges(layout)
                 + memory_ranges(layout.segments, stack_pointers, cap, extra_vaddr_ranges))


def _segments(layout: LayoutLike | Sequence[SegmentLike]) -> Sequence[SegmentLike]:
    segments = getattr(layout, "segments", None)   # a LayoutLike, or segments already
    return layout if segments is None else segments


def _index(layout: LayoutLike | Sequence[SegmentLike] | SegmentIndex) -> SegmentIndex:
    return layout if isinstance(layout, SegmentIndex) else SegmentIndex(_segments(layout))
