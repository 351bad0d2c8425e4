"""Output files that appear under their name only when complete.

A core cut short (the target died, the agent went away, Ctrl-C, the agent's
``--max-freeze``) must never sit under the name the user asked for: a script
that checks that ``core.4242`` exists would feed a debugger half a core.  And
``corepeek dump`` runs as root, often in a directory other users can write:
it must never write through a symlink someone planted there, nor keep the
mode of a file that was there before (a core holds every secret of the
process).

:class:`AtomicOutput` therefore creates a *new* file beside the destination
(``O_CREAT|O_EXCL|O_NOFOLLOW``, mode 0600), hands out its descriptor, and on
:meth:`~AtomicOutput.commit` fsyncs it and renames it over the destination
(a rename replaces a symlink, it never follows one).  Anything else --
an exception, :meth:`~AtomicOutput.abort` -- removes it, or with
``keep_partial`` renames it to ``NAME.partial``.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

from .errors import CaptureError

PARTIAL_SUFFIX = ".partial"
FILE_MODE = 0o600


def create_new(directory: Path, prefix: str, suffix: str = ".tmp") -> tuple[int, Path]:
    """A new empty file ``directory/PREFIX<random>SUFFIX`` (0600, never through a link)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        path = directory / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            fd = os.open(path, flags, FILE_MODE)
        except FileExistsError:
            continue
        os.fchmod(fd, FILE_MODE)            # whatever the umask or a default ACL says
        return fd, path
    raise FileExistsError(f"no free temporary name in {directory}")


def link_new(tmp: Path, directory: Path, name: str, *,
             unique: Callable[[str, int], str] | None = None) -> str:
    """Give the complete file ``tmp`` the name ``name`` in ``directory`` without
    replacing anything there (a hard link fails on any existing name, a
    planted symlink included), then drop ``tmp``.  A taken name becomes
    ``unique(name, n)`` for n = 2, 3...; returns the name used.
    """
    unique = unique or (lambda base, n: f"{base}-{n}")
    candidate = name
    for n in range(2, 10_000):
        try:
            os.link(tmp, directory / candidate, follow_symlinks=False)
        except FileExistsError:
            candidate = unique(name, n)
            continue
        except OSError:                       # no hard links here (FAT, some FUSE)
            if os.path.lexists(directory / candidate):
                candidate = unique(name, n)
                continue
            os.replace(tmp, directory / candidate)
            return candidate
        os.unlink(tmp)
        return candidate
    raise FileExistsError(f"no free name for {name} in {directory}")


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort: some file systems refuse)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicOutput:
    """A file written under a temporary name and renamed to ``path`` on :meth:`commit`.

    Use as a context manager; leaving it without :meth:`commit` aborts.  The
    checks that can fail (a directory as destination, no such directory, no
    permission) happen in the constructor, before anything is frozen.
    """

    def __init__(self, path: str | os.PathLike[str], *, keep_partial: bool = False) -> None:
        self.path = Path(path)
        self.keep_partial = keep_partial
        self.partial_path = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        self.kept: Path | None = None           # NAME.partial, once abort() kept it
        name = self.path.name
        if not name or name in (".", ".."):
            raise CaptureError(f"{path}: not a file name")
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            pass
        else:
            if stat.S_ISDIR(st.st_mode):
                raise CaptureError(f"{self.path} is a directory: give a file name with -o")
        directory = self.path.parent
        try:
            self.fd, self.tmp_path = create_new(directory, f".{name}.", ".tmp")
        except OSError as exc:
            raise CaptureError(f"cannot create a file in {directory or '.'}: "
                               f"{exc.strerror or exc}") from None
        self._done = False

    def fileno(self) -> int:
        return self.fd

    def commit(self) -> None:
        """Flush the file to disk and give it its name (replacing what was there)."""
        if self._done:
            raise ValueError("output already committed or aborted")
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        os.replace(self.tmp_path, self.path)
        self._done = True
        fsync_dir(self.path.parent)

    def abort(self) -> Path | None:
        """Remove the unfinished file, or keep it as ``NAME.partial``; idempotent.

        Returns the path of the kept partial file, if any.
        """
        if self._done:
            return self.kept
        self._done = True
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.keep_partial:
            try:
                os.replace(self.tmp_path, self.partial_path)
                self.kept = self.partial_path
                return self.kept
            except OSError:
                pass                          # fall through: never leave the temporary
        try:
            os.unlink(self.tmp_path)
        except FileNotFoundError:
            pass
        return None

    def __enter__(self) -> AtomicOutput:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()
