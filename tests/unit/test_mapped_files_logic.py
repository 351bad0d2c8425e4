"""Pure parts of the mapped-file service and bundles: who may read what, paths, scripts."""
from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from corepeek.bundle import debugger_scripts
from corepeek.errors import CaptureError
from corepeek.files import FileCache, sysroot_relative
from corepeek.v1 import capture_pb2 as pb
from corepeek_agent.errors import InvalidRequest, PermissionDenied
from corepeek_agent.mapped_files import FileServer, FileTable, MappedFile


def _file(fid: int, **kw: object) -> MappedFile:
    base = dict(id=fid, path=f"/lib/f{fid}.so", deleted=False, device=1, inode=fid, size=100,
                build_id="ab" * 20, elf=True, regular=True, dontdump=False, vmas=((0, 4096),))
    base.update(kw)
    return MappedFile(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("kw,full,stacks", [
    ({}, True, True),
    ({"elf": False, "build_id": ""}, True, False),      # data files: full mode only
    ({"dontdump": True}, False, False),                 # kept out of the core on purpose
    ({"regular": False}, False, False),                 # devices, or nothing could be opened
])
def test_what_each_mode_may_read(kw: dict, full: bool, stacks: bool) -> None:
    f = _file(1, **kw)
    assert (f.readable("full"), f.readable("stacks"), f.readable("notes")) == (full, stacks,
                                                                                False)


def test_file_server_refuses_before_opening_anything() -> None:
    table = FileTable((_file(1), _file(2, elf=False)), {0: 1})
    server = FileServer(pid=1 << 30, table=table, mode="stacks", chunk_size=4096)
    for bad in (0, 3, 1 << 31):
        with pytest.raises(InvalidRequest):
            list(server.read(bad, 0, 10))
    with pytest.raises(PermissionDenied, match="ELF files only"):
        list(server.read(2, 0, 10))
    assert list(server.read(1, 100, 10)) == []           # at/after the end: nothing, no open
    notes = FileServer(pid=1 << 30, table=table, mode="notes", chunk_size=4096)
    with pytest.raises(PermissionDenied, match="notes"):
        list(notes.read(1, 0, 10))
    assert table.file_at(0) == 1 and table.file_at(4096) == 0


@pytest.mark.parametrize("path", ["relative/x", "/", "/a/../etc/passwd", "/a/./b", "/a//b/..",
                                  "/a/b\n/c", "/a/\x1b[2J", "/.."])
def test_unusable_remote_paths_are_refused(path: str) -> None:
    with pytest.raises(CaptureError):
        sysroot_relative(path)


def test_remote_paths_stay_inside_the_sysroot() -> None:
    assert sysroot_relative("/usr/lib/libc.so.6") == PurePosixPath("usr/lib/libc.so.6")
    assert sysroot_relative("/srv/my app/bin") == PurePosixPath("srv/my app/bin")


def test_debugger_scripts_quote_paths() -> None:
    lay = pb.CoreLayout(pid=7, comm="x", arch="x86_64")
    gdb, lldb = debugger_scripts(Path("/tmp/my dir"), "/srv/a b/exe", lay)
    assert "set sysroot /tmp/my\\ dir/root\n" in gdb
    assert "file /tmp/my\\ dir/root/srv/a\\ b/exe\n" in gdb
    assert 'platform select remote-linux --sysroot "/tmp/my dir/root"' in lldb
    assert all(line.startswith(("#", "set ", "file ", "core-file ")) for line in
               gdb.splitlines())


def test_cache_paths_are_build_ids_only(tmp_path: Path) -> None:
    cache = FileCache(tmp_path)
    assert cache.path_for("abcdef12") == tmp_path / "files" / "ab" / "cdef12"
    for bad in ("../../etc", "ABCD", "ab"):
        with pytest.raises(ValueError):
            cache.path_for(bad)
    f = pb.MappedFile(id=1, path="/x", size=3, build_id="abcdef12")
    assert cache.lookup(f) is None
    (tmp_path / "files" / "ab").mkdir(parents=True)
    (tmp_path / "files" / "ab" / "cdef12").write_bytes(b"xyz")
    assert cache.lookup(f) == tmp_path / "files" / "ab" / "cdef12"
    assert cache.lookup(pb.MappedFile(id=1, path="/x", size=4, build_id="abcdef12")) is None
