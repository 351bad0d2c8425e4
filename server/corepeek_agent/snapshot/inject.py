"""Syscall injection: make one stopped thread execute one system call (tracer thread).

Owns the ptrace sequence of an injection (registers set, syscall-enter stop,
clone/fork events, syscall-exit stop) and putting the thread back in an
interrupt stop inside get_signal with its registers restored, so the call it
was interrupted in restarts as it would have.  See the package docstring.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .. import ptrace_ops
from .abi import SyscallAbi

log = logging.getLogger(__name__)

STEP_TIMEOUT = 5.0                  # one ptrace step of an injection
CLONE_TIMEOUT = 120.0               # the clone itself: page tables of a huge target


class _Lost(Exception):
    """The injecting thread did something unexpected; the message says what."""


def _kill_and_reap(clone_pid: int) -> None:
    try:
        os.kill(clone_pid, 9)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + STEP_TIMEOUT
    while time.monotonic() < deadline:
        ev = ptrace_ops.wait_stop(clone_pid, STEP_TIMEOUT)
        if ev is None or ev.exited:
            return
        # A stop reported before SIGKILL took effect: let it die.
        try:
            ptrace_ops.cont(clone_pid)
        except OSError:
            pass


def _wait(tid: int, timeout: float, what: str) -> ptrace_ops.StopEvent:
    ev = ptrace_ops.wait_stop(tid, timeout)
    if ev is None:
        raise _Lost(f"thread {tid} did not reach {what} within {timeout:.1f} s")
    if ev.exited:
        raise _Lost(f"thread {tid} exited (killed?) before {what}")
    return ev


def _back_to_interrupt_stop(tid: int, saved: bytes, stopped: bool) -> None:
    """Stop the thread in get_signal again and restore its registers there.

    From a syscall stop (``stopped``), PTRACE_INTERRUPT + PTRACE_CONT; from a
    thread still inside the call, PTRACE_INTERRUPT and wait for its next stop.
    Only in get_signal does the restored state get the syscall-restart fix-up
    the interrupted call needs.
    """
    ptrace_ops.interrupt(tid)
    if stopped:
        ptrace_ops.cont(tid)
    deadline = time.monotonic() + CLONE_TIMEOUT
    while True:
        ev = ptrace_ops.wait_stop(tid, max(0.0, deadline - time.monotonic()))
        if ev is None:
            log.error("thread %d did not come back from an injected system call; its "
                      "registers could not be restored", tid)
            raise _Lost(f"thread {tid} did not come back from the injected system call")
        if ev.exited:
            return
        if ev.event == ptrace_ops.PTRACE_EVENT_STOP:
            break
        if ev.event in (ptrace_ops.PTRACE_EVENT_CLONE, ptrace_ops.PTRACE_EVENT_FORK,
                        ptrace_ops.PTRACE_EVENT_VFORK):
            # Only when the injection was abandoned before its clone() ran
            # (a step timed out): that child must not live.
            child = ptrace_ops.geteventmsg(tid)
            log.error("thread %d: killing child %d of an abandoned injection", tid, child)
            _kill_and_reap(child)
        # A syscall-exit stop or a fork event still to come: go on to the trap.
        ptrace_ops.cont(tid)
    ptrace_ops.setregset(tid, ptrace_ops.NT_PRSTATUS, saved)


@dataclass
class Injection:
    """Result of one injected system call."""

    result: int = 0
    started: bool = False            # the thread entered the system call
    child: int = 0
    pending_signal: int = 0          # a signal caught before the call started
    group_stop: bool = False         # a group stop caught before the call started
    syscall_seconds: float = 0.0


def inject_syscall(tid: int, abi: SyscallAbi, insn_addr: int, nr: int, args: Sequence[int],
                   *, options: int = 0, on_child: Callable[[int], None] | None = None,
                   restore: bool = True, timeout: float = CLONE_TIMEOUT) -> Injection:
    """Make stopped thread ``tid`` execute one system call (tracer thread only).

    ``tid`` must be in an interrupt stop (PTRACE_EVENT_STOP).  With ``restore``
    it ends in an interrupt stop again with its registers exactly as before;
    without, it is left in the syscall-exit stop (for a clone that never runs).

    If the thread stops before entering the call (a signal dequeued, a group
    stop), its registers are put back right in that stop, which is left as it
    is, and ``started`` is False: a signal-delivery-stop's signal is reported in
    ``pending_signal`` (hand it back at detach).  Raises :class:`_Lost` when
    the thread does something else unexpected (registers restored if possible).
    """
    saved = ptrace_ops.getregset(tid, ptrace_ops.NT_PRSTATUS)
    ptrace_ops.setoptions(tid, ptrace_ops.PTRACE_O_TRACESYSGOOD | options)
    ptrace_ops.setregset(tid, ptrace_ops.NT_PRSTATUS, abi.call_regs(saved, insn_addr, nr, args))
    out = Injection()
    stopped = True
    try:
        ptrace_ops.syscall(tid)
        stopped = False
        ev = _wait(tid, STEP_TIMEOUT, "the syscall-enter stop")
        stopped = True
        if not ev.is_syscall_stop:
            # Still in get_signal, before any user instruction: put the
            # registers back right here and leave the stop as it is.
            ptrace_ops.setregset(tid, ptrace_ops.NT_PRSTATUS, saved)
            if ev.is_group_stop:
                out.group_stop = True
            elif ev.event == 0:
                out.pending_signal = ev.signal
            return out
        out.started = True
        t0 = time.monotonic()
        ptrace_ops.syscall(tid)
        stopped = False
        ev = _wait(tid, timeout, "the system call's end")
        stopped = True
        while ev.event in (ptrace_ops.PTRACE_EVENT_CLONE, ptrace_ops.PTRACE_EVENT_FORK,
                           ptrace_ops.PTRACE_EVENT_VFORK):
            out.child = ptrace_ops.geteventmsg(tid)
            if on_child is not None:
                on_child(out.child)
            ptrace_ops.syscall(tid)
            stopped = False
            ev = _wait(tid, timeout, "the syscall-exit stop")
            stopped = True
        out.syscall_seconds = time.monotonic() - t0
        if not ev.is_syscall_stop:
            raise _Lost(f"thread {tid}: unexpected stop (signal {ev.signal}, event "
                        f"{ev.event}) instead of the syscall-exit stop")
        out.result = abi.result(ptrace_ops.getregset(tid, ptrace_ops.NT_PRSTATUS))
        return out
    finally:
        if out.started and restore:
            _back_to_interrupt_stop(tid, saved, stopped)
        elif not out.started and not stopped:
            # Never reached the syscall-enter stop (timeout): get it back.
            _back_to_interrupt_stop(tid, saved, False)
        if restore:
            try:
                ptrace_ops.setoptions(tid, 0)
            except OSError:
                pass
