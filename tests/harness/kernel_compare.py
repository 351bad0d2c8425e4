"""Compare a corepeek core with the kernel's core of the same process, field by field.

The kernel dumps at the crash, corepeek at the freeze just before it.  What
cannot change in between must be equal byte for byte; what the crash itself
changes differs by design and is left out, each with its reason:

Equal, byte for byte:
  * the ELF header, the list of notes (owner, type, size, order) and the
    PT_LOAD table;
  * NT_AUXV, NT_FILE and NT_X86_XSAVE_LAYOUT (process-wide, deterministic);
  * NT_PRPSINFO except pr_state/pr_sname/pr_zomb and pr_flag: nice, uid,
    gid, pid, ppid, pgrp, sid, fname and psargs;
  * per thread, NT_PRSTATUS's pr_sighold, pr_pid, pr_ppid, pr_pgrp, pr_sid
    and pr_fpvalid, and NT_X86_XSTATE's software-reserved bytes 464..511
    (the kernel's xstate_fx_sw_bytes: the XCR0 mask and XSAVE size).

Different by design:
  * pr_state/pr_sname/pr_zomb: the state of the kernel's dumping thread in
    the middle of the dump (D on 6.18), not the sleeping or stopped state
    corepeek sees;
  * pr_flag: at the crash the task flags gain PF_SIGNALED and PF_POSTCOREDUMP
    (0x408 on 6.18);
  * NT_SIGINFO and NT_PRSTATUS's pr_info/pr_cursig/pr_sigpend: the kernel
    records the fatal signal in every thread; a live capture has none;
  * NT_PRSTATUS's times: CPU time keeps running until the crash;
  * registers (NT_PRSTATUS pr_reg, NT_PRFPREG, NT_PRXFPREG and the rest of
    NT_X86_XSTATE): the crashing thread's registers are those of signal
    delivery, running threads moved on.  Threads parked in a system call
    keep their pc and sp: callers check those themselves.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from elftools.elf.elffile import ELFFile

NT_PRSTATUS, NT_PRPSINFO, NT_AUXV = 1, 3, 6
NT_X86_XSTATE, NT_X86_XSAVE_LAYOUT = 0x202, 0x205
NT_FILE = 0x46494C45
DETERMINISTIC_NOTES = (NT_AUXV, NT_FILE, NT_X86_XSAVE_LAYOUT)
XSTATE_SW_RESERVED = slice(464, 512)


@dataclass(frozen=True)
class Structs:
    """Offsets in (compat_)elf_prpsinfo and (compat_)elf_prstatus for one ELF class."""

    psinfo_same: tuple[slice, ...]      # nice .. psargs (skipping state and pr_flag)
    prstatus_same: tuple[slice, ...]    # sighold, pid..sid, fpvalid
    pid_offset: int                     # pr_pid in prstatus


STRUCTS = {
    # elf_prpsinfo: state sname zomb nice, pad, flag@8 (8), uid@16 gid@20 pid@24 ppid@28
    # pgrp@32 sid@36 fname@40 psargs@56..136.  elf_prstatus: info@0 cursig@12 sigpend@16
    # sighold@24 pid@32 ppid@36 pgrp@40 sid@44 times@48..112 reg@112 fpvalid@328..332
    64: Structs((slice(3, 8), slice(16, 136)), (slice(24, 32), slice(32, 48), slice(328, 332)), 32),
    # compat: state sname zomb nice, flag@4 (4), uid@8 gid@10 (u16) pid@12 ppid@16 pgrp@20
    # sid@24 fname@28 psargs@44..124.  compat_elf_prstatus: info@0 cursig@12 sigpend@16
    # sighold@20 pid@24 ppid@28 pgrp@32 sid@36 times@40..72 reg@72 fpvalid@140..144
    32: Structs((slice(3, 4), slice(8, 124)), (slice(20, 24), slice(24, 40), slice(140, 144)), 24),
}


@dataclass
class CoreFile:
    """A core's ELF header, raw notes (owner, type, desc) and PT_LOAD table."""

    path: Path
    elfclass: int = 0
    header: dict = field(default_factory=dict)  # type: ignore[type-arg]
    notes: list[tuple[str, int, bytes]] = field(default_factory=list)
    loads: list[tuple[int, ...]] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path) -> "CoreFile":
        core = cls(path)
        with open(path, "rb") as f:
            elf = ELFFile(f)
            core.elfclass = elf.elfclass
            core.header = dict(elf.header)
            for seg in elf.iter_segments():
                if seg["p_type"] == "PT_NOTE":
                    core.notes = list(_parse_notes(seg.data()))
                elif seg["p_type"] == "PT_LOAD":
                    core.loads.append((seg["p_offset"], seg["p_vaddr"], seg["p_filesz"],
                                       seg["p_memsz"], seg["p_flags"], seg["p_align"]))
        return core

    def shape(self) -> list[tuple[str, int, int]]:
        return [(name, t, len(d)) for name, t, d in self.notes]

    def all_of(self, ntype: int) -> list[bytes]:
        return [d for _, t, d in self.notes if t == ntype]

    def threads(self) -> dict[int, dict[int, bytes]]:
        """{tid: {note type: desc}}: NT_PRSTATUS and the register sets after it
        (the process notes that follow the first thread's NT_PRSTATUS excluded)."""
        pid_at = STRUCTS[self.elfclass].pid_offset
        out: dict[int, dict[int, bytes]] = {}
        current: dict[int, bytes] = {}
        for _, t, d in self.notes:
            if t == NT_PRSTATUS:
                current = out.setdefault(struct.unpack_from("<i", d, pid_at)[0], {})
            if t not in (NT_PRPSINFO, NT_AUXV, NT_FILE, 0x53494749, NT_X86_XSAVE_LAYOUT):
                current[t] = d
        return out


def _parse_notes(raw: bytes):  # type: ignore[no-untyped-def]
    off = 0
    while off + 12 <= len(raw):
        namesz, descsz, ntype = struct.unpack_from("<III", raw, off)
        name = raw[off + 12:off + 12 + namesz].rstrip(b"\0").decode()
        doff = off + 12 + (namesz + 3) // 4 * 4
        yield name, ntype, raw[doff:doff + descsz]
        off = doff + (descsz + 3) // 4 * 4


def _fields(data: bytes, parts: tuple[slice, ...]) -> list[bytes]:
    return [data[p] for p in parts]


def assert_same_as_kernel(ours: Path, kernel: Path) -> tuple[CoreFile, CoreFile]:
    """Assert everything the module docstring lists as equal; returns both cores."""
    a, b = CoreFile.read(ours), CoreFile.read(kernel)
    assert a.elfclass == b.elfclass
    assert a.header == b.header, "ELF headers differ"
    assert a.shape() == b.shape(), "note lists differ"
    assert a.loads == b.loads, "PT_LOAD tables differ"
    for ntype in DETERMINISTIC_NOTES:
        assert a.all_of(ntype) == b.all_of(ntype), f"note {ntype:#x} differs from the kernel's"
    s = STRUCTS[a.elfclass]
    (psa,), (psb,) = a.all_of(NT_PRPSINFO), b.all_of(NT_PRPSINFO)
    assert _fields(psa, s.psinfo_same) == _fields(psb, s.psinfo_same), "NT_PRPSINFO differs"
    ta, tb = a.threads(), b.threads()
    assert set(ta) == set(tb)
    for tid, notes in ta.items():
        other = tb[tid]
        assert (_fields(notes[NT_PRSTATUS], s.prstatus_same)
                == _fields(other[NT_PRSTATUS], s.prstatus_same)), f"thread {tid}: NT_PRSTATUS"
        if NT_X86_XSTATE in notes:
            assert (notes[NT_X86_XSTATE][XSTATE_SW_RESERVED]
                    == other[NT_X86_XSTATE][XSTATE_SW_RESERVED]), f"thread {tid}: XSTATE sw bytes"
    return a, b
