"""The ArchSpec seam: i386 facts, TLS activity, picking a task's architecture,
and proof that the generic note/layout code serves an architecture it has never
heard of (an aarch64-shaped spec defined here)."""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from corepeek_agent import procfs
from corepeek_agent.arch import ARCHES, I386, X86_64, ArchSpec, RegsetNote
from corepeek_agent.arch.base import select_arch
from corepeek_agent.arch.i386 import tls_in_use
from corepeek_agent.elfcore.constants import ElfClass, Machine, NoteType
from corepeek_agent.elfcore.layout import Bytes, CoreLayout
from corepeek_agent.elfcore.model import DumpedMapping, Mapping, ProcessState, ThreadState
from corepeek_agent.elfcore.notes import build_notes, prpsinfo, prstatus
from corepeek_agent.session import choose_arch

EM_ARM = 40


def _never() -> tuple[int, int]:
    raise AssertionError("the executable must not be consulted when the registers decide")


# -- i386 facts -------------------------------------------------------------------------


def test_i386_spec_describes_the_compat_core() -> None:
    assert (I386.elf_class, I386.machine, I386.word_size, I386.uid_size) == (
        ElfClass.ELF32, Machine.EM_386, 4, 2)
    assert I386.gpregs_size == 68 and I386.word_mask == 0xFFFFFFFF
    # x86_32_regsets order after REGSET32_GENERAL: FP, XFP, XSTATE, TLS, IOPERM.
    assert [r.note_type for r in I386.regsets] == [
        NoteType.NT_PRFPREG, NoteType.NT_PRXFPREG, NoteType.NT_X86_XSTATE,
        NoteType.NT_386_TLS, NoteType.NT_386_IOPERM]
    assert I386.syscall_insn == b"\xcd\x80"


def test_i386_pc_and_sp_are_eip_and_esp() -> None:
    # user_regs_struct: ebx ecx edx esi edi ebp eax xds xes xfs xgs orig_eax eip xcs eflags esp xss
    regs = struct.pack("<17I", *range(100, 117))
    assert (I386.pc(regs), I386.sp(regs)) == (112, 115)
    assert I386.pc(b"") == 0 and I386.sp(regs[:60]) == 0


def test_given_gcc_m32_then_user_regs_struct_agrees_with_the_i386_spec(tmp_path: Path) -> None:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    src, exe = tmp_path / "regs.c", tmp_path / "regs"
    src.write_text("#include <stdio.h>\n#include <stddef.h>\n#include <sys/user.h>\n"
                   "int main(void){printf(\"%zu %zu %zu\\n\", sizeof(struct user_regs_struct),"
                   " offsetof(struct user_regs_struct, eip), offsetof(struct user_regs_struct,"
                   " esp)); return 0;}\n")
    res = subprocess.run(["gcc", "-m32", "-o", str(exe), str(src)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip("gcc -m32 cannot build (gcc-multilib missing?)")
    size, eip, esp = map(int, subprocess.run([str(exe)], capture_output=True, text=True,
                                             check=True).stdout.split())
    assert (size, eip // 4, esp // 4) == (I386.gpregs_size, I386.pc_index, I386.sp_index)


# -- TLS activity (regset_tls_active) ------------------------------------------------------


def _desc(entry: int, base: int, limit: int, flags: int) -> bytes:
    return struct.pack("<IIII", entry, base, limit, flags)


EMPTY = 0x28        # read_exec_only | seg_not_present: how fill_user_desc shows an empty slot


@pytest.mark.parametrize("descs,active", [
    # glibc's thread pointer: base set, 4 GiB limit in pages, 32-bit, useable
    ([(12, 0xF7D00000, 0xFFFFF, 0x51), (13, 0, 0, EMPTY), (14, 0, 0, EMPTY)], True),
    ([(12, 0, 0, EMPTY), (13, 0, 0, EMPTY), (14, 0, 0, EMPTY)], False),
    # a present descriptor with base 0 and limit 0 is not empty (desc_empty tests the raw words)
    ([(12, 0, 0, 0x41), (13, 0, 0, EMPTY), (14, 0, 0, EMPTY)], True),
    ([(12, 0, 0, EMPTY), (13, 0, 0, EMPTY), (14, 0x1000, 0, EMPTY)], True),
    ([(12, 0, 0, 0), (13, 0, 0, 0), (14, 0, 0, 0)], False),
])
def test_tls_in_use_mirrors_regset_tls_active(descs: list[tuple[int, int, int, int]],
                                              active: bool) -> None:
    assert tls_in_use(b"".join(_desc(*d) for d in descs)) is active


def test_regset_note_activity() -> None:
    assert RegsetNote(NoteType.NT_PRFPREG).is_active(b"\x01")
    assert not RegsetNote(NoteType.NT_PRFPREG).is_active(b"")
    tls = next(r for r in I386.regsets if r.note_type == NoteType.NT_386_TLS)
    assert not tls.is_active(_desc(12, 0, 0, EMPTY) * 3)
    assert all(r.active is None for r in X86_64.regsets)


# -- picking a task's architecture --------------------------------------------------------


def test_registers_decide_without_reading_the_executable() -> None:
    assert select_arch(ARCHES.values(), 68, _never) is I386
    assert select_arch(ARCHES.values(), 216, _never) is X86_64


@pytest.mark.parametrize("ident,expected", [((32, Machine.EM_386), "i386"),
                                            ((64, Machine.EM_X86_64), "x86_64"),
                                            ((32, Machine.EM_X86_64), "x86_64"),   # x32: host
                                            ((0, 0), "x86_64")])
def test_without_registers_the_executable_then_the_host_decide(ident: tuple[int, int],
                                                               expected: str) -> None:
    assert select_arch(ARCHES.values(), 0, lambda: ident, host_machine="x86_64").name == expected


def test_agent_class_never_decides() -> None:
    # This test process is a 64-bit python; a 68-byte register set still means i386 ...
    assert choose_arch(os.getpid(), bytes(68)) is I386
    # ... and with no registers its own executable's header decides.
    assert procfs.exe_elf_ident(os.getpid()) == (64, Machine.EM_X86_64)
    assert choose_arch(os.getpid(), b"") is X86_64


def test_exe_elf_ident_of_a_gone_process_is_unknown() -> None:
    assert procfs.exe_elf_ident(2**22 + 12345) == (0, 0)


# -- the seam: a new architecture is one ArchSpec ------------------------------------------

# An aarch64-shaped spec as an arch/aarch64.py module would define it (see
# docs/architectures.md): user_pt_regs is regs[31], sp, pc, pstate (34 x u64).
AARCH64 = ArchSpec(
    name="aarch64", elf_class=ElfClass.ELF64, machine=Machine.EM_AARCH64, word_size=8,
    gpregs_size=34 * 8, pc_index=32, sp_index=31,
    regsets=(RegsetNote(NoteType.NT_PRFPREG), RegsetNote(0x401),      # NT_ARM_TLS
             RegsetNote(0x404)),                                      # NT_ARM_SYSTEM_CALL
    uid_size=4, syscall_insn=bytes.fromhex("010000d4"))               # svc #0
ARM = ArchSpec(
    name="arm", elf_class=ElfClass.ELF32, machine=EM_ARM,  # type: ignore[arg-type]
    word_size=4, gpregs_size=18 * 4, pc_index=15, sp_index=13,
    regsets=(), uid_size=2, syscall_insn=bytes.fromhex("000000ef"))   # svc #0 (A32)


def test_a_registered_aarch64_spec_is_picked_by_its_register_size() -> None:
    arches = [*ARCHES.values(), AARCH64]
    assert select_arch(arches, 272, _never) is AARCH64
    assert select_arch(arches, 68, _never) is I386
    assert select_arch(arches, 0, lambda: (64, Machine.EM_AARCH64)) is AARCH64
    assert select_arch(arches, 0, lambda: (0, 0), host_machine="aarch64") is AARCH64
    assert select_arch([AARCH64, ARM], 72, _never) is ARM


def test_generic_note_and_layout_code_serves_an_unknown_architecture() -> None:
    gpregs = struct.pack("<34Q", *range(34))
    thread = ThreadState(tid=7, frozen=True, gpregs=gpregs,
                         regsets=((NoteType.NT_PRFPREG, bytes(528)), (0x401, bytes(16)),
                                  (0x404, struct.pack("<i", 98))))
    proc = ProcessState(pid=7, ppid=1, pgrp=7, sid=7, uid=0, gid=0, state="S", nice=0,
                        flags=0, comm="a64", psargs=b"a64",
                        auxv=struct.pack("<4Q", 6, 65536, 0, 0))
    # elf_prstatus on arm64: 112 bytes of common fields + 272 of regs + pr_fpvalid, padded.
    assert len(prstatus(AARCH64, proc, thread, leader=True)) == 392
    assert len(prpsinfo(AARCH64, proc)) == 136
    assert (AARCH64.pc(gpregs), AARCH64.sp(gpregs)) == (32, 31)
    maps = [DumpedMapping(Mapping(0x400000, 0x410000, "r-xp", 0, 5, "/a64"), 0x10000)]
    notes = build_notes(AARCH64, proc, [thread], maps)
    layout = CoreLayout.build(AARCH64, notes, maps)
    core = b"".join(p.data if isinstance(p, Bytes) else bytes(p.length)
                    for p in layout.pieces(0, layout.total_size))
    elf = ELFFile(io.BytesIO(core))
    assert elf.elfclass == 64 and elf.header.e_machine == "EM_AARCH64"
    parsed = [(n["n_name"], n["n_type"], n["n_descsz"])
              for n in next(elf.iter_segments()).iter_notes()]
    assert parsed[0] == ("CORE", "NT_PRSTATUS", 392)
    assert parsed[5:] == [("CORE", "NT_FPREGSET", 528), ("LINUX", 0x401, 16),
                          ("LINUX", 0x404, 4)]
