"""regions: the core byte ranges NOTES and STACKS captures may read."""

from __future__ import annotations

from corepeek.v1 import capture_pb2 as pb
from corepeek_agent.arch import X86_64
from corepeek_format import regions
from corepeek_agent.elfcore.constants import PAGE_SIZE
from corepeek_agent.elfcore.layout import CoreLayout
from corepeek_agent.elfcore.model import DumpedMapping, Mapping
from corepeek_agent.elfcore.notes import encode_note

P = PAGE_SIZE


def _layout() -> CoreLayout:
    maps = [
        # an executable: ELF header page dumped, text not, data dumped
        DumpedMapping(Mapping(0x400000, 0x402000, "r--p", 0, 5, "/bin/app"), P),
        DumpedMapping(Mapping(0x402000, 0x405000, "r-xp", 0x2000, 5, "/bin/app"), 0),
        DumpedMapping(Mapping(0x405000, 0x406000, "rw-p", 0x5000, 5, "/bin/app"), P),
        # a thread stack (guard page not dumped) and the main stack
        DumpedMapping(Mapping(0x7000_0000, 0x7000_1000, "---p", 0, 0, ""), 0),
        DumpedMapping(Mapping(0x7000_1000, 0x7010_1000, "rw-p", 0, 0, ""), 0x100000),
        DumpedMapping(Mapping(0x7ff0_0000, 0x7ff2_1000, "rw-p", 0, 0, "[stack]"), 0x21000),
        DumpedMapping(Mapping(0x7ff3_0000, 0x7ff3_2000, "r-xp", 0, 0, "[vdso]"), 2 * P),
        # a library mapped at a non-zero offset only: no header page
        DumpedMapping(Mapping(0x7ff4_0000, 0x7ff4_1000, "r--p", 0x3000, 7, "/lib/x.so"), P),
    ]
    return CoreLayout.build(X86_64, encode_note(6, b"\0" * 32), maps)


def _seg(layout: CoreLayout, vaddr: int):  # type: ignore[no-untyped-def]
    return next(s for s in layout.segments if s.vaddr == vaddr)


def test_merge_coalesces_touching_and_overlapping_and_drops_empty() -> None:
    assert regions.merge([(10, 5), (0, 10), (30, 0), (14, 6), (40, 1)]) == [(0, 20), (40, 1)]
    assert regions.merge([]) == []


def test_contains_needs_the_whole_range_inside_one_merged_range() -> None:
    ranges = regions.merge([(0, 100), (200, 50)])
    assert regions.contains(ranges, 0, 100)
    assert regions.contains(ranges, 210, 40)
    assert not regions.contains(ranges, 90, 20)          # runs past the first range
    assert not regions.contains(ranges, 150, 1)          # in the gap
    assert not regions.contains(ranges, 240, 11)         # past the end of the last
    assert not regions.contains([], 0, 1)
    assert not regions.contains(ranges, 251, 1)


def test_vaddr_ranges_map_to_dumped_bytes_only() -> None:
    lay = _layout()
    hdr = _seg(lay, 0x400000)
    # the header page is dumped, the rest of that mapping is not
    assert regions.vaddr_range_to_file(lay, 0x400ff0, 0x20) == [(hdr.file_offset + 0xff0, 0x10)]
    assert regions.vaddr_range_to_file(lay, 0x403000, 0x100) == []        # text, not dumped
    data = _seg(lay, 0x405000)
    assert regions.vaddr_range_to_file(lay, 0x405010, 8) == [(data.file_offset + 0x10, 8)]


def test_stack_range_runs_from_below_sp_to_the_mapping_end_and_is_capped() -> None:
    lay = _layout()
    stack = _seg(lay, 0x7000_1000)
    sp = 0x7010_0F00
    lo = (sp - regions.RED_ZONE) // P * P
    assert regions.stack_ranges(lay, [sp], 8 << 20) == [
        (stack.file_offset + lo - stack.vaddr, 0x7010_1000 - lo)]
    # a cap smaller than the distance to the end cuts from the bottom up
    assert regions.stack_ranges(lay, [sp - 0x10000], P) == [
        (stack.file_offset + (sp - 0x10000 - regions.RED_ZONE) // P * P - stack.vaddr, P)]
    # the red zone never reaches below the mapping
    assert regions.stack_ranges(lay, [0x7000_1010], P)[0][0] == stack.file_offset
    # a stack pointer in no mapping, or a zero cap, gives nothing
    assert regions.stack_ranges(lay, [0x1000, 0], 8 << 20) == []
    assert regions.stack_ranges(lay, [sp], 0) == []


def test_object_headers_are_the_first_page_of_offset_zero_file_mappings_and_vdso() -> None:
    lay = _layout()
    got = regions.object_header_ranges(lay)
    hdr, vdso = _seg(lay, 0x400000), _seg(lay, 0x7ff3_0000)
    assert got == [(hdr.file_offset, P), (vdso.file_offset, 2 * P)]


def test_notes_ranges_are_the_header_block_and_the_notes() -> None:
    lay = _layout()
    assert regions.notes_ranges(lay) == [(0, lay.notes_offset + len(lay.notes))]


def test_stacks_ranges_add_notes_stacks_headers_and_extras_merged() -> None:
    lay = _layout()
    sp = 0x7ff2_0F00
    extra = [(0x405100, 40), (0x403000, 64)]          # one dumped, one not
    got = regions.stacks_ranges(lay, [sp], 8 << 20, extra_vaddr_ranges=extra)
    want = regions.merge(regions.notes_ranges(lay) + regions.stack_ranges(lay, [sp], 8 << 20)
                         + regions.object_header_ranges(lay)
                         + [(_seg(lay, 0x405000).file_offset + 0x100, 40)])
    assert got == want
    for off, n in got:
        assert regions.contains(got, off, n)


def test_protobuf_segments_plan_the_same_memory_ranges_as_the_layout() -> None:
    lay = _layout()
    pbs = [pb.Segment(file_offset=s.file_offset, vaddr=s.vaddr, file_size=s.file_size,
                      mem_size=s.mem_size, flags=s.flags, name=s.name,
                      file_page_offset=s.file_page_offset, shared=s.shared)
           for s in lay.segments]
    sps = [0x7010_0F00, 0x7ff2_0F00]
    extra = [(0x405100, 40)]
    from_pb = regions.memory_ranges(pbs, sps, 8 << 20, extra)
    from_layout = regions.memory_ranges(lay.segments, sps, 8 << 20, extra)
    assert from_pb == from_layout
    assert regions.merge(regions.notes_ranges(lay) + from_pb) == regions.stacks_ranges(
        lay, sps, 8 << 20, extra)
