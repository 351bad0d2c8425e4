"""Self-check of the harness: targets build, run, answer and die cleanly, and the
independent tools read a gdb-made core of them. No corepeek agent involved."""
from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from . import checks, tools
from .targets import (TARGET_NAMES, Target, TargetError, bigmem_touched_pages,
                                   bigmem_words, build_target, sigqueue, threads_pattern)

THREAD_FUNCS = ("cp_sleeper_nanosleep", "cp_reader_pipe", "cp_waiter_condvar", "cp_spinner",
                "cp_heartbeat", "cp_signals", "main")
ROLE_FUNCS = {"tid_sleeper": "cp_sleeper_nanosleep", "tid_reader": "cp_reader_pipe",
              "tid_waiter": "cp_waiter_condvar", "tid_spinner": "cp_spinner",
              "tid_heartbeat": "cp_heartbeat", "tid_signals": "cp_signals", "tid_main": "main"}


@pytest.fixture(scope="module")
def bindir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("targets")


@pytest.fixture(scope="module")
def ptrace_ok() -> None:
    ok, why = checks.ptrace_available()
    if not ok:
        pytest.skip(f"ptrace unavailable here, gcore tests skipped: {why}")


@pytest.fixture(autouse=True)
def no_leftovers():
    before = checks.descendants()  # e.g. an agent started by another test's fixture
    yield
    checks.assert_no_leftover_processes(ignore=before)


def test_build_all_and_cache(bindir: Path) -> None:
    for name in TARGET_NAMES:
        exe = build_target(name, bindir)
        assert exe.is_file()
        started = time.monotonic()
        assert build_target(name, bindir) == exe
        assert time.monotonic() - started < 0.5, "second build should hit the cache"
    with pytest.raises(TargetError, match="no target source"):
        build_target("nonexistent", bindir)


def test_threads_protocol(bindir: Path) -> None:
    with Target(build_target("threads", bindir), ["100"]) as t:
        r = t.ready
        assert r["pid"] == t.pid and r["pattern_len"] == 4096 and r["sleep_ms"] == 100
        tids = t.tids()
        assert len(tids) == 7
        assert {r[k] for k in ROLE_FUNCS} == set(tids)
        assert t.state() in ("S", "R") and t.tracer_pid() == 0
        assert set(t.thread_states()) == set(tids)
        assert Path(f"/proc/{t.pid}/task/{r['tid_sleeper']}/comm").read_text().strip() == "cp_sleeper"

        for n in (1, 2):  # standard signals do not queue: wait for each to land
            t.send_signal(signal.SIGUSR1)
            deadline = time.monotonic() + 2
            while t.status()["usr1"] < n and time.monotonic() < deadline:
                time.sleep(0.01)
        for payload in (7, 8, -9):
            sigqueue(t.pid, signal.SIGRTMIN + 1, payload)
        deadline = time.monotonic() + 2
        while (st := t.status())["rt"] != [7, 8, -9] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert st["usr1"] == 2 and st["rt"] == [7, 8, -9] and st["rt_dropped"] == 0

        woke = t.command("wake")
        assert woke == {"reply": "woke", "nanosleep": "ok", "pipe": "ok", "cond": "ok"}
        st = checks.assert_thawed_and_undisturbed(t)
        assert st["pipe_reads"] == 1 and st["cond_wakes"] == 1 and st["sleeps_ok"] >= 1
        assert st["spins"] > 0 and st["disturbed_at"] == []

        with pytest.raises(TargetError, match="rejected"):
            t.command("bogus")
        st = t.command("resetgap")
        assert st["reply"] == "status" and st["maxgap_us"] < 50_000
        assert t.quit() == 0


@pytest.mark.parametrize("name,args", [("threads", []), ("eintr_probe", []),
                                       ("vfork_parent", ["1"]), ("bigmem", ["-m", "4", "-t", "3"])])
def test_sigterm_exits_cleanly(bindir: Path, name: str, args: list[str]) -> None:
    with Target(build_target(name, bindir), args) as t:
        t.send_signal(signal.SIGTERM)
        assert t.wait_exit() == 0, t.describe()


def test_start_failure_is_clear(bindir: Path) -> None:
    with pytest.raises(TargetError, match="usage: threads"):
        Target(build_target("threads", bindir), ["0"]).start()


def test_stop_is_detected(bindir: Path) -> None:
    """SIGSTOP/SIGCONT is what a freeze must not look like: the checks must catch it."""
    threads = build_target("threads", bindir)
    with Target(threads, watcher=build_target("parent_watch", bindir)) as t:
        assert t.watch_ready["child_pid"] == t.pid
        checks.assert_thawed_and_undisturbed(t)
        t.send_signal(signal.SIGSTOP)
        t.wait_state("T")
        checks.assert_thawed_and_undisturbed(t, expect_stopped=True)
        with pytest.raises(AssertionError, match="job-control stopped"):
            checks.assert_thawed_and_undisturbed(t)
        with pytest.raises(TargetError, match="frozen or stuck"):
            t.command("status", timeout=0.3)
        t.send_signal(signal.SIGCONT)
        t.wait_state("SRD")
        assert t.status()["reply"] == "status"  # the late reply to the timed-out one is skipped
        seen = t.watch_status()
        assert seen["wait_stopped"] == 1 and seen["wait_continued"] == 1, seen
        assert "sigchld:stopped" in seen["events"] and "sigchld:continued" in seen["events"]
        with pytest.raises(AssertionError, match="parent noticed"):
            checks.assert_thawed_and_undisturbed(t)
        t.quit()
        deadline = time.monotonic() + 2
        while "wait:exited:0" not in t.watch_status()["events"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "wait:exited:0" in t.watch_status()["events"]


def test_parent_watch_quit(bindir: Path) -> None:
    with Target(build_target("threads", bindir), watcher=build_target("parent_watch", bindir)) as t:
        assert t.watch_command("quit")["reply"] == "bye"
        assert t.wait_exit() is None and t.proc.wait(timeout=5) == 0


def test_eintr_probe_sees_stop(bindir: Path) -> None:
    """The probes report EINTR after a SIGSTOP/SIGCONT (as signal(7) says), nothing otherwise."""
    with Target(build_target("eintr_probe", bindir)) as t:
        assert t.ready["semid"] >= 0
        woke = t.command("wake")
        assert set(woke.values()) == {"woke", "ok"}, woke
        before = t.status()
        assert all(before[f"{p}_eintr"] == 0 for p in ("epoll", "semop", "semtimedop",
                                                       "sigtimedwait", "recv"))
        t.send_signal(signal.SIGSTOP)
        t.wait_state("T")
        t.send_signal(signal.SIGCONT)
        t.wait_state("SRD")
        time.sleep(0.05)
        after = checks.assert_thawed_and_undisturbed(t)  # the common counters stay clean
        for probe in ("epoll", "semop", "semtimedop", "sigtimedwait", "recv"):
            assert after[f"{probe}_eintr"] == 1, (probe, after)
        assert after["probe_other"] == 0


def test_vfork_parent(bindir: Path) -> None:
    with Target(build_target("vfork_parent", bindir), ["1"]) as t:
        vtid = t.ready["vfork_tid"]
        assert t.thread_states()[vtid] == "D"
        assert Path(f"/proc/{t.ready['child_pid']}").exists()
        st = t.status()
        assert st["vfork_returned"] == 0
        deadline = time.monotonic() + 5
        while not (st := t.status())["child_reaped"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert st["vfork_returned"] == 1 and st["child_status"] == 0
        checks.assert_thawed_and_undisturbed(t)


def test_bigmem_sparse_and_gap(bindir: Path) -> None:
    args = ["-m", "8", "-r", "1024", "-s", "-t", "50"]
    with Target(build_target("bigmem", bindir), args) as t:
        r = t.ready
        assert len(t.tids()) == 3 + 50 and r["stride_pages"] == 128
        pages = bigmem_touched_pages(r)
        assert len(pages) == 8 * 256
        with open(f"/proc/{t.pid}/mem", "rb") as mem:
            for off in (pages[0], pages[1], pages[-1]):
                mem.seek(r["addr"] + off)
                assert mem.read(4096) == bigmem_words(off, 4096)
            mem.seek(r["addr"] + pages[1] - 4096)
            assert mem.read(4096) == bytes(4096)  # untouched page between two touched ones
        t.command("resetgap")
        t.send_signal(signal.SIGSTOP)
        time.sleep(0.3)
        t.send_signal(signal.SIGCONT)
        t.wait_state("SRD")
        time.sleep(0.05)
        st = t.status()
        assert 300_000 <= st["maxgap_us"] < 2_000_000, st
        assert st["idle_threads"] == 50


def _check_threads_core(core: Path, exe: Path, t: Target) -> None:
    bts = tools.gdb_backtraces(core, exe)
    assert set(bts) == set(t.tids()), tools.gdb_backtraces_text(core, exe)
    for role, func in ROLE_FUNCS.items():
        assert func in bts[t.ready[role]], (role, bts)
    r = t.ready
    assert tools.gdb_read_memory(core, exe, r["pattern_addr"], 4096) == threads_pattern(1, 4096)
    assert tools.gdb_read_memory(core, exe, r["heap_addr"] + 1000, 512) == threads_pattern(2, 512, 1000)
    regs = tools.gdb_registers(core, exe)
    pc = "rip" if "rip" in regs[t.pid] else "eip"
    assert set(regs) == set(bts) and all(regs[lwp][pc] for lwp in regs)


def test_gcore_of_threads(bindir: Path, tmp_path: Path, ptrace_ok) -> None:
    exe = build_target("threads", bindir)
    with Target(exe, watcher=build_target("parent_watch", bindir)) as t:
        core = tools.gcore(t.pid, tmp_path / "threads.core")
        # gdb attaches with PTRACE_ATTACH: still nothing visible to the target or its parent.
        checks.assert_thawed_and_undisturbed(t)
        _check_threads_core(core, exe, t)
        stacks = tools.eu_stack(core, exe)
        assert set(stacks) == set(t.tids())
        for role, func in ROLE_FUNCS.items():
            assert func in stacks[t.ready[role]], (role, tools.eu_stack_text(core, exe))
        notes = tools.eu_readelf_notes(core)
        assert notes.count(("CORE", "PRSTATUS")) == len(t.tids())
        assert {("CORE", "PRPSINFO"), ("CORE", "AUXV"), ("CORE", "FILE")} <= set(notes)


def test_gcore_of_threads_m32(bindir: Path, tmp_path: Path, ptrace_ok) -> None:
    exe = build_target("threads", bindir, m32=True)
    with Target(exe) as t:
        assert t.ready["pattern_addr"] < 2**32
        core = tools.gcore(t.pid, tmp_path / "threads32.core")
        checks.assert_thawed_and_undisturbed(t)
        _check_threads_core(core, exe, t)
        assert tools.gdb_registers(core, exe)[t.pid]["eip"] > 0
