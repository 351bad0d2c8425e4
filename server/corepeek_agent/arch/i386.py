"""i386 tasks, native or compat on an x86_64 kernel.

gpregs is the 32-bit ``struct user_regs_struct`` (17 ints: ebx ecx edx esi edi
ebp eax xds xes xfs xgs orig_eax eip xcs eflags esp xss); ptrace hands a 64-bit
tracer exactly this 68-byte view for a compat tracee, which is how compat
tasks are recognised.  Per-thread notes follow the kernel's
``x86_32_regsets`` order (arch/x86/kernel/ptrace.c: GENERAL, FP, XFP, XSTATE,
TLS, IOPERM); the compat core is ELF32/EM_386 with the compat
prstatus/prpsinfo/siginfo layouts, 32-bit auxv and NT_FILE words, 16-bit
uid/gid in prpsinfo (``__compat_uid_t``), and the same NT_X86_XSAVE_LAYOUT
extra note as a native core (the compat writer is binfmt_elf.c recompiled,
so it calls the same ``elf_coredump_extra_notes_write``).
"""

from __future__ import annotations

import struct

from ..elfcore.constants import ElfClass, Machine, NoteType
from .base import ArchSpec, RegsetNote
from .x86_xsave import extra_notes

USER_DESC_SIZE = 16          # struct user_desc
# The user_desc flag bits of an empty GDT descriptor as fill_user_desc()
# reports it: read_exec_only (bit 3) and seg_not_present (bit 5).
_EMPTY_DESC_FLAGS = 0x28


def tls_in_use(data: bytes) -> bool:
    """``regset_tls_active()`` from the NT_386_TLS bytes ptrace returned.

    The kernel dumps the TLS note when any of the three GDT TLS descriptors is
    not empty (desc_empty: both descriptor words zero).  ptrace hands out all
    three as ``struct user_desc`` {entry_number, base_addr, limit, flags}
    whether they are in use or not; an empty one reads base 0, limit 0 and
    flags ``read_exec_only|seg_not_present``.  A descriptor set with base 0
    and limit 0 but other flags is in use, so the flags count too.  (An
    all-zero flags word is treated as empty as well: set_thread_area() clears
    a descriptor given all-zero fields, so no real descriptor reads that way.)
    """
    for off in range(0, len(data) - USER_DESC_SIZE + 1, USER_DESC_SIZE):
        _entry, base, limit, flags = struct.unpack_from("<IIII", data, off)
        if base or limit or (flags & 0xFF) not in (0, _EMPTY_DESC_FLAGS):
            return True
    return False


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
        RegsetNote(NoteType.NT_386_TLS, active=tls_in_use),
        RegsetNote(NoteType.NT_386_IOPERM),
    ),
    uid_size=2,
    extra_notes=extra_notes,
    syscall_insn=b"\xcd\x80",   # int $0x80 (the vDSO's __kernel_vsyscall may use sysenter)
)
