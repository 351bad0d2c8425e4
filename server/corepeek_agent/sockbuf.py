"""Socket buffers sized for a core stream, through gRPC core's socket mutator.

Why: a 1 MiB chunk does not fit a default Unix socket send buffer
(``net.core.wmem_default``, 208 KiB): every message is cut into several
``sendmsg`` calls, a third of them EAGAIN, each a hand-off between gRPC's
threads.  A 4 MiB send buffer took a 1 GiB transfer from about 2.3 to 1.7 s
(bench/bench_datapath.py, docs/performance.md).

How: grpcio has no option for SO_SNDBUF, and a Unix socket accepted by gRPC
does not inherit the listening socket's buffers (TCP ones do).  gRPC core
applies a ``grpc_socket_mutator`` (channel argument ``grpc.socket_mutator``)
to every socket it creates: the listener, each accepted connection, each
client connection.  grpcio passes any option value that has ``__int__`` to
core as a pointer argument, so a mutator built here with ctypes reaches core
unchanged.  That depends on two stable C declarations of gRPC's public
headers (``grpc_socket_mutator`` and its vtable in grpc/impl/grpc_types.h,
``grpc_mutate_socket_info``); nothing reaches into ``/proc/self/fd``.

Limits: ``SO_SNDBUF``/``SO_RCVBUF`` are capped by ``net.core.wmem_max`` /
``rmem_max``; as root (CAP_NET_ADMIN) ``SO_SNDBUFFORCE``/``SO_RCVBUFFORCE``
pass the cap.  When neither works the connection keeps what the kernel gave
it, is served anyway, and the shortfall is logged once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import socket
import threading
from dataclasses import dataclass, field

import grpc

log = logging.getLogger(__name__)

# A 4 MiB buffer (the kernel doubles the value it is given) holds several
# chunks; 8 and 16 MiB measured no faster (docs/performance.md).
DEFAULT_BUFFER_BYTES = 4 * 1024 * 1024

SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)

# grpc_fd_usage (grpc/impl/grpc_types.h / socket_mutator.h).
FD_CLIENT_CONNECTION, FD_SERVER_LISTENER, FD_SERVER_CONNECTION = 0, 1, 2


class _SocketInfo(ctypes.Structure):
    """grpc_mutate_socket_info."""

    _fields_ = [("fd", ctypes.c_int), ("usage", ctypes.c_int)]


_MUTATE_FD = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_int, ctypes.c_void_p)
_COMPARE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_DESTROY = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_MUTATE_FD_2 = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.POINTER(_SocketInfo), ctypes.c_void_p)


class _VTable(ctypes.Structure):
    """grpc_socket_mutator_vtable."""

    _fields_ = [("mutate_fd", _MUTATE_FD), ("compare", _COMPARE), ("destroy", _DESTROY),
                ("mutate_fd_2", _MUTATE_FD_2)]


class _Mutator(ctypes.Structure):
    """grpc_socket_mutator: its vtable, then a gpr_refcount (one intptr_t)."""

    _fields_ = [("vtable", ctypes.POINTER(_VTable)), ("refcount", ctypes.c_ssize_t)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_setsockopt = _libc.setsockopt
_setsockopt.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint]
_getsockopt = _libc.getsockopt
_getsockopt.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                        ctypes.c_void_p]


def set_buffer(fd: int, send: bool, size: int) -> int:
    """Give socket ``fd`` a send (or receive) buffer of ``size`` bytes.

    Tries the forcing option first (root passes ``wmem_max``/``rmem_max``),
    then the plain one (capped by the kernel).  Returns what the kernel
    reports afterwards (twice the value set, for its bookkeeping).
    """
    plain, force = ((socket.SO_SNDBUF, SO_SNDBUFFORCE) if send
                    else (socket.SO_RCVBUF, SO_RCVBUFFORCE))
    value = ctypes.c_int(size)
    if _setsockopt(fd, socket.SOL_SOCKET, force, ctypes.byref(value), 4) != 0:
        _setsockopt(fd, socket.SOL_SOCKET, plain, ctypes.byref(value), 4)
    got, length = ctypes.c_int(0), ctypes.c_uint(4)
    if _getsockopt(fd, socket.SOL_SOCKET, plain, ctypes.byref(got), ctypes.byref(length)) != 0:
        return 0
    return got.value


_ALIVE: list[BufferSizer] = []      # every mutator handed to gRPC (one per server)


@dataclass
class BufferSizer:
    """A gRPC socket mutator that sizes the buffers of the sockets it sees.

    ``send_bytes``/``receive_bytes`` (0: leave alone) apply to accepted
    connections (``server=True``) or to client connections.  Pass
    :meth:`option` in the server's or channel's options.  gRPC holds a raw
    pointer to it, so it lives as long as the process (a few hundred bytes
    per server).
    """

    send_bytes: int = DEFAULT_BUFFER_BYTES
    receive_bytes: int = 0
    server: bool = True
    sockets: int = 0                        # sockets sized so far
    short: int = 0                          # ...that got less than asked
    _warned: bool = field(default=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        # The callbacks and structures must outlive every gRPC object that
        # holds the pointer: they live as long as this object.
        self._callbacks = (_MUTATE_FD(self._mutate_fd), _COMPARE(_compare),
                           _DESTROY(_destroy), _MUTATE_FD_2(self._mutate_fd_2))
        self._vtable = _VTable(*self._callbacks)
        # One reference that is never released: gRPC never calls destroy.
        self._mutator = _Mutator(ctypes.pointer(self._vtable), 1)
        # grpcio does not keep its options alive once the server or channel
        # exists, but core keeps the pointer: never let this object go.
        _ALIVE.append(self)

    def __int__(self) -> int:
        """The address of the grpc_socket_mutator (grpcio's pointer-option protocol)."""
        return ctypes.addressof(self._mutator)

    def option(self) -> tuple[str, BufferSizer]:
        return ("grpc.socket_mutator", self)

    # -- called by gRPC core, on its own threads ------------------------------------

    def _mutate_fd(self, fd: int, _mutator: int) -> bool:
        # Only for gRPC builds without mutate_fd_2: listener and client sockets.
        return self._apply(fd)

    def _mutate_fd_2(self, info: ctypes._Pointer[_SocketInfo], _mutator: int) -> bool:
        usage = info.contents.usage
        wanted = FD_SERVER_CONNECTION if self.server else FD_CLIENT_CONNECTION
        if usage == wanted or (self.server and usage == FD_SERVER_LISTENER):
            # The listener too: accepted TCP sockets inherit its buffers
            # from the handshake on, Unix ones do not (hence both).
            return self._apply(info.contents.fd)
        return True

    def _apply(self, fd: int) -> bool:
        try:
            short = []
            for send, size in ((True, self.send_bytes), (False, self.receive_bytes)):
                # The kernel doubles what it is given (room for its bookkeeping).
                if size > 0 and set_buffer(fd, send, size) < 2 * size:
                    short.append(("SO_SNDBUF" if send else "SO_RCVBUF", size))
            with self._lock:
                self.sockets += 1
                if short:
                    self.short += 1
                warn, self._warned = bool(short) and not self._warned, self._warned or bool(short)
            if warn:
                log.warning("socket buffers smaller than asked (%s): raise net.core.wmem_max/"
                            "rmem_max or run as root for CAP_NET_ADMIN; streams will be slower "
                            "(logged once)", ", ".join(f"{n} {s}" for n, s in short))
        except Exception:  # noqa: BLE001 - never fail a connection over its buffers
            log.exception("sizing socket buffers failed; serving the connection anyway")
        return True


def _compare(a: int, b: int) -> int:
    return (a > b) - (a < b)


def _destroy(_mutator: int) -> None:
    """Never reached: the reference taken at creation is never released."""


# grpcio releases whose core was checked to lay out grpc_socket_mutator (and
# its vtable) as declared above (tests/integration/test_sockbuf.py).  Another
# release gets no mutator: a wrong layout would crash the agent, slower
# streams only cost time.
TESTED_GRPC_RELEASES = ("1.85.",)


def grpc_release_tested(version: str | None = None) -> bool:
    """Whether this grpcio is one whose socket-mutator layout was checked."""
    return (grpc.__version__ if version is None else version).startswith(TESTED_GRPC_RELEASES)


def buffer_options(send_bytes: int = DEFAULT_BUFFER_BYTES, receive_bytes: int = 0, *,
                   server: bool = True) -> list[tuple[str, object]]:
    """gRPC options sizing the socket buffers (none when both sizes are 0, or
    when this grpcio's socket-mutator layout was never checked)."""
    if send_bytes <= 0 and receive_bytes <= 0:
        return []
    if not grpc_release_tested():
        log.warning("socket buffers left to the kernel: grpcio %s is not one whose socket "
                    "mutator layout corepeek checked (%s)", grpc.__version__,
                    ", ".join(r + "x" for r in TESTED_GRPC_RELEASES))
        return []
    return [BufferSizer(send_bytes, receive_bytes, server=server).option()]
