"""NT_X86_XSAVE_LAYOUT exactly as the kernel writes it.

``dump_xsave_layout_desc`` (arch/x86/kernel/fpu/xstate.c) emits one
``struct x86_xfeat_component {u32 type, size, offset, flags}`` for every
extended feature (bit 2 and up) of ``fpu_user_cfg.max_features``, in bit order,
with size/offset from CPUID(0xD, bit).EAX/EBX and ``flags = 0`` ("reserved for
future use"). CPUID's ECX is not copied: on AMX CPUs it is non-zero (bit 1:
64-byte aligned, bit 2: XFD), which is how corepeek's note once differed.

The CPUID table below is the one measured on an Intel Xeon with AMX
(features 0x602e7, XSAVE size 0x2b00 = 11008 bytes).
"""

from __future__ import annotations

import struct

import pytest

from corepeek_agent.arch import I386, X86_64
from corepeek_agent.arch.x86_xsave import (NT_X86_XSAVE_LAYOUT, cpuid, extra_notes,
                                           layout_records, xsave_layout_desc)
from corepeek_agent.elfcore.constants import NoteType
from corepeek_agent.elfcore.model import ProcessState, ThreadState
from corepeek_agent.elfcore.notes import build_notes

AMX_FEATURES = 0x602E7          # x87 SSE AVX opmask ZMM_Hi256 Hi16_ZMM PKRU XTILECFG XTILEDATA
AMX_LEAF_D = {                  # sub-leaf: (EAX size, EBX offset, ECX flags, EDX)
    2: (0x100, 0x240, 0, 0), 5: (0x40, 0x440, 0, 0), 6: (0x200, 0x480, 0, 0),
    7: (0x400, 0x680, 0, 0), 9: (0x8, 0xA80, 0, 0),
    17: (0x40, 0xAC0, 0x2, 0), 18: (0x2000, 0xB00, 0x6, 0),
}
XCR0_OFFSET = 464               # sw_reserved[USER_XSTATE_XCR0_WORD] in the FXSAVE area

PROC = ProcessState(pid=100, ppid=1, pgrp=100, sid=100, uid=0, gid=0, state="S", nice=0,
                    flags=0, comm="t", psargs=b"t", auxv=struct.pack("<2Q", 0, 0))


def _records(desc: bytes) -> list[tuple[int, int, int, int]]:
    assert len(desc) % 16 == 0
    return list(struct.iter_unpack("<IIII", desc))


def _xstate(features: int, size: int = 832) -> bytes:
    buf = bytearray(size)
    struct.pack_into("<Q", buf, XCR0_OFFSET, features)
    return bytes(buf)


def _real_features() -> int:
    """The XCR0 bits this CPU supports (CPUID(0xD, 0) EDX:EAX): a mask it knows."""
    regs = cpuid(0xD, 0)
    if regs is None:
        pytest.skip("CPUID cannot be executed here")
    return regs[0] | regs[3] << 32


# -- the encoding, on a known CPU ---------------------------------------------------------


def test_given_amx_cpuid_then_records_carry_size_and_offset_and_zero_flags() -> None:
    desc = layout_records(AMX_FEATURES, AMX_LEAF_D.get)
    assert _records(desc) == [
        (2, 0x100, 0x240, 0), (5, 0x40, 0x440, 0), (6, 0x200, 0x480, 0), (7, 0x400, 0x680, 0),
        (9, 0x8, 0xA80, 0), (17, 0x40, 0xAC0, 0), (18, 0x2000, 0xB00, 0)]


def test_given_only_x87_and_sse_then_the_note_is_empty_not_absent() -> None:
    # Kernel commit c8161e5304ab: zero records is valid, the note header is still written.
    assert layout_records(0x3, AMX_LEAF_D.get) == b""
    assert extra_notes([(NoteType.NT_X86_XSTATE, _xstate(0x3))]) == [(NT_X86_XSAVE_LAYOUT, b"")]


def test_given_an_unreadable_sub_leaf_then_no_layout_is_guessed() -> None:
    assert layout_records(AMX_FEATURES, {2: (0x100, 0x240, 0, 0)}.get) is None


def test_given_no_xcr0_word_then_no_note() -> None:
    assert extra_notes([(NoteType.NT_X86_XSTATE, _xstate(0))]) == []
    assert extra_notes([(NoteType.NT_X86_XSTATE, b"\0" * 100)]) == []   # too short
    assert extra_notes([(NoteType.NT_PRFPREG, _xstate(AMX_FEATURES))]) == []


# -- on this CPU ---------------------------------------------------------------------------


def test_on_this_cpu_every_record_is_cpuid_size_and_offset_with_flags_zero() -> None:
    features = _real_features()
    desc = xsave_layout_desc(features)
    assert desc is not None
    records = _records(desc)
    assert [t for t, *_ in records] == [b for b in range(2, 64) if features >> b & 1]
    for bit, size, offset, flags in records:
        eax, ebx, _, _ = cpuid(0xD, bit)           # type: ignore[misc]
        assert (size, offset, flags) == (eax, ebx, 0), f"feature {bit}"


@pytest.mark.parametrize("arch", [X86_64, I386], ids=["x86_64", "i386"])
def test_given_a_thread_xstate_then_the_layout_note_comes_last_and_is_the_same_for_both_arches(
        arch) -> None:  # type: ignore[no-untyped-def]
    features = _real_features()
    thread = ThreadState(tid=100, frozen=True, gpregs=bytes(arch.gpregs_size),
                         regsets=((NoteType.NT_X86_XSTATE, _xstate(features)),))
    raw = build_notes(arch, PROC, [thread], [])
    desc = xsave_layout_desc(features)
    assert desc is not None
    tail = struct.pack("<III", 6, len(desc), NT_X86_XSAVE_LAYOUT) + b"LINUX\0\0\0" + desc
    assert raw.endswith(tail)
    assert all(flags == 0 for *_, flags in _records(desc))
