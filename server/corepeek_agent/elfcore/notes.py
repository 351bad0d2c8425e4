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
    word_mask = (1 << (8 * arch.word_size)) - 1
    head = struct.pack(f"<iiih2x{w}{w}iiii", cursig, 0, 0, cursig,
                       thread.sigpend & word_mask, thread.sighold & word_mask,
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


def prpsinfo(arch: ArchSpec, proc: ProcessState) -> bytes:
    """``struct elf_prpsinfo``; state encoded as the kernel's fill_psinfo does."""
    code = _STATE_CODES.get(proc.state, 1)
    sname = proc.state.encode()[:1] or b"S"
    uid_fmt = "H" if arch.uid_size == 2 else "I"
    mask = (1 << (8 * arch.uid_size)) - 1
    pad = "4x" if arch.word_size == 8 else ""
    fmt = f"<bcbb{pad}{arch.word_format}{uid_fmt}{uid_fmt}iiii16s{PRARGSZ}s"
    psargs = proc.psargs[:PRARGSZ - 1]
    return struct.pack(fmt, code, sname, int(sname == b"Z"), max(-128, min(127, proc.nice)),
                       proc.flags & ((1 << (8 * arch.word_size)) - 1),
                       proc.uid & mask, proc.gid & mask,
                       proc.pid, proc.ppid, proc.pgrp, proc.sid,
                       proc.comm.encode(errors="replace")[:15], psargs)


def siginfo(proc: ProcessState) -> bytes:
    """NT_SIGINFO: the process's siginfo, or zeros for a live capture (no signal)."""
    return proc.siginfo[:SIGINFO_SIZE].ljust(SIGINFO_SIZE, b"\0")


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
    w = arch.word_format
    out = [struct.pack(f"<{w}{w}", len(files), PAGE_SIZE)]
    out += [struct.pack(f"<{w}{w}{w}", m.start, m.end, m.offset // PAGE_SIZE) for m in files]
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
            out.append(encode_note(NoteType.NT_SIGINFO, siginfo(proc)))
            out.append(encode_note(NoteType.NT_AUXV, trim_auxv(arch, proc.auxv)))
            out.append(encode_note(NoteType.NT_FILE, nt_file(arch, mappings)))
        if thread.frozen:
            out.extend(encode_note(t, data) for t, data in thread.regsets)
    first = next((t for t in threads if t.frozen), None)
    if first is not None:
        out.extend(encode_note(t, data) for t, data in arch.extra_notes(list(first.regsets)))
    return b"".join(out)
