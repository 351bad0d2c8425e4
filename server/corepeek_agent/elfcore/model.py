"""Plain records describing a frozen process, the input of the core writer."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ThreadState:
    """One thread at the moment of the freeze.

    ``gpregs`` is the raw NT_PRSTATUS register set; for a thread that did not
    stop in time it is empty and the core gets zeroed registers (the seed
    RFC's rule).  ``regsets`` holds the other per-thread notes in kernel order.
    """

    tid: int
    frozen: bool
    gpregs: bytes
    regsets: tuple[tuple[int, bytes], ...] = ()
    sigpend: int = 0
    sighold: int = 0
    utime_us: int = 0
    stime_us: int = 0
    comm: str = ""
    state: str = ""


@dataclass(frozen=True)
class ProcessState:
    """Process-wide facts that go into NT_PRPSINFO and NT_PRSTATUS."""

    pid: int
    ppid: int
    pgrp: int
    sid: int
    uid: int
    gid: int
    state: str            # /proc state letter before the freeze
    nice: int
    flags: int            # task->flags (field 9 of /proc/PID/stat)
    comm: str
    psargs: bytes         # argv joined by spaces
    utime_us: int = 0     # whole-group times (the leader's prstatus)
    stime_us: int = 0
    cutime_us: int = 0
    cstime_us: int = 0
    auxv: bytes = b""
    siginfo: bytes = b""  # native siginfo_t; empty means no signal (live capture)


@dataclass(frozen=True)
class Mapping:
    """One VMA as /proc/PID/maps and smaps describe it."""

    start: int
    end: int
    perms: str                      # e.g. "r-xp"
    offset: int                     # offset in the mapped file, bytes
    inode: int
    path: str                       # "" for anonymous memory
    vm_flags: frozenset[str] = field(default_factory=frozenset)  # smaps VmFlags
    anon_bytes: int = 0             # smaps Anonymous + Swap
    shared_bytes: int = 0           # smaps Shared_Clean + Shared_Dirty + KSM
    file_nlink: int | None = None   # link count of the mapped file
    file_mode: int | None = None    # st_mode of the mapped file

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def readable(self) -> bool:
        return self.perms[0] == "r"

    @property
    def writable(self) -> bool:
        return self.perms[1] == "w"

    @property
    def executable(self) -> bool:
        return self.perms[2] == "x"

    @property
    def shared(self) -> bool:
        return self.perms[3] == "s"

    @property
    def may_hold_cow_shared_pages(self) -> bool:
        """Private memory with anonymous pages another process also maps
        (copy-on-write after fork, or KSM): pinning them would unshare them."""
        return not self.shared and self.anon_bytes > 0 and self.shared_bytes > 0

    @property
    def file_backed(self) -> bool:
        """True when the VMA has a vm_file (it then appears in NT_FILE)."""
        return self.inode != 0 or self.path.startswith("/")

    @property
    def display_path(self) -> str:
        return self.path


@dataclass(frozen=True)
class DumpedMapping:
    """A mapping with the number of its bytes the core holds (from its start)."""

    mapping: Mapping
    dump_size: int
