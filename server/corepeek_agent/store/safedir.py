"""The store directory: created 0700 and owned by the agent's user, files 0600,
every path opened relative to the directory's fd without following links."""

from __future__ import annotations

import os
import stat

from ..errors import CorepeekError


class StoreDirError(CorepeekError):
    help = "give --store a directory only root can write (it is created 0700 if missing)"


def open_store_dir(path: str) -> int:
    """An O_DIRECTORY fd of ``path``, created 0700 if missing; refuses a symlink, a
    directory owned by another user, or one others may write or read."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise StoreDirError(f"cannot create store directory {path}: {exc.strerror}") from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise StoreDirError(f"cannot open store directory {path}: {exc.strerror} "
                            "(a symlink is refused)") from None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
        os.close(fd)
        raise StoreDirError(f"store directory {path} must be owned by uid {os.geteuid()} "
                            f"with mode 0700 (it is uid {st.st_uid}, mode "
                            f"{stat.S_IMODE(st.st_mode):o})")
    return fd


def create_file(dir_fd: int, name: str) -> int:
    """A new file, 0600, never following a link or reusing an existing file."""
    if "/" in name or name in (".", ".."):
        raise ValueError(f"bad store file name {name!r}")
    return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                   0o600, dir_fd=dir_fd)


def open_file(dir_fd: int, name: str) -> int:
    if "/" in name or name in (".", ".."):
        raise ValueError(f"bad store file name {name!r}")
    return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


def remove_file(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
