"""The per-architecture facts the core writer and the freezer need.

An :class:`ArchSpec` describes one *task* architecture (what the kernel's
``task_user_regset_view()`` returns for a task), not the host: an x86_64
kernel runs both x86_64 and i386 (compat) tasks, and the core of a compat task
is the ELF32 core the kernel's compat writer (fs/compat_binfmt_elf.c) makes.
:func:`select_arch` picks the spec for a task; see docs/architectures.md.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from ..elfcore.constants import ElfClass, Machine


@dataclass(frozen=True)
class RegsetNote:
    """A register set the kernel writes as a per-thread note after NT_PRSTATUS.

    ``active`` mirrors the regset's kernel ``active()`` hook where PTRACE_GETREGSET
    alone cannot tell: ptrace hands out a regset whether or not the core writer
    would dump it (e.g. i386 TLS: all three descriptors, even when every one is
    empty), so the predicate decides from the bytes ptrace returned.  Regsets
    whose ``get`` fails (e.g. NT_386_IOPERM with no I/O bitmap) are skipped by
    the freezer without asking.
    """

    note_type: int
    active: Callable[[bytes], bool] | None = field(default=None, compare=False)

    def is_active(self, data: bytes) -> bool:
        """Would the kernel's core writer emit this note for ``data``?"""
        return bool(data) and (self.active is None or self.active(data))


@dataclass(frozen=True)
class ArchSpec:
    """Everything architecture-specific about a target's core.

    ``gpregs_size`` is the size of the NT_PRSTATUS register set ptrace returns
    for a task of this architecture (a tracer always gets the tracee's own
    view: 68 bytes for an i386 task even when the tracer is 64-bit); the
    freezer uses it, with the executable's ELF header as a fallback, to tell
    compat tasks apart (:func:`select_arch`).
    """

    name: str                # also the ``uname -m`` of a kernel whose native tasks these are
    elf_class: ElfClass
    machine: Machine
    word_size: int
    gpregs_size: int
    pc_index: int            # word index of the program counter in gpregs
    sp_index: int            # word index of the stack pointer in gpregs
    regsets: tuple[RegsetNote, ...]
    uid_size: int            # width of pr_uid/pr_gid in prpsinfo
    syscall_insn: bytes      # instruction snapshot mode injects syscalls with
    # Process-wide notes the kernel appends after the thread notes, computed
    # from the first thread's register sets (e.g. NT_X86_XSAVE_LAYOUT).
    extra_notes: Callable[[Sequence[tuple[int, bytes]]], list[tuple[int, bytes]]] = field(
        default=lambda regsets: [], compare=False)

    @property
    def word_format(self) -> str:
        return "Q" if self.word_size == 8 else "I"

    @property
    def word_mask(self) -> int:
        """All ones in a word: C ``(compat_)ulong`` assignments truncate to this."""
        return (1 << (8 * self.word_size)) - 1

    @property
    def elf_class_bits(self) -> int:
        return 32 if self.elf_class == ElfClass.ELF32 else 64

    def _gpreg(self, gpregs: bytes, index: int) -> int:
        if len(gpregs) < (index + 1) * self.word_size:
            return 0
        (value,) = struct.unpack_from("<" + self.word_format, gpregs, index * self.word_size)
        return int(value)

    def pc(self, gpregs: bytes) -> int:
        return self._gpreg(gpregs, self.pc_index)

    def sp(self, gpregs: bytes) -> int:
        return self._gpreg(gpregs, self.sp_index)


ExeIdent = tuple[int, int]   # (ELF class in bits: 32/64, e_machine); (0, 0) if unknown


def select_arch(arches: Iterable[ArchSpec], gpregs_size: int,
                exe_ident: Callable[[], ExeIdent], host_machine: str | None = None) -> ArchSpec:
    """The architecture of a task, never the agent's own.

    1. The NT_PRSTATUS size ptrace returned for one of its threads (the
       tracee's view, 68 bytes for i386, 216 for x86_64, 272 for aarch64).
    2. Else (no thread's registers could be read) the executable's ELF class
       and machine; ``exe_ident`` is only called then.  An ELF32 executable
       with EM_X86_64 (x32) matches nothing and falls through.
    3. Else the host kernel's native architecture (``uname -m``), else the
       first one registered.
    """
    arches = list(arches)
    if not arches:
        raise ValueError("no architecture registered")
    by_size = [a for a in arches if a.gpregs_size == gpregs_size]
    if len(by_size) == 1:
        return by_size[0]
    candidates = by_size or arches
    bits, machine = exe_ident()
    for a in candidates:
        if a.elf_class_bits == bits and a.machine == machine:
            return a
    host = host_machine if host_machine is not None else os.uname().machine
    return next((a for a in candidates if a.name == host), candidates[0])
