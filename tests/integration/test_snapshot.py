"""Snapshot mode: the target is frozen only while a copy-on-write clone is made.

Real targets, a real agent, real gRPC.  Each test proves the core holds the
frozen moment while the target ran on (it answers commands and rewrites the
memory while the stream is open), that the target never learns about the
clone (no SIGCHLD, nothing for wait(), no child left), and that it ends thawed
and undisturbed; the Target context manager kills and reaps it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from corepeek.dump import write_full_core
from corepeek.errors import CaptureError
from corepeek.remote import RemoteCore, open_capture
from harness.agents import start_agent, stop_agent
from harness.checks import assert_thawed_and_undisturbed, descendants
from harness.targets import (Target, TargetError, bigmem_touched_pages, bigmem_words,
                             churn_data_rounds, proc_status_field, sigqueue, threads_pattern)

MIB = 1024 * 1024


def pattern(seed: int, length: int, offset: int = 0) -> bytes:
    """Bytes of a snapshot_probe region filled with ``seed``: (i*151+seed)%251,
    which repeats every 251 bytes."""
    period = bytes((i * 151 + seed) % 251 for i in range(251))
    start = offset % 251
    return (period * (-(-(start + length) // 251)))[start:start + length]


def core_bytes(core: RemoteCore, vaddr: int, length: int) -> bytes:
    """Target memory [vaddr, +length) as the core holds it (may span segments)."""
    out = b""
    while len(out) < length:
        pos = vaddr + len(out)
        seg = next((s for s in core.layout.segments
                    if s.vaddr <= pos < s.vaddr + s.file_size), None)
        assert seg is not None, f"{pos:#x} is not in any dumped segment"
        n = min(length - len(out), seg.vaddr + seg.file_size - pos)
        out += core.read_bytes(seg.file_offset + pos - seg.vaddr, n)
    return out


def segment_of(core: RemoteCore, vaddr: int):  # type: ignore[no-untyped-def]
    return next(s for s in core.layout.segments if s.vaddr <= vaddr < s.vaddr + s.mem_size)


def children(pid: int) -> list[int]:
    kids: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            kids += [int(k) for k in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            pass
    return kids


def state(pid: int) -> str:
    value = proc_status_field(Path(f"/proc/{pid}/status"), "State")
    return value[0] if value else ""


def wait_until(cond, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return bool(cond())


def assert_target_saw_no_child(t: Target) -> None:
    """No child left, nothing for wait(), no SIGCHLD pending (it is blocked)."""
    assert wait_until(lambda: not children(t.pid)), f"children left: {children(t.pid)}"
    waited = t.command("waitcheck")
    assert (waited["nohang"], waited["wait"], waited["wall"]) == ("ECHILD",) * 3, waited
    st = t.status()
    assert st["sigchld_pending"] == 0 and st["children"] == 0, st
    shd = int(proc_status_field(Path(f"/proc/{t.pid}/status"), "ShdPnd") or "0", 16)
    assert not shd & (1 << (signal.SIGCHLD - 1)), f"SIGCHLD pending: ShdPnd={shd:#x}"


@pytest.fixture(scope="module")
def probe(build):  # type: ignore[no-untyped-def]
    return build("snapshot_probe")


# -- the frozen moment, while the target runs on --------------------------------------


def test_core_holds_the_frozen_moment_while_the_target_rewrites_it(agent, probe) -> None:
    with Target(probe) as t:
        r = t.ready
        n = int(r["region_len"])
        with open_capture(agent.address, t.pid, snapshot=True) as core:
            lay = core.layout
            assert lay.snapshot and lay.snapshot_status == "", lay.snapshot_status
            # The target runs: not stopped, not traced, answers and rewrites.
            assert "t" not in t.thread_states().values(), t.thread_states()
            assert set(t.tracer_pids().values()) == {0}
            assert t.command("rewrite 5") == {"reply": "rewrote", "seed": 5}
            clone = children(t.pid)
            assert len(clone) == 1, clone
            assert state(clone[0]) == "t"            # stopped and traced by the agent
            # The clone is a child, but a "clone" child: invisible to wait().
            waited = t.command("waitcheck")
            assert (waited["nohang"], waited["wait"]) == ("ECHILD", "ECHILD"), waited
            assert waited["wall"] == 0, waited       # __WALL sees it, still running
            # The core: the old pattern everywhere private, new one in MAP_SHARED.
            assert core_bytes(core, r["pat_addr"], n) == pattern(1, n)
            assert core_bytes(core, r["df_addr"], n) == pattern(7, n)   # MADV_DONTFORK
            assert core_bytes(core, r["wf_addr"], n) == pattern(9, n)   # MADV_WIPEONFORK
            bulk_len = int(r["bulk_len"])
            assert core_bytes(core, r["bulk_addr"], bulk_len) == pattern(3, bulk_len)
            sh = segment_of(core, r["sh_addr"])
            assert sh.shared and sh.read_after_thaw
            assert core_bytes(core, r["sh_addr"], 4096) == pattern(5, 4096)
            for name in ("pat", "df", "wf", "bulk"):
                assert not segment_of(core, r[f"{name}_addr"]).read_after_thaw, name
            # Still the old content after a second rewrite.
            t.command("rewrite 6")
            assert core_bytes(core, r["pat_addr"] + n - 4096, 4096) == pattern(1, 4096, n - 4096)
        assert_thawed_and_undisturbed(t)
        assert_target_saw_no_child(t)
        assert not os.path.exists(f"/proc/{clone[0]}"), "the clone still exists"


def test_a_full_core_from_a_snapshot_is_a_valid_core(agent, probe, tmp_path: Path) -> None:
    with Target(probe) as t:
        out = tmp_path / "core"
        with open_capture(agent.address, t.pid, snapshot=True) as core:
            assert core.layout.snapshot
            t.command("rewrite 8")
            write_full_core(core, out)
            lay = core.layout
        with open(out, "rb") as f:
            elf = ELFFile(f)
            assert elf.header.e_type == "ET_CORE"
            assert sum(1 for s in elf.iter_segments() if s.header.p_type == "PT_LOAD") == \
                len(lay.segments)
            r = t.ready
            for seg in elf.iter_segments():
                if seg.header.p_type == "PT_LOAD" and seg.header.p_vaddr == r["pat_addr"]:
                    f.seek(seg.header.p_offset)
                    assert f.read(4096) == pattern(1, 4096)
                    break
            else:
                raise AssertionError("no PT_LOAD for the pattern region")
        assert_thawed_and_undisturbed(t)
        assert_target_saw_no_child(t)


def test_the_parent_of_the_target_sees_nothing(agent, build) -> None:
    with Target(build("threads"), watcher=build("parent_watch")) as t:
        with open_capture(agent.address, t.pid, snapshot=True) as core:
            assert core.layout.snapshot, core.layout.snapshot_status
            woke = t.command("wake")                 # runs while the stream is open
            assert (woke["nanosleep"], woke["pipe"], woke["cond"]) == ("ok", "ok", "ok"), woke
            addr, n = t.ready["pattern_addr"], t.ready["pattern_len"]
            assert core_bytes(core, addr, n) == threads_pattern(1, n)
            assert len([th for th in core.layout.threads if th.frozen]) == len(t.tids())
        assert_thawed_and_undisturbed(t)        # parent_watch: no SIGCHLD, no stop report
        assert wait_until(lambda: not children(t.pid))


def test_stacks_mode_from_a_snapshot(agent, build) -> None:
    with Target(build("threads")) as t:
        with open_capture(agent.address, t.pid, snapshot=True, mode="stacks") as core:
            assert core.layout.snapshot, core.layout.snapshot_status
            stacks = [s for s in core.layout.segments if s.stack]
            assert len(stacks) >= 2
            for th in core.layout.threads:
                seg = next(s for s in stacks if s.vaddr <= th.sp < s.vaddr + s.mem_size)
                data = core_bytes(core, th.sp, min(256, seg.vaddr + seg.file_size - th.sp))
                assert any(data), f"thread {th.tid}: stack reads as zeros"
        assert_thawed_and_undisturbed(t)
        assert wait_until(lambda: not children(t.pid))


def test_a_1gib_target_is_frozen_briefly(agent, build) -> None:
    """The heartbeat's longest gap is the freeze: under 100 ms, loosely (the best
    of up to five captures: the machine is shared); a live capture of 1 GiB
    keeps it frozen for the whole transfer (over a second)."""
    with Target(build("bigmem"), ["-m", "1024", "-H", "1000"]) as t:
        r = t.ready
        pages = bigmem_touched_pages(r)
        gaps = []
        for attempt in range(5):
            t.command("resetgap")
            with open_capture(agent.address, t.pid, snapshot=True) as core:
                assert core.layout.snapshot, core.layout.snapshot_status
                time.sleep(0.05)
                gaps.append(int(t.status()["maxgap_us"]))
                for off in (pages[0], pages[len(pages) // 2], pages[-1]):
                    assert core_bytes(core, r["addr"] + off, 4096) == bigmem_words(off, 4096)
            if min(gaps) < 100_000:
                break
        assert min(gaps) < 100_000, f"snapshot freeze gaps (us): {gaps}"
        assert_thawed_and_undisturbed(t)
        assert wait_until(lambda: not children(t.pid))


def _private_dirty_mib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no Private_Dirty in smaps_rollup")


def test_reading_the_snapshot_copies_no_memory(agent, build) -> None:
    # The clone's pages stay shared with the target while the core is pulled:
    # process_vm_readv would pin them, and pinning a shared anonymous page
    # unshares (copies) it, which would show as the target's pages turning
    # private.  Reading through /proc/CLONE/mem copies nothing.
    with Target(build("bigmem"), ["-m", "256"]) as t:
        assert _private_dirty_mib(t.pid) >= 250
        with open_capture(agent.address, t.pid, snapshot=True) as core:
            assert core.layout.snapshot
            assert _private_dirty_mib(t.pid) < 32         # shared with the clone now
            for off in range(0, core.size, 64 * MIB):
                for _ in core.read_range(off, min(64 * MIB, core.size - off)):
                    pass
            assert _private_dirty_mib(t.pid) < 32, "reading the clone copied its pages"
        assert_thawed_and_undisturbed(t)
        assert wait_until(lambda: not children(t.pid))


# -- stress: threads coming and going, signals, a zombie leader ---------------------------


def test_snapshots_of_a_churning_target(agent, build) -> None:
    with Target(build("churn"), ["-n", "4"]) as t:
        for _ in range(15):
            with open_capture(agent.address, t.pid, snapshot=True) as core:
                assert core.layout.snapshot, core.layout.snapshot_status
                assert all(th.frozen for th in core.layout.threads)
                core.read_bytes(core.layout.notes.offset, core.layout.notes.length)
        st = assert_thawed_and_undisturbed(t)
        assert st is not None and st["check_fail"] == 0 and st["spawned"] > 100
        assert wait_until(lambda: not children(t.pid))


def test_snapshot_of_a_zombie_leader_process(agent, build) -> None:
    # The leader called pthread_exit: another thread makes the clone, and the
    # zombie is removed through a live thread.
    with Target(build("churn"), ["-z", "-n", "1"]) as t:
        assert wait_until(lambda: t.state() == "Z")
        with open_capture(agent.address, t.pid, snapshot=True) as core:
            assert core.layout.snapshot, core.layout.snapshot_status
            addr = int(t.ready["data_addr"])
            churn_data_rounds(core_bytes(core, addr, 4096))  # real contents
        st = assert_thawed_and_undisturbed(t)
        assert st is not None and st["check_fail"] == 0
        assert wait_until(lambda: not children(t.pid))


def test_signals_sent_around_snapshots_all_arrive_in_order(agent, build) -> None:
    sigrt = signal.SIGRTMIN + 2
    with Target(build("threads")) as t:
        sent = 0
        for _ in range(15):
            sigqueue(t.pid, sigrt, sent)
            sent += 1
            with open_capture(agent.address, t.pid, snapshot=True) as core:
                sigqueue(t.pid, sigrt, sent)
                sent += 1
                assert core.layout.snapshot, core.layout.snapshot_status
        assert wait_until(lambda: len(t.status()["rt"]) >= sent)
        assert t.status()["rt"] == list(range(sent))
        assert_thawed_and_undisturbed(t)
        assert wait_until(lambda: not children(t.pid))


def test_snapshots_under_a_storm_of_ignored_signals(agent, build) -> None:
    # SIGWINCH is ignored by default, but a traced thread still stops for it
    # (signal-delivery-stop), also right before the injected clone(): the
    # registers go back in that stop and the signal is handed back at detach.
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    with Target(build("threads")) as t:
        stop = threading.Event()
        sent = [0]

        def storm() -> None:
            while not stop.is_set():
                for tid in (t.pid, t.pid):            # mostly the leader: the injector
                    libc.tgkill(t.pid, tid, signal.SIGWINCH)
                    sent[0] += 1
                time.sleep(0.0001)

        th = threading.Thread(target=storm)
        th.start()
        try:
            taken = 0
            for _ in range(15):
                with open_capture(agent.address, t.pid, snapshot=True) as core:
                    taken += core.layout.snapshot
                    assert core.layout.snapshot or "signal" in core.layout.snapshot_status, \
                        core.layout.snapshot_status
                    n = t.ready["pattern_len"]
                    assert core_bytes(core, t.ready["pattern_addr"], n) == threads_pattern(1, n)
        finally:
            stop.set()
            th.join()
        assert sent[0] > 100 and taken > 0
        assert_thawed_and_undisturbed(t)
        woke = t.command("wake")
        assert (woke["nanosleep"], woke["pipe"], woke["cond"]) == ("ok", "ok", "ok"), woke
        assert wait_until(lambda: not children(t.pid))


# -- what the clone does not get ---------------------------------------------------------


def test_dontfork_memory_beyond_the_budget_is_read_after_the_thaw(agent, probe) -> None:
    with Target(probe, ["-D", "80"]) as t:          # 80 MiB > the 64 MiB held in memory
        r = t.ready
        with open_capture(agent.address, t.pid, snapshot=True) as core:
            assert core.layout.snapshot
            df = segment_of(core, r["df_addr"])
            assert df.read_after_thaw and not df.shared
            assert not segment_of(core, r["wf_addr"]).read_after_thaw
            last = int(r["df_len"]) - 4096
            assert core_bytes(core, r["df_addr"] + last, 4096) == pattern(7, 4096, last)
            assert core_bytes(core, r["wf_addr"], 4096) == pattern(9, 4096)
        assert_thawed_and_undisturbed(t)
        assert_target_saw_no_child(t)


def test_the_clone_shares_the_fd_table_and_holds_nothing_open(agent, probe) -> None:
    # CLONE_FILES: closing the write end of a pipe in the target really closes it
    # (a copied fd table would keep a second write end open in the clone).
    with Target(probe) as t:
        with open_capture(agent.address, t.pid, snapshot=True) as core:
            assert core.layout.snapshot
            assert t.command("closepipe")["eof"] == 1
        assert_thawed_and_undisturbed(t)
        assert_target_saw_no_child(t)


def test_the_copied_fd_table_alternative_closes_everything_in_the_clone(probe,
                                                                      require_root) -> None:
    # Agent-internal option (measurements): no CLONE_FILES, close_range() in the clone.
    from corepeek_agent.session import CaptureSession, SessionOptions
    with Target(probe, ["-F", "100"]) as t:
        s = CaptureSession(t.pid, options=SessionOptions(snapshot=True,
                                                         snapshot_share_files=False))
        try:
            s.open()
            assert s.snapshot is not None, s.snapshot_status
            assert os.listdir(f"/proc/{s.snapshot.clone_pid}/fd") == []
            assert len(os.listdir(f"/proc/{t.pid}/fd")) > 100
            assert t.command("closepipe")["eof"] == 1
        finally:
            s.close()
        assert_thawed_and_undisturbed(t)
        assert_target_saw_no_child(t)


def test_a_target_in_its_own_pid_namespace(agent, probe) -> None:
    # unshare --pid --fork (with its own /proc): sh is pid 1 of a new pid
    # namespace, the probe pid 2, and the clone's pid there differs from the
    # agent's: the injected wait4() must name it as the target does (NSpid).
    t = Target(Path("/usr/bin/unshare"), ["--pid", "--fork", "--mount-proc", "--kill-child",
                                          "/bin/sh", "-c", f"{probe} & wait"])
    with t:
        assert t.ready["pid"] == 2
        outer = t.pid
        probe_pid = next(p for p in descendants(outer)
                         if os.readlink(f"/proc/{p}/exe") == str(probe))
        t.pid = probe_pid                    # checks look at the probe; close() kills unshare
        with open_capture(agent.address, t.pid, snapshot=True) as core:
            assert core.layout.snapshot, core.layout.snapshot_status
            clone = children(t.pid)
            assert len(clone) == 1
            nspid = proc_status_field(Path(f"/proc/{clone[0]}/status"), "NSpid")
            assert nspid is not None and len(nspid.split()) == 2, nspid
            assert int(nspid.split()[1]) != clone[0]          # numbered differently inside
            assert t.command("waitcheck")["wall"] == 0
            assert core_bytes(core, t.ready["pat_addr"], 4096) == pattern(1, 4096)
        assert_thawed_and_undisturbed(t)
        assert_target_saw_no_child(t)


# -- falling back to live mode ----------------------------------------------------------


@pytest.mark.parametrize("how", ["kill", "errno"])
def test_a_seccomp_filter_against_clone_means_live_mode(agent, probe, how: str) -> None:
    with Target(probe, ["-S", how]) as t:
        with open_capture(agent.address, t.pid, snapshot=True) as core:
            lay = core.layout
            assert not lay.snapshot
            assert "seccomp" in lay.snapshot_status, lay.snapshot_status
            assert ("KILL_PROCESS" if how == "kill" else "ERRNO") in lay.snapshot_status
            assert set(t.thread_states().values()) == {"t"}      # live: frozen
            assert core_bytes(core, t.ready["pat_addr"], 4096) == pattern(1, 4096)
        assert_thawed_and_undisturbed(t)
        assert_target_saw_no_child(t)


def test_a_failing_clone_means_live_mode(agent, probe) -> None:
    # uid 65534 with RLIMIT_NPROC 1: the injected clone() fails with EAGAIN.
    with Target(probe, ["-N"]) as t:
        with open_capture(agent.address, t.pid, snapshot=True) as core:
            lay = core.layout
            assert not lay.snapshot
            assert "clone() failed" in lay.snapshot_status, lay.snapshot_status
            assert set(t.thread_states().values()) == {"t"}
            assert core_bytes(core, t.ready["pat_addr"], 4096) == pattern(1, 4096)
        assert_thawed_and_undisturbed(t)
        assert_target_saw_no_child(t)


def test_a_job_control_stopped_target_gets_a_live_capture(agent, probe) -> None:
    with Target(probe) as t:
        t.send_signal(signal.SIGSTOP)
        t.wait_state("T")
        with open_capture(agent.address, t.pid, snapshot=True) as core:
            assert not core.layout.snapshot
            assert "job control" in core.layout.snapshot_status
        assert_thawed_and_undisturbed(t, expect_stopped=True)
        t.send_signal(signal.SIGCONT)
        t.wait_state("SR")
        assert_thawed_and_undisturbed(t)
        assert_target_saw_no_child(t)


def test_an_i386_target(agent, build) -> None:
    try:
        exe = build("snapshot_probe", m32=True)
    except TargetError as exc:
        pytest.skip(f"cannot build a 32-bit target: {exc}")
    with Target(exe) as t:
        r = t.ready
        with open_capture(agent.address, t.pid, snapshot=True) as core:
            assert core.layout.arch == "i386"
            assert core.layout.snapshot, core.layout.snapshot_status
            t.command("rewrite 4")
            assert core_bytes(core, r["pat_addr"], 4096) == pattern(1, 4096)
            assert core_bytes(core, r["df_addr"], 4096) == pattern(7, 4096)
            assert core_bytes(core, r["wf_addr"], 4096) == pattern(9, 4096)
        assert_thawed_and_undisturbed(t)
        assert_target_saw_no_child(t)


# -- the clone's lifetime ----------------------------------------------------------------


def test_killing_the_agent_mid_stream_leaves_no_clone_running(probe, tmp_path: Path,
                                                              require_root) -> None:
    own = start_agent(tmp_path)
    try:
        with Target(probe) as t:
            core = open_capture(own.address, t.pid, snapshot=True)
            try:
                assert core.layout.snapshot
                clone = children(t.pid)
                assert len(clone) == 1
                assert core_bytes(core, t.ready["pat_addr"], 4096) == pattern(1, 4096)
                own.proc.send_signal(signal.SIGKILL)
                own.proc.wait(timeout=10)
                # PTRACE_O_EXITKILL: the clone dies with its tracer.  Its zombie
                # stays under the target (exit signal 0: invisible to wait()).
                assert wait_until(lambda: state(clone[0]) in ("Z", "")), state(clone[0])
            finally:
                try:
                    core.close()
                except CaptureError:
                    pass
            assert_thawed_and_undisturbed(t)
            waited = t.command("waitcheck")
            assert (waited["nohang"], waited["wait"]) == ("ECHILD", "ECHILD"), waited
            assert t.status()["sigchld_pending"] == 0
    finally:
        stop_agent(own)


def test_the_maximum_freeze_duration_bounds_the_clone(probe, tmp_path: Path,
                                                      require_root) -> None:
    own = start_agent(tmp_path, "--max-freeze", "1")
    try:
        with Target(probe) as t:
            with open_capture(own.address, t.pid, snapshot=True) as core:
                assert core.layout.snapshot
                clone = children(t.pid)
                assert len(clone) == 1
                assert wait_until(lambda: not os.path.exists(f"/proc/{clone[0]}"), 10)
                with pytest.raises(CaptureError):
                    core.read_bytes(0, 4096)
            assert_thawed_and_undisturbed(t)
            assert_target_saw_no_child(t)
    finally:
        stop_agent(own)


def test_cli_dump_snapshot(agent, probe, tmp_path: Path) -> None:
    with Target(probe) as t:
        out = tmp_path / "core"
        res = subprocess.run([sys.executable, "-m", "corepeek", "dump", "--agent", agent.address,
                              str(t.pid), "-o", str(out), "--snapshot"],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert "snapshot: target thawed after the clone" in res.stderr, res.stderr
        assert "snapshot served for" in res.stderr
        assert "target stopped for" in res.stderr and "while its snapshot was made" in res.stderr
        with open(out, "rb") as f:
            assert ELFFile(f).header.e_type == "ET_CORE"
        assert_thawed_and_undisturbed(t)
        assert_target_saw_no_child(t)


def test_cli_dump_snapshot_fallback_is_reported(agent, probe, tmp_path: Path) -> None:
    with Target(probe, ["-S", "errno"]) as t:
        res = subprocess.run([sys.executable, "-m", "corepeek", "dump", "--agent", agent.address,
                              str(t.pid), "-o", str(tmp_path / "core"), "--snapshot"],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert "warning: snapshot not taken, live capture instead" in res.stderr, res.stderr
        assert "target stopped for" in res.stderr and "(the whole transfer)" in res.stderr
        assert_thawed_and_undisturbed(t)
        assert_target_saw_no_child(t)
