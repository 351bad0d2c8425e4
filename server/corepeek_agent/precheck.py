"""Checks made before a target is frozen, so a capture bound to fail stops nothing.

* another tracer (gdb, strace) holds the process: it cannot be seized, and
  seizing the threads it does not trace would stop the target for nothing;
* a 32-bit target whose core cannot fit ELF32 file offsets: the layout is
  computed from /proc alone with empty notes, a lower bound on every offset
  (the exact check runs again once the notes are built, and thaws at once).
"""

from __future__ import annotations

from . import procfs
from .arch import ARCHES
from .arch.base import select_arch
from .elfcore.dumpfilter import vma_dump_size
from .elfcore.layout import CoreLayout, CoreTooLarge
from .elfcore.model import DumpedMapping, Mapping
from .errors import AlreadyTraced, CoreTooLargeForElf32, ProcessGone
from .memory import MemoryReader


def check_untraced(pid: int) -> None:
    """Raise AlreadyTraced naming the tracer if any thread of ``pid`` is traced."""
    found = procfs.foreign_tracer(pid)
    if found is not None:
        tid, tracer, comm = found
        thread = "" if tid == pid else f" (thread {tid})"
        raise AlreadyTraced(f"process {pid}{thread} is already traced by pid {tracer} "
                            f"({comm or 'comm unknown'})")


def check_fits_elf_class(pid: int) -> None:
    """Raise CoreTooLargeForElf32 if a 32-bit target's core surely overflows ELF32."""
    if procfs.exe_elf_class(pid) != 32:
        return
    arch = select_arch(ARCHES.values(), 0, lambda: procfs.exe_elf_ident(pid))
    try:
        reader = MemoryReader(pid)
    except OSError:
        return                      # the exact check after the freeze still applies
    try:
        def read_head(m: Mapping) -> bytes | None:
            buf = bytearray(4)
            return bytes(buf) if reader.read_into(m.start, buf) == 4 else None

        dump_filter = procfs.coredump_filter(pid)
        dumped = [DumpedMapping(m, vma_dump_size(m, dump_filter, read_head))
                  for m in procfs.mappings(pid)]
        CoreLayout.build(arch, b"", dumped)
    except CoreTooLarge as exc:
        raise CoreTooLargeForElf32(f"pid {pid}: {exc}") from None
    except ProcessGone:
        return                      # the open that follows reports it
    finally:
        reader.close()
