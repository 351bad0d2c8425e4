"""Note encoding for native x86_64 targets: sizes and fields the kernel uses."""

from __future__ import annotations

import io
import struct

from elftools.elf.elffile import ELFFile

from corepeek_agent.arch import X86_64
from corepeek_agent.elfcore.constants import NoteType
from corepeek_agent.elfcore.layout import CoreLayout
from corepeek_agent.elfcore.model import DumpedMapping, Mapping, ProcessState, ThreadState
from corepeek_agent.elfcore.notes import build_notes, encode_note, nt_file, prpsinfo, prstatus, trim_auxv

PROC = ProcessState(pid=100, ppid=1, pgrp=100, sid=100, uid=1000, gid=1000, state="S",
                    nice=0, flags=0x400000, comm="target", psargs=b"./target --flag",
                    auxv=struct.pack("<8Q", 6, 4096, 25, 0x7fff0000, 0, 0, 99, 99))


def _thread(tid: int, frozen: bool = True) -> ThreadState:
    regs = bytes(range(216)) if frozen else b""
    return ThreadState(tid=tid, frozen=frozen, gpregs=regs,
                       regsets=((NoteType.NT_PRFPREG, b"\x01" * 512),) if frozen else ())


def test_struct_sizes_match_the_kernel() -> None:
    assert len(prstatus(X86_64, PROC, _thread(100), leader=True)) == 336
    assert len(prpsinfo(X86_64, PROC)) == 136


def test_given_unfrozen_thread_then_registers_are_zero_and_no_fp_note() -> None:
    body = prstatus(X86_64, PROC, _thread(101, frozen=False), leader=False)
    assert body[112:112 + 216] == bytes(216)
    assert struct.unpack_from("<i", body, 328)[0] == 0       # pr_fpvalid
    notes = build_notes(X86_64, PROC, [_thread(100), _thread(101, frozen=False)], [])
    elf = _parse_notes(notes)
    per_type = [n["n_type"] for n in elf]
    assert per_type.count("NT_PRSTATUS") == 2 and per_type.count("NT_FPREGSET") == 1


def test_note_order_matches_fill_note_info() -> None:
    notes = build_notes(X86_64, PROC, [_thread(100), _thread(101)], [])
    assert [n["n_type"] for n in _parse_notes(notes)] == [
        "NT_PRSTATUS", "NT_PRPSINFO", "NT_SIGINFO", "NT_AUXV", "NT_FILE", "NT_FPREGSET",
        "NT_PRSTATUS", "NT_FPREGSET"]


def test_auxv_is_cut_after_at_null() -> None:
    assert len(trim_auxv(X86_64, PROC.auxv)) == 48


def test_nt_file_lists_file_backed_mappings_only() -> None:
    maps = [DumpedMapping(Mapping(0x1000, 0x3000, "r--p", 0x2000, 7, "/bin/x"), 0),
            DumpedMapping(Mapping(0x5000, 0x6000, "rw-p", 0, 0, ""), 0),
            DumpedMapping(Mapping(0x7000, 0x8000, "r-xp", 0, 0, "[vdso]"), 0)]
    desc = nt_file(X86_64, maps)
    count, page = struct.unpack_from("<QQ", desc)
    assert (count, page) == (1, 4096)
    assert struct.unpack_from("<QQQ", desc, 16) == (0x1000, 0x3000, 2)
    assert desc[40:] == b"/bin/x\0"


def test_prpsinfo_fields() -> None:
    body = prpsinfo(X86_64, PROC)
    state, sname, zomb, nice = struct.unpack_from("<bcbb", body)
    assert (state, sname, zomb) == (1, b"S", 0)
    assert struct.unpack_from("<II", body, 16) == (1000, 1000)
    assert body[40:46] == b"target" and body[56:71] == b"./target --flag"


def _parse_notes(notes: bytes) -> list:  # type: ignore[type-arg]
    layout = CoreLayout.build(X86_64, notes, [])
    core = layout.header + bytes(layout.notes_offset - len(layout.header)) + notes
    core += bytes(layout.total_size - len(core))
    elf = ELFFile(io.BytesIO(core))
    seg = next(elf.iter_segments())
    return list(seg.iter_notes())


def test_encode_note_pads_name_and_desc() -> None:
    raw = encode_note(0x202, b"abc")
    assert raw == struct.pack("<III", 6, 3, 0x202) + b"LINUX\0\0\0" + b"abc\0"
