"""`corepeek mount`: a live process as a read-only directory (FUSE).

MOUNTPOINT/core is the whole core, exact size, read lazily through the open
capture stream (``RemoteCoreFile``: windows of ``readahead`` bytes, a block
cache); MOUNTPOINT/root/ holds the ELF files the target maps at their paths
(each fetched, or taken from the build-id cache, on its first read);
MOUNTPOINT/gdbinit and lldbinit load the three; MOUNTPOINT/.build-id/ names
the files by build-id (``eu-stack --core MNT/core --debuginfo-path MNT``).  A debugger pulls only what
it touches: a backtrace of every thread reads a few MiB of a GiB core.

The capture stays open while mounted (the target stays frozen, or its
snapshot is served, within the agent's --max-freeze); unmounting
(``fusermount3 -u``) or SIGINT ends it and the target runs free.  Once the
agent or the network failed, every read answers EIO at once.

Binding: mfusepy (the maintained fusepy fork: ctypes, libfuse 2 or 3, no
build step); pyfuse3 would need trio and a compiler.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .bundle import debugger_scripts, library_aliases
from .errors import CaptureError
from .files import FileCache, debug_files, executable, obtain, sysroot_relative
from .remote import RemoteCore

log = logging.getLogger(__name__)

# Measured (bench/bench_debug.py, docs/remote-debugging.md): gdb's `thread
# apply all bt` reads stacks and link maps in small pieces, so the window
# hardly changes its time (1.07-1.11 s for 32 KiB-512 KiB windows on a 4 GiB,
# 50-thread target) but does change the bytes (core bytes +70% from 32 KiB
# to 512 KiB on a 256 MiB target); 128 KiB keeps the request count low for
# sequential readers (drgn, eu-stack) at +8% bytes over 32 KiB.
DEFAULT_READAHEAD = 128 * 1024
FUSE_MAIN_LOOP_ENDED = 8


@dataclass
class Node:
    """One entry of the mounted tree."""

    kind: str                               # "dir", "core", "text", "file"
    children: dict[str, str] = field(default_factory=dict)   # name -> path
    text: bytes = b""
    file_id: int = 0
    size: int = 0


class CoreFS:
    """The FUSE operations (mfusepy calls them from its worker threads)."""

    use_ns = True

    def __init__(self, core: RemoteCore, mountpoint: Path, cache: FileCache | None,
                 readahead: int = DEFAULT_READAHEAD, scratch: Path | None = None) -> None:
        self.core = core
        self.cache = cache
        self.failed: str | None = None       # why reads answer EIO
        self._core_file = core.file
        self._core_file.readahead = readahead
        self._lock = threading.Lock()       # RemoteCoreFile is one cursor
        self._file_lock = threading.Lock()
        self._local: dict[int, int] = {}     # file id -> fd of the local copy
        self._scratch = Path(tempfile.mkdtemp(prefix="corepeek-mount-", dir=scratch))
        self._uid, self._gid, self._now = os.geteuid(), os.getegid(), time.time_ns()
        self.nodes: dict[str, Node] = {"/": Node("dir")}
        self._add("/core", Node("core", size=core.size))
        self._add("/root", Node("dir"))
        lay = core.layout
        exe_file, exe_path = executable(lay), None
        placed: dict[int, str] = {}
        for f in debug_files(lay):
            path = "/root/" + str(sysroot_relative(f.path))
            if path not in self.nodes:
                self._add(path, Node("file", file_id=f.id, size=f.size))
                placed[f.id] = path
                if exe_file is not None and f.id == exe_file.id:
                    exe_path = f.path
                if f.build_id:          # as in a bundle: for elfutils and debuginfod
                    self._add(f"/.build-id/{f.build_id[:2]}/{f.build_id[2:]}",
                              Node("file", file_id=f.id, size=f.size))
        for name, fid in library_aliases(core):
            path = "/root/" + str(sysroot_relative(name))
            if fid in placed and path not in self.nodes:
                self._add(path, Node("file", file_id=fid, size=self.nodes[placed[fid]].size))
        gdbinit, lldbinit = debugger_scripts(mountpoint, exe_path, lay)
        self._add("/gdbinit", Node("text", text=gdbinit.encode()))
        self._add("/lldbinit", Node("text", text=lldbinit.encode()))

    def _add(self, path: str, node: Node) -> None:
        parent = str(PurePosixPath(path).parent)
        if parent not in self.nodes:
            self._add(parent, Node("dir"))
        self.nodes[parent].children[PurePosixPath(path).name] = path
        self.nodes[path] = node

    def _node(self, path: str) -> Node:
        node = self.nodes.get(path)
        if node is None:
            raise _fuse_error(errno.ENOENT)
        return node

    # -- FUSE operations ---------------------------------------------------------------

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        node = self._node(path)
        base = {"st_uid": self._uid, "st_gid": self._gid, "st_atime": self._now,
                "st_mtime": self._now, "st_ctime": self._now}
        if node.kind == "dir":
            return {**base, "st_mode": stat.S_IFDIR | 0o500, "st_nlink": 2}
        size = len(node.text) if node.kind == "text" else node.size
        return {**base, "st_mode": stat.S_IFREG | 0o400, "st_nlink": 1, "st_size": size,
                "st_blocks": (size + 511) // 512}

    def readdir(self, path: str, fh: int) -> list[str]:
        node = self._node(path)
        if node.kind != "dir":
            raise _fuse_error(errno.ENOTDIR)
        return [".", "..", *node.children]

    def open(self, path: str, flags: int) -> int:
        node = self._node(path)
        if node.kind == "dir":
            raise _fuse_error(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise _fuse_error(errno.EROFS)
        return 0

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        node = self._node(path)
        if node.kind == "text":
            return node.text[offset:offset + size]
        if self.failed is not None:
            raise _fuse_error(errno.EIO)
        try:
            if node.kind == "core":
                return self._read_core(offset, size)
            return os.pread(self._local_copy(node.file_id), size, offset)
        except CaptureError as exc:      # the stream is over: every later read fails too
            self.failed = str(exc)
            log.error("reads now fail with EIO: %s", exc)
            raise _fuse_error(errno.EIO) from None

    def _read_core(self, offset: int, size: int) -> bytes:
        """Exactly the bytes asked for (up to the end of the core): what a
        stacks or notes session may not read reads as zeros, as in a partial
        core, and a short read never ends the file early."""
        end = min(offset + size, self.core.size)
        out = bytearray()
        with self._lock:
            while offset + len(out) < end:
                pos = offset + len(out)
                self._core_file.seek(pos)
                try:
                    data = self._core_file.read(end - pos)
                except CaptureError as exc:
                    if exc.code is None or exc.code.name != "PERMISSION_DENIED":
                        raise
                    data = b""
                if not data:            # not readable here: zeros up to the next readable byte
                    nxt = min((int(r.offset) for r in self.core.layout.readable
                               if int(r.offset) > pos), default=end)
                    data = bytes(min(nxt, end) - pos)
                out += data
        return bytes(out)

    def _local_copy(self, file_id: int) -> int:
        """An fd of mapped file ``file_id`` here: fetched (or from the cache) on first use."""
        with self._file_lock:
            fd = self._local.get(file_id)
            if fd is None:
                f = next(f for f in self.core.layout.files if f.id == file_id)
                dest = self._scratch / str(file_id)
                obtain(self.core, f, self.cache, dest)
                fd = os.open(dest, os.O_RDONLY | os.O_CLOEXEC)
                os.unlink(dest)
                self._local[file_id] = fd
            return fd

    def statfs(self, path: str) -> dict[str, int]:
        return {"f_bsize": 4096, "f_frsize": 4096, "f_namemax": 255}

    def close(self) -> None:
        for fd in self._local.values():
            os.close(fd)
        self._local.clear()
        try:
            os.rmdir(self._scratch)
        except OSError:
            pass


def _fuse_error(code: int) -> OSError:
    import mfusepy
    return mfusepy.FuseOSError(code)


def mount(core: RemoteCore, mountpoint: Path, *, cache: FileCache | None = None,
          readahead: int = DEFAULT_READAHEAD) -> CoreFS:
    """Serve ``core`` at ``mountpoint`` until it is unmounted or SIGINT; returns
    the filesystem (its ``core.stats`` say what crossed the wire)."""
    try:
        import mfusepy
    except (ImportError, OSError) as exc:      # OSError: libfuse not found
        raise CaptureError(f"corepeek mount needs mfusepy and libfuse3 "
                           f"(pip install 'corepeek[mount]'; apt install fuse3): {exc}") from None
    fs = CoreFS(core, Path(os.path.abspath(mountpoint)), cache, readahead)
    ops = _operations(mfusepy, fs)
    try:
        mfusepy.FUSE(ops, str(mountpoint), foreground=True, ro=True, fsname="corepeek",
                     subtype="corepeek", default_permissions=True)
    except RuntimeError as exc:
        # fuse_main's status: 8 is "the loop ended on a signal" (SIGINT, SIGTERM)
        # as well as a loop failure; anything else is a failed mount.
        status = exc.args[0] if exc.args else None
        if status != FUSE_MAIN_LOOP_ENDED:
            raise CaptureError(f"cannot mount at {mountpoint} (libfuse status {status})") from None
        log.info("the FUSE loop ended on a signal")
    finally:
        fs.close()
    return fs


def _operations(mfusepy: Any, fs: CoreFS) -> Any:
    """An mfusepy.Operations whose methods are ``fs``'s."""
    class Ops(mfusepy.Operations):   # type: ignore[misc, name-defined]
        use_ns = True
        getattr = staticmethod(fs.getattr)
        readdir = staticmethod(fs.readdir)
        open = staticmethod(fs.open)
        read = staticmethod(fs.read)
        statfs = staticmethod(fs.statfs)
    return Ops()
