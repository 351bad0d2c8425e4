"""vma_dump_size: the kernel's coredump_filter rules, bit by bit."""

from __future__ import annotations

import pytest

from corepeek_agent.elfcore.constants import DEFAULT_DUMP_FILTER, PAGE_SIZE, DumpFilter
from corepeek_agent.elfcore.dumpfilter import vma_dump_size
from corepeek_agent.elfcore.model import Mapping

SIZE = 16 * PAGE_SIZE


def m(perms: str = "rw-p", path: str = "", inode: int = 0, anon: int = 0,
      flags: str = "rd wr mr mw me ac", nlink: int | None = None, mode: int | None = None,
      offset: int = 0) -> Mapping:
    return Mapping(start=0x10000, end=0x10000 + SIZE, perms=perms, offset=offset, inode=inode,
                   path=path, vm_flags=frozenset(flags.split()), anon_bytes=anon,
                   file_nlink=nlink, file_mode=mode)


def no_head(_: Mapping) -> bytes | None:
    raise AssertionError("the mapping head should not be read here")


@pytest.mark.parametrize("mapping, filt, expected", [
    # written anonymous memory: bit 0
    (m(anon=4096), DEFAULT_DUMP_FILTER, SIZE),
    (m(anon=4096), DEFAULT_DUMP_FILTER & ~DumpFilter.ANON_PRIVATE, 0),
    # never-written anonymous memory has no anon_vma: nothing
    (m(anon=0), 0x1FF, 0),
    # MADV_DONTDUMP wins over everything but special mappings
    (m(anon=4096, flags="rd wr dd"), 0x1FF, 0),
    (m(path="[vdso]", perms="r-xp", flags="rd ex dd"), 0, SIZE),
    (m(path="[vvar]", perms="r--p"), 0, SIZE),
    # shared anonymous (shmem, nlink 0): bit 1; shared file: bit 3
    (m(perms="rw-s", path="/dev/zero (deleted)", inode=5, nlink=0), DEFAULT_DUMP_FILTER, SIZE),
    (m(perms="rw-s", path="/dev/zero (deleted)", inode=5, nlink=0), 0x31, 0),
    (m(perms="rw-s", path="/data", inode=5, nlink=1), DEFAULT_DUMP_FILTER, 0),
    (m(perms="rw-s", path="/data", inode=5, nlink=1), DumpFilter.MAPPED_SHARED, SIZE),
    # private file mapping: bit 2 dumps it whole
    (m(perms="r--p", path="/lib/x.so", inode=5, offset=PAGE_SIZE), DumpFilter.MAPPED_PRIVATE, SIZE),
    # hugetlb: bits 5/6
    (m(anon=4096, flags="rd wr ht"), DumpFilter.HUGETLB_PRIVATE, SIZE),
    (m(anon=4096, flags="rd wr ht"), DumpFilter.ANON_PRIVATE, 0),
    (m(perms="rw-s", flags="rd wr sh ht", inode=5, path="/anon_hugepage (deleted)", nlink=0),
     DumpFilter.HUGETLB_SHARED, SIZE),
    # VM_IO is never dumped
    (m(anon=4096, flags="rd wr io"), 0x1FF, 0),
])
def test_filter_rules(mapping: Mapping, filt: int, expected: int) -> None:
    assert vma_dump_size(mapping, filt, no_head) == expected


def test_given_executable_file_at_offset_0_then_first_page_only() -> None:
    exe = m(perms="r--p", path="/usr/bin/x", inode=5, mode=0o755)
    assert vma_dump_size(exe, DEFAULT_DUMP_FILTER, no_head) == PAGE_SIZE
    assert vma_dump_size(exe, DEFAULT_DUMP_FILTER & ~DumpFilter.ELF_HEADERS, no_head) == 0


def test_given_non_executable_library_then_elf_magic_decides() -> None:
    lib = m(perms="r--p", path="/usr/lib/libx.so", inode=5, mode=0o644)
    assert vma_dump_size(lib, DEFAULT_DUMP_FILTER, lambda _: b"\x7fELF") == PAGE_SIZE
    assert vma_dump_size(lib, DEFAULT_DUMP_FILTER, lambda _: b"#!/b") == 0
    assert vma_dump_size(lib, DEFAULT_DUMP_FILTER, lambda _: None) == 0


def test_given_file_mapping_not_at_offset_0_then_nothing() -> None:
    text = m(perms="r-xp", path="/usr/bin/x", inode=5, mode=0o755, offset=PAGE_SIZE)
    assert vma_dump_size(text, DEFAULT_DUMP_FILTER, no_head) == 0
