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
obstacles, the pre-read budget) is a pure function, unit tested.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from . import procfs, ptrace_ops
from .arch import ArchSpec
from .elfcore.model import DumpedMapping, Mapping
from .errors import CorepeekError, ProcessGone
from .freezer import Freezer, FreezeResult, FrozenThread
from .memory import MemoryReader

log = logging.getLogger(__name__)

CLONE_FILES = 0x00000400
WNOHANG = 1
WALL = 0x40000000
# A child stack pointer in the never-mapped first page (vm.mmap_min_addr):
# a runaway clone faults at its first stack access.
POISON_SP = 0x100
PREREAD_BUDGET = 64 * 1024 * 1024   # MADV_DONTFORK/WIPEONFORK bytes held per session
STEP_TIMEOUT = 5.0                  # one ptrace step of an injection
CLONE_TIMEOUT = 120.0               # the clone itself: page tables of a huge target
SEARCH_LIMIT = 8 * 1024 * 1024      # bytes of one mapping searched for the instruction


class SnapshotUnavailable(CorepeekError):
    """No snapshot could be made; the session falls back to live mode."""


# -- system call ABIs ------------------------------------------------------------------


@dataclass(frozen=True)
class SyscallAbi:
    """Where a task's system call number, arguments and result live in gpregs.

    Indexes are word indexes in the NT_PRSTATUS register set ptrace returns
    for the task (``struct user_regs_struct`` of its architecture).
    """

    arch: str
    word_size: int
    nr_index: int
    arg_indexes: tuple[int, ...]          # up to six arguments, in order
    ret_index: int
    orig_nr_index: int
    pc_index: int
    sp_index: int
    audit_arch: int                       # seccomp_data.arch
    nr_clone: int
    nr_wait4: int
    nr_close_range: int

    @property
    def fmt(self) -> str:
        return "<" + ("q" if self.word_size == 8 else "i")

    def _put(self, regs: bytearray, index: int, value: int) -> None:
        bits = 8 * self.word_size
        value &= (1 << bits) - 1
        if value >= 1 << (bits - 1):
            value -= 1 << bits
        struct.pack_into(self.fmt, regs, index * self.word_size, value)

    def _get(self, regs: bytes, index: int) -> int:
        (value,) = struct.unpack_from(self.fmt, regs, index * self.word_size)
        return int(value)

    def call_regs(self, gpregs: bytes, pc: int, nr: int, args: Sequence[int] = ()) -> bytes:
        """gpregs set up to run system call ``nr`` with ``args`` at ``pc``.

        Unused argument registers are zeroed; ``orig_ax`` is -1 so the kernel's
        syscall-restart fix-up does not rewrite pc and the number.
        """
        if len(args) > len(self.arg_indexes):
            raise ValueError(f"at most {len(self.arg_indexes)} arguments")
        regs = bytearray(gpregs)
        self._put(regs, self.pc_index, pc)
        self._put(regs, self.nr_index, nr)
        self._put(regs, self.orig_nr_index, -1)
        for i, index in enumerate(self.arg_indexes):
            self._put(regs, index, args[i] if i < len(args) else 0)
        return bytes(regs)

    def result(self, gpregs: bytes) -> int:
        """The (signed) return value of a system call at its exit stop."""
        return self._get(gpregs, self.ret_index)

    def pc(self, gpregs: bytes) -> int:
        return self._get(gpregs, self.pc_index) & ((1 << (8 * self.word_size)) - 1)


# struct user_regs_struct (x86_64): r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx
# rdx rsi rdi orig_rax rip cs eflags rsp ss fs_base gs_base ds es fs gs
X86_64_ABI = SyscallAbi(
    arch="x86_64", word_size=8, nr_index=10, arg_indexes=(14, 13, 12, 7, 9, 8),
    ret_index=10, orig_nr_index=15, pc_index=16, sp_index=19, audit_arch=0xC000003E,
    nr_clone=56, nr_wait4=61, nr_close_range=436)
# struct user_regs_struct (i386): ebx ecx edx esi edi ebp eax xds xes xfs xgs
# orig_eax eip xcs eflags esp xss; int $0x80 takes ebx ecx edx esi edi ebp.
I386_ABI = SyscallAbi(
    arch="i386", word_size=4, nr_index=6, arg_indexes=(0, 1, 2, 3, 4, 5),
    ret_index=6, orig_nr_index=11, pc_index=12, sp_index=15, audit_arch=0x40000003,
    nr_clone=120, nr_wait4=114, nr_close_range=436)
ABIS = {a.arch: a for a in (X86_64_ABI, I386_ABI)}


def clone_args(abi: SyscallAbi, flags: int, child_sp: int = POISON_SP) -> tuple[int, ...]:
    """Arguments of ``clone(flags, newsp, ...)``; the TLS and tid pointers are 0.

    x86_64 passes (flags, newsp, parent_tid, child_tid, tls); i386 (flags,
    newsp, parent_tid, tls, child_tid): with zeros the order does not matter.
    """
    return (flags, child_sp, 0, 0, 0)


def find_insn(data: bytes, insn: bytes) -> int:
    """Offset of the first occurrence of ``insn`` in ``data``, or -1.

    Any occurrence will do, aligned to an instruction boundary or not: the
    thread jumps right to it, executes those bytes as the system call
    instruction and stops at the syscall-exit stop before the next one.
    """
    return data.find(insn) if insn else -1


def insn_search_order(mappings: Sequence[Mapping]) -> list[Mapping]:
    """Mappings worth searching for a syscall instruction, best first:
    ``[vdso]``, the C library's executable mappings, then any other readable
    executable file mapping (a static executable has no libc)."""
    vdso = [m for m in mappings if m.path == "[vdso]"]
    code = [m for m in mappings if m.executable and m.readable and m.path.startswith("/")]
    libc = [m for m in code if os.path.basename(m.path).startswith(("libc.so", "libc-"))]
    return vdso + libc + [m for m in code if m not in libc]


def find_syscall_insn(mappings: Sequence[Mapping], insn: bytes,
                      read: Callable[[int, int], bytes]) -> int:
    """Address of a syscall instruction in the target, or 0 if none is found."""
    for m in insn_search_order(mappings):
        data = read(m.start, min(m.size, SEARCH_LIMIT))
        off = find_insn(data, insn)
        if off >= 0:
            return m.start + off
    return 0


# -- seccomp ---------------------------------------------------------------------------

SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_KILL_THREAD = 0x00000000
SECCOMP_RET_TRAP = 0x00030000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_RET_TRACE = 0x7FF00000
SECCOMP_RET_LOG = 0x7FFC0000
SECCOMP_RET_ALLOW = 0x7FFF0000
_ACTION_FULL = 0xFFFF0000
_SECCOMP_DATA = struct.Struct("<iIQ6Q")      # nr arch instruction_pointer args[6]


class FilterError(ValueError):
    """A classic BPF program this evaluator does not understand (or a bad one)."""


def _action_rank(ret: int) -> int:
    """The kernel's ACTION_ONLY(): lower wins (KILL_PROCESS is most restrictive)."""
    action = ret & _ACTION_FULL
    return action - (1 << 32) if action & 0x80000000 else action


def run_bpf(prog: bytes, data: bytes) -> int:
    """Run one classic BPF seccomp program over ``struct seccomp_data`` bytes."""
    insns = [struct.unpack_from("<HBBI", prog, i) for i in range(0, len(prog) - 7, 8)]
    a = x = 0
    mem = [0] * 16
    pc = 0
    mask = 0xFFFFFFFF
    for _ in range(4096 + 1):
        if pc >= len(insns):
            raise FilterError("the program runs off its end")
        code, jt, jf, k = insns[pc]
        pc += 1
        cls = code & 0x07
        if cls in (0x00, 0x01):                         # BPF_LD / BPF_LDX
            mode, size = code & 0xE0, code & 0x18
            if mode == 0x00:                            # IMM
                val = k
            elif mode == 0x80:                          # LEN
                val = len(data)
            elif mode == 0x60:                          # MEM
                if k >= 16:
                    raise FilterError("scratch memory index out of range")
                val = mem[k]
            elif mode == 0x20 and cls == 0x00 and size == 0x00:   # LD W ABS
                if k % 4 or k + 4 > len(data):
                    raise FilterError(f"load at offset {k}")
                (val,) = struct.unpack_from("<I", data, k)
            else:
                raise FilterError(f"unsupported load {code:#x}")
            if cls == 0x00:
                a = val
            else:
                x = val
        elif cls in (0x02, 0x03):                       # BPF_ST / BPF_STX
            if k >= 16:
                raise FilterError("scratch memory index out of range")
            mem[k] = a if cls == 0x02 else x
        elif cls == 0x04:                               # BPF_ALU
            op, src = code & 0xF0, (x if code & 0x08 else k)
            if op == 0x00:
                a = (a + src) & mask
            elif op == 0x10:
                a = (a - src) & mask
            elif op == 0x20:
                a = (a * src) & mask
            elif op == 0x30:
                if src == 0:
                    return SECCOMP_RET_KILL_THREAD      # the kernel's division by zero
                a //= src
            elif op == 0x90:
                if src == 0:
                    return SECCOMP_RET_KILL_THREAD
                a %= src
            elif op == 0x40:
                a |= src
            elif op == 0x50:
                a &= src
            elif op == 0x60:
                a = (a << src) & mask if src < 32 else 0
            elif op == 0x70:
                a = a >> src if src < 32 else 0
            elif op == 0x80:
                a = (-a) & mask
            elif op == 0xA0:
                a ^= src
            else:
                raise FilterError(f"unsupported ALU op {code:#x}")
        elif cls == 0x05:                               # BPF_JMP
            op, src = code & 0xF0, (x if code & 0x08 else k)
            if op == 0x00:
                pc += k
                continue
            taken = {0x10: a == src, 0x20: a > src, 0x30: a >= src, 0x40: bool(a & src)}.get(op)
            if taken is None:
                raise FilterError(f"unsupported jump {code:#x}")
            pc += jt if taken else jf
        elif cls == 0x06:                               # BPF_RET
            rval = code & 0x18
            return {0x00: k, 0x10: a, 0x08: x}.get(rval, k) & mask
        elif cls == 0x07:                               # BPF_MISC
            if code & 0xF8 == 0x00:
                x = a                                   # TAX
            elif code & 0xF8 == 0x80:
                a = x                                   # TXA
            else:
                raise FilterError(f"unsupported misc {code:#x}")
        else:
            raise FilterError(f"unsupported class {code:#x}")
    raise FilterError("the program does not end")


def seccomp_data(abi: SyscallAbi, nr: int, ip: int, args: Sequence[int]) -> bytes:
    words = [(a & ((1 << (8 * abi.word_size)) - 1)) for a in args] + [0] * (6 - len(args))
    return _SECCOMP_DATA.pack(nr, abi.audit_arch, ip, *words[:6])


def seccomp_verdict(filters: Sequence[bytes], data: bytes) -> int:
    """The action the kernel would take: every filter runs, the most restrictive wins."""
    ret = SECCOMP_RET_ALLOW
    for prog in filters:
        cur = run_bpf(prog, data)
        if _action_rank(cur) < _action_rank(ret):
            ret = cur
    return ret


def seccomp_allows(action: int) -> bool:
    return action & _ACTION_FULL in (SECCOMP_RET_ALLOW, SECCOMP_RET_LOG)


def describe_action(action: int) -> str:
    names = {SECCOMP_RET_KILL_PROCESS: "KILL_PROCESS", SECCOMP_RET_KILL_THREAD: "KILL_THREAD",
             SECCOMP_RET_TRAP: "TRAP", SECCOMP_RET_ERRNO: "ERRNO",
             SECCOMP_RET_USER_NOTIF: "USER_NOTIF", SECCOMP_RET_TRACE: "TRACE",
             SECCOMP_RET_LOG: "LOG", SECCOMP_RET_ALLOW: "ALLOW"}
    return names.get(action & _ACTION_FULL, f"{action:#x}")


# -- what stops a snapshot, what the clone lacks -----------------------------------------

UFFD_FLAGS = frozenset({"um", "uw", "ui"})   # userfaultfd missing / wp / minor


def obstacle(arch: ArchSpec, threads: Sequence[FrozenThread],
             mappings: Sequence[Mapping]) -> str:
    """Why no clone should be injected into this frozen target ("" if none)."""
    if arch.name not in ABIS:
        return f"snapshot mode does not support {arch.name} targets"
    unfrozen = [t.tid for t in threads if not t.stopped]
    if unfrozen:
        return f"threads {unfrozen} did not freeze"
    if any(t.group_stop for t in threads):
        return "the target is stopped by job control (a live capture costs it nothing)"
    if not pick_injector(threads):
        return "no thread is in a state where a system call can be injected"
    uffd = [m for m in mappings if m.vm_flags & UFFD_FLAGS]
    if uffd:
        return (f"userfaultfd-registered memory at {uffd[0].start:#x} (a fork would be "
                "reported to, and may wait for, the userfaultfd monitor)")
    return ""


def pick_injector(threads: Sequence[FrozenThread], leader: int = 0) -> list[FrozenThread]:
    """Threads a system call may be injected into, best first.

    Only a plain interrupt stop will do (not a signal-delivery-stop whose signal
    is handed back at detach, nor a group stop).  The thread-group leader comes
    first: it is the parent of the clone, and the thread least likely to exit.
    """
    ok = [t for t in threads if t.stopped and not t.pending_signal and not t.group_stop
          and not t.exited and t.gpregs]
    return sorted(ok, key=lambda t: t.tid != leader)


def private_copies(dumped: Sequence[DumpedMapping]) -> list[int]:
    """Indexes of dumped mappings the clone does not get (MADV_DONTFORK, ``dc``)
    or gets zeroed (MADV_WIPEONFORK, ``wf``); MAP_SHARED ones excluded (they are
    read from the clone like any shared mapping: same pages)."""
    return [i for i, d in enumerate(dumped) if d.dump_size and not d.mapping.shared
            and d.mapping.vm_flags & {"dc", "wf"}]


def read_after_thaw(dumped: Sequence[DumpedMapping], from_original: Sequence[int]) -> set[int]:
    """Segments whose bytes may be newer than the frozen moment: MAP_SHARED
    mappings, and private copies read from the running original."""
    return {i for i, d in enumerate(dumped) if d.mapping.shared} | set(from_original)


def plan_preread(sizes: Sequence[int], budget: int = PREREAD_BUDGET) -> tuple[list[int], list[int]]:
    """Split regions (by index) into those held in memory (in order, while they
    fit in ``budget``) and those read from the original after the thaw."""
    held, later, used = [], [], 0
    for i, n in enumerate(sizes):
        if used + n <= budget:
            held.append(i)
            used += n
        else:
            later.append(i)
    return held, later


# -- the reader ----------------------------------------------------------------------


@dataclass
class HeldRegion:
    """Bytes of a mapping the clone lacks, read from the frozen original.

    ``runs`` are (vaddr, data) of the populated parts; the rest reads as zeros.
    """

    start: int
    end: int
    runs: list[tuple[int, bytes]] = field(default_factory=list)

    @property
    def held_bytes(self) -> int:
        return sum(len(d) for _, d in self.runs)


class CloneReader(MemoryReader):
    """The clone's memory through ``/proc/CLONE/mem``, not process_vm_readv.

    process_vm_readv pins the pages it copies (FOLL_PIN), and pinning an
    anonymous page the clone still shares copy-on-write with the target makes
    the kernel unshare it first (gup_must_unshare): every page read would be
    copied in the clone, charged to the target's memory cgroup, at a third of
    the speed.  ``/proc/PID/mem`` takes plain references (FOLL_GET) and copies
    nothing.  Population (holes) still comes from the clone's pagemap.
    """

    def __init__(self, pid: int) -> None:
        super().__init__(pid)
        try:
            self._mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            super().close()
            raise

    def close(self) -> None:
        if self._mem >= 0:
            os.close(self._mem)
            self._mem = -1
        super().close()

    def read_into(self, vaddr: int, buf: bytearray | memoryview) -> int:
        view = memoryview(buf)
        if len(view) == 0:
            return 0
        try:
            got = os.preadv(self._mem, [view], vaddr)
        except OSError as exc:
            if exc.errno not in (errno.EIO, errno.EFAULT, errno.ENOMEM, errno.ESRCH):
                raise
            got = 0
        if got == 0:
            self._check_alive()                  # an exited clone reads as nothing
        return got

    def _check_alive(self) -> None:
        try:
            state = procfs.stat(self.tid).state
        except ProcessGone:
            state = "X"
        if state in ("Z", "X"):
            raise ProcessGone(f"the snapshot clone {self.tid} exited during the capture")


class SnapshotReader(MemoryReader):
    """Reads the snapshot: the clone, except what the clone does not have.

    ``held`` regions are served from memory (pre-read while frozen),
    ``from_original`` (start, end) ranges from the running original, the rest
    from the clone.  ``tid`` stays the original's thread, so the session's
    liveness checks still watch the target; ``clone_pid`` is the clone.
    """

    def __init__(self, clone_pid: int, original: MemoryReader,
                 held: Sequence[HeldRegion] = (),
                 from_original: Sequence[tuple[int, int]] = (),
                 clone: MemoryReader | None = None) -> None:
        # No MemoryReader.__init__: every read is routed to one of these.
        self.clone = clone if clone is not None else CloneReader(clone_pid)
        self.original = original
        self.tid = original.tid
        self.clone_pid = clone_pid
        self._pagemap, self._scan_ok = -1, False
        self._regions: list[tuple[int, int, HeldRegion | None]] = sorted(
            [(h.start, h.end, h) for h in held] + [(s, e, None) for s, e in from_original],
            key=lambda r: r[0])

    def close(self) -> None:
        self.clone.close()
        self.original.close()

    def _split(self, vaddr: int, length: int) -> Iterator[tuple[int, int, object]]:
        """(start, length, source) parts: a HeldRegion, "original", or "clone"."""
        pos, end = vaddr, vaddr + length
        for start, stop, held in self._regions:
            if stop <= pos or start >= end:
                continue
            if start > pos:
                yield pos, start - pos, "clone"
                pos = start
            part_end = min(stop, end)
            yield pos, part_end - pos, held if held is not None else "original"
            pos = part_end
        if pos < end:
            yield pos, end - pos, "clone"

    def populated_runs(self, vaddr: int, length: int) -> Iterator[tuple[int, int, bool]]:
        for start, n, source in self._split(vaddr, length):
            if source == "clone":
                yield from self.clone.populated_runs(start, n)
            elif source == "original":
                yield from self.original.populated_runs(start, n)
            else:
                assert isinstance(source, HeldRegion)
                yield from self._runs_from(start, n, iter(
                    (a, a + len(d)) for a, d in source.runs))

    def read_into(self, vaddr: int, buf: bytearray | memoryview) -> int:
        view = memoryview(buf)
        done = 0
        for start, n, source in self._split(vaddr, len(view)):
            part = view[done:done + n]
            if source == "clone":
                got = self.clone.read_into(start, part)
            elif source == "original":
                got = self.original.read_into(start, part)
            else:
                assert isinstance(source, HeldRegion)
                part[:] = bytes(n)
                for a, data in source.runs:
                    lo, hi = max(a, start), min(a + len(data), start + n)
                    if lo < hi:
                        part[lo - start:hi - start] = data[lo - a:hi - a]
                got = n
            done += got
            if got < n:
                break
        return done


def preread(reader: MemoryReader, dumped: Sequence[DumpedMapping],
            budget: int = PREREAD_BUDGET) -> tuple[list[HeldRegion], list[int]]:
    """Read the private copies the clone lacks from the frozen original.

    Returns the held regions and the indexes (into ``dumped``) left to be read
    from the original after the thaw (over ``budget``).
    """
    idx = private_copies(dumped)
    plans: list[tuple[int, int, list[tuple[int, int]]]] = []
    for i in idx:
        m = dumped[i].mapping
        end = m.start + dumped[i].dump_size
        if m.file_backed:
            runs = [(m.start, end)]
        else:
            runs = [(s, s + n) for s, n, pop in reader.populated_runs(m.start, end - m.start)
                    if pop]
        plans.append((m.start, end, runs))
    held_idx, later_idx = plan_preread([sum(b - a for a, b in r) for _, _, r in plans], budget)
    held = []
    for j in held_idx:
        start, end, runs = plans[j]
        region = HeldRegion(start, end)
        for a, b in runs:
            data, _gaps = reader.read(a, b - a)
            region.runs.append((a, bytes(data)))
        held.append(region)
    return held, [idx[j] for j in later_idx]


# -- injection (tracer thread) ---------------------------------------------------------


class _Lost(Exception):
    """The injecting thread did something unexpected; the message says what."""


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
    released: bool = False
    reaped_in_target: bool = False
    refreeze_seconds: float = 0.0

    def release(self) -> None:
        """Kill and reap the clone, and remove its zombie from the target (tracer thread)."""
        if self.released:
            return
        self.released = True
        _kill_and_reap(self.clone_pid)
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


def _seccomp_mode(pid: int, tid: int) -> int:
    try:
        return int(procfs.status(pid, tid).get("Seccomp", "0"))
    except (ProcessGone, ValueError):
        return 0


def _seccomp_filters(tid: int) -> list[bytes]:
    filters = []
    for index in range(1024):
        try:
            filters.append(ptrace_ops.seccomp_filter(tid, index))
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return filters
            raise
    return filters


def seccomp_check(pid: int, tid: int, abi: SyscallAbi, ip: int,
                  calls: Sequence[tuple[int, Sequence[int]]]) -> str:
    """Why the thread's seccomp filters would not let ``calls`` through ("" if they would)."""
    mode = _seccomp_mode(pid, tid)
    if mode == 0:
        return ""
    if mode == 1:
        return "the target runs in seccomp strict mode"
    try:
        filters = _seccomp_filters(tid)
    except OSError as exc:
        return f"its seccomp filters cannot be inspected ({os.strerror(exc.errno or 0)})"
    for nr, args in calls:
        try:
            action = seccomp_verdict(filters, seccomp_data(abi, nr, ip, args))
        except FilterError as exc:
            return f"its seccomp filter cannot be evaluated ({exc})"
        if not seccomp_allows(action):
            return f"its seccomp filter answers {describe_action(action)} to system call {nr}"
    return ""


def take_snapshot(freezer: Freezer, fr: FreezeResult, mappings: Sequence[Mapping],
                  read: Callable[[int, int], bytes], *, thread_timeout: float,
                  share_files: bool = True) -> Snapshot:
    """Make the clone and detach the target (tracer thread, target frozen).

    Raises :class:`SnapshotUnavailable` (the target still frozen, untouched)
    when no clone could be made.
    """
    t0 = time.monotonic()
    abi = ABIS.get(fr.arch.name)
    why = obstacle(fr.arch, fr.threads, mappings)
    if why or abi is None:
        raise SnapshotUnavailable(why or f"no ABI for {fr.arch.name}")
    insn = fr.arch.syscall_insn
    insn_addr = find_syscall_insn(mappings, insn, read)
    if not insn_addr:
        raise SnapshotUnavailable(f"no {insn.hex(' ')} (system call) instruction found in "
                                  "the target's [vdso], libc or executable mappings")
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
            raise SnapshotUnavailable(why)
        snap = Snapshot(freezer.pid, 0, t.tid, abi, insn_addr, thread_timeout,
                        share_files=share_files)

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

        try:
            inj = inject_syscall(t.tid, abi, insn_addr, abi.nr_clone, cargs,
                                 options=(ptrace_ops.PTRACE_O_TRACECLONE |
                                          ptrace_ops.PTRACE_O_TRACEFORK |
                                          ptrace_ops.PTRACE_O_TRACEVFORK),
                                 on_child=adopt)
        except (_Lost, OSError) as exc:
            raise SnapshotUnavailable(f"the clone() injection failed: {exc}") from None
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
                os.strerror(-inj.result) if inj.result < 0 else "no child was reported"))
        snap.clone_seconds = inj.syscall_seconds
        freezer.detach_target()
        snap.frozen_seconds = time.monotonic() - t0
        if not share_files:
            _close_fds_in_clone(snap)
        return snap
    raise SnapshotUnavailable("no thread could run the injected clone(): " + "; ".join(reasons))


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


ABI_INSNS = {"x86_64": b"\x0f\x05", "i386": b"\xcd\x80"}


def _proc_mem_reader(pid: int) -> Callable[[int, int], bytes]:
    def read(addr: int, n: int) -> bytes:
        reader = MemoryReader(pid)
        try:
            buf = bytearray(n)
            return bytes(buf[:reader.read_into(addr, buf)])
        finally:
            reader.close()
    return read


__all__ = ["ABIS", "CloneReader", "HeldRegion", "Snapshot", "SnapshotReader",
           "SnapshotUnavailable", "SyscallAbi", "find_insn", "obstacle", "preread",
           "reap_in_target", "take_snapshot"]
