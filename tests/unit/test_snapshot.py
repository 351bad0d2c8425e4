"""Snapshot mode's pure parts: syscall ABIs, instruction search, seccomp
evaluation, obstacles, the pre-read budget, the reader's routing, and the
freezer's command mechanism (with ptrace stubbed out)."""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator

import pytest

from corepeek_agent import snapshot
from corepeek_agent.arch import I386, X86_64
from corepeek_agent.elfcore.model import DumpedMapping, Mapping
from corepeek_agent.freezer import Freezer, FreezeResult, FrozenThread, TracerGone
from corepeek_agent.snapshot import (I386_ABI, SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO,
                                     SECCOMP_RET_KILL_PROCESS, SECCOMP_RET_KILL_THREAD,
                                     SECCOMP_RET_LOG, SECCOMP_RET_TRACE, X86_64_ABI, FilterError,
                                     HeldRegion, SnapshotReader)

# -- ABIs ------------------------------------------------------------------------------


def _regs64(**named: int) -> bytes:
    names = ("r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax rip cs "
             "eflags rsp ss fs_base gs_base ds es fs gs").split()
    return struct.pack("<27Q", *[named.get(n, 1000 + i) & (2**64 - 1)
                                 for i, n in enumerate(names)])


def _unpack64(regs: bytes) -> dict[str, int]:
    names = ("r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax rip cs "
             "eflags rsp ss fs_base gs_base ds es fs gs").split()
    return dict(zip(names, struct.unpack("<27q", regs)))


def test_x86_64_call_registers() -> None:
    saved = _regs64(rax=-512, orig_rax=0, rip=0x401000, rsp=0x7ffd0000)
    regs = X86_64_ABI.call_regs(saved, 0x7fff1234, 56, (0x400, 0x100, 0, 0, 0))
    r = _unpack64(regs)
    assert r["rip"] == 0x7fff1234 and r["rax"] == 56 and r["orig_rax"] == -1
    assert (r["rdi"], r["rsi"], r["rdx"], r["r10"], r["r8"], r["r9"]) == (0x400, 0x100, 0, 0, 0, 0)
    # Everything else untouched: the stack pointer, segment and flags registers.
    before = _unpack64(saved)
    for name in ("rsp", "rbx", "rbp", "r12", "cs", "ss", "eflags", "fs_base", "gs_base"):
        assert r[name] == before[name], name
    assert len(regs) == X86_64.gpregs_size


def test_x86_64_result_is_signed() -> None:
    assert X86_64_ABI.result(_regs64(rax=-11)) == -11
    assert X86_64_ABI.result(_regs64(rax=4242)) == 4242


def test_i386_call_registers() -> None:
    # ebx ecx edx esi edi ebp eax xds xes xfs xgs orig_eax eip xcs eflags esp xss
    saved = struct.pack("<17I", *range(100, 117))
    regs = I386_ABI.call_regs(saved, 0xF7FC1234, 120, (0x400, 0x100))
    w = struct.unpack("<17i", regs)
    assert len(regs) == I386.gpregs_size
    assert w[12] & 0xFFFFFFFF == 0xF7FC1234 and w[6] == 120 and w[11] == -1
    assert w[0:6] == (0x400, 0x100, 0, 0, 0, 0)
    assert w[15] == 115 and w[13] == 113            # esp, xcs untouched
    assert I386_ABI.result(struct.pack("<17i", *([0] * 6 + [-38] + [0] * 10))) == -38


def test_too_many_arguments() -> None:
    with pytest.raises(ValueError):
        X86_64_ABI.call_regs(_regs64(), 0, 0, tuple(range(7)))


def test_abis_match_the_arch_specs() -> None:
    assert snapshot.ABIS["x86_64"].pc_index == X86_64.pc_index
    assert snapshot.ABIS["x86_64"].sp_index == X86_64.sp_index
    assert snapshot.ABIS["i386"].pc_index == I386.pc_index
    assert snapshot.ABIS["i386"].sp_index == I386.sp_index
    assert snapshot.ABI_INSNS == {"x86_64": X86_64.syscall_insn, "i386": I386.syscall_insn}


# -- instruction search ----------------------------------------------------------------


def _m(start: int, size: int, perms: str = "r-xp", path: str = "", flags: str = "",
       inode: int = 0) -> Mapping:
    return Mapping(start, start + size, perms, 0, inode, path, frozenset(flags.split()))


def test_find_insn_takes_any_occurrence() -> None:
    assert snapshot.find_insn(b"\x90\x48\x0f\x05\xc3", b"\x0f\x05") == 2
    assert snapshot.find_insn(b"\x90\x90", b"\x0f\x05") == -1
    assert snapshot.find_insn(b"\xcd\x80", b"\xcd\x80") == 0
    assert snapshot.find_insn(b"abc", b"") == -1


def test_search_order_vdso_then_libc() -> None:
    maps = [_m(0x1000, 0x1000, path="/usr/bin/x", inode=5),
            _m(0x2000, 0x1000, "r--p", "/usr/lib/x86_64-linux-gnu/libc.so.6", inode=6),
            _m(0x3000, 0x1000, "r-xp", "/usr/lib/x86_64-linux-gnu/libc.so.6", inode=6),
            _m(0x4000, 0x1000, "--xp", "/usr/lib/libc-2.31.so", inode=7),
            _m(0x5000, 0x2000, "r-xp", "[vdso]")]
    assert [m.start for m in snapshot.insn_search_order(maps)] == [0x5000, 0x3000, 0x1000]


def test_find_syscall_insn_reads_the_target() -> None:
    mem = {0x5000: b"\x00" * 100 + b"\x0f\x05", 0x3000: b"\x0f\x05"}
    maps = [_m(0x3000, 0x1000, path="/lib/libc.so.6", inode=1), _m(0x5000, 0x2000, path="[vdso]")]
    assert snapshot.find_syscall_insn(maps, b"\x0f\x05", lambda a, n: mem[a][:n]) == 0x5000 + 100
    mem[0x5000] = b"\x90" * 64
    assert snapshot.find_syscall_insn(maps, b"\x0f\x05", lambda a, n: mem[a][:n]) == 0x3000
    assert snapshot.find_syscall_insn(maps, b"\xcd\x80", lambda a, n: mem[a][:n]) == 0


# -- seccomp ----------------------------------------------------------------------------


def stmt(code: int, k: int) -> bytes:
    return struct.pack("<HBBI", code, 0, 0, k)


def jump(code: int, k: int, jt: int, jf: int) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k)


LD_W_ABS, JEQ_K, JSET_K, JGE_K, RET_K, RET_A = 0x20, 0x15, 0x45, 0x35, 0x06, 0x16
AUDIT_X86_64 = 0xC000003E
OFF_NR, OFF_ARCH, OFF_ARG0 = 0, 4, 16


def deny_syscall(nr: int, action: int, arch: int = AUDIT_X86_64) -> bytes:
    """The snapshot_probe filter: other architectures allowed, ``nr`` -> action."""
    return b"".join([
        stmt(LD_W_ABS, OFF_ARCH), jump(JEQ_K, arch, 1, 0), stmt(RET_K, SECCOMP_RET_ALLOW),
        stmt(LD_W_ABS, OFF_NR), jump(JEQ_K, nr, 0, 1), stmt(RET_K, action),
        stmt(RET_K, SECCOMP_RET_ALLOW)])


def data(nr: int, *args: int, abi: snapshot.SyscallAbi = X86_64_ABI) -> bytes:
    return snapshot.seccomp_data(abi, nr, 0x7FFF0000, args)


def test_seccomp_denied_call() -> None:
    prog = deny_syscall(56, SECCOMP_RET_KILL_PROCESS)
    assert snapshot.seccomp_verdict([prog], data(56, 0x400)) == SECCOMP_RET_KILL_PROCESS
    assert snapshot.seccomp_verdict([prog], data(61)) == SECCOMP_RET_ALLOW
    # An i386 task is another audit arch: this filter lets it through.
    assert snapshot.seccomp_verdict([prog], data(56, abi=I386_ABI)) == SECCOMP_RET_ALLOW


def test_seccomp_most_restrictive_filter_wins() -> None:
    errno_eperm = SECCOMP_RET_ERRNO | 1
    filters = [deny_syscall(56, errno_eperm), deny_syscall(56, SECCOMP_RET_KILL_PROCESS),
               deny_syscall(56, SECCOMP_RET_TRACE)]
    assert snapshot.seccomp_verdict(filters, data(56)) == SECCOMP_RET_KILL_PROCESS
    assert snapshot.seccomp_verdict(filters[:1] + filters[2:], data(56)) == errno_eperm
    assert snapshot.seccomp_verdict([deny_syscall(56, SECCOMP_RET_KILL_THREAD),
                                     deny_syscall(56, errno_eperm)], data(56)) == 0
    assert snapshot.seccomp_verdict([], data(56)) == SECCOMP_RET_ALLOW


def test_seccomp_flag_checks_like_container_profiles() -> None:
    # clone allowed unless a namespace flag is set (what container runtimes do).
    ns_flags = 0x7E020000
    prog = b"".join([
        stmt(LD_W_ABS, OFF_NR), jump(JEQ_K, 56, 0, 3),
        stmt(LD_W_ABS, OFF_ARG0), jump(JSET_K, ns_flags, 0, 1),
        stmt(RET_K, SECCOMP_RET_ERRNO | 1), stmt(RET_K, SECCOMP_RET_ALLOW)])
    assert snapshot.seccomp_allows(snapshot.seccomp_verdict([prog], data(56, 0x400)))
    assert not snapshot.seccomp_allows(snapshot.seccomp_verdict([prog], data(56, 0x10000000)))


def test_seccomp_alu_memory_and_return_a() -> None:
    prog = b"".join([
        stmt(LD_W_ABS, OFF_NR),
        stmt(0x04, 0x10),                  # A += 16
        stmt(0x02, 3),                     # M[3] = A
        stmt(0x00, 0),                     # A = 0
        stmt(0x61, 3),                     # X = M[3]
        stmt(0x87, 0),                     # A = X
        jump(JGE_K, 72, 0, 1),             # nr >= 56 ?
        stmt(RET_K, SECCOMP_RET_LOG),
        stmt(0x00, SECCOMP_RET_ALLOW),     # A = ALLOW
        stmt(RET_A, 0)])
    assert snapshot.seccomp_verdict([prog], data(56)) == SECCOMP_RET_LOG
    assert snapshot.seccomp_verdict([prog], data(1)) == SECCOMP_RET_ALLOW
    assert snapshot.seccomp_allows(SECCOMP_RET_LOG)
    assert not snapshot.seccomp_allows(SECCOMP_RET_TRACE)


def test_seccomp_division_by_zero_kills() -> None:
    prog = stmt(0x00, 5) + stmt(0x34, 0) + stmt(RET_K, SECCOMP_RET_ALLOW)   # A /= 0
    assert snapshot.run_bpf(prog, data(1)) == SECCOMP_RET_KILL_THREAD


@pytest.mark.parametrize("prog", [
    stmt(0x00, 0),                                     # runs off the end
    stmt(LD_W_ABS, 2) + stmt(RET_K, 0),                # misaligned load
    stmt(LD_W_ABS, 64) + stmt(RET_K, 0),               # past seccomp_data
    stmt(0x28, 0) + stmt(RET_K, 0),                    # LD H ABS: not for seccomp
])
def test_seccomp_programs_we_cannot_evaluate(prog: bytes) -> None:
    with pytest.raises(FilterError):
        snapshot.run_bpf(prog, data(1))


def test_seccomp_action_names() -> None:
    assert snapshot.describe_action(SECCOMP_RET_ERRNO | 13) == "ERRNO"
    assert snapshot.describe_action(SECCOMP_RET_KILL_PROCESS) == "KILL_PROCESS"


# -- obstacles ---------------------------------------------------------------------------


def _t(tid: int, **kw: object) -> FrozenThread:
    t = FrozenThread(tid, stopped=True, gpregs=b"\0" * 216)
    for k, v in kw.items():
        setattr(t, k, v)
    return t


def test_no_obstacle() -> None:
    assert snapshot.obstacle(X86_64, [_t(10), _t(11)], [_m(0x1000, 0x1000)]) == ""
    assert snapshot.obstacle(I386, [_t(10)], []) == ""


def test_obstacles() -> None:
    from dataclasses import replace
    assert "aarch64" in snapshot.obstacle(replace(X86_64, name="aarch64"), [_t(1)], [])
    assert "did not freeze" in snapshot.obstacle(X86_64, [_t(1), _t(2, stopped=False)], [])
    assert "job control" in snapshot.obstacle(X86_64, [_t(1, group_stop=True)], [])
    assert "no thread" in snapshot.obstacle(X86_64, [_t(1, pending_signal=10)], [])
    assert "userfaultfd" in snapshot.obstacle(
        X86_64, [_t(1)], [_m(0x1000, 0x1000, "rw-p", flags="rd wr mr um")])


def test_injector_choice_prefers_the_leader() -> None:
    threads = [_t(5, pending_signal=10), _t(7), _t(9), _t(6, gpregs=b"")]
    assert [t.tid for t in snapshot.pick_injector(threads, leader=9)] == [9, 7]
    assert [t.tid for t in snapshot.pick_injector(threads, leader=5)] == [7, 9]


# -- what the clone lacks ----------------------------------------------------------------


def test_private_copies_and_read_after_thaw() -> None:
    dumped = [DumpedMapping(_m(0x1000, 0x1000, "rw-p", flags="rd wr dc"), 0x1000),
              DumpedMapping(_m(0x2000, 0x1000, "rw-p", flags="rd wr wf"), 0x1000),
              DumpedMapping(_m(0x3000, 0x1000, "rw-s", flags="rd wr sh dc"), 0x1000),
              DumpedMapping(_m(0x4000, 0x1000, "rw-p", flags="rd wr dc dd"), 0),
              DumpedMapping(_m(0x5000, 0x1000, "rw-p", flags="rd wr"), 0x1000)]
    assert snapshot.private_copies(dumped) == [0, 1]
    assert snapshot.read_after_thaw(dumped, [1]) == {1, 2}


def test_preread_budget() -> None:
    assert snapshot.plan_preread([10, 20, 30], budget=35) == ([0, 1], [2])
    assert snapshot.plan_preread([40, 10], budget=35) == ([1], [0])
    assert snapshot.plan_preread([], budget=35) == ([], [])
    assert snapshot.plan_preread([35], budget=35) == ([0], [])


class FakeReader:
    """A MemoryReader stand-in: memory is a dict of page -> byte value."""

    def __init__(self, tid: int, pages: dict[int, int]) -> None:
        self.tid, self.pages, self.closed = tid, pages, False

    def populated_runs(self, vaddr: int, length: int) -> Iterator[tuple[int, int, bool]]:
        for page in range(vaddr, vaddr + length, 4096):
            yield page, 4096, page in self.pages

    def read_into(self, vaddr: int, buf: bytearray | memoryview) -> int:
        view = memoryview(buf)
        for i in range(len(view)):
            view[i] = self.pages.get((vaddr + i) // 4096 * 4096, 0)
        return len(view)

    def read(self, vaddr: int, length: int) -> tuple[bytearray, list[tuple[int, int]]]:
        buf = bytearray(length)
        self.read_into(vaddr, buf)
        return buf, []

    def close(self) -> None:
        self.closed = True


def test_snapshot_reader_routes_by_address() -> None:
    clone = FakeReader(99, {0x1000: 1, 0x2000: 0, 0x5000: 5})
    original = FakeReader(10, {0x1000: 11, 0x2000: 12, 0x3000: 13, 0x5000: 15})
    held = HeldRegion(0x2000, 0x3000, [(0x2000, b"\x22" * 4096)])
    reader = SnapshotReader(99, original, [held], [(0x3000, 0x4000)],   # type: ignore[arg-type]
                            clone=clone)                                 # type: ignore[arg-type]
    assert reader.tid == 10 and reader.clone_pid == 99
    buf = bytearray(0x5000)
    assert reader.read_into(0x1000, buf) == 0x5000
    assert [buf[i] for i in range(0, 0x5000, 4096)] == [1, 0x22, 13, 0, 5]
    data, gaps = reader.read(0x2ff0, 0x20)               # spans held -> original
    assert bytes(data) == b"\x22" * 0x10 + b"\x0d" * 0x10 and gaps == []
    runs = list(reader.populated_runs(0x1000, 0x5000))
    assert runs == [(0x1000, 0x1000, True), (0x2000, 0x1000, True), (0x3000, 0x1000, True),
                    (0x4000, 0x1000, False), (0x5000, 0x1000, True)]
    reader.close()
    assert clone.closed and original.closed


def test_snapshot_reader_held_region_holes_read_as_zeros() -> None:
    original = FakeReader(10, {})
    held = HeldRegion(0x1000, 0x4000, [(0x2000, b"\x07" * 4096)])
    reader = SnapshotReader(99, original, [held], clone=FakeReader(99, {}))  # type: ignore[arg-type]
    buf = bytearray(0x3000)
    assert reader.read_into(0x1000, buf) == 0x3000
    assert buf == bytes(4096) + b"\x07" * 4096 + bytes(4096)
    assert list(reader.populated_runs(0x1000, 0x3000)) == [
        (0x1000, 0x1000, False), (0x2000, 0x1000, True), (0x3000, 0x1000, False)]
    assert held.held_bytes == 4096


def test_preread_reads_populated_private_copies() -> None:
    original = FakeReader(10, {0x1000: 1, 0x3000: 3, 0x10000: 9})
    dumped = [DumpedMapping(_m(0x1000, 0x4000, "rw-p", flags="rd wr dc"), 0x4000),
              DumpedMapping(_m(0x10000, 0x1000, "rw-p", flags="rd wr"), 0x1000),
              DumpedMapping(_m(0x20000, 0x2000, "rw-p", flags="rd wr wf"), 0x2000)]
    held, later = snapshot.preread(original, dumped)            # type: ignore[arg-type]
    assert later == [] and [(h.start, h.end) for h in held] == [(0x1000, 0x5000),
                                                                 (0x20000, 0x22000)]
    assert [(a, d[0], len(d)) for a, d in held[0].runs] == [(0x1000, 1, 4096), (0x3000, 3, 4096)]
    assert held[1].runs == []
    held, later = snapshot.preread(original, dumped, budget=4096)  # type: ignore[arg-type]
    assert [(h.start, h.end) for h in held] == [(0x20000, 0x22000)] and later == [0]


def test_clone_arguments() -> None:
    args = snapshot.clone_args(X86_64_ABI, snapshot.CLONE_FILES)
    assert args[0] == 0x400 and args[0] & 0xFF == 0      # exit signal 0: no SIGCHLD
    assert args[1] == snapshot.POISON_SP and 0 < args[1] < 0x1000
    assert args[2:] == (0, 0, 0)


# -- the freezer's command mechanism ---------------------------------------------------------


@pytest.fixture
def fake_freezer(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """A Freezer whose freeze and detach do no ptrace."""
    detached: list[str] = []

    def fake_freeze(self: Freezer, threads: dict[int, FrozenThread]) -> FreezeResult:
        threads[self.pid] = FrozenThread(self.pid, stopped=True)
        return FreezeResult(tuple(threads.values()), X86_64, 0.0, {})

    def fake_detach(self: Freezer, threads: dict[int, FrozenThread]) -> None:
        detached.append(threading.current_thread().name + f":{sorted(threads)}")

    monkeypatch.setattr(Freezer, "_freeze", fake_freeze)
    monkeypatch.setattr(Freezer, "_detach_all", fake_detach)

    def make(max_freeze: float = 30.0, on_expire=None) -> Freezer:  # type: ignore[no-untyped-def]
        return Freezer(4242, choose_arch=lambda p, g: X86_64, thread_timeout=0.1,
                       max_freeze=max_freeze, on_expire=on_expire)

    make.detached = detached  # type: ignore[attr-defined]
    return make


def test_run_on_tracer_runs_on_the_tracer_thread(fake_freezer) -> None:  # type: ignore[no-untyped-def]
    f = fake_freezer()
    f.freeze()
    assert f.run_on_tracer(lambda: threading.current_thread().name) == "tracer-4242"
    with pytest.raises(ZeroDivisionError):
        f.run_on_tracer(lambda: 1 / 0)
    assert f.run_on_tracer(lambda: 7) == 7                  # still serving after an error
    f.thaw()
    assert f.thawed.is_set()
    with pytest.raises(TracerGone):
        f.run_on_tracer(lambda: 1)


def test_early_detach_and_exit_hooks(fake_freezer) -> None:  # type: ignore[no-untyped-def]
    f = fake_freezer()
    f.freeze()
    order: list[str] = []

    def setup() -> None:
        f.add_exit_hook(lambda: order.append("first:" + threading.current_thread().name))
        f.add_exit_hook(lambda: order.append("second"))
        f.add_exit_hook(lambda: 1 / 0)                       # logged, not fatal
        f.detach_target()

    f.run_on_tracer(setup)
    assert f.target_detached_at > 0 and f.frozen_threads == {}
    assert fake_freezer.detached == ["tracer-4242:[4242]"]
    assert not f.thawed.is_set()                             # the tracer thread stays
    f.thaw()
    assert order == ["second", "first:tracer-4242"]
    assert fake_freezer.detached == ["tracer-4242:[4242]", "tracer-4242:[]"]


def test_max_freeze_ends_the_tracer_thread(fake_freezer) -> None:  # type: ignore[no-untyped-def]
    expired = threading.Event()
    f = fake_freezer(max_freeze=0.2, on_expire=expired.set)
    f.freeze()
    t0 = time.monotonic()
    assert f.run_on_tracer(lambda: 1) == 1
    assert f.thawed.wait(5) and expired.is_set() and f.expired
    assert time.monotonic() - t0 < 5
    with pytest.raises(TracerGone):
        f.run_on_tracer(lambda: 1)


def test_commands_queued_when_the_tracer_ends_fail(fake_freezer) -> None:  # type: ignore[no-untyped-def]
    f = fake_freezer()
    f.freeze()
    started = threading.Event()
    results: list[object] = []

    def slow() -> str:
        started.set()
        time.sleep(0.2)
        return "slow"

    def call(fn) -> None:  # type: ignore[no-untyped-def]
        try:
            results.append(f.run_on_tracer(fn))
        except TracerGone as exc:
            results.append(exc)

    a = threading.Thread(target=call, args=(slow,))
    a.start()
    started.wait(5)
    b = threading.Thread(target=call, args=(lambda: "late",))
    b.start()
    # Thaw only once "late" sits in the queue behind the running "slow".
    deadline = time.monotonic() + 5
    while f._commands.qsize() < 1:
        assert time.monotonic() < deadline, "the second command never reached the queue"
        time.sleep(0.001)
    f.thaw()
    a.join(5)
    b.join(5)
    # The running command completes; the queued one fails (either may report first).
    assert len(results) == 2 and results.count("slow") == 1, results
    assert sum(isinstance(r, TracerGone) for r in results) == 1, results


def test_pid_as_seen_by_the_same_namespace() -> None:
    import os
    me = os.getpid()
    assert snapshot.ns_pids(me)[0] == me
    assert snapshot.pid_as_seen_by(me, me) == snapshot.ns_pids(me)[-1]
