"""Encodings of a 32-bit (i386 compat) core: the kernel's compat structs.

Expected sizes and offsets are derived by hand from the kernel's structs
(include/linux/elfcore-compat.h, include/uapi/asm-generic/siginfo.h and
compat_siginfo in include/linux/compat.h, compiled for i386):

compat_elf_prstatus (144 bytes)::

    0   pr_info {si_signo, si_code, si_errno}  3 x s32
    12  pr_cursig s16 (+2 pad)
    16  pr_sigpend, 20 pr_sighold              compat_ulong_t
    24  pr_pid, 28 pr_ppid, 32 pr_pgrp, 36 pr_sid
    40  pr_utime, 48 pr_stime, 56 pr_cutime, 64 pr_cstime   old_timeval32 {s32, s32}
    72  pr_reg (17 x u32 = 68)
    140 pr_fpvalid s32

compat_elf_prpsinfo (124 bytes)::

    0 pr_state, 1 pr_sname, 2 pr_zomb, 3 pr_nice   char
    4 pr_flag compat_ulong_t, 8 pr_uid, 10 pr_gid  __compat_uid_t = u16
    12 pr_pid, 16 pr_ppid, 20 pr_pgrp, 24 pr_sid
    28 pr_fname[16], 44 pr_psargs[80]

When gcc with -m32 is available the same numbers are also checked against
glibc's <sys/procfs.h> and <signal.h>, which mirror the kernel's layouts.
"""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from corepeek_agent.arch import I386, X86_64
from corepeek_agent.elfcore.constants import PAGE_SIZE, PN_XNUM, NoteType
from corepeek_agent.elfcore.layout import Bytes, CoreLayout
from corepeek_agent.elfcore.model import DumpedMapping, Mapping, ProcessState, ThreadState
from corepeek_agent.elfcore.notes import (build_notes, nt_file, prpsinfo, prstatus, siginfo,
                                          siginfo_layout, siginfo_to_compat, trim_auxv)

AT_NULL, AT_PAGESZ, AT_SYSINFO = 0, 6, 32

PROC = ProcessState(pid=4242, ppid=1, pgrp=4242, sid=4000, uid=1000, gid=100, state="S",
                    nice=-5, flags=0x00400040, comm="threads-m32-target", psargs=b"./t32 -x 1",
                    utime_us=1_500_000, stime_us=250_000, cutime_us=7, cstime_us=9,
                    auxv=struct.pack("<6I", AT_SYSINFO, 0xF7F0E5E0, AT_PAGESZ, 4096, AT_NULL, 0))


def _gpregs(eip: int = 0x08049000, esp: int = 0xFFFFD000) -> bytes:
    regs = list(range(1, 18))
    regs[12], regs[15] = eip, esp
    return struct.pack("<17I", *regs)


TLS_IN_USE = (struct.pack("<IIII", 12, 0xF7D00000, 0xFFFFF, 0x51)
              + struct.pack("<IIII", 13, 0, 0, 0x28) + struct.pack("<IIII", 14, 0, 0, 0x28))


def _thread(tid: int, frozen: bool = True, tls: bool = True, sigpend: int = 0,
            sighold: int = 0) -> ThreadState:
    regsets: list[tuple[int, bytes]] = [(NoteType.NT_PRFPREG, b"\x01" * 108),
                                        (NoteType.NT_PRXFPREG, b"\x02" * 512),
                                        (NoteType.NT_X86_XSTATE, bytes(832))]
    if tls:
        regsets.append((NoteType.NT_386_TLS, TLS_IN_USE))
    return ThreadState(tid=tid, frozen=frozen, gpregs=_gpregs() if frozen else b"",
                       regsets=tuple(regsets) if frozen else (), sigpend=sigpend,
                       sighold=sighold, utime_us=3_000_001, stime_us=4)


def _notes(blob: bytes) -> list[tuple[bytes, int, bytes]]:
    out, off = [], 0
    while off < len(blob):
        namesz, descsz, ntype = struct.unpack_from("<III", blob, off)
        name = blob[off + 12:off + 12 + namesz].rstrip(b"\0")
        doff = off + 12 + (namesz + 3) // 4 * 4
        out.append((name, ntype, blob[doff:doff + descsz]))
        off = doff + (descsz + 3) // 4 * 4
    return out


def _materialise(layout: CoreLayout) -> bytes:
    """The whole core with every memory byte zero."""
    out = bytearray()
    for p in layout.pieces(0, layout.total_size):
        out += p.data if isinstance(p, Bytes) else bytes(p.length)
    return bytes(out)


# -- prstatus ------------------------------------------------------------------


def test_given_i386_thread_then_prstatus_is_144_bytes_with_compat_offsets() -> None:
    body = prstatus(I386, PROC, _thread(4243, sigpend=0x100, sighold=0x4002), leader=False,
                    cursig=11)
    assert len(body) == 144
    assert struct.unpack_from("<iiih", body, 0) == (11, 0, 0, 11)
    assert struct.unpack_from("<II", body, 16) == (0x100, 0x4002)
    assert struct.unpack_from("<iiii", body, 24) == (4243, 1, 4242, 4000)
    assert struct.unpack_from("<8i", body, 40) == (3, 1, 0, 4, 0, 7, 0, 9)   # thread times
    assert body[72:140] == _gpregs()
    assert struct.unpack_from("<i", body, 140) == (1,)                       # pr_fpvalid


def test_given_leader_then_prstatus_carries_the_group_times() -> None:
    body = prstatus(I386, PROC, _thread(4242), leader=True)
    assert struct.unpack_from("<4i", body, 40) == (1, 500_000, 0, 250_000)


def test_given_blocked_realtime_signals_then_compat_masks_keep_the_low_32_bits() -> None:
    # /proc SigBlk of a target blocking SIGUSR1 and every RT signal: 0xfffffffe00000200.
    # The kernel assigns sig[0] to a compat_ulong_t, so only signals 1-32 remain.
    mask = 0xFFFFFFFE_00000200
    body = prstatus(I386, PROC, _thread(4242, sigpend=mask, sighold=mask), leader=True)
    assert struct.unpack_from("<II", body, 16) == (0x200, 0x200)
    native = prstatus(X86_64, PROC, ThreadState(4242, True, bytes(216), sighold=mask),
                      leader=True)
    assert struct.unpack_from("<Q", native, 24) == (mask,)


def test_given_unfrozen_thread_then_registers_are_zero_and_fpvalid_clear() -> None:
    body = prstatus(I386, PROC, _thread(4244, frozen=False), leader=False)
    assert len(body) == 144 and body[72:140] == bytes(68)
    assert struct.unpack_from("<i", body, 140) == (0,)


# -- prpsinfo ------------------------------------------------------------------


def test_given_i386_then_prpsinfo_is_124_bytes_with_16_bit_ids() -> None:
    body = prpsinfo(I386, PROC)
    assert len(body) == 124
    assert struct.unpack_from("<bcbb", body, 0) == (1, b"S", 0, -5)
    assert struct.unpack_from("<IHH", body, 4) == (0x00400040, 1000, 100)
    assert struct.unpack_from("<iiii", body, 12) == (4242, 1, 4242, 4000)
    assert body[28:44] == b"threads-m32-tar\0"
    assert body[44:54] == b"./t32 -x 1" and body[54:124] == bytes(70)


@pytest.mark.parametrize("uid,expected", [(0, 0), (65535, 65535), (65536, 65534),
                                          (100000, 65534), (2**32 - 1, 65534)])
def test_given_id_beyond_16_bits_then_prpsinfo_has_the_overflow_id(uid: int,
                                                                   expected: int) -> None:
    # SET_UID -> high2lowuid: ids that do not fit become overflowuid, not uid & 0xffff.
    proc = ProcessState(**{**PROC.__dict__, "uid": uid, "gid": uid})
    assert struct.unpack_from("<HH", prpsinfo(I386, proc), 8) == (expected, expected)
    assert struct.unpack_from("<II", prpsinfo(X86_64, proc), 16) == (uid, uid)


def test_given_long_task_flags_then_pr_flag_is_truncated_to_32_bits() -> None:
    proc = ProcessState(**{**PROC.__dict__, "flags": 0x1_0040_0000})
    assert struct.unpack_from("<I", prpsinfo(I386, proc), 4) == (0x0040_0000,)


# -- siginfo -------------------------------------------------------------------


def test_given_live_capture_then_siginfo_is_128_zero_bytes() -> None:
    assert siginfo(PROC, I386) == bytes(128)


def _native(signo: int, code: int, fields: dict[int, tuple[str, int]]) -> bytes:
    buf = bytearray(128)
    struct.pack_into("<iii", buf, 0, signo, 0, code)
    for off, (fmt, value) in fields.items():
        struct.pack_into("<" + fmt, buf, off, value)
    return bytes(buf)


# (signo, si_code, layout, native fields {offset: (fmt, value)}, compat fields) with
# the native LP64 offsets (union at 16, pointers 8-aligned) and compat offsets
# (union at 12) of siginfo_t / compat_siginfo_t.
SIGINFO_CASES = [
    (10, 0, "kill", {16: ("i", 321), 20: ("I", 1000)}, {12: ("i", 321), 16: ("I", 1000)}),
    (9, 0x80, "kill", {16: ("i", 0), 20: ("I", 0)}, {}),
    (11, -1, "rt", {16: ("i", 5), 20: ("I", 7), 24: ("i", 77)},
     {12: ("i", 5), 16: ("I", 7), 20: ("i", 77)}),
    (6, -6, "rt", {16: ("i", 5), 20: ("I", 7)}, {12: ("i", 5), 16: ("I", 7)}),
    (14, -2, "timer", {16: ("i", 3), 20: ("i", 2), 24: ("i", 99)},
     {12: ("i", 3), 16: ("i", 2), 20: ("i", 99)}),
    (17, 1, "chld", {16: ("i", 88), 20: ("I", 0), 24: ("i", 3), 32: ("q", 12), 40: ("q", 34)},
     {12: ("i", 88), 20: ("i", 3), 24: ("i", 12), 28: ("i", 34)}),
    (11, 1, "fault", {16: ("Q", 0x1234)}, {12: ("I", 0x1234)}),
    (7, 4, "fault_mceerr", {16: ("Q", 0xF000_0000), 24: ("h", 12)},
     {12: ("I", 0xF000_0000), 16: ("h", 12)}),
    (11, 3, "fault_bnderr", {16: ("Q", 0x10), 32: ("Q", 0x20), 40: ("Q", 0x30)},
     {12: ("I", 0x10), 20: ("I", 0x20), 24: ("I", 0x30)}),
    (11, 4, "fault_pkuerr", {16: ("Q", 0x10), 32: ("I", 5)}, {12: ("I", 0x10), 20: ("I", 5)}),
    (5, 6, "fault_perf", {16: ("Q", 0x10), 24: ("Q", 0x99), 32: ("I", 2), 36: ("I", 1)},
     {12: ("I", 0x10), 16: ("I", 0x99), 20: ("I", 2), 24: ("I", 1)}),
    (29, 1, "poll", {16: ("q", 0x41), 24: ("i", 6)}, {12: ("i", 0x41), 16: ("i", 6)}),
    (29, -5, "poll", {16: ("q", 0x41), 24: ("i", 6)}, {12: ("i", 0x41), 16: ("i", 6)}),
    (31, 1, "sys", {16: ("Q", 0x8049000), 24: ("i", 39), 28: ("I", 0x40000003)},
     {12: ("I", 0x8049000), 16: ("i", 39), 20: ("I", 0x40000003)}),
]


@pytest.mark.parametrize("signo,code,layout,native,compat", SIGINFO_CASES)
def test_given_native_siginfo_then_compat_layout_matches_copy_siginfo_to_external32(
        signo: int, code: int, layout: str, native: dict[int, tuple[str, int]],
        compat: dict[int, tuple[str, int]]) -> None:
    assert siginfo_layout(signo, code) == layout
    out = siginfo_to_compat(_native(signo, code, native))
    expected = bytearray(128)
    struct.pack_into("<iii", expected, 0, signo, 0, code)
    for off, (fmt, value) in compat.items():
        struct.pack_into("<" + fmt, expected, off, value)
    assert out == bytes(expected)


def test_given_signal_in_proc_state_then_i386_note_is_compat_and_x86_64_is_native() -> None:
    native = _native(11, 1, {16: ("Q", 0x1234)})
    proc = ProcessState(**{**PROC.__dict__, "siginfo": native})
    assert siginfo(proc, I386) == siginfo_to_compat(native)
    assert siginfo(proc, X86_64) == native and siginfo(proc) == native


# -- auxv, NT_FILE -----------------------------------------------------------------


def test_given_compat_auxv_from_proc_then_it_is_cut_after_the_32_bit_at_null() -> None:
    # /proc/PID/auxv scans saved_auxv as 64-bit pairs, so for a compat task it
    # returns zero words past the real (32-bit) AT_NULL; the kernel's core
    # writer stops at the 32-bit AT_NULL.
    real = struct.pack("<8I", AT_SYSINFO, 0xF7F0E5E0, AT_PAGESZ, 4096, 25, 0xFFD67BAB,
                       AT_NULL, 0)
    assert trim_auxv(I386, real + bytes(24)) == real
    assert trim_auxv(I386, real[:-8]) == real            # no AT_NULL at all: one is added


def test_given_i386_then_nt_file_uses_32_bit_words() -> None:
    maps = [DumpedMapping(Mapping(0x56577000, 0x56578000, "r--p", 0, 7, "/t32"), 4096),
            DumpedMapping(Mapping(0x56578000, 0x5657A000, "r-xp", 0x1000, 7, "/t32"), 0),
            DumpedMapping(Mapping(0xF7F0E000, 0xF7F0F000, "r-xp", 0, 0, "[vdso]"), 4096),
            DumpedMapping(Mapping(0xF7CD4000, 0xF7CF6000, "r--p", 0x22000, 9, "/lib32/libc.so.6"),
                          0)]
    desc = nt_file(I386, maps)
    assert struct.unpack_from("<II", desc) == (3, PAGE_SIZE)
    assert struct.unpack_from("<9I", desc, 8) == (0x56577000, 0x56578000, 0,
                                                  0x56578000, 0x5657A000, 1,
                                                  0xF7CD4000, 0xF7CF6000, 0x22)
    assert desc[44:] == b"/t32\0/t32\0/lib32/libc.so.6\0"


# -- whole note segment and ELF32 headers ------------------------------------------------


def test_given_i386_threads_then_notes_follow_the_compat_writer_order() -> None:
    threads = [_thread(4242), _thread(4243, tls=False), _thread(4244, frozen=False)]
    notes = _notes(build_notes(I386, PROC, threads, []))
    extra = [n for n in notes if n[1] == 0x205]          # NT_X86_XSAVE_LAYOUT (CPU dependent)
    assert [(name, t, len(d)) for name, t, d in notes if t != 0x205] == [
        (b"CORE", NoteType.NT_PRSTATUS, 144), (b"CORE", NoteType.NT_PRPSINFO, 124),
        (b"CORE", NoteType.NT_SIGINFO, 128), (b"CORE", NoteType.NT_AUXV, 24),
        (b"CORE", NoteType.NT_FILE, 8),
        (b"CORE", NoteType.NT_PRFPREG, 108), (b"LINUX", NoteType.NT_PRXFPREG, 512),
        (b"LINUX", NoteType.NT_X86_XSTATE, 832), (b"LINUX", NoteType.NT_386_TLS, 48),
        (b"CORE", NoteType.NT_PRSTATUS, 144),
        (b"CORE", NoteType.NT_PRFPREG, 108), (b"LINUX", NoteType.NT_PRXFPREG, 512),
        (b"LINUX", NoteType.NT_X86_XSTATE, 832),
        (b"CORE", NoteType.NT_PRSTATUS, 144)]
    assert all(name == b"LINUX" for name, _, _ in extra)
    assert notes[len(notes) - len(extra):] == extra          # process-wide extra notes come last


def test_given_i386_core_then_pyelftools_reads_elf32_em386_and_every_note() -> None:
    maps = [DumpedMapping(Mapping(0x56577000, 0x56578000, "r-xp", 0, 7, "/t32"), PAGE_SIZE),
            DumpedMapping(Mapping(0xFFD48000, 0xFFD69000, "rw-p", 0, 0, "[stack]"), 0)]
    notes = build_notes(I386, PROC, [_thread(4242), _thread(4243)], maps)
    layout = CoreLayout.build(I386, notes, maps)
    elf = ELFFile(io.BytesIO(_materialise(layout)))
    assert elf.elfclass == 32 and elf.header.e_machine == "EM_386"
    assert (elf.header.e_ehsize, elf.header.e_phentsize) == (52, 32)
    seg = next(elf.iter_segments())
    parsed = list(seg.iter_notes())
    assert [n["n_type"] for n in parsed][:5] == ["NT_PRSTATUS", "NT_PRPSINFO", "NT_SIGINFO",
                                                 "NT_AUXV", "NT_FILE"]
    psinfo = parsed[1]["n_desc"]
    assert (psinfo.pr_pid, psinfo.pr_uid, psinfo.pr_gid) == (4242, 1000, 100)
    files = parsed[4]["n_desc"]
    assert files.num_map_entries == 1 and files.filename == [b"/t32"]
    loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
    assert [(s["p_vaddr"], s["p_flags"], s["p_filesz"]) for s in loads] == [
        (0x56577000, 5, PAGE_SIZE), (0xFFD48000, 6, 0)]


def test_given_elf32_phdr_then_p_flags_sits_after_p_memsz() -> None:
    maps = [DumpedMapping(Mapping(0x8048000, 0x8049000, "rw-p", 0, 0, ""), PAGE_SIZE)]
    layout = CoreLayout.build(I386, b"", maps)
    # Elf32_Phdr: p_type p_offset p_vaddr p_paddr p_filesz p_memsz p_flags p_align
    load = struct.unpack_from("<8I", layout.header, 52 + 32)
    assert load == (1, layout.data_offset, 0x8048000, 0, PAGE_SIZE, PAGE_SIZE, 6, PAGE_SIZE)


def test_given_elf32_with_more_than_65534_segments_then_pn_xnum_uses_an_elf32_shdr() -> None:
    count = PN_XNUM + 3
    maps = [DumpedMapping(Mapping(0x1000_0000 + i * 2 * PAGE_SIZE,
                                  0x1000_0000 + i * 2 * PAGE_SIZE + PAGE_SIZE, "r--p", 0, 0, ""), 0)
            for i in range(count)]
    layout = CoreLayout.build(I386, b"", maps)
    ehdr = struct.unpack_from("<16sHHIIIIIHHHHHH", layout.header)
    e_shoff, (e_phnum, e_shentsize, e_shnum, e_shstrndx) = ehdr[6], ehdr[10:14]
    assert (e_phnum, e_shentsize, e_shnum, e_shstrndx) == (PN_XNUM, 40, 1, 0)
    assert e_shoff == layout.section_header_offset == layout.total_size - 40
    # fill_extnum_info(): SHT_NULL, sh_size = e_shnum (1), sh_info = real phdr count.
    assert struct.unpack("<10I", layout.section_header) == (0, 0, 0, 0, 0, 1, 0, count + 1, 0, 0)
    elf = ELFFile(io.BytesIO(_materialise(layout)))
    assert elf.elfclass == 32 and elf.num_segments() == count + 1


# -- cross-check with the C compiler's view of the same structs ---------------------------

_PROBE = r"""
#include <stdio.h>
#include <stddef.h>
#include <signal.h>
#include <sys/procfs.h>
#define P(x) printf("%s=%zu\n", #x, (size_t)(x))
int main(void) {
  P(sizeof(struct elf_prstatus)); P(offsetof(struct elf_prstatus, pr_sigpend));
  P(offsetof(struct elf_prstatus, pr_pid)); P(offsetof(struct elf_prstatus, pr_utime));
  P(offsetof(struct elf_prstatus, pr_reg)); P(offsetof(struct elf_prstatus, pr_fpvalid));
  P(sizeof(struct elf_prpsinfo)); P(offsetof(struct elf_prpsinfo, pr_flag));
  P(offsetof(struct elf_prpsinfo, pr_uid)); P(sizeof(((struct elf_prpsinfo *)0)->pr_uid));
  P(offsetof(struct elf_prpsinfo, pr_pid)); P(offsetof(struct elf_prpsinfo, pr_fname));
  P(offsetof(struct elf_prpsinfo, pr_psargs)); P(sizeof(siginfo_t));
  P(offsetof(siginfo_t, si_pid)); P(offsetof(siginfo_t, si_value));
  P(offsetof(siginfo_t, si_utime)); P(offsetof(siginfo_t, si_addr));
  P(offsetof(siginfo_t, si_addr_lsb)); P(offsetof(siginfo_t, si_lower));
  P(offsetof(siginfo_t, si_upper)); P(offsetof(siginfo_t, si_pkey));
  P(offsetof(siginfo_t, si_fd)); P(offsetof(siginfo_t, si_arch));
  return 0;
}
"""

_EXPECTED = {
    "-m32": {"sizeof(struct elf_prstatus)": 144, "offsetof(struct elf_prstatus, pr_sigpend)": 16,
             "offsetof(struct elf_prstatus, pr_pid)": 24,
             "offsetof(struct elf_prstatus, pr_utime)": 40,
             "offsetof(struct elf_prstatus, pr_reg)": 72,
             "offsetof(struct elf_prstatus, pr_fpvalid)": 140,
             "sizeof(struct elf_prpsinfo)": 124, "offsetof(struct elf_prpsinfo, pr_flag)": 4,
             "offsetof(struct elf_prpsinfo, pr_uid)": 8,
             "sizeof(((struct elf_prpsinfo *)0)->pr_uid)": 2,
             "offsetof(struct elf_prpsinfo, pr_pid)": 12,
             "offsetof(struct elf_prpsinfo, pr_fname)": 28,
             "offsetof(struct elf_prpsinfo, pr_psargs)": 44, "sizeof(siginfo_t)": 128,
             "offsetof(siginfo_t, si_pid)": 12, "offsetof(siginfo_t, si_value)": 20,
             "offsetof(siginfo_t, si_utime)": 24, "offsetof(siginfo_t, si_addr)": 12,
             "offsetof(siginfo_t, si_addr_lsb)": 16, "offsetof(siginfo_t, si_lower)": 20,
             "offsetof(siginfo_t, si_upper)": 24, "offsetof(siginfo_t, si_pkey)": 20,
             "offsetof(siginfo_t, si_fd)": 16, "offsetof(siginfo_t, si_arch)": 20},
    "-m64": {"sizeof(struct elf_prstatus)": 336, "sizeof(struct elf_prpsinfo)": 136,
             "offsetof(siginfo_t, si_pid)": 16, "offsetof(siginfo_t, si_value)": 24,
             "offsetof(siginfo_t, si_utime)": 32, "offsetof(siginfo_t, si_addr)": 16,
             "offsetof(siginfo_t, si_addr_lsb)": 24, "offsetof(siginfo_t, si_lower)": 32,
             "offsetof(siginfo_t, si_upper)": 40, "offsetof(siginfo_t, si_pkey)": 32,
             "offsetof(siginfo_t, si_fd)": 24, "offsetof(siginfo_t, si_arch)": 28},
}


@pytest.mark.parametrize("flag", ["-m32", "-m64"])
def test_given_a_c_compiler_then_its_struct_layouts_agree_with_these_encodings(
        flag: str, tmp_path: Path) -> None:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    src, exe = tmp_path / "probe.c", tmp_path / f"probe{flag}"
    src.write_text(_PROBE)
    res = subprocess.run(["gcc", flag, "-o", str(exe), str(src)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"gcc {flag} cannot build ({res.stderr.strip()[:200]}); gcc-multilib missing?")
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    seen = dict(line.rsplit("=", 1) for line in out.splitlines())
    assert {k: int(seen[k]) for k in _EXPECTED[flag]} == _EXPECTED[flag]
    # and the encoders produce exactly those sizes
    arch = I386 if flag == "-m32" else X86_64
    regs = bytes(arch.gpregs_size)
    assert len(prstatus(arch, PROC, ThreadState(1, True, regs), leader=True)) == int(
        seen["sizeof(struct elf_prstatus)"])
    assert len(prpsinfo(arch, PROC)) == int(seen["sizeof(struct elf_prpsinfo)"])
