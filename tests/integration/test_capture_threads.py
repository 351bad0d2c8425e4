"""A full capture of a real multi-threaded program, checked by independent tools.

GIVEN the `threads` target (threads parked in nanosleep, read on a pipe, a
condition variable, one spinning) WHEN its core is pulled through a real agent
over gRPC THEN gdb, eu-stack, eu-readelf and pyelftools read it, memory is
exact, and the target is running again, untraced and undisturbed.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from harness.checks import assert_thawed_and_undisturbed
from harness.targets import Target, threads_pattern
from harness.tools import eu_readelf_notes, eu_stack, gcore, gdb_backtraces, gdb_read_memory, gdb_registers

from harness.capture import capture_file

PARKED = {"cp_sleeper_nanosleep", "cp_reader_pipe", "cp_waiter_condvar", "cp_spinner"}


@pytest.fixture
def threads_target(build, require_root):  # type: ignore[no-untyped-def]
    with Target(build("threads"), watcher=build("parent_watch")) as t:
        yield t


def test_full_core_loads_in_gdb_with_every_thread_in_its_function(
        agent, threads_target: Target, build, tmp_path: Path) -> None:
    exe = build("threads")
    core = tmp_path / "threads.core"

    layout = capture_file(agent.address, threads_target.pid, core)

    assert {t.tid for t in layout.threads} == set(threads_target.tids())
    assert all(t.frozen for t in layout.threads)
    bts = gdb_backtraces(core, exe)
    assert set(bts) == set(threads_target.tids())
    ready = threads_target.ready
    for name, tid_key in [("cp_sleeper_nanosleep", "tid_sleeper"), ("cp_reader_pipe", "tid_reader"),
                          ("cp_waiter_condvar", "tid_waiter"), ("cp_spinner", "tid_spinner")]:
        assert name in bts[int(ready[tid_key])], (name, bts[int(ready[tid_key])])
    assert "main" in bts[threads_target.pid]
    assert_thawed_and_undisturbed(threads_target)


def test_memory_at_known_addresses_is_exact(agent, threads_target: Target, build,
                                            tmp_path: Path) -> None:
    core = tmp_path / "threads.core"
    capture_file(agent.address, threads_target.pid, core)
    r = threads_target.ready

    got_global = gdb_read_memory(core, build("threads"), int(r["pattern_addr"]), int(r["pattern_len"]))
    got_heap = gdb_read_memory(core, build("threads"), int(r["heap_addr"]), int(r["heap_len"]))

    assert got_global == threads_pattern(1, int(r["pattern_len"]))
    assert got_heap == threads_pattern(2, int(r["heap_len"]))
    assert_thawed_and_undisturbed(threads_target)


def test_elfutils_and_pyelftools_accept_the_core(agent, threads_target: Target, build,
                                                 tmp_path: Path) -> None:
    core = tmp_path / "threads.core"
    capture_file(agent.address, threads_target.pid, core)
    tids = set(threads_target.tids())

    notes = eu_readelf_notes(core)
    stacks = eu_stack(core, build("threads"))
    with open(core, "rb") as f:
        elf = ELFFile(f)
        parsed = [n["n_type"] for seg in elf.iter_segments() if seg["p_type"] == "PT_NOTE"
                  for n in seg.iter_notes()]

    assert notes.count(("CORE", "PRSTATUS")) == len(tids)
    for kind in ("PRPSINFO", "SIGINFO", "AUXV", "FILE"):
        assert ("CORE", kind) in notes
    assert parsed.count("NT_PRSTATUS") == len(tids) and "NT_FILE" in parsed
    assert set(stacks) == tids
    assert "cp_sleeper_nanosleep" in stacks[int(threads_target.ready["tid_sleeper"])]
    assert_thawed_and_undisturbed(threads_target)


def test_lldb_lists_every_thread(agent, threads_target: Target, build, tmp_path: Path) -> None:
    core = tmp_path / "threads.core"
    capture_file(agent.address, threads_target.pid, core)
    out = subprocess.run(["lldb", "--batch", "--no-lldbinit", "-c", str(core), str(build("threads")),
                          "-o", "thread list", "-o", "bt all"],
                         capture_output=True, text=True, timeout=120).stdout
    for tid in threads_target.tids():
        assert f"tid = {tid}" in out, out
    assert "cp_waiter_condvar" in out and "cp_sleeper_nanosleep" in out, out
    assert_thawed_and_undisturbed(threads_target)


def test_registers_match_gcore_of_the_same_paused_target(agent, threads_target: Target, build,
                                                         tmp_path: Path) -> None:
    # Pause the target with a job-control stop so both tools see one state;
    # corepeek leaves a stopped process stopped.
    exe = build("threads")
    threads_target.send_signal(signal.SIGSTOP)
    threads_target.wait_state("T")
    ours, theirs = tmp_path / "ours.core", tmp_path / "gcore.core"
    try:
        capture_file(agent.address, threads_target.pid, ours)
        assert_thawed_and_undisturbed(threads_target, expect_stopped=True)
        gcore(threads_target.pid, theirs)
    finally:
        threads_target.send_signal(signal.SIGCONT)
    a, b = gdb_registers(ours, exe), gdb_registers(theirs, exe)

    assert set(a) == set(b) == set(threads_target.tids())
    for tid in a:
        for reg in ("rip", "rsp", "rbp", "rbx", "r12", "r13", "r14", "r15", "rdi", "rsi",
                    "orig_rax", "fs_base", "cs", "ss"):
            assert a[tid][reg] == b[tid][reg], (tid, reg, hex(a[tid][reg]), hex(b[tid][reg]))
    threads_target.wait_state("SR")
    assert_thawed_and_undisturbed(threads_target, check_parent=False)
