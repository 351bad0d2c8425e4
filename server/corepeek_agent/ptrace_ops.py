"""Raw ptrace requests (through python-ptrace's binding) and waitpid.

python-ptrace has no PTRACE_SEIZE/PTRACE_INTERRUPT helpers, so they are issued
through its raw ``ptrace()`` call.  Every function here must be called from the
thread that seized the tracee (the kernel answers ESRCH otherwise); see
:mod:`.freezer` and :mod:`.snapshot` (whose code runs on the freezer's
tracer thread through ``Freezer.run_on_tracer``).
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
import time
from dataclasses import dataclass

from ptrace.binding.func import ptrace as _raw_ptrace
from ptrace.error import PtraceError

PTRACE_CONT = 7
PTRACE_SINGLESTEP = 9
PTRACE_DETACH = 17
PTRACE_SYSCALL = 24
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETEVENTMSG = 0x4201
PTRACE_GETSIGINFO = 0x4202
PTRACE_GETREGSET = 0x4204
PTRACE_SETREGSET = 0x4205
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_SECCOMP_GET_FILTER = 0x420C

PTRACE_O_TRACESYSGOOD = 0x1
PTRACE_O_TRACEFORK = 0x2
PTRACE_O_TRACEVFORK = 0x4
PTRACE_O_TRACECLONE = 0x8
PTRACE_O_EXITKILL = 1 << 20

PTRACE_EVENT_FORK = 1
PTRACE_EVENT_VFORK = 2
PTRACE_EVENT_CLONE = 3
PTRACE_EVENT_STOP = 128
SIGTRAP = 5
SYSCALL_STOP_SIGNAL = SIGTRAP | 0x80     # WSTOPSIG of a syscall stop with TRACESYSGOOD
NT_PRSTATUS = 1
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


def cont(tid: int, signal: int = 0) -> None:
    _call(PTRACE_CONT, tid, 0, signal)


def syscall(tid: int, signal: int = 0) -> None:
    """PTRACE_SYSCALL: resume until the next syscall-enter/exit (or other) stop."""
    _call(PTRACE_SYSCALL, tid, 0, signal)


def singlestep(tid: int, signal: int = 0) -> None:
    _call(PTRACE_SINGLESTEP, tid, 0, signal)


def setoptions(tid: int, options: int) -> None:
    _call(PTRACE_SETOPTIONS, tid, 0, options)


def geteventmsg(tid: int) -> int:
    """PTRACE_GETEVENTMSG: e.g. the new child's pid at a PTRACE_EVENT_CLONE stop."""
    msg = ctypes.c_ulong(0)
    _call(PTRACE_GETEVENTMSG, tid, 0, ctypes.addressof(msg))
    return int(msg.value)


def setregset(tid: int, note_type: int, data: bytes) -> None:
    """PTRACE_SETREGSET with exactly the bytes GETREGSET returned (or a patched copy)."""
    buf = ctypes.create_string_buffer(bytes(data), len(data))
    iov = _Iovec(ctypes.cast(buf, ctypes.c_void_p), len(data))
    _call(PTRACE_SETREGSET, tid, note_type, ctypes.addressof(iov))


def seccomp_filter(tid: int, index: int) -> bytes:
    """PTRACE_SECCOMP_GET_FILTER: the classic BPF program ``index`` filters back
    from the thread's newest (8 bytes per instruction); ENOENT past the oldest."""
    count = _call(PTRACE_SECCOMP_GET_FILTER, tid, index, 0)
    buf = ctypes.create_string_buffer(max(count, 1) * 8)
    count = _call(PTRACE_SECCOMP_GET_FILTER, tid, index, ctypes.addressof(buf))
    return buf.raw[:count * 8]


_regset_buffers = threading.local()     # one scratch buffer + iovec per tracer thread


def getregset(tid: int, note_type: int, max_size: int = 1 << 16) -> bytes:
    """PTRACE_GETREGSET: the kernel shrinks iov_len to the set's real size.

    The scratch buffer and its iovec are reused (a freeze reads ~5 sets per
    thread, 1,000 calls for 200 threads; a fresh 64 KiB buffer each time cost
    most of such a freeze) and only the returned length is copied out.
    """
    scratch = getattr(_regset_buffers, "scratch", None)
    if scratch is None or scratch[2] < max_size:
        buf = ctypes.create_string_buffer(max_size)
        iov = _Iovec(ctypes.addressof(buf), max_size)
        scratch = _regset_buffers.scratch = (buf, iov, max_size, ctypes.addressof(iov))
    buf, iov, _, iov_addr = scratch
    iov.iov_len = max_size
    _call(PTRACE_GETREGSET, tid, note_type, iov_addr)
    return ctypes.string_at(buf, iov.iov_len)


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

    @property
    def is_syscall_stop(self) -> bool:
        """A syscall-enter/exit stop (needs PTRACE_O_TRACESYSGOOD)."""
        return not self.exited and self.event == 0 and self.signal == SYSCALL_STOP_SIGNAL

    @property
    def is_interrupt_stop(self) -> bool:
        """A PTRACE_EVENT_STOP that is not a group stop (PTRACE_INTERRUPT, new child)."""
        return self.event == PTRACE_EVENT_STOP and self.signal not in JOB_CONTROL_SIGNALS


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


def wait_stop(tid: int, timeout: float, spin: float = 0.005,
              poll: float = 0.0001) -> StopEvent | None:
    """Poll waitpid on one tracee until it reports, or None after ``timeout`` seconds.

    The first ``spin`` seconds yield the CPU between polls instead of sleeping
    (a sleep on a loaded machine easily lasts a millisecond or more, and the
    target may be frozen meanwhile); then it sleeps ``poll`` between polls.
    """
    now = time.monotonic()
    deadline, spin_end = now + timeout, now + min(spin, timeout)
    while True:
        ev = wait_nohang(tid)
        if ev is not None:
            return ev
        now = time.monotonic()
        if now >= deadline:
            return None
        if now < spin_end:
            os.sched_yield()
        else:
            time.sleep(poll)
