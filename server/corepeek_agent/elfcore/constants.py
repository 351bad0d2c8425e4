"""ELF constants used in core files (values from the ELF gABI and <elf.h>)."""

from __future__ import annotations

from enum import IntEnum, IntFlag

# The same page size and PN_XNUM for the core writer and the client's readers.
from corepeek_format.elfstructs import PAGE_SIZE, PN_XNUM  # noqa: F401  (re-exported)

ELFMAG = b"\x7fELF"
EV_CURRENT = 1
ELFDATA2LSB = 1
ET_CORE = 4
SHT_NULL = 0


class ElfClass(IntEnum):
    ELF32 = 1
    ELF64 = 2


class Machine(IntEnum):
    EM_386 = 3
    EM_X86_64 = 62
    EM_AARCH64 = 183


class PType(IntEnum):
    PT_LOAD = 1
    PT_NOTE = 4


class PFlags(IntFlag):
    PF_X = 1
    PF_W = 2
    PF_R = 4


class NoteType(IntEnum):
    NT_PRSTATUS = 1
    NT_PRFPREG = 2
    NT_PRPSINFO = 3
    NT_AUXV = 6
    NT_PRXFPREG = 0x46E62B7F
    NT_386_TLS = 0x200
    NT_386_IOPERM = 0x201
    NT_X86_XSTATE = 0x202
    NT_X86_SHSTK = 0x204
    NT_SIGINFO = 0x53494749
    NT_FILE = 0x46494C45


# Owner names the kernel gives each note type (include/uapi/linux/elf.h NN_*).
CORE_OWNER_TYPES = frozenset({
    NoteType.NT_PRSTATUS, NoteType.NT_PRFPREG, NoteType.NT_PRPSINFO,
    NoteType.NT_AUXV, NoteType.NT_SIGINFO, NoteType.NT_FILE,
})


def note_owner(note_type: int) -> bytes:
    """Return the note owner name the kernel uses for note_type."""
    return b"CORE" if note_type in CORE_OWNER_TYPES else b"LINUX"


# Bits of /proc/PID/coredump_filter (MMF_DUMP_* in include/linux/sched/coredump.h).
class DumpFilter(IntFlag):
    ANON_PRIVATE = 1 << 0
    ANON_SHARED = 1 << 1
    MAPPED_PRIVATE = 1 << 2
    MAPPED_SHARED = 1 << 3
    ELF_HEADERS = 1 << 4
    HUGETLB_PRIVATE = 1 << 5
    HUGETLB_SHARED = 1 << 6
    DAX_PRIVATE = 1 << 7
    DAX_SHARED = 1 << 8


DEFAULT_DUMP_FILTER = 0x33
