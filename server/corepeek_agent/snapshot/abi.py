"""Where to inject a system call, and how (pure).

Owns the system call ABIs (:class:`SyscallAbi`: which register holds the
number, the arguments, the result, per architecture), the arguments of the
injected ``clone()``, and the search for a system call instruction in the
target's ``[vdso]``, libc or executable mappings.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..elfcore.model import Mapping

CLONE_FILES = 0x00000400
WNOHANG = 1
WALL = 0x40000000
# A child stack pointer in the never-mapped first page (vm.mmap_min_addr):
# a runaway clone faults at its first stack access.
POISON_SP = 0x100
SEARCH_LIMIT = 8 * 1024 * 1024      # bytes of one mapping searched for the instruction
ABI_INSNS = {"x86_64": b"\x0f\x05", "i386": b"\xcd\x80"}


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
