"""`corepeek dump --with-files -o DIR`: a core that debugs on any machine.

DIR/core is the core; DIR/root/ holds every ELF file the target mapped at its
absolute path as the target saw it (a sysroot: the executable and the exact
libraries, even deleted ones or ones that exist only in the target's mount
namespace); DIR/gdbinit and DIR/lldbinit load the three, so
``gdb -x DIR/gdbinit`` (or ``lldb -s DIR/lldbinit``) needs nothing else.
DIR/.build-id/ab/cdef... names the same files by GNU build-id (hard links), the
layout elfutils (``eu-stack --core DIR/core --debuginfo-path DIR``) and
debuginfod stores use.

DIR is built in a new private temporary directory next to it and renamed
into place once complete, so a failed or interrupted dump leaves nothing
half-written and nothing is ever written through a link an attacker planted.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from corepeek_format import dynlink

from .errors import CaptureError
from .files import FileCache, debug_files, executable, obtain, sysroot_relative
from .remote import RemoteCore
from .v1 import capture_pb2 as pb

WriteCore = Callable[[RemoteCore, Path], object]


@dataclass
class BundleResult:
    path: Path
    files: int = 0                  # ELF files in root/
    fetched: int = 0                # of which crossed the wire
    file_bytes: int = 0             # their bytes on the wire
    missing: list[str] = field(default_factory=list)   # listed but not readable


def _gdb_quote(path: str) -> str:
    """A path as one gdb argument (gdb_buildargv: backslash escapes)."""
    return "".join("\\" + c if c in " \t\"'\\" else c for c in path)


def _lldb_quote(path: str) -> str:
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'


def debugger_scripts(directory: Path, exe: str | None, lay: pb.CoreLayout
                     ) -> tuple[str, str]:
    """(gdbinit, lldbinit) loading DIR/core with DIR/root as the sysroot.

    ``exe`` is the executable's path inside root/ (None: not available); every
    path is checked by ``sysroot_relative`` first, so no remote string can
    add a debugger command.
    """
    root, core = str(directory / "root"), str(directory / "core")
    head = (f"# corepeek: pid {lay.pid} ({lay.comm!r}), {lay.arch}, "
            f"{len(lay.threads)} threads\n")
    gdb = [head, f"set sysroot {_gdb_quote(root)}\n"]
    # lldb resolves every module under a remote platform's sysroot
    lldb = [head, f"platform select remote-linux --sysroot {_lldb_quote(root)}\n"]
    if exe is not None:
        gdb.append(f"file {_gdb_quote(root + exe)}\n")
        lldb.append(f"target create --core {_lldb_quote(core)} {_lldb_quote(root + exe)}\n")
    else:
        lldb.append(f"target create --core {_lldb_quote(core)}\n")
    gdb.append(f"core-file {_gdb_quote(core)}\n")
    return "".join(gdb), "".join(lldb)


def library_aliases(core: RemoteCore) -> list[tuple[str, int]]:
    """(name, MappedFile.id) of each object the dynamic linker loaded under a
    name other than its mapped path (``/lib/...`` for ``/usr/lib/...``).

    A debugger looks libraries up by the link_map's l_name; the agent lists
    the path the kernel resolved.  The object's file is the one mapped where
    its dynamic section (l_ld) lies.
    """
    from .partial import VaddrReader

    lay = core.layout
    notes = core.read_bytes(lay.notes.offset, lay.notes.length)
    try:
        info = dynlink.walk(VaddrReader(core, local_files=False).read,
                            dynlink.auxv_from_notes(notes), lay.elf_class // 8, symbols=())
    except CaptureError:
        return []
    segments = [(int(s.vaddr), int(s.mem_size), int(s.file)) for s in lay.segments if s.file]
    paths = {f.id: f.path for f in lay.files}
    out = []
    for obj in info.objects:
        fid = next((f for v, n, f in segments if v <= obj.l_ld < v + n), 0)
        if obj.name.startswith("/") and fid and paths.get(fid) != obj.name:
            out.append((obj.name, fid))
    return out


def _mkdirs(base: Path, rel: Path) -> Path:
    """base/rel, each directory created 0700 (base is this dump's own new directory)."""
    path = base
    for part in rel.parts:
        path = path / part
        if not os.path.isdir(path):
            os.mkdir(path, 0o700)
    return path


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _refuse_existing(out: Path) -> None:
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        return
    if not (os.path.isdir(out) and not os.path.islink(out)) or os.listdir(out):
        raise CaptureError(f"{out} exists (and is not an empty directory): choose a new "
                           "directory for the bundle")
    del st


def write_bundle(core: RemoteCore, out: Path, write_core: WriteCore,
                 cache: FileCache | None = None) -> BundleResult:
    """Write the bundle of an open capture to the directory ``out`` (which must
    not exist, or be empty)."""
    out = Path(os.path.abspath(out))
    _refuse_existing(out)
    lay = core.layout
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    result = BundleResult(out)
    try:
        before = core.stats.file_bytes
        root = tmp / "root"
        root.mkdir(mode=0o700)
        readable = {f.id for f in debug_files(lay)}
        exe_file = executable(lay)
        exe_rel: str | None = None
        for f in lay.files:
            if not f.elf:
                continue
            rel = sysroot_relative(f.path)
            if f.id not in readable:
                result.missing.append(f.path)
                continue
            dest = _mkdirs(root, rel.parent) / rel.name
            if os.path.lexists(dest):
                continue                # two inodes once at one path: the first wins
            result.fetched += obtain(core, f, cache, dest)
            result.files += 1
            if f.build_id:              # DIR/.build-id/ab/cdef...: for elfutils, debuginfod
                link = _mkdirs(tmp, Path(".build-id", f.build_id[:2])) / f.build_id[2:]
                if not os.path.lexists(link):
                    os.link(dest, link)
            if exe_file is not None and f.id == exe_file.id:
                exe_rel = "/" + str(rel)
        placed = {f.id: root / sysroot_relative(f.path) for f in lay.files if f.id in readable}
        for name, fid in library_aliases(core):
            alias = root / sysroot_relative(name)
            if fid in placed and placed[fid].exists() and not os.path.lexists(alias):
                _mkdirs(root, alias.parent.relative_to(root))
                os.link(placed[fid], alias)
        write_core(core, tmp / "core")
        os.chmod(tmp / "core", 0o600)
        result.file_bytes = core.stats.file_bytes - before
        gdbinit, lldbinit = debugger_scripts(out, exe_rel, lay)
        _write_private(tmp / "gdbinit", gdbinit)
        _write_private(tmp / "lldbinit", lldbinit)
        os.rename(tmp, out)             # never follows a link at `out`; fails if not empty
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result
