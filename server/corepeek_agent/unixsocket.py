"""Binding the agent's Unix socket without races an unprivileged user could win.

The socket file is the only access control gRPC offers a Unix listener, so:

* the directory must not be writable by anyone but root, the agent's own user
  or the socket's group (else anyone could swap the socket for a symlink);
* whatever sits at the path must be a stale socket (no listener): a regular
  file, a symlink (dangling or not), a directory or a live socket is refused
  and never deleted;
* the socket is created with its final mode (umask around ``bind``) and handed
  to its group with ``lchown`` (never following a link); nothing is chmod-ed
  by path afterwards.

Every refusal is a :class:`SocketSetupError`: one line for the operator.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Callable

from .errors import CorepeekError


class SocketSetupError(CorepeekError):
    help = "see docs/security.md, Transport"


def check_directory(path: str, group: int | None) -> None:
    """Refuse a socket directory other users could write to (swap the socket)."""
    parent = os.path.dirname(os.path.abspath(path)) or "/"
    try:
        st = os.stat(parent)
    except OSError as exc:
        raise SocketSetupError(f"socket directory {parent}: {exc.strerror}") from None
    owners = {0, os.geteuid()}
    if st.st_uid not in owners:
        raise SocketSetupError(f"socket directory {parent} is owned by uid {st.st_uid}, not "
                               "root or the agent's user: its owner could replace the socket")
    mode = stat.S_IMODE(st.st_mode)
    if mode & stat.S_IWOTH:
        raise SocketSetupError(f"socket directory {parent} is writable by every user "
                               f"(mode {mode:o}): put the socket in a directory only root "
                               "can write, such as /run/corepeek")
    if mode & stat.S_IWGRP and st.st_gid not in {0, os.getegid(), group}:
        raise SocketSetupError(f"socket directory {parent} is writable by group {st.st_gid} "
                               f"(mode {mode:o}): only root or the socket group may write it")


def clear_stale(path: str) -> None:
    """Remove a stale socket at ``path``; refuse anything else that is there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(path)
        raise SocketSetupError(f"{path} is a symlink (to {target}); refusing to use or remove "
                               "it")
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketSetupError(f"{path} exists and is not a socket; refusing to remove it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno != errno.ECONNREFUSED:
            raise SocketSetupError(f"cannot probe the socket {path}: {exc.strerror}") from None
    else:
        raise SocketSetupError(f"{path} is the socket of a running agent; stop it first")
    finally:
        probe.close()
    os.unlink(path)


def bind_unix(path: str, mode: int, group: int | None, bind: Callable[[], int]) -> int:
    """Run ``bind`` (gRPC's ``add_insecure_port``) so the socket appears with ``mode``
    and then belongs to ``group``; returns what ``bind`` returned."""
    check_directory(path, group)
    clear_stale(path)
    old = os.umask(0o777 & ~mode)
    try:
        port = bind()
    finally:
        os.umask(old)
    try:
        if group is not None:
            os.chown(path, -1, group, follow_symlinks=False)
        st = os.lstat(path)
    except OSError as exc:
        raise SocketSetupError(f"cannot set the group of {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode) or stat.S_IMODE(st.st_mode) != mode or (
            group is not None and st.st_gid != group):
        raise SocketSetupError(f"{path} changed while the agent created it (mode "
                               f"{stat.S_IMODE(st.st_mode):o}, gid {st.st_gid}); refusing to "
                               "serve on it")
    return port
