"""Encoding of the ELF core notes, for 32- and 64-bit targets.

Struct layouts follow the kernel's ``struct elf_prstatus``/``elf_prpsinfo``
(and their compat forms); the word size and uid width come from the target's
:class:`~corepeek_agent.arch.base.ArchSpec`, never from the agent.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

from ..arch.base import ArchSpec
from .constants import PAGE_SIZE, NoteType, note_owner
from .model import DumpedMapping, ProcessState, ThreadState

SIGINFO_SIZE = 128
PRARGSZ = 80


def _pad4(n: int) -> int:
    return (n + 3) & ~3


def encode_note(note_type: int, desc: bytes, owner: bytes | None = None) -> bytes:
    """One note: namesz, descsz, type, name and desc each padded to 4 bytes."""
    name = (owner if owner is not None else note_owner(note_type)) + b"\0"
    header = struct.pack("<III", len(name), len(desc), note_type)
    return (header + name.ljust(_pad4(len(name)), b"\0")
            + desc.ljust(_pad4(len(desc)), b"\0"))


def _timeval(arch: ArchSpec, micros: int) -> bytes:
    fmt = "<qq" if arch.word_size == 8 else "<ii"
    return struct.pack(fmt, micros // 1_000_000, micros % 1_000_000)


def prstatus(arch: ArchSpec, proc: ProcessState, thread: ThreadState,
             *, leader: bool, cursig: int = 0) -> bytes:
    """``struct elf_prstatus`` for one thread (zeroed registers if not frozen)."""
    w = arch.word_format
    # pr_sigpend/pr_sighold are (compat_)ulong: a compat core keeps sig[0]'s
    # low 32 bits (signals 1-32), as the kernel's assignment truncates it.
    head = struct.pack(f"<iiih2x{w}{w}iiii", cursig, 0, 0, cursig,
                       thread.sigpend & arch.word_mask, thread.sighold & arch.word_mask,
                       thread.tid, proc.ppid, proc.pgrp, proc.sid)
    utime, stime = ((proc.utime_us, proc.stime_us) if leader
                    else (thread.utime_us, thread.stime_us))
    times = b"".join(_timeval(arch, t) for t in (utime, stime, proc.cutime_us, proc.cstime_us))
    regs = thread.gpregs if thread.frozen else b""
    regs = regs[:arch.gpregs_size].ljust(arch.gpregs_size, b"\0")
    fpvalid = int(thread.frozen and any(t == NoteType.NT_PRFPREG for t, _ in thread.regsets))
    tail = struct.pack("<i", fpvalid)
    body = head + times + regs + tail
    return body.ljust(_align(len(body), arch.word_size), b"\0")


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


_STATE_CODES = {"R": 0, "S": 1, "D": 2, "T": 3, "t": 3, "Z": 4, "X": 5}


OVERFLOW_UID = OVERFLOW_GID = 65534   # /proc/sys/kernel/overflow{u,g}id defaults


def _old_id(value: int, size: int, overflow: int) -> int:
    """SET_UID/SET_GID (include/linux/highuid.h): an id that does not fit a
    16-bit field becomes the overflow id (high2lowuid), it is not truncated."""
    if size >= 4:
        return value & 0xFFFFFFFF
    return value if value <= 0xFFFF else overflow


def prpsinfo(arch: ArchSpec, proc: ProcessState) -> bytes:
    """``struct elf_prpsinfo``; state encoded as the kernel's fill_psinfo does."""
    code = _STATE_CODES.get(proc.state, 1)
    sname = proc.state.encode()[:1] or b"S"
    uid_fmt = "H" if arch.uid_size == 2 else "I"
    pad = "4x" if arch.word_size == 8 else ""
    fmt = f"<bcbb{pad}{arch.word_format}{uid_fmt}{uid_fmt}iiii16s{PRARGSZ}s"
    psargs = proc.psargs[:PRARGSZ - 1]
    return struct.pack(fmt, code, sname, int(sname == b"Z"), max(-128, min(127, proc.nice)),
                       proc.flags & arch.word_mask,
                       _old_id(proc.uid, arch.uid_size, OVERFLOW_UID),
                       _old_id(proc.gid, arch.uid_size, OVERFLOW_GID),
                       proc.pid, proc.ppid, proc.pgrp, proc.sid,
                       proc.comm.encode(errors="replace")[:15], psargs)


def siginfo(proc: ProcessState, arch: ArchSpec | None = None) -> bytes:
    """NT_SIGINFO: the process's siginfo, or zeros for a live capture (no signal).

    ``proc.siginfo`` is a native (64-bit) ``siginfo_t`` as PTRACE_GETSIGINFO
    hands it to the agent; a 32-bit target's note holds the compat layout the
    kernel's compat writer produces (copy_siginfo_to_external32), so it is
    converted.  All zeros (si_signo 0) is a valid siginfo in either layout.
    """
    raw = proc.siginfo[:SIGINFO_SIZE].ljust(SIGINFO_SIZE, b"\0")
    if arch is not None and arch.word_size == 4 and any(raw):
        return siginfo_to_compat(raw)
    return raw


# siginfo layouts (kernel/signal.c siginfo_layout()) as the fields each one
# copies in copy_siginfo_to_external32(): (native offset, compat offset, kind)
# with kind "i" a 32-bit field, "h" a 16-bit one, "w" a long/pointer that
# shrinks from 64 to 32 bits.  Native = x86_64/LP64 siginfo_t (union at 16),
# compat = compat_siginfo_t (union at 12).
_SIGINFO_FIELDS: dict[str, tuple[tuple[int, int, str], ...]] = {
    "kill": ((16, 12, "i"), (20, 16, "i")),                                # pid uid
    "timer": ((16, 12, "i"), (20, 16, "i"), (24, 20, "i")),                # tid overrun int
    "rt": ((16, 12, "i"), (20, 16, "i"), (24, 20, "i")),                   # pid uid int
    "chld": ((16, 12, "i"), (20, 16, "i"), (24, 20, "i"), (32, 24, "w"), (40, 28, "w")),
    "poll": ((16, 12, "w"), (24, 16, "i")),                                # band fd
    "sys": ((16, 12, "w"), (24, 16, "i"), (28, 20, "i")),                  # call_addr syscall arch
    "fault": ((16, 12, "w"),),                                             # addr
    "fault_mceerr": ((16, 12, "w"), (24, 16, "h")),                        # addr addr_lsb
    "fault_bnderr": ((16, 12, "w"), (32, 20, "w"), (40, 24, "w")),         # addr lower upper
    "fault_pkuerr": ((16, 12, "w"), (32, 20, "i")),                        # addr pkey
    "fault_perf": ((16, 12, "w"), (24, 16, "w"), (32, 20, "i"), (36, 24, "i")),
}
_SIGILL, _SIGTRAP, _SIGBUS, _SIGFPE, _SIGSEGV = 4, 5, 7, 8, 11
_SIGCHLD, _SIGPOLL, _SIGSYS = 17, 29, 31
# (highest si_code, layout) for kernel-generated codes (NSIG* in uapi siginfo.h)
_CODE_FILTER = {_SIGILL: (11, "fault"), _SIGFPE: (15, "fault"), _SIGSEGV: (10, "fault"),
                _SIGBUS: (5, "fault"), _SIGTRAP: (6, "fault"), _SIGCHLD: (6, "chld"),
                _SIGPOLL: (6, "poll"), _SIGSYS: (2, "sys")}
_SI_KERNEL, _SI_TIMER, _SI_SIGIO, _NSIGPOLL = 0x80, -2, -5, 6


def siginfo_layout(signo: int, code: int) -> str:
    """Which union member a (signo, si_code) pair uses, as the kernel decides."""
    if 0 < code < _SI_KERNEL:
        limit, layout = _CODE_FILTER.get(signo, (0, ""))
        if code <= limit:
            if signo == _SIGBUS and code in (4, 5):          # BUS_MCEERR_AR/AO
                return "fault_mceerr"
            if signo == _SIGSEGV and code == 3:              # SEGV_BNDERR
                return "fault_bnderr"
            if signo == _SIGSEGV and code == 4:              # SEGV_PKUERR
                return "fault_pkuerr"
            if signo == _SIGTRAP and code == 6:              # TRAP_PERF
                return "fault_perf"
            return layout
        return "poll" if code <= _NSIGPOLL else "kill"
    if code == _SI_TIMER:
        return "timer"
    if code == _SI_SIGIO:
        return "poll"
    return "rt" if code < 0 else "kill"


def siginfo_to_compat(native: bytes) -> bytes:
    """A native LP64 ``siginfo_t`` in the 32-bit compat layout (128 bytes)."""
    native = native[:SIGINFO_SIZE].ljust(SIGINFO_SIZE, b"\0")
    signo, errno_, code = struct.unpack_from("<iii", native, 0)
    out = bytearray(SIGINFO_SIZE)
    struct.pack_into("<iii", out, 0, signo, errno_, code)
    for src, dst, kind in _SIGINFO_FIELDS[siginfo_layout(signo, code)]:
        if kind == "w":
            struct.pack_into("<I", out, dst, struct.unpack_from("<Q", native, src)[0] & 0xFFFFFFFF)
        else:
            n = 2 if kind == "h" else 4
            out[dst:dst + n] = native[src:src + n]
    return bytes(out)


def trim_auxv(arch: ArchSpec, raw: bytes) -> bytes:
    """Cut /proc/PID/auxv after its AT_NULL pair, as the kernel's core writer does.

    For compat tasks /proc/PID/auxv scans 64-bit words and may return too much
    or too little; the 32-bit AT_NULL entry is authoritative.
    """
    pair = 2 * arch.word_size
    fmt = "<" + arch.word_format
    for off in range(0, len(raw) - pair + 1, pair):
        (key,) = struct.unpack_from(fmt, raw, off)
        if key == 0:
            return raw[:off + pair]
    return raw[:len(raw) // pair * pair] + b"\0" * pair


def nt_file(arch: ArchSpec, mappings: Iterable[DumpedMapping]) -> bytes:
    """NT_FILE: count, page size, (start, end, page offset) triples, then names."""
    files = [d.mapping for d in mappings if d.mapping.file_backed]
    w, mask = arch.word_format, arch.word_mask     # user_long_t: 32-bit words for compat
    out = [struct.pack(f"<{w}{w}", len(files), PAGE_SIZE)]
    out += [struct.pack(f"<{w}{w}{w}", m.start & mask, m.end & mask, m.offset // PAGE_SIZE & mask)
            for m in files]
    out += [m.path.encode(errors="surrogateescape") + b"\0" for m in files]
    return b"".join(out)


def build_notes(arch: ArchSpec, proc: ProcessState, threads: Sequence[ThreadState],
                mappings: Sequence[DumpedMapping]) -> bytes:
    """All notes, in the kernel's order.

    The first thread's NT_PRSTATUS is followed by the process notes (PRPSINFO,
    SIGINFO, AUXV, FILE), then that thread's other register sets; every other
    thread contributes NT_PRSTATUS and its register sets; the architecture's
    process-wide extra notes come last.
    """
    out: list[bytes] = []
    for index, thread in enumerate(threads):
        out.append(encode_note(NoteType.NT_PRSTATUS,
                               prstatus(arch, proc, thread, leader=thread.tid == proc.pid)))
        if index == 0:
            out.append(encode_note(NoteType.NT_PRPSINFO, prpsinfo(arch, proc)))
            out.append(encode_note(NoteType.NT_SIGINFO, siginfo(proc, arch)))
            out.append(encode_note(NoteType.NT_AUXV, trim_auxv(arch, proc.auxv)))
            out.append(encode_note(NoteType.NT_FILE, nt_file(arch, mappings)))
        if thread.frozen:
            out.extend(encode_note(t, data) for t, data in thread.regsets)
    first = next((t for t in threads if t.frozen), None)
    if first is not None:
        out.extend(encode_note(t, data) for t, data in arch.extra_notes(list(first.regsets)))
    return b"".join(out)
