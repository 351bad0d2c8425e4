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

While it waits for the thaw, the tracer thread serves commands: other threads
hand it work with :meth:`Freezer.run_on_tracer` (a queue and a Future), which
is how snapshot mode (:mod:`.snapshot`) injects a ``clone()`` into the frozen
target, detaches the target early (:meth:`Freezer.detach_target`) and keeps
the clone traced until the session ends; its clean-up runs as an exit hook on
the same thread.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from . import procfs, ptrace_ops
from .arch import ArchSpec
from .errors import AlreadyTraced, CorepeekError, ProcessGone, PtraceUnavailable

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.0002
MAX_SCAN_ROUNDS = 1000

T = TypeVar("T")


class TracerGone(CorepeekError):
    """A command was sent to a tracer thread that no longer serves any."""

    code = grpc.StatusCode.ABORTED


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
    # From the first PTRACE_SEIZE until every register set was read: how long
    # the freeze itself stopped the target (the thread states are read just
    # before, while it still runs).
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
        # Work other threads hand to the tracer thread (run_on_tracer); None wakes it.
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = (
            queue.SimpleQueue())
        self._commands_lock = threading.Lock()
        self._serving = True
        self._threads: dict[int, FrozenThread] = {}
        self._exit_hooks: list[Callable[[], None]] = []
        # When the target itself was let go: early (snapshot) or at the end.
        self.target_detached_at = 0.0

    # -- public, any thread ---------------------------------------------------

    def freeze(self) -> FreezeResult:
        self._thread.start()
        return self._result.result()

    def thaw(self, wait: bool = True) -> None:
        """Ask the tracer thread to detach and exit; with ``wait``, return only
        once the OS thread is gone, so the kernel has released every tracee."""
        self._thaw_requested.set()
        self._commands.put(None)
        if wait and self._thread.ident is not None and \
                threading.current_thread() is not self._thread:
            self._thread.join()
            _wait_os_thread_gone(self._thread.native_id)

    def run_on_tracer(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the tracer thread (where ptrace requests must come from)
        while the target is frozen, and return its result or raise its exception.

        Raises :class:`TracerGone` if the tracer thread no longer serves
        commands (thawed, expired, or never started).
        """
        if threading.current_thread() is self._thread:
            return fn()
        fut: Future[T] = Future()
        with self._commands_lock:
            if not self._serving or not self._thread.is_alive() or self._thaw_requested.is_set():
                raise TracerGone(f"pid {self.pid}: the tracer thread has ended")
            self._commands.put((fn, fut))
        return fut.result()

    # -- tracer thread only ---------------------------------------------------------

    @property
    def frozen_threads(self) -> dict[int, FrozenThread]:
        """The target's threads still attached (tracer thread only)."""
        return self._threads

    def add_exit_hook(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` on the tracer thread when it ends, after the target is
        detached (hooks run newest first; exceptions are logged)."""
        self._exit_hooks.append(hook)

    def detach_target(self) -> None:
        """Thaw the target now but keep the tracer thread (and any other tracee,
        e.g. a snapshot clone) until :meth:`thaw` or the maximum freeze duration."""
        self._detach_all(self._threads)
        self._threads.clear()
        self.target_detached_at = time.monotonic()

    # -- tracer thread ------------------------------------------------------------

    def _run(self) -> None:
        threads = self._threads
        try:
            try:
                result = self._freeze(threads)
            except BaseException as exc:
                self._result.set_exception(exc)
                return
            self._result.set_result(result)
            if not self._serve(time.monotonic() + self._max_freeze):
                self.expired = True
                log.warning("pid %d: maximum freeze duration %.1fs reached, thawing",
                            self.pid, self._max_freeze)
                if self._on_expire is not None:
                    self._on_expire()
        finally:
            self._stop_serving()
            self._detach_all(threads)
            threads.clear()
            if not self.target_detached_at:
                self.target_detached_at = time.monotonic()
            for hook in reversed(self._exit_hooks):
                try:
                    hook()
                except Exception:
                    log.exception("pid %d: tracer exit hook failed", self.pid)
            self.thawed.set()
            # Returning ends this OS thread; the kernel then releases any
            # tracee that never stopped, cancelling its pending interrupt.

    def _serve(self, deadline: float) -> bool:
        """Run commands until thaw is requested (True) or the deadline passes (False)."""
        while not self._thaw_requested.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                item = self._commands.get(timeout=left)
            except queue.Empty:
                continue
            if item is not None:
                self._execute(*item)
        return True

    @staticmethod
    def _execute(fn: Callable[[], Any], fut: Future[Any]) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            fut.set_exception(exc)

    def _stop_serving(self) -> None:
        with self._commands_lock:
            self._serving = False
        while True:
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return
            if item is not None and item[1].set_running_or_notify_cancel():
                item[1].set_exception(TracerGone(f"pid {self.pid}: the tracer thread has ended"))

    def _freeze(self, threads: dict[int, FrozenThread]) -> FreezeResult:
        t0 = 0.0
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
                # A thread in ptrace-stop creates no threads, and one that was
                # in clone() stopped only after its child joined the group,
                # so once every seized thread has stopped one scan without
                # newcomers is final; a thread that did not stop may still
                # clone, so then a second one must agree.
                settled = all(t.stopped or t.exited for t in threads.values())
                if quiet_rounds >= (1 if settled else 2):
                    break
                continue
            quiet_rounds = 0
            # States first, seizes after: the seizes of one round then follow
            # each other closely, and the states are read while nothing is
            # stopped yet (half of a 200-thread freeze otherwise).
            for tid in new:
                try:
                    states_before[tid] = procfs.thread_state(self.pid, tid)
                except ProcessGone:
                    skipped.add(tid)
            t0 = t0 or time.monotonic()
            for tid in new:
                if tid not in skipped and not self._seize_one(tid, threads, states_before):
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
            ptrace_ops.seize(tid)
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                return False                   # thread exited meanwhile
            if exc.errno == errno.EPERM:
                if states.get(tid) in ("Z", "X"):
                    return False               # zombie (e.g. leader after pthread_exit)
                try:
                    if procfs.thread_state(self.pid, tid) in ("Z", "X"):
                        return False           # became one since its state was read
                    tracer = procfs.tracer_pid(self.pid, tid)
                except ProcessGone:
                    return False
                if tracer:
                    try:
                        name = procfs.comm(tracer)
                    except ProcessGone:
                        name = "comm unknown"
                    raise AlreadyTraced(f"process {self.pid} is already traced by pid {tracer} "
                                        f"({name})") from None
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
            if spec.is_active(data):
                t.regsets.append((spec.note_type, data))

    def _detach_all(self, threads: dict[int, FrozenThread]) -> None:
        """Detach every stopped tracee, handing back signals it was about to get.

        Threads present now are tried too: a thread that called execve()
        during the freeze took over the leader's tid, and ESRCH from a tid
        that is not (or no longer) our stopped tracee is harmless.
        """
        try:
            current = procfs.task_ids(self.pid)
        except ProcessGone:
            current = set()
        for tid in sorted(current | {t.tid for t in threads.values() if t.stopped}):
            t = threads.get(tid)
            try:
                ptrace_ops.detach(tid, t.pending_signal if t is not None else 0)
            except OSError as exc:
                if exc.errno != errno.ESRCH:
                    log.error("pid %d: detach of %d failed: %s", self.pid, tid, exc)


def _wait_os_thread_gone(native_id: int | None, timeout: float = 1.0) -> None:
    """Python's join() returns before the OS thread has fully exited."""
    if native_id is None:
        return
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/self/task/{native_id}") and time.monotonic() < deadline:
        time.sleep(0.0005)


__all__ = ["Freezer", "FreezeResult", "FrozenThread", "CorepeekError", "TracerGone"]
