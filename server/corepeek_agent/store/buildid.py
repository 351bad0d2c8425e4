"""GNU build-ids of ELF objects, from the first page of the file: what a
stored entry lists so a debugger's symbol server can be asked before the core
is fetched.  Pure: bytes in, hex string out."""

from __future__ import annotations

import struct

NT_GNU_BUILD_ID = 3
PT_NOTE = 4


def build_id(head: bytes) -> str:
    """The build-id in ``head`` (the first bytes of an ELF file), or ""."""
    if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] not in (1, 2) or head[5] not in (1, 2):
        return ""
    end = "<" if head[5] == 1 else ">"
    if head[4] == 2:
        phoff, = struct.unpack_from(end + "Q", head, 32)
        phentsize, phnum = struct.unpack_from(end + "HH", head, 54)
        phdr, off_at, size_at = end + "IIQQQQQQ", 2, 5
    else:
        phoff, = struct.unpack_from(end + "I", head, 28)
        phentsize, phnum = struct.unpack_from(end + "HH", head, 42)
        phdr, off_at, size_at = end + "IIIIIIII", 1, 4
    if phentsize != struct.calcsize(phdr):
        return ""
    for i in range(min(phnum, 64)):
        at = phoff + i * phentsize
        if at + phentsize > len(head):
            break
        ph = struct.unpack_from(phdr, head, at)
        if ph[0] != PT_NOTE:
            continue
        found = _notes(head, ph[off_at], ph[size_at], end)
        if found:
            return found
    return ""


def _notes(head: bytes, offset: int, size: int, end: str) -> str:
    pos, stop = offset, min(offset + size, len(head))
    while pos + 12 <= stop:
        namesz, descsz, ntype = struct.unpack_from(end + "III", head, pos)
        name_at = pos + 12
        desc_at = name_at + ((namesz + 3) & ~3)
        nxt = desc_at + ((descsz + 3) & ~3)
        if nxt > stop:
            return ""
        if ntype == NT_GNU_BUILD_ID and head[name_at:name_at + namesz] == b"GNU\0":
            return head[desc_at:desc_at + descsz].hex()
        pos = nxt
    return ""
