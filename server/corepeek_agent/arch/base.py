"""The per-architecture facts the core writer and the freezer need."""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..elfcore.constants import ElfClass, Machine


@dataclass(frozen=True)
class RegsetNote:
    """A register set the kernel writes as a per-thread note after NT_PRSTATUS.

    ``only_if_nonempty`` mirrors regsets whose kernel ``active()`` hook reports
    nothing to dump when every byte is zero (e.g. an unused TLS array).
    """

    note_type: int
    only_if_nonempty: bool = False


@dataclass(frozen=True)
class ArchSpec:
    """Everything architecture-specific about a target's core.

    ``gpregs_size`` is the size of the NT_PRSTATUS register set ptrace returns
    for a task of this architecture; the freezer uses it (with the ELF class of
    the executable) to recognise compat tasks.
    """

    name: str
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

    def _gpreg(self, gpregs: bytes, index: int) -> int:
        if len(gpregs) < (index + 1) * self.word_size:
            return 0
        (value,) = struct.unpack_from("<" + self.word_format, gpregs, index * self.word_size)
        return int(value)

    def pc(self, gpregs: bytes) -> int:
        return self._gpreg(gpregs, self.pc_index)

    def sp(self, gpregs: bytes) -> int:
        return self._gpreg(gpregs, self.sp_index)
