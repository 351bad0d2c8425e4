"""ELF header structs for core files, by ELF class (1 = 32-bit, 2 = 64-bit).

Shared by the agent's core writer and the client's partial-core writer so the
two cannot disagree on a field's width or position.
"""

from __future__ import annotations

import struct

ELFCLASS32, ELFCLASS64 = 1, 2
PAGE_SIZE = 4096  # ELF_EXEC_PAGESIZE on x86; segment data starts page aligned
PT_LOAD, PT_NOTE = 1, 4
PN_XNUM = 0xFFFF  # e_phnum when the real count is in the first section header's sh_info

EHDR = {ELFCLASS64: struct.Struct("<16sHHIQQQIHHHHHH"),
        ELFCLASS32: struct.Struct("<16sHHIIIIIHHHHHH")}
# Program header fields in file order differ between classes (p_flags moves).
PHDR = {ELFCLASS64: struct.Struct("<IIQQQQQQ"),    # type flags offset vaddr paddr filesz memsz align
        ELFCLASS32: struct.Struct("<IIIIIIII")}    # type offset vaddr paddr filesz memsz flags align
SHDR = {ELFCLASS64: struct.Struct("<IIQQQQIIQQ"),
        ELFCLASS32: struct.Struct("<IIIIIIIIII")}


def pack_phdr(elf_class: int, p_type: int, p_flags: int, p_offset: int, p_vaddr: int,
              p_paddr: int, p_filesz: int, p_memsz: int, p_align: int) -> bytes:
    """One program header in the class's field order."""
    if elf_class == ELFCLASS64:
        return PHDR[ELFCLASS64].pack(p_type, p_flags, p_offset, p_vaddr, p_paddr,
                                     p_filesz, p_memsz, p_align)
    return PHDR[ELFCLASS32].pack(p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz,
                                 p_flags, p_align)
