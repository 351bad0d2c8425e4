"""Would the target's seccomp filters let the injected system calls through?

Owns a classic BPF interpreter for seccomp programs (:func:`run_bpf`, pure),
the kernel's rule for combining filters (the most restrictive action wins),
and :func:`seccomp_check`, which reads a thread's mode and filters (procfs,
PTRACE_SECCOMP_GET_FILTER) and evaluates the calls an injection will make,
so a filter that would kill or trap the target is found before any call runs.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Sequence

from .. import procfs, ptrace_ops
from ..errors import ProcessGone
from .abi import SyscallAbi

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
