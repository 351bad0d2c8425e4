"""Raw ptrace requests (through python-ptrace's binding) and waitpid.

python-ptrace has no PTRACE_SEIZE/PTRACE_INTERRUPT helpers, so they are issued
through its raw ``ptrace()`` call.  Every function here must be called from the
thread that seized the tracee (the kernel answers ESRCH otherwise); see
:mod:`.freezer`, the only user.
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass

from ptrace.binding.func import ptrace as _raw_ptrace
from ptrace.error import PtraceError

PTRACE_CONT = 7
PTRACE_DETACH = 17
PTRACE_GETSIGINFO = 0x4202
PTRACE_GETREGSET = 0x4204
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_EVENT_STOP = 128
__WALL = 0x40000000

JOB_CONTROL_SIGNALS = frozenset({19, 20, 21, 22})  # SIGSTOP SIGTSTP SIGTTIN SIGTTOU


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def _call(request: int, tid: int, addr: int = 0, data: int = 0) -> int:
    try:
        return int(_raw_ptrace(request, tid, addr, data))
    except PtraceError as exc:
        raise OSError(exc.errno or errno.EIO, f"ptrace({request:#x}, {tid}): "
                      f"{os.strerror(exc.errno or errno.EIO)}") from None


def seize(tid: int, options: int = 0) -> None:
    _call(PTRACE_SEIZE, tid, 0, options)


def interrupt(tid: int) -> None:
    _call(PTRACE_INTERRUPT, tid)


def detach(tid: int, signal: int = 0) -> None:
    _call(PTRACE_DETACH, tid, 0, signal)


def getregset(tid: int, note_type: int, max_size: int = 1 << 16) -> bytes:
    """PTRACE_GETREGSET: the kernel shrinks iov_len to the set's real size."""
    buf = ctypes.create_string_buffer(max_size)
    iov = _Iovec(ctypes.cast(buf, ctypes.c_void_p), max_size)
    _call(PTRACE_GETREGSET, tid, note_type, ctypes.addressof(iov))
    return buf.raw[:iov.iov_len]


@dataclass(frozen=True)
class StopEvent:
    """What waitpid reported for one tracee."""

    tid: int
    exited: bool = False
    signal: int = 0       # WSTOPSIG
    event: int = 0        # status >> 16

    @property
    def is_signal_delivery(self) -> bool:
        return not self.exited and self.event == 0

    @property
    def is_group_stop(self) -> bool:
        return self.event == PTRACE_EVENT_STOP and self.signal in JOB_CONTROL_SIGNALS


def wait_nohang(tid: int) -> StopEvent | None:
    """Non-blocking waitpid on one tracee; None if it has nothing to report."""
    try:
        pid, status = os.waitpid(tid, os.WNOHANG | __WALL)
    except ChildProcessError:
        return StopEvent(tid, exited=True)
    if pid == 0:
        return None
    if os.WIFSTOPPED(status):
        return StopEvent(tid, signal=os.WSTOPSIG(status), event=status >> 16)
    return StopEvent(tid, exited=True)
