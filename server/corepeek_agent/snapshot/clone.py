"""The clone's lifetime: made while the target is frozen, killed and reaped at the end.

Owns :func:`take_snapshot` (checks, injection of ``clone()``, adoption of the
child, the target's detach), :class:`Snapshot` with its :meth:`~Snapshot.release`,
and :func:`reap_in_target`, which removes the zombie the clone leaves under
the target by injecting ``wait4()`` into one briefly frozen thread.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .. import procfs, ptrace_ops
from ..elfcore.model import Mapping
from ..errors import ProcessGone
from ..freezer import Freezer, FreezeResult
from ..memory import MemoryReader
from .abi import (ABI_INSNS, ABIS, CLONE_FILES, WALL, WNOHANG, SyscallAbi, clone_args,
                  find_syscall_insn)
from .ledger import Ledger
from .inject import STEP_TIMEOUT, _kill_and_reap, _Lost, _wait, inject_syscall
from .obstacles import SnapshotUnavailable, obstacle_reason, pick_injector
from .seccomp import seccomp_check

log = logging.getLogger(__name__)

# How long a session's end waits for the zombie's removal (normally ~1 ms).
REAP_WAIT = 2.0


def ns_pids(pid: int) -> list[int]:
    """A process's pids from the agent's pid namespace inward (``NSpid``)."""
    value = procfs.status(pid).get("NSpid", "")
    return [int(x) for x in value.split()] or [pid]


def pid_as_seen_by(observer: int, pid: int) -> int:
    """``pid`` (agent's numbering) as process ``observer`` names it: the entry of
    its ``NSpid`` at the depth of the observer's own pid namespace.  A clone
    lives in the target's namespace (or one below), never above it."""
    level = len(ns_pids(observer)) - 1
    ids = ns_pids(pid)
    if len(ids) <= level:
        raise ProcessGone(f"pid {pid} is not visible in the pid namespace of {observer}")
    return ids[level]


@dataclass
class Snapshot:
    """A clone of the target, stopped and traced by the freezer's tracer thread."""

    target_pid: int
    clone_pid: int
    parent_tid: int
    abi: SyscallAbi
    insn_addr: int
    thread_timeout: float
    clone_pid_in_target: int = 0    # the clone's pid in the target's pid namespace
    frozen_seconds: float = 0.0     # injection start to the target's detach
    clone_seconds: float = 0.0      # the clone() system call alone
    share_files: bool = True
    ledger: Ledger | None = None    # the agent's on-disk record of its clones
    released: bool = False
    reaped_in_target: bool = False
    refreeze_seconds: float = 0.0

    def release(self) -> None:
        """Kill and reap the clone, and remove its zombie from the target (tracer thread)."""
        if self.released:
            return
        self.released = True
        _kill_and_reap(self.clone_pid)
        # The zombie's removal stops one thread of the target; PTRACE_SEIZE
        # itself waits for an exec in progress in the target (cred_guard_mutex),
        # so it runs on a thread of its own that the session waits for a while.
        worker = threading.Thread(target=self._reap_zombie, daemon=True,
                                  name=f"reap-{self.target_pid}")
        worker.start()
        worker.join(REAP_WAIT)
        if worker.is_alive():
            log.warning("pid %d: removing the zombie of snapshot clone %d takes over %.0f s "
                        "(the target is in exec?); it goes on in the background",
                        self.target_pid, self.clone_pid, REAP_WAIT)

    def _reap_zombie(self) -> None:
        try:
            self.reaped_in_target, self.refreeze_seconds = reap_in_target(
                self.target_pid, self.clone_pid, self.abi, self.insn_addr, self.thread_timeout,
                child_in_target=self.clone_pid_in_target)
            log.info("pid %d: snapshot clone %d killed; zombie %s (thread frozen %.2f ms)",
                     self.target_pid, self.clone_pid,
                     "removed" if self.reaped_in_target else "left", self.refreeze_seconds * 1e3)
        except Exception as exc:  # noqa: BLE001 - never fail the session's end
            log.warning("pid %d: could not remove the zombie of snapshot clone %d: %s",
                        self.target_pid, self.clone_pid, exc)
        finally:
            if self.ledger is not None:
                self.ledger.forget(self.clone_pid)


def take_snapshot(freezer: Freezer, fr: FreezeResult, mappings: Sequence[Mapping],
                  read: Callable[[int, int], bytes], *, thread_timeout: float,
                  share_files: bool = True, ledger: Ledger | None = None) -> Snapshot:
    """Make the clone and detach the target (tracer thread, target frozen).

    Raises :class:`SnapshotUnavailable` (the target still frozen, untouched)
    when no clone could be made.
    """
    t0 = time.monotonic()
    abi = ABIS.get(fr.arch.name)
    reason, why = obstacle_reason(fr.arch, fr.threads, mappings)
    if why or abi is None:
        raise SnapshotUnavailable(why or f"no ABI for {fr.arch.name}",
                                  reason or "unsupported_arch")
    insn = fr.arch.syscall_insn
    insn_addr = find_syscall_insn(mappings, insn, read)
    if not insn_addr:
        raise SnapshotUnavailable(f"no {insn.hex(' ')} (system call) instruction found in "
                                  "the target's [vdso], libc or executable mappings",
                                  "no_instruction")
    flags = CLONE_FILES if share_files else 0
    cargs = clone_args(abi, flags)
    calls: list[tuple[int, Sequence[int]]] = [(abi.nr_clone, cargs),
                                              (abi.nr_wait4, (0, 0, WALL | WNOHANG, 0))]
    if not share_files:
        calls.append((abi.nr_close_range, (0, 0xFFFFFFFF, 0)))
    attached = freezer.frozen_threads
    reasons = []
    for cand in pick_injector(fr.threads, freezer.pid):
        t = attached.get(cand.tid)
        if t is None:
            continue
        why = seccomp_check(freezer.pid, t.tid, abi, insn_addr + len(insn), calls)
        if why:
            raise SnapshotUnavailable(why, "seccomp")
        snap = Snapshot(freezer.pid, 0, t.tid, abi, insn_addr, thread_timeout,
                        share_files=share_files, ledger=ledger)

        def adopt(child: int, snap: Snapshot = snap) -> None:
            snap.clone_pid = child
            freezer.add_exit_hook(snap.release)     # whatever happens next
            ev = _wait(child, STEP_TIMEOUT, "the clone's first stop")
            if not ev.is_interrupt_stop:
                log.warning("pid %d: clone %d first stopped with signal %d event %d",
                            freezer.pid, child, ev.signal, ev.event)
            ptrace_ops.setoptions(child, ptrace_ops.PTRACE_O_EXITKILL |
                                  ptrace_ops.PTRACE_O_TRACESYSGOOD)
            # wait4() in the target will need the clone's pid as the target names it.
            try:
                snap.clone_pid_in_target = pid_as_seen_by(freezer.pid, child)
            except (ProcessGone, ValueError) as exc:
                log.warning("pid %d: clone %d: %s", freezer.pid, child, exc)
            if ledger is not None:
                ledger.record(freezer.pid, child, snap.clone_pid_in_target, abi.arch, insn_addr)

        try:
            inj = inject_syscall(t.tid, abi, insn_addr, abi.nr_clone, cargs,
                                 options=(ptrace_ops.PTRACE_O_TRACECLONE |
                                          ptrace_ops.PTRACE_O_TRACEFORK |
                                          ptrace_ops.PTRACE_O_TRACEVFORK),
                                 on_child=adopt)
        except (_Lost, OSError) as exc:
            raise SnapshotUnavailable(f"the clone() injection failed: {exc}",
                                      "injection_failed") from None
        if not inj.started:
            # A signal or a group stop came first; the thread stays in that
            # stop with its own registers (the signal goes back at detach).
            t.pending_signal = t.pending_signal or inj.pending_signal
            t.group_stop = t.group_stop or inj.group_stop
            reasons.append(f"thread {t.tid} stopped for "
                           f"{'a group stop' if inj.group_stop else f'signal {inj.pending_signal}'}")
            if inj.group_stop:
                break
            continue
        if inj.result < 0 or not snap.clone_pid:
            raise SnapshotUnavailable("clone() failed in the target: " + (
                os.strerror(-inj.result) if inj.result < 0 else "no child was reported"),
                "clone_failed")
        snap.clone_seconds = inj.syscall_seconds
        freezer.detach_target()
        snap.frozen_seconds = time.monotonic() - t0
        if not share_files:
            _close_fds_in_clone(snap)
        return snap
    raise SnapshotUnavailable("no thread could run the injected clone(): " + "; ".join(reasons),
                              "no_thread")


def _close_fds_in_clone(snap: Snapshot) -> None:
    """Copied fd table: close every descriptor in the clone before anything else."""
    try:
        inj = inject_syscall(snap.clone_pid, snap.abi, snap.insn_addr, snap.abi.nr_close_range,
                             (0, 0xFFFFFFFF, 0), options=ptrace_ops.PTRACE_O_EXITKILL,
                             restore=False, timeout=STEP_TIMEOUT)
        if inj.result < 0:
            log.warning("pid %d: close_range in clone %d failed: %s", snap.target_pid,
                        snap.clone_pid, os.strerror(-inj.result))
    except (_Lost, OSError) as exc:
        log.warning("pid %d: close_range in clone %d failed: %s", snap.target_pid,
                    snap.clone_pid, exc)


def _children(pid: int) -> set[int]:
    kids: set[int] = set()
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    kids.update(int(k) for k in f.read().split())
            except OSError:
                continue
    except OSError:
        pass
    return kids


def reap_in_target(pid: int, child: int, abi: SyscallAbi, insn_addr: int,
                   thread_timeout: float, *, child_in_target: int = 0) -> tuple[bool, float]:
    """Remove ``child``'s zombie from its parent ``pid`` by injecting
    ``wait4(child, NULL, __WALL|WNOHANG, NULL)`` into one thread of ``pid``,
    frozen just for that while the others run (tracer thread).

    ``child`` is the agent's pid of the clone, ``child_in_target`` the same
    process's pid in the target's pid namespace (what wait4 there takes).
    Returns (no zombie left, seconds that thread was frozen).
    """
    if child not in _children(pid):
        return True, 0.0               # the target exited (init reaps) or waited already
    if not child_in_target:
        return False, 0.0              # never learnt its pid there: do not guess
    try:
        tids = sorted(procfs.task_ids(pid), key=lambda t: t != pid)
    except ProcessGone:
        return True, 0.0
    insn = ABI_INSNS[abi.arch]
    head = b""
    for tid in tids:                # a zombie leader has no memory to read: a live thread
        try:
            head = _proc_mem_reader(tid)(insn_addr, len(insn))
        except (ProcessGone, OSError):
            continue
        if head:
            break
    if head and head != insn:
        # Another image since (exec): seizing a thread for it would be in
        # vain, and may wait for the exec itself.  The new image inherits the
        # zombie; it goes when the target waits with __WALL or exits.
        log.warning("pid %d: the zombie of snapshot clone %d stays: the target called exec",
                    pid, child)
        return False, 0.0
    args = (child_in_target, 0, WALL | WNOHANG, 0)
    last = "no thread could be stopped"
    for tid in tids:
        try:
            ptrace_ops.seize(tid)
        except OSError as exc:
            last = f"PTRACE_SEIZE of thread {tid}: {os.strerror(exc.errno or 0)}"
            continue
        t0 = time.monotonic()
        pending = 0
        try:
            ptrace_ops.interrupt(tid)
            ev = ptrace_ops.wait_stop(tid, thread_timeout)
            if ev is None or ev.exited:
                last = f"thread {tid} did not stop"
                continue
            if not ev.is_interrupt_stop:
                pending = ev.signal if ev.event == 0 else 0
                last = f"thread {tid} stopped with signal {ev.signal} event {ev.event}"
                continue
            regs = ptrace_ops.getregset(tid, ptrace_ops.NT_PRSTATUS)
            # The same process image as at the snapshot (no exec since)?
            if len(regs) != abi.word_size * (27 if abi.word_size == 8 else 17) or \
                    _proc_mem_reader(tid)(insn_addr, len(insn)) != insn:
                last = "the target's image changed (exec?)"
                break
            why = seccomp_check(pid, tid, abi, insn_addr + len(insn), [(abi.nr_wait4, args)])
            if why:
                last = why
                break
            inj = inject_syscall(tid, abi, insn_addr, abi.nr_wait4, args, timeout=STEP_TIMEOUT)
            pending = inj.pending_signal
            if inj.started:
                if inj.result == child_in_target:
                    return True, time.monotonic() - t0
                last = f"wait4 answered {inj.result}"
                break
            last = f"thread {tid} was stopped by a signal first"
        except (_Lost, OSError) as exc:
            last = str(exc)
        finally:
            try:
                ptrace_ops.detach(tid, pending)
            except OSError:
                pass
    log.warning("pid %d: the zombie of snapshot clone %d stays until the target waits for "
                "it or exits: %s", pid, child, last)
    return False, 0.0


def _proc_mem_reader(pid: int) -> Callable[[int, int], bytes]:
    def read(addr: int, n: int) -> bytes:
        reader = MemoryReader(pid)
        try:
            buf = bytearray(n)
            return bytes(buf[:reader.read_into(addr, buf)])
        finally:
            reader.close()
    return read
