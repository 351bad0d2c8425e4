"""x86_64 native tasks.

gpregs is ``struct user_regs_struct`` (27 longs: r15 r14 r13 r12 rbp rbx r11
r10 r9 r8 rax rcx rdx rsi rdi orig_rax rip cs eflags rsp ss fs_base gs_base ds
es fs gs).  Per-thread notes follow the kernel's x86_64_regsets order.
"""

from __future__ import annotations

from ..elfcore.constants import ElfClass, Machine, NoteType
from .base import ArchSpec, RegsetNote
from .x86_xsave import extra_notes

X86_64 = ArchSpec(
    name="x86_64",
    elf_class=ElfClass.ELF64,
    machine=Machine.EM_X86_64,
    word_size=8,
    gpregs_size=27 * 8,
    pc_index=16,
    sp_index=19,
    regsets=(
        RegsetNote(NoteType.NT_PRFPREG),
        RegsetNote(NoteType.NT_386_IOPERM),
        RegsetNote(NoteType.NT_X86_XSTATE),
        RegsetNote(NoteType.NT_X86_SHSTK),
    ),
    uid_size=4,
    extra_notes=extra_notes,
    syscall_insn=b"\x0f\x05",
)
