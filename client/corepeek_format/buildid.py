"""The GNU build-id of an ELF file, over a read callback.

Both sides use it: the agent names every file a target maps by its build-id
(read through /proc/PID/map_files), and the client checks that a cached file
is the one it asked for.  Only little-endian ELF (x86) is read; anything
else has no build-id here.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from .elfstructs import ELFCLASS32, ELFCLASS64, EHDR, PHDR, SHDR

ELF_MAGIC = b"\x7fELF"
PT_NOTE = 4
SHT_NOTE = 7
NT_GNU_BUILD_ID = 3
MAX_NOTES_BYTES = 64 * 1024         # a note segment larger than this is not a build-id's
MAX_HEADERS = 4096

# read(offset, length) -> at most length bytes (fewer at the end of the file)
Read = Callable[[int, int], bytes]


def is_elf(head: bytes) -> bool:
    return head[:4] == ELF_MAGIC


def _notes_build_id(data: bytes, align: int) -> str:
    """The NT_GNU_BUILD_ID descriptor (hex) among the notes in ``data``."""
    pos = 0
    while pos + 12 <= len(data):
        namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
        name_at = pos + 12
        desc_at = name_at + (namesz + align - 1) // align * align
        end = desc_at + (descsz + align - 1) // align * align
        if desc_at + descsz > len(data):
            return ""
        if ntype == NT_GNU_BUILD_ID and data[name_at:name_at + namesz].rstrip(b"\0") == b"GNU":
            return data[desc_at:desc_at + descsz].hex()
        pos = end
    return ""


def build_id(read: Read) -> str:
    """The file's GNU build-id in hex, from its PT_NOTE segments (or, for a
    file without program headers, its SHT_NOTE sections); "" if none."""
    ident = read(0, 64)
    if not is_elf(ident) or len(ident) < 52 or ident[5] != 1:      # ELFDATA2LSB only
        return ""
    cls = ident[4]
    if cls not in (ELFCLASS32, ELFCLASS64):
        return ""
    ehdr = EHDR[cls]
    if len(ident) < ehdr.size:
        return ""
    fields = ehdr.unpack_from(ident)
    phoff, shoff, phentsize, phnum, shentsize, shnum = (
        fields[5], fields[6], fields[9], fields[10], fields[11], fields[12])
    tables = [(phoff, phentsize, phnum, PHDR[cls], True),
              (shoff, shentsize, shnum, SHDR[cls], False)]
    for off, entsize, num, st, program in tables:
        if not off or entsize < st.size or not 0 < num <= MAX_HEADERS:
            continue
        table = read(off, entsize * num)
        for i in range(len(table) // entsize):
            h = st.unpack_from(table, i * entsize)
            if program:
                at, size = (h[2], h[5]) if cls == ELFCLASS64 else (h[1], h[4])
                is_note, align = h[0] == PT_NOTE, h[7]
            else:
                is_note, at, size, align = h[1] == SHT_NOTE, h[4], h[5], h[8]
            if not is_note or not 0 < size <= MAX_NOTES_BYTES:
                continue
            found = _notes_build_id(read(at, size), 8 if align == 8 else 4)
            if found:
                return found
    return ""
