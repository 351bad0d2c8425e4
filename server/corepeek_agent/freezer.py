"""Freezing a process with PTRACE_SEIZE + PTRACE_INTERRUPT, on one tracer thread.

Why a dedicated thread per target: the kernel accepts ptrace requests only from
the thread that seized the tracee, and a gRPC worker can block indefinitely in
a send to a stalled client.  The tracer thread freezes, reads registers, then
waits for a thaw request or its own deadline (the maximum freeze duration), and
always detaches before it exits; if the whole agent dies, the kernel detaches
(SEIZE without PTRACE_O_EXITKILL), so the target never stays frozen.

Semantics kept intact:

* no SIGSTOP is sent, so the parent sees no stop/continue report and the
  restartable system calls (nanosleep, read, futex, poll...) restart;
* a signal that arrives between SEIZE and the stop is caught in its
  signal-delivery-stop and handed back at detach, so it is not lost;
* a process in a job-control stop stays stopped after the detach;
* a thread that does not stop within the timeout (e.g. a vfork parent in D
  state) is reported unfrozen and gets zeroed registers (the seed RFC's rule);
  its pending interrupt is cancelled when the tracer thread exits.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from . import procfs, ptrace_ops
from .arch import ArchSpec
from .errors import AlreadyTraced, CorepeekError, ProcessGone, PtraceUnavailable

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.0002
MAX_SCAN_ROUNDS = 1000


@dataclass
class FrozenThread:
    tid: int
    stopped: bool = False
    exited: bool = False
    pending_signal: int = 0            # re-injected at detach
    group_stop: bool = False
    gpregs: bytes = b""
    regsets: list[tuple[int, bytes]] = field(default_factory=list)


@dataclass(frozen=True)
class FreezeResult:
    threads: tuple[FrozenThread, ...]
    arch: ArchSpec
    freeze_seconds: float
    states_before: dict[int, str]


ArchChooser = Callable[[int, bytes], ArchSpec]


class Freezer:
    """Owns the tracer thread of one target.

    ``freeze()`` blocks until every thread is stopped (or timed out) and
    returns their registers; ``thaw()`` is idempotent and safe from any thread.
    ``on_expire`` is called (on the tracer thread) if the maximum freeze
    duration passes first.
    """

    def __init__(self, pid: int, *, choose_arch: ArchChooser, thread_timeout: float,
                 max_freeze: float, on_expire: Callable[[], None] | None = None) -> None:
        self.pid = pid
        self._choose_arch = choose_arch
        self._thread_timeout = thread_timeout
        self._max_freeze = max_freeze
        self._on_expire = on_expire
        self._thaw_requested = threading.Event()
        self._result: Future[FreezeResult] = Future()
        self._thread = threading.Thread(target=self._run, name=f"tracer-{pid}", daemon=True)
        self.thawed = threading.Event()
        self.expired = False

    # -- public, any thread ---------------------------------------------------

    def freeze(self) -> FreezeResult:
        self._thread.start()
        return self._result.result()

    def thaw(self, wait: bool = True) -> None:
        self._thaw_requested.set()
        if wait and self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()

    # -- tracer thread ------------------------------------------------------------

    def _run(self) -> None:
        threads: dict[int, FrozenThread] = {}
        try:
            try:
                result = self._freeze(threads)
            except BaseException as exc:
                self._result.set_exception(exc)
                return
            self._result.set_result(result)
            if not self._thaw_requested.wait(self._max_freeze):
                self.expired = True
                log.warning("pid %d: maximum freeze duration %.1fs reached, thawing",
                            self.pid, self._max_freeze)
                if self._on_expire is not None:
                    self._on_expire()
        finally:
            self._detach_all(threads)
            self.thawed.set()
            # Returning ends this OS thread; the kernel then releases any
            # tracee that never stopped, cancelling its pending interrupt.

    def _freeze(self, threads: dict[int, FrozenThread]) -> FreezeResult:
        t0 = time.monotonic()
        states_before: dict[int, str] = {}
        skipped: set[int] = set()          # zombies and threads that vanished
        quiet_rounds = 0
        for _ in range(MAX_SCAN_ROUNDS):
            try:
                tids = procfs.task_ids(self.pid)
            except ProcessGone:
                raise ProcessGone(f"process {self.pid} exited during the freeze") from None
            new = sorted(tids - threads.keys() - skipped)
            if not new:
                quiet_rounds += 1
                if quiet_rounds >= 2:
                    break
                continue
            quiet_rounds = 0
            for tid in new:
                if not self._seize_one(tid, threads, states_before):
                    skipped.add(tid)
            self._wait_for_stops([threads[t] for t in new if t in threads])
        for tid in [tid for tid, t in threads.items() if t.exited]:
            del threads[tid]
        live = {tid: t for tid, t in threads.items() if t.stopped}
        if not threads:
            raise ProcessGone(f"process {self.pid} has no thread that could be seized")
        gp0 = self._first_regs(live)
        arch = self._choose_arch(self.pid, gp0)
        for t in live.values():
            self._read_registers(t, arch)
        frozen = tuple(sorted(threads.values(), key=lambda t: (t.tid != self.pid, t.tid)))
        return FreezeResult(frozen, arch, time.monotonic() - t0, states_before)

    def _seize_one(self, tid: int, threads: dict[int, FrozenThread],
                   states: dict[int, str]) -> bool:
        """Seize and interrupt one thread; False if it cannot be (gone, zombie)."""
        try:
            states[tid] = procfs.stat(self.pid, tid).state
        except ProcessGone:
            return False
        try:
            ptrace_ops.seize(tid)
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                return False                   # thread exited meanwhile
            if exc.errno == errno.EPERM:
                if states.get(tid) in ("Z", "X"):
                    return False               # zombie (e.g. leader after pthread_exit)
                try:
                    tracer = procfs.tracer_pid(self.pid, tid)
                except ProcessGone:
                    return False
                if tracer:
                    raise AlreadyTraced(
                        f"process {self.pid} is already traced by pid {tracer}") from None
                raise PtraceUnavailable(f"PTRACE_SEIZE of thread {tid} refused") from None
            raise
        threads[tid] = FrozenThread(tid)
        try:
            ptrace_ops.interrupt(tid)
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                raise
        return True

    def _wait_for_stops(self, waiting: list[FrozenThread]) -> None:
        deadline = time.monotonic() + self._thread_timeout
        pending = {t.tid: t for t in waiting if not t.stopped}
        while pending:
            progressed = False
            for tid in list(pending):
                ev = ptrace_ops.wait_nohang(tid)
                if ev is None:
                    continue
                progressed = True
                t = pending.pop(tid)
                if ev.exited:
                    t.exited = True
                    continue
                t.stopped = True
                if ev.is_signal_delivery:
                    # Stay in the signal-delivery-stop (the thread is frozen)
                    # and hand the signal back at detach so it is not lost.
                    t.pending_signal = ev.signal
                elif ev.is_group_stop:
                    t.group_stop = True
            if pending and not progressed:
                if time.monotonic() >= deadline:
                    log.warning("pid %d: threads %s did not stop within %.0f ms; "
                                "their registers are zeroed", self.pid, sorted(pending),
                                self._thread_timeout * 1000)
                    return
                time.sleep(POLL_INTERVAL)

    @staticmethod
    def _first_regs(live: dict[int, FrozenThread]) -> bytes:
        for t in live.values():
            try:
                return ptrace_ops.getregset(t.tid, 1)
            except OSError:
                continue
        return b""

    def _read_registers(self, t: FrozenThread, arch: ArchSpec) -> None:
        try:
            t.gpregs = ptrace_ops.getregset(t.tid, 1)
        except OSError as exc:
            log.warning("pid %d: cannot read registers of %d: %s", self.pid, t.tid, exc)
            t.stopped = False
            return
        for spec in arch.regsets:
            try:
                data = ptrace_ops.getregset(t.tid, spec.note_type)
            except OSError:
                continue                       # regset not active for this task
            if spec.only_if_nonempty and not _tls_in_use(data):
                continue
            if data:
                t.regsets.append((spec.note_type, data))

    def _detach_all(self, threads: dict[int, FrozenThread]) -> None:
        for t in threads.values():
            if not t.stopped:
                continue
            try:
                ptrace_ops.detach(t.tid, t.pending_signal)
            except OSError as exc:
                if exc.errno != errno.ESRCH:
                    log.error("pid %d: detach of %d failed: %s", self.pid, t.tid, exc)


def _tls_in_use(data: bytes) -> bool:
    """True if any ``struct user_desc`` has a base or limit (regset_tls_active)."""
    return any(data[i + 4:i + 12] != bytes(8) for i in range(0, len(data) - 15, 16))


__all__ = ["Freezer", "FreezeResult", "FrozenThread", "CorepeekError"]
