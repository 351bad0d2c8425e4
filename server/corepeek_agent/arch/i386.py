"""i386 tasks, native or compat on an x86_64 kernel.

gpregs is the 32-bit ``struct user_regs_struct`` (17 ints: ebx ecx edx esi edi
ebp eax xds xes xfs xgs orig_eax eip xcs eflags esp xss).  Per-thread notes
follow the kernel's x86_32_regsets order; the TLS note is written only when a
TLS descriptor is in use, as its ``active()`` hook decides.
"""

from __future__ import annotations

from ..elfcore.constants import ElfClass, Machine, NoteType
from .base import ArchSpec, RegsetNote
from .x86_xsave import extra_notes

I386 = ArchSpec(
    name="i386",
    elf_class=ElfClass.ELF32,
    machine=Machine.EM_386,
    word_size=4,
    gpregs_size=17 * 4,
    pc_index=12,
    sp_index=15,
    regsets=(
        RegsetNote(NoteType.NT_PRFPREG),
        RegsetNote(NoteType.NT_PRXFPREG),
        RegsetNote(NoteType.NT_X86_XSTATE),
        RegsetNote(NoteType.NT_386_TLS, only_if_nonempty=True),
        RegsetNote(NoteType.NT_386_IOPERM),
    ),
    uid_size=2,
    extra_notes=extra_notes,
    syscall_insn=b"\xcd\x80",
)
