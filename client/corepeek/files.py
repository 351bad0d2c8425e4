"""The files a captured process maps, fetched once per client.

The agent lists every file the target maps (``CoreLayout.files``: path, size,
GNU build-id) and serves their bytes inside the capture stream
(``RemoteCore.read_file``).  A library is the same file on every host that
runs the same build, so fetched ELF files are kept in a cache keyed by
build-id under the user's cache directory: a file crosses the wire once per
client, whatever process or host it came from.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath

from corepeek_format.buildid import build_id

from .errors import CaptureError
from .remote import RemoteCore
from .v1 import capture_pb2 as pb

FETCH_BYTES = 8 * 1024 * 1024       # bytes per read_file request


def cache_root() -> Path:
    """$XDG_CACHE_HOME/corepeek (or ~/.cache/corepeek)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "corepeek"


def sysroot_relative(path: str) -> PurePosixPath:
    """A remote absolute path as a relative path inside a sysroot.

    The path comes from the agent: "..", "." and empty components are refused
    so that no file can be written outside the sysroot.
    """
    parts = path.split("/")[1:]
    if not path.startswith("/") or any(
            p in ("..", ".", "") or any(ord(c) < 0x20 or c == "\x7f" for c in p)
            for p in parts):
        raise CaptureError(f"the agent listed a mapped file with an unusable path {path!r}")
    return PurePosixPath(*parts)


def file_build_id(path: Path) -> str:
    with open(path, "rb") as f:
        return build_id(lambda off, n: os.pread(f.fileno(), n, off))


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if not os.path.isdir(path) or os.path.islink(path) or st.st_uid != os.geteuid():
        raise CaptureError(f"{path} is not a directory of this user")


class FileCache:
    """ELF files by build-id: ROOT/files/<first 2 hex digits>/<rest>, 0600 in 0700 dirs."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or cache_root()) / "files"
        self.hits = 0
        self.misses = 0

    def path_for(self, bid: str) -> Path:
        if len(bid) < 4 or any(c not in "0123456789abcdef" for c in bid):
            raise ValueError(f"not a build-id: {bid!r}")
        return self.root / bid[:2] / bid[2:]

    def lookup(self, f: pb.MappedFile) -> Path | None:
        """The cached copy of ``f`` (same build-id and size), or None."""
        if not f.build_id:
            return None
        path = self.path_for(f.build_id)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        if not os.path.isfile(path) or os.path.islink(path) or st.st_size != f.size:
            return None
        return path

    def store(self, f: pb.MappedFile, src: Path) -> None:
        """Copy a fetched file into the cache (a temporary file renamed into place)."""
        path = self.path_for(f.build_id)
        _private_dir(path.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".fetch.")
        try:
            with open(src, "rb") as s, os.fdopen(fd, "wb") as d:
                shutil.copyfileobj(s, d, 1 << 20)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise


def fetch_to(core: RemoteCore, f: pb.MappedFile, dest: Path) -> int:
    """Write mapped file ``f`` to a new file ``dest`` (0600, never through a
    link); returns the bytes received."""
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    got = 0
    try:
        while got < f.size:
            data = core.read_file(f.id, got, min(FETCH_BYTES, f.size - got))
            if not data:
                break
            os.pwrite(fd, data, got)
            got += len(data)
    finally:
        os.close(fd)
    if got != f.size:
        raise CaptureError(f"mapped file {f.path}: got {got} of {f.size} bytes")
    return got


def obtain(core: RemoteCore, f: pb.MappedFile, cache: FileCache | None, dest: Path) -> bool:
    """Write mapped file ``f`` to a new file ``dest``: copied from the cache, or
    fetched (then cached if the bytes carry the build-id the agent listed).
    True if it was fetched."""
    hit = cache.lookup(f) if cache is not None else None
    if hit is not None and cache is not None:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        with open(hit, "rb") as s, os.fdopen(fd, "wb") as d:
            shutil.copyfileobj(s, d, 1 << 20)
        cache.hits += 1
        return False
    fetch_to(core, f, dest)
    if cache is not None and f.build_id:
        cache.misses += 1
        if file_build_id(dest) == f.build_id:
            cache.store(f, dest)
    return True


def debug_files(layout: pb.CoreLayout) -> list[pb.MappedFile]:
    """The mapped files a debugger needs (ELF) that this session may read."""
    return [f for f in layout.files if f.elf and f.readable]


def executable(layout: pb.CoreLayout) -> pb.MappedFile | None:
    """The mapped file that is the target's executable."""
    exe = layout.exe.removesuffix(" (deleted)")
    return next((f for f in layout.files if f.path == exe), None)
