"""The files a captured process maps: listed with build-ids, served by range.

A debugger on another machine needs the target's executable and the exact
libraries it had mapped.  Those may live only in the target's mount namespace,
or be deleted by an upgrade since.  While the target is frozen the session
lists every regular file it maps, once per inode, with its size and GNU
build-id (``scan``); a stacks or full session may then read them
(``FileServer``) through /proc/PID/map_files, which opens the inode actually
mapped, never whatever the path names today.

What may be read: nothing in notes mode; ELF files only in stacks mode (a
stacks session may see code and symbols, not the data files a process maps);
every regular file in full mode.  A file any of whose mappings is
MADV_DONTDUMP is never served (it was kept out of the core on purpose).  A
file the target does not map has no id, so it cannot be named at all.
"""

from __future__ import annotations

import logging
import os
import stat as statmod
from collections.abc import Iterator
from dataclasses import dataclass, field

from corepeek_format.buildid import build_id, is_elf

from . import procfs
from .elfcore.model import Mapping
from .errors import InvalidRequest, PermissionDenied, ProcessGone

log = logging.getLogger(__name__)

MODE_FULL, MODE_STACKS, MODE_NOTES = "full", "stacks", "notes"
MAX_FILES = 4096                    # listed per target; more are left out (logged)
DELETED = " (deleted)"


@dataclass(frozen=True)
class MappedFile:
    id: int                         # 1, 2, ...
    path: str                       # as the target sees it, without " (deleted)"
    deleted: bool
    device: int
    inode: int
    size: int
    build_id: str                   # hex, "" if none
    elf: bool
    regular: bool                   # a regular file the agent could open
    dontdump: bool                  # some mapping of it is MADV_DONTDUMP
    vmas: tuple[tuple[int, int], ...]   # [start, end) of each mapping of it

    def readable(self, mode: str) -> bool:
        """May a session in ``mode`` read this file's bytes?"""
        if not self.regular or self.dontdump or mode == MODE_NOTES:
            return False
        return mode == MODE_FULL or self.elf


@dataclass(frozen=True)
class FileTable:
    files: tuple[MappedFile, ...] = ()
    by_vma: dict[int, int] = field(default_factory=dict)    # vma start -> file id

    def file_at(self, vaddr: int) -> int:
        """The id of the file mapped at the VMA starting at ``vaddr`` (0: none)."""
        return self.by_vma.get(vaddr, 0)

    def get(self, file_id: int) -> MappedFile | None:
        return self.files[file_id - 1] if 0 < file_id <= len(self.files) else None


def _describe(pid: int, vmas: list[Mapping], dev: int, ino: int) -> tuple[int, bool, str, bool]:
    """(size, regular, build-id, elf) of one mapped inode, read through its mapping."""
    m = vmas[0]
    fd = procfs.open_mapped_file(pid, m.start, m.end, dev, ino, m.path.removesuffix(DELETED))
    if fd is None:
        return 0, False, "", False
    try:
        st = os.fstat(fd)

        def read(offset: int, length: int) -> bytes:
            return os.pread(fd, length, offset)

        head = read(0, 4)
        elf = is_elf(head)
        return st.st_size, statmod.S_ISREG(st.st_mode), build_id(read) if elf else "", elf
    except OSError:
        return 0, False, "", False
    finally:
        os.close(fd)


def scan(pid: int, tid: int | None, maps: list[Mapping]) -> FileTable:
    """Every file ``pid`` maps, once per inode (run while it is frozen)."""
    devices = procfs.map_devices(pid, tid)
    groups: dict[tuple[int, int], list[Mapping]] = {}
    for m in maps:
        if not m.inode or not m.path.startswith("/"):
            continue
        ident = procfs.map_file_identity(pid, m.start, m.end)
        key = (ident[0], ident[1]) if ident else (devices.get(m.start, -1), m.inode)
        groups.setdefault(key, []).append(m)
    if len(groups) > MAX_FILES:
        log.warning("pid %d maps %d files; listing the first %d", pid, len(groups), MAX_FILES)
    files: list[MappedFile] = []
    by_vma: dict[int, int] = {}
    for (dev, ino), vmas in list(groups.items())[:MAX_FILES]:
        size, regular, bid, elf = _describe(pid, vmas, dev, ino)
        fid = len(files) + 1
        path = vmas[0].path
        files.append(MappedFile(
            id=fid, path=path.removesuffix(DELETED), deleted=path.endswith(DELETED),
            device=dev, inode=ino, size=size, build_id=bid, elf=elf, regular=regular,
            dontdump=any("dd" in v.vm_flags for v in vmas),
            vmas=tuple((v.start, v.end) for v in vmas)))
        by_vma.update((v.start, fid) for v in vmas)
    return FileTable(tuple(files), by_vma)


class FileServer:
    """One stream's reads of mapped files: bounds, policy, pinned fds.

    Each file is opened once, on its first read, through one of its
    mappings (or the target's root, same inode only), and kept open until the
    stream ends, so later reads see the same inode whatever the target does.
    """

    def __init__(self, pid: int, table: FileTable, mode: str, chunk_size: int) -> None:
        self.pid, self.table, self.mode, self.chunk_size = pid, table, mode, chunk_size
        self._fds: dict[int, int] = {}

    def file(self, file_id: int) -> MappedFile:
        """The file ``file_id`` names, if this session may read it."""
        f = self.table.get(file_id)
        if f is None:
            raise InvalidRequest(f"no mapped file with id {file_id} (the layout lists "
                                 f"{len(self.table.files)})")
        if self.mode == MODE_NOTES:
            raise PermissionDenied("a notes capture may not read mapped files",
                                   help="open a stacks or full capture")
        if not f.readable(self.mode):
            why = ("it is not a regular file" if not f.regular else
                   "a mapping of it is MADV_DONTDUMP" if f.dontdump else
                   f"{self.mode} mode serves ELF files only")
            raise PermissionDenied(f"mapped file {file_id} may not be read: {why}")
        return f

    def _fd(self, f: MappedFile) -> int:
        fd = self._fds.get(f.id)
        if fd is not None:
            return fd
        for start, end in f.vmas:
            fd = procfs.open_mapped_file(self.pid, start, end, f.device, f.inode, f.path)
            if fd is not None:
                self._fds[f.id] = fd
                return fd
        raise ProcessGone(f"pid {self.pid} has exited or no longer maps {f.path} (and "
                          "that path names another file now)")

    def read(self, file_id: int, offset: int, length: int) -> Iterator[tuple[int, bytes]]:
        """(offset, bytes) pieces of at most ``chunk_size`` bytes, up to the
        size the file had when listed (a read past it yields nothing)."""
        f = self.file(file_id)
        end = min(offset + length, f.size)
        if offset >= end:
            return
        fd = self._fd(f)
        pos = offset
        while pos < end:
            data = os.pread(fd, min(self.chunk_size, end - pos), pos)
            if not data:
                return                  # the file was truncated since: a short read
            yield pos, data
            pos += len(data)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
