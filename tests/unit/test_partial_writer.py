"""Partial cores on bytes: header parsing, the partial layout, the seekable file.

Full cores here are made by the agent's own pure CoreLayout from synthetic
mappings whose memory byte at ``v`` is a function of ``v``; partial cores
are judged with pyelftools.  A fake RemoteCore serves a materialised core
with the agent's (offset, length) semantics, so ``RemoteCoreFile`` and
``write_partial_core`` run end to end without a process.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from elftools.elf.elffile import ELFFile

from corepeek import partial
from corepeek.errors import CaptureError
from corepeek.remote import Piece, RemoteCoreFile, TransferStats
from corepeek.v1 import capture_pb2 as pb
from corepeek_agent.arch import I386, X86_64
from corepeek_agent.arch.base import ArchSpec
from corepeek_format import regions
from corepeek_agent.elfcore.constants import PAGE_SIZE, PN_XNUM
from corepeek_agent.elfcore.layout import Bytes, CoreLayout, Zeros
from corepeek_agent.elfcore.model import DumpedMapping, Mapping
from corepeek_agent.elfcore.notes import encode_note

P = PAGE_SIZE


def mem_byte(v: int) -> int:
    return (v * 7 + (v >> 12)) % 251


def mem(v: int, n: int) -> bytes:
    return bytes(mem_byte(x) for x in range(v, v + n))


def make_layout(arch: ArchSpec = X86_64, count: int = 0) -> CoreLayout:
    maps = [
        DumpedMapping(Mapping(0x400000, 0x402000, "r--p", 0, 5, "/bin/app"), P),
        DumpedMapping(Mapping(0x402000, 0x405000, "r-xp", 0x2000, 5, "/bin/app"), 0),
        DumpedMapping(Mapping(0x405000, 0x407000, "rw-p", 0x5000, 5, "/bin/app"), 2 * P),
        DumpedMapping(Mapping(0x407000, 0x409000, "rw-p", 0, 0, "[heap]"), 2 * P),
        DumpedMapping(Mapping(0x7000_0000, 0x7000_1000, "---p", 0, 0, ""), 0),
        DumpedMapping(Mapping(0x7000_1000, 0x7001_1000, "rw-p", 0, 0, ""), 0x10000),
        DumpedMapping(Mapping(0x7ff0_0000, 0x7ff0_4000, "rw-p", 0, 0, "[stack]"), 4 * P),
    ]
    maps += [DumpedMapping(Mapping(0x1000_0000 + i * 2 * P, 0x1000_0000 + i * 2 * P + P,
                                   "r--p", 0, 0, ""), 0) for i in range(count)]
    notes = encode_note(1, bytes(336)) + encode_note(6, bytes(64)) + encode_note(0x202, b"x" * 9)
    return CoreLayout.build(arch, notes, maps)


def materialise(lay: CoreLayout) -> bytes:
    out = bytearray()
    for p in lay.pieces(0, lay.total_size):
        if isinstance(p, Bytes):
            out += p.data
        elif isinstance(p, Zeros):
            out += bytes(p.length)
        else:
            out += mem(p.vaddr, p.length)
    return bytes(out)


def write_plan(plan: partial.PartialPlan, full: bytes) -> bytes:
    out = bytearray(plan.size)
    out[:len(plan.header)] = plan.header
    for c in plan.notes + plan.data:
        out[c.dst:c.dst + c.length] = full[c.src:c.src + c.length]
    if plan.section_header:
        o = plan.section_header_offset
        out[o:o + len(plan.section_header)] = plan.section_header
    return bytes(out)


def loads_of(data: bytes) -> list:  # type: ignore[type-arg]
    return [s for s in ELFFile(io.BytesIO(data)).iter_segments() if s["p_type"] == "PT_LOAD"]


def check_partial(lay: CoreLayout, full: bytes, data: bytes, keep: list[tuple[int, int]]) -> None:
    """The partial core keeps every mapping, exactly the kept dumped bytes, and the notes."""
    elf = ELFFile(io.BytesIO(data))
    assert elf.header.e_type == "ET_CORE"
    assert elf.elfclass == (64 if lay.arch.elf_class == 2 else 32)
    note = next(s for s in elf.iter_segments() if s["p_type"] == "PT_NOTE")
    assert note.data() == lay.notes
    loads = loads_of(data)
    # every mapping is still covered, exactly, in address order, without overlap
    pieces = [(s["p_vaddr"], s["p_memsz"]) for s in loads]
    assert pieces == sorted(pieces)
    assert regions.merge(pieces) == regions.merge((s.vaddr, s.mem_size) for s in lay.segments)
    assert sum(n for _, n in pieces) == sum(s.mem_size for s in lay.segments)
    # data-carrying pieces hold the target's bytes at congruent offsets
    held: list[tuple[int, int]] = []
    for s in loads:
        if s["p_filesz"]:
            assert s["p_filesz"] == s["p_memsz"]
            assert s["p_offset"] % P == s["p_vaddr"] % P
            assert s.data() == mem(s["p_vaddr"], s["p_filesz"])
            held.append((s["p_vaddr"], s["p_filesz"]))
    # ... and they are exactly the kept bytes the full core had
    want: list[tuple[int, int]] = []
    for seg in lay.segments:
        for off, n in keep:
            lo, hi = max(off, seg.file_offset), min(off + n, seg.file_offset + seg.file_size)
            if lo < hi:
                want.append((seg.vaddr + lo - seg.file_offset, hi - lo))
    assert regions.merge(held) == regions.merge(want)


@pytest.mark.parametrize("arch", [X86_64, I386], ids=["elf64", "elf32"])
def test_given_a_full_core_header_when_parsed_then_loads_match_the_layout(arch: ArchSpec) -> None:
    lay = make_layout(arch)
    hdr = partial.parse_core_header(lay.header)
    assert hdr.elf_class == arch.elf_class and hdr.e_machine == arch.machine
    assert [(p.p_vaddr, p.p_memsz, p.p_filesz, p.p_offset, p.p_flags) for p in hdr.loads] == [
        (s.vaddr, s.mem_size, s.file_size, s.file_offset, s.flags) for s in lay.segments]
    assert hdr.phdrs[0].p_type == partial.PT_NOTE
    assert hdr.phdrs[0].p_offset == lay.notes_offset


@pytest.mark.parametrize("arch", [X86_64, I386], ids=["elf64", "elf32"])
def test_notes_only_keeps_every_mapping_with_no_bytes(arch: ArchSpec) -> None:
    lay = make_layout(arch)
    full = materialise(lay)
    plan = partial.plan_partial(partial.parse_core_header(lay.header), [])
    data = write_plan(plan, full)
    check_partial(lay, full, data, [])
    assert all(s["p_filesz"] == 0 for s in loads_of(data))
    assert plan.loads == len(lay.segments) and plan.loads_with_data == 0
    assert plan.data == () and plan.memory_bytes == 0
    assert plan.size == -(-(plan.notes[0].dst + len(lay.notes)) // P) * P
    assert plan.size < P + len(lay.header) + len(lay.notes) + P


@pytest.mark.parametrize("arch", [X86_64, I386], ids=["elf64", "elf32"])
def test_kept_sub_ranges_become_their_own_loads(arch: ArchSpec) -> None:
    lay = make_layout(arch)
    full = materialise(lay)
    seg = {s.vaddr: s for s in lay.segments}
    stack, thread = seg[0x7FF0_0000], seg[0x7000_1000]
    keep = [
        (stack.file_offset + 2 * P, 2 * P),                        # top of the main stack
        (thread.file_offset + 0x8000 + 40, 100),                   # inside a thread stack
        (thread.file_offset + 0x9000, 8),                          # ... twice
        (seg[0x400000].file_offset, P),                            # a header page
        (seg[0x405000].file_offset + 2 * P - 16, 16 + 24),         # runs into the heap
        (0, 64),                                                   # the ELF header: ignored
        (lay.notes_offset, 10),                                    # the notes: ignored
    ]
    plan = partial.plan_partial(partial.parse_core_header(lay.header), keep)
    data = write_plan(plan, full)
    check_partial(lay, full, data, keep)
    # the thread stack became: gap, 100 bytes, gap, 8 bytes, gap
    loads = [(s["p_vaddr"], s["p_memsz"], s["p_filesz"]) for s in loads_of(data)
             if thread.vaddr <= s["p_vaddr"] < thread.vaddr + thread.mem_size]
    assert loads == [(thread.vaddr, 0x8000 + 40, 0), (thread.vaddr + 0x8000 + 40, 100, 100),
                     (thread.vaddr + 0x8000 + 140, 0x9000 - 0x8000 - 140, 0),
                     (thread.vaddr + 0x9000, 8, 8),
                     (thread.vaddr + 0x9008, thread.mem_size - 0x9008, 0)]
    # what is fetched: the kept segment bytes, touching copies joined across segments
    data_seg = seg[0x405000]
    assert (data_seg.file_offset + 2 * P - 16, 40) in plan.fetch_ranges()
    assert plan.memory_bytes == 2 * P + 100 + 8 + P + 40


def test_destinations_split_a_read_across_copies() -> None:
    lay = make_layout()
    seg = {s.vaddr: s for s in lay.segments}
    data_seg = seg[0x405000]
    start = data_seg.file_offset + 2 * P - 16
    plan = partial.plan_partial(partial.parse_core_header(lay.header), [(start, 40)])
    dests = plan.destinations(start - 100, 1000)
    assert [(c.src, c.length) for c in dests] == [(start, 16), (start + 16, 24)]
    assert plan.destinations(0, 10) == []


def test_random_keeps_always_give_a_valid_partial_core() -> None:
    lay = make_layout()
    full = materialise(lay)
    hdr = partial.parse_core_header(lay.header)
    rng = random.Random(3)
    for _ in range(40):
        keep = [(rng.randrange(lay.data_offset, lay.total_size), rng.randrange(1, 3 * P))
                for _ in range(rng.randrange(0, 8))]
        plan = partial.plan_partial(hdr, keep)
        check_partial(lay, full, write_plan(plan, full), keep)


def test_more_than_pn_xnum_segments_use_the_section_header() -> None:
    lay = make_layout(count=PN_XNUM)
    assert lay.section_header
    hdr = partial.parse_core_header(lay.header, lay.section_header)
    assert len(hdr.loads) == len(lay.segments)
    with pytest.raises(partial.PartialCoreError):
        partial.parse_core_header(lay.header)
    seg = next(s for s in lay.segments if s.vaddr == 0x7FF0_0000)
    plan = partial.plan_partial(hdr, [(seg.file_offset + P, P)])
    data = write_plan(plan, materialise(lay))
    elf = ELFFile(io.BytesIO(data))
    assert elf.header.e_phnum == PN_XNUM and elf.num_segments() == len(plan.phdrs)
    assert len(plan.phdrs) == len(lay.segments) + 3            # PT_NOTE + one split
    held = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD" and s["p_filesz"]]
    assert [(s["p_vaddr"], s.data()) for s in held] == [(seg.vaddr + P, mem(seg.vaddr + P, P))]


@pytest.mark.parametrize("blob, why", [
    (b"not an elf file at all" * 4, "not an ELF"),
    (b"\x7fELF\x03\x01\x01" + bytes(60), "class"),
])
def test_bad_headers_are_refused(blob: bytes, why: str) -> None:
    with pytest.raises(partial.PartialCoreError, match=why):
        partial.parse_core_header(blob)


def test_an_executable_header_is_not_a_core() -> None:
    lay = make_layout()
    exe = bytearray(lay.header)
    exe[16] = 2                                                   # ET_EXEC
    with pytest.raises(partial.PartialCoreError, match="ET_CORE"):
        partial.parse_core_header(bytes(exe))


# -- a fake RemoteCore: the agent's read semantics over a materialised core ---------------


class FakeCore:
    def __init__(self, lay: CoreLayout, mode: int = pb.CAPTURE_MODE_FULL,
                 readable: list[tuple[int, int]] | None = None, sps: tuple[int, ...] = ()) -> None:
        self.full = materialise(lay)
        self.lay = lay
        readable = readable if readable is not None else [(0, lay.total_size)]
        self.readable = regions.merge(readable)
        self.layout = pb.CoreLayout(
            total_size=lay.total_size, elf_class=64 if lay.arch.elf_class == 2 else 32,
            arch=lay.arch.name, pid=1, mode=mode,
            headers=pb.ByteRange(offset=0, length=len(lay.header)),
            notes=pb.ByteRange(offset=lay.notes_offset, length=len(lay.notes)),
            section_headers=pb.ByteRange(offset=lay.section_header_offset if lay.section_header
                                         else 0, length=len(lay.section_header)),
            segments=[pb.Segment(file_offset=s.file_offset, vaddr=s.vaddr, file_size=s.file_size,
                                 mem_size=s.mem_size, flags=s.flags, name=s.name,
                                 file_page_offset=s.file_page_offset, shared=s.shared,
                                 stack=any(s.vaddr <= sp < s.vaddr + s.mem_size for sp in sps))
                      for s in lay.segments],
            threads=[pb.ThreadInfo(tid=i + 1, frozen=True, sp=sp) for i, sp in enumerate(sps)],
            readable=[pb.ByteRange(offset=o, length=n) for o, n in self.readable])
        self.stats = TransferStats()
        self.calls: list[tuple[int, int]] = []
        self.file = RemoteCoreFile(self)  # type: ignore[arg-type]

    @property
    def size(self) -> int:
        return self.lay.total_size

    def read_range(self, offset: int, length: int) -> Iterator[Piece]:
        self.calls.append((offset, length))
        end = min(offset + length, self.size)
        if end > offset and self.layout.mode != pb.CAPTURE_MODE_FULL and not regions.contains(
                self.readable, offset, end - offset):
            raise CaptureError("denied", grpc.StatusCode.PERMISSION_DENIED)
        self.stats.requests += 1
        for pos in range(offset, end, 1000):
            chunk = self.full[pos:min(end, pos + 1000)]
            self.stats.data_bytes += len(chunk)
            self.stats.record(pos, len(chunk))
            yield Piece(pos, chunk)

    def read_bytes(self, offset: int, length: int) -> bytes:
        return b"".join(p.data or b"" for p in self.read_range(offset, length))


def test_the_remote_file_parses_with_pyelftools_and_fetches_header_and_notes_whole() -> None:
    core = FakeCore(make_layout())
    elf = ELFFile(core.file)
    notes = [n["n_type"] for s in elf.iter_segments() if s["p_type"] == "PT_NOTE"
             for n in s.iter_notes()]
    assert notes == ["NT_PRSTATUS", "NT_AUXV", 0x202]
    lay = core.lay
    assert core.calls == [(0, len(lay.header)), (lay.notes_offset, len(lay.notes))]
    assert core.file.fetched_ranges() == [(0, lay.notes_offset + len(lay.notes))]


def test_the_remote_file_reads_windows_clipped_to_segments_and_never_refetches() -> None:
    lay = make_layout()
    core = FakeCore(lay)
    f = core.file
    f.readahead = 3 * P
    seg = next(s for s in lay.segments if s.vaddr == 0x7000_1000)
    f.seek(seg.file_offset + 5 * P + 10)
    assert f.read(100) == mem(seg.vaddr + 5 * P + 10, 100)
    assert core.calls == [(seg.file_offset + 3 * P, 3 * P)]        # aligned window
    f.seek(seg.file_offset + 3 * P)
    f.read(3 * P)
    assert len(core.calls) == 1                                     # all cached
    # a read spanning cached and uncached bytes fetches only what is missing
    f.seek(seg.file_offset + 5 * P)
    assert f.read(2 * P) == mem(seg.vaddr + 5 * P, 2 * P)
    assert core.calls[1] == (seg.file_offset + 6 * P, 3 * P)
    # the last window of a segment stops at the segment's end
    last = lay.segments[-1]
    f.seek(last.file_offset + last.file_size - 10)
    assert f.read(100) == mem(last.vaddr + last.file_size - 10, 10)
    assert core.calls[-1][0] + core.calls[-1][1] == lay.total_size


def test_the_remote_file_refuses_unreadable_offsets_without_a_round_trip() -> None:
    lay = make_layout()
    allowed = regions.notes_ranges(lay)
    core = FakeCore(lay, pb.CAPTURE_MODE_NOTES, allowed)
    f = core.file
    f.seek(lay.data_offset + 10)
    with pytest.raises(CaptureError) as err:
        f.read(10)
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert core.calls == []
    # a read that runs past the readable range stops at its end
    end = allowed[-1][0] + allowed[-1][1]
    f.seek(end - 8)
    assert f.read(100) == core.full[end - 8:end]


def test_the_remote_file_evicts_old_windows_but_keeps_header_and_notes() -> None:
    lay = make_layout()
    core = FakeCore(lay)
    f = RemoteCoreFile(core, readahead=P, cache_bytes=2 * P)  # type: ignore[arg-type]
    ELFFile(f)
    seg = next(s for s in lay.segments if s.vaddr == 0x7000_1000)
    for i in range(8):
        f.seek(seg.file_offset + i * P)
        assert f.read(P) == mem(seg.vaddr + i * P, P)
    calls = len(core.calls)
    f.seek(0)
    f.read(len(lay.header))                                           # still cached
    assert len(core.calls) == calls
    f.seek(seg.file_offset)
    assert f.read(16) == mem(seg.vaddr, 16)                           # evicted: fetched again
    assert len(core.calls) == calls + 1


# -- write_partial_core end to end on the fake ------------------------------------------------


@pytest.mark.parametrize("arch", [X86_64, I386], ids=["elf64", "elf32"])
def test_write_partial_core_in_a_stacks_session_fetches_only_readable_bytes(
        tmp_path: Path, arch: ArchSpec) -> None:
    lay = make_layout(arch)
    sps = (0x7000_1000 + 0xF000 + 8, 0x7FF0_3000)
    readable = regions.stacks_ranges(lay, sps, 8 << 20, [(0x405100, 40)])
    core = FakeCore(lay, pb.CAPTURE_MODE_STACKS, readable, sps)
    out = tmp_path / "core"

    result = partial.write_partial_core(core, out)  # type: ignore[arg-type]

    data = out.read_bytes()
    keep = [r for r in readable if r[0] >= lay.data_offset]
    check_partial(lay, core.full, data, keep)
    assert result.mode == "stacks" and result.file_size == len(data)
    assert result.memory_bytes == sum(n for _, n in keep)
    assert result.data_bytes == core.stats.data_bytes == regions.total(readable)
    assert result.fetched == tuple(keep)


def test_write_partial_core_notes_mode_fetches_header_and_notes_only(tmp_path: Path) -> None:
    lay = make_layout()
    core = FakeCore(lay, pb.CAPTURE_MODE_NOTES, regions.notes_ranges(lay))
    result = partial.write_partial_core(core, tmp_path / "core")  # type: ignore[arg-type]
    assert result.mode == "notes" and result.memory_bytes == 0 and result.fetched == ()
    assert core.stats.data_bytes == len(lay.header) + len(lay.notes)
    check_partial(lay, core.full, (tmp_path / "core").read_bytes(), [])


def test_a_notes_session_cannot_make_a_stacks_core(tmp_path: Path) -> None:
    lay = make_layout()
    core = FakeCore(lay, pb.CAPTURE_MODE_NOTES, regions.notes_ranges(lay))
    with pytest.raises(ValueError, match="notes session"):
        partial.write_partial_core(core, tmp_path / "c", mode="stacks")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'notes' or 'stacks'"):
        partial.write_partial_core(core, tmp_path / "c", mode="full")  # type: ignore[arg-type]


def test_a_full_session_plans_stacks_like_the_agent(tmp_path: Path) -> None:
    lay = make_layout()
    sps = (0x7000_1000 + 0xF000 + 8, 0x7FF0_3000)
    core = FakeCore(lay, pb.CAPTURE_MODE_FULL, None, sps)
    result = partial.write_partial_core(core, tmp_path / "c", mode="stacks")  # type: ignore[arg-type]
    # no auxv in these notes: the walk adds nothing, the plan is stacks + ELF headers
    want = regions.merge(regions.stack_ranges(lay, sps, partial.DEFAULT_STACK_BYTES)
                         + regions.object_header_ranges(lay))
    assert list(result.fetched) == want
