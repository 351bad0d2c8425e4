"""Snapshot mode: freeze the target only while a copy-on-write clone of it is made.

With every thread frozen and the core's layout and notes computed (they are
the original's), the agent makes one thread of the target execute a
``clone()`` system call, injected through ptrace at a ``syscall`` instruction
found in the target's ``[vdso]`` (libc as a fallback).  The child is a
copy-on-write image of the frozen address space; it is auto-attached to the
agent's tracer thread (``PTRACE_O_TRACECLONE``) and caught in its first stop,
before it runs a single instruction of the target, and it stays stopped until
the session ends.  The original is detached (thawed) right after the clone
exists; memory is then read from the clone, through ``/proc/CLONE/mem``
(:class:`CloneReader`: process_vm_readv would copy every shared page it pins).
See docs/snapshot.md.

The injection, step by step (tracer thread, target frozen):

1. ``PTRACE_SETOPTIONS`` on the injecting thread only: TRACESYSGOOD, TRACECLONE,
   TRACEFORK, TRACEVFORK.  Never EXITKILL on the target.
2. Registers: pc = the syscall instruction, number and arguments per the ABI
   (:class:`SyscallAbi`), ``orig_ax = -1`` so the syscall-restart fix-up the
   thread is in the middle of (it was interrupted in get_signal) leaves them alone.
3. ``PTRACE_SYSCALL`` to the syscall-enter stop, again to the
   ``PTRACE_EVENT_CLONE`` stop (``PTRACE_GETEVENTMSG``: the child's pid; wait
   for the child's first stop and set ``PTRACE_O_EXITKILL`` on it), again to
   the syscall-exit stop (the result).
4. ``PTRACE_INTERRUPT`` + ``PTRACE_CONT``: the thread stops once more inside
   get_signal (before any user instruction), where the saved registers are put
   back with ``PTRACE_SETREGSET``; the interrupted system call then restarts
   exactly as it would have.  No SIGTRAP is ever generated (single-stepping
   would force one, and reset a blocked or ignored SIGTRAP's disposition).

Flags: ``CLONE_FILES`` (the clone shares the fd table, so it holds nothing open
and never closes anything: it never runs) and exit signal 0 (no SIGCHLD; a
"clone" child that ``wait()``/``waitpid(-1, ...)`` without ``__WALL`` or
``__WCLONE`` never see).  The child's stack pointer is set to an unmapped
address so that, if it ever ran (agent killed between its creation and
EXITKILL), it would fault at its first stack access.

Clean-up (an exit hook of the tracer thread): SIGKILL the clone, reap it as
its tracer, then re-freeze one thread of the target for a moment and inject
``wait4(clone, NULL, __WALL|WNOHANG, NULL)`` to remove the zombie the clone
leaves under its real parent, the target.

Everything that decides (ABIs, instruction search, seccomp filter evaluation,
obstacles, the pre-read budget) is a pure function, unit tested.  One concern
per module:

- :mod:`.abi`: system call ABIs and the search for a syscall instruction (pure);
- :mod:`.seccomp`: the BPF interpreter and the check of the target's filters;
- :mod:`.obstacles`: whether to try at all (else live mode), what the clone lacks;
- :mod:`.inject`: the ptrace sequence of one injected system call;
- :mod:`.clone`: the clone's lifetime (take, release, reap in the target);
- :mod:`.reader`: reading the snapshot (clone, original, held bytes).
"""

from __future__ import annotations

from .abi import (ABI_INSNS, ABIS, CLONE_FILES, I386_ABI, POISON_SP, SEARCH_LIMIT, WALL,
                  WNOHANG, X86_64_ABI, SyscallAbi, clone_args, find_insn, find_syscall_insn,
                  insn_search_order)
from .clone import Snapshot, ns_pids, pid_as_seen_by, reap_in_target, take_snapshot
from .inject import CLONE_TIMEOUT, STEP_TIMEOUT, Injection, inject_syscall
from .obstacles import (PREREAD_BUDGET, UFFD_FLAGS, SnapshotUnavailable, obstacle,
                        pick_injector, plan_preread, private_copies, read_after_thaw)
from .reader import CloneReader, HeldRegion, SnapshotReader, preread
from .seccomp import (SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO, SECCOMP_RET_KILL_PROCESS,
                      SECCOMP_RET_KILL_THREAD, SECCOMP_RET_LOG, SECCOMP_RET_TRACE,
                      SECCOMP_RET_TRAP, SECCOMP_RET_USER_NOTIF, FilterError, describe_action,
                      run_bpf, seccomp_allows, seccomp_check, seccomp_data, seccomp_verdict)

__all__ = [
    "ABIS", "ABI_INSNS", "CLONE_FILES", "CLONE_TIMEOUT", "I386_ABI", "POISON_SP",
    "PREREAD_BUDGET", "SEARCH_LIMIT", "SECCOMP_RET_ALLOW", "SECCOMP_RET_ERRNO",
    "SECCOMP_RET_KILL_PROCESS", "SECCOMP_RET_KILL_THREAD", "SECCOMP_RET_LOG",
    "SECCOMP_RET_TRACE", "SECCOMP_RET_TRAP", "SECCOMP_RET_USER_NOTIF", "STEP_TIMEOUT",
    "UFFD_FLAGS", "WALL", "WNOHANG", "X86_64_ABI", "CloneReader", "FilterError", "HeldRegion",
    "Injection", "Snapshot", "SnapshotReader", "SnapshotUnavailable", "SyscallAbi",
    "clone_args", "describe_action", "find_insn", "find_syscall_insn", "inject_syscall",
    "insn_search_order", "ns_pids", "obstacle", "pick_injector", "pid_as_seen_by",
    "plan_preread", "preread", "private_copies", "read_after_thaw", "reap_in_target",
    "run_bpf", "seccomp_allows", "seccomp_check", "seccomp_data", "seccomp_verdict",
    "take_snapshot",
]
