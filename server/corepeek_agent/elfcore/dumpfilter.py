"""How many bytes of each mapping the core holds: the kernel's vma_dump_size().

The rules follow fs/coredump.c bit by bit for /proc/PID/coredump_filter, with
what user space can see standing in for kernel state:

* ``anon_vma`` (the VMA was ever written, so it has private pages) is
  approximated by smaps ``Anonymous`` + ``Swap`` being non-zero;
* the mapped file's ``i_nlink`` and ``i_mode`` come from a stat of
  /proc/PID/map_files/START-END;
* the ELF-header check that the kernel defers to dump time is answered by a
  callable that reads the mapping's first four bytes.
"""

from __future__ import annotations

from collections.abc import Callable

from .constants import ELFMAG, PAGE_SIZE, DumpFilter
from .model import Mapping

# Named special mappings the kernel always dumps (always_dump_vma()).
_NOT_SPECIAL_PREFIXES = ("[heap]", "[stack", "[anon:", "[anon_shmem:")


def is_special_mapping(m: Mapping) -> bool:
    """vdso, vvar, vsyscall, uprobes...: mappings with a vm_ops->name."""
    return m.path.startswith("[") and not m.path.startswith(_NOT_SPECIAL_PREFIXES)


def vma_dump_size(m: Mapping, dump_filter: int,
                  read_head: Callable[[Mapping], bytes | None]) -> int:
    """Bytes of ``m`` (from its start) that a kernel core would contain."""
    f = DumpFilter(dump_filter & 0x1FF)
    whole = m.size
    if is_special_mapping(m):
        return whole
    flags = m.vm_flags
    if "dd" in flags:                       # VM_DONTDUMP (MADV_DONTDUMP)
        return 0
    if "ht" in flags:                       # hugetlb
        wanted = DumpFilter.HUGETLB_SHARED if m.shared else DumpFilter.HUGETLB_PRIVATE
        return whole if f & wanted else 0
    if "io" in flags:                       # VM_IO: device memory
        return 0
    if m.shared:
        anon = m.file_nlink == 0 or not m.file_backed
        wanted = DumpFilter.ANON_SHARED if anon else DumpFilter.MAPPED_SHARED
        return whole if f & wanted else 0
    if m.anon_bytes > 0 and f & DumpFilter.ANON_PRIVATE:
        return whole
    if not m.file_backed:
        return 0
    if f & DumpFilter.MAPPED_PRIVATE:
        return whole
    if f & DumpFilter.ELF_HEADERS and m.offset == 0 and m.readable:
        if m.file_mode is not None and m.file_mode & 0o111:
            return min(PAGE_SIZE, whole)
        head = read_head(m)
        if head is not None and head[:4] == ELFMAG:
            return min(PAGE_SIZE, whole)
    return 0
