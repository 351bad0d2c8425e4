"""Snapshot by default: every full and stacks capture, its fallbacks and its gaps.

Real targets, a real agent (real gRPC), real ptrace.  Each test proves the
target ended thawed and undisturbed, and saw no child.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from corepeek.remote import open_capture
from corepeek_agent.session import CaptureSession, SessionOptions
from harness.agents import start_agent, stop_agent
from harness.checks import assert_thawed_and_undisturbed
from harness.targets import Target
from test_snapshot import (assert_target_saw_no_child, children, core_bytes, pattern, state,
                           wait_until)

MIB = 1 << 20


@pytest.fixture(scope="module")
def probe(build):  # type: ignore[no-untyped-def]
    return build("snapshot_probe")


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def audit(path: Path, pid: int) -> dict:
    deadline = time.monotonic() + 5
    while True:
        lines = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] \
            if path.exists() else []
        found = [d for d in lines if d.get("kind") == "capture" and d.get("pid") == pid]
        if found or time.monotonic() > deadline:
            assert found, lines
            return found[-1]
        time.sleep(0.05)


# -- the default ----------------------------------------------------------------------


def test_a_plain_dump_of_a_threaded_target_is_a_snapshot_nobody_notices(agent, build,
                                                                        tmp_path: Path) -> None:
    """`corepeek dump PID`, no option: the clone is made, the target (15 threads,
    under parent_watch) runs during the transfer; no SIGCHLD reaches the
    parent, no restartable call returns EINTR, no child is left."""
    with Target(build("threads"), watcher=build("parent_watch")) as t:
        out = tmp_path / "core"
        res = subprocess.run([sys.executable, "-m", "corepeek", "dump", "--agent", agent.address,
                              str(t.pid), "-o", str(out)],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        # The default says nothing extra: the summary gives the stop time.
        assert "snapshot: target thawed after the clone" not in res.stderr, res.stderr
        assert "while its snapshot was made" in res.stderr, res.stderr
        with open(out, "rb") as f:
            elf = ELFFile(f)
            assert elf.header.e_type == "ET_CORE"
            prstatus = [n for seg in elf.iter_segments() if seg.header.p_type == "PT_NOTE"
                        for n in seg.iter_notes() if n["n_type"] == "NT_PRSTATUS"]
        assert len(prstatus) == len(t.tids())
        assert wait_until(lambda: not children(t.pid)), children(t.pid)
        assert_thawed_and_undisturbed(t)        # parent_watch: no SIGCHLD, no stop report
        time.sleep(0.3)
        assert_thawed_and_undisturbed(t)        # and no late EINTR either


def test_the_snapshot_is_the_frozen_target_byte_for_byte(probe, require_root) -> None:
    """One freeze, read twice: every byte of the core from the frozen target
    (live), then, after the clone was made and the target rewrote its memory,
    every byte again from the clone: identical (memory, notes, registers)."""
    with Target(probe, ["-m", "16"]) as t:
        s = CaptureSession(t.pid, options=SessionOptions(snapshot=False))
        s.open()
        try:
            assert s.layout is not None
            size = s.layout.total_size

            def whole() -> bytes:
                buf = bytearray(size)
                for c in s.read(0, size):
                    if c.data is not None:
                        buf[c.offset:c.offset + len(c.data)] = c.data
                return bytes(buf)

            # MAP_SHARED memory is no snapshot (read_after_thaw): masked out.
            # So is each thread's struct rseq (32 bytes at fs_base +
            # __rseq_offset): the kernel rewrites its cpu_id fields in the
            # clone it creates (docs/snapshot.md, "What the target can observe").
            shared = [(g.file_offset, g.file_size) for g in s.layout.segments if g.shared]
            rseq_off = ctypes.c_long.in_dll(ctypes.CDLL(None), "__rseq_offset").value
            for th in s.threads:
                addr = struct.unpack_from("<Q", th.gpregs, 21 * 8)[0] + rseq_off
                seg = next(g for g in s.layout.segments
                           if g.vaddr <= addr < g.vaddr + g.file_size)
                shared.append((seg.file_offset + addr - seg.vaddr, 32))

            def masked(core: bytes) -> bytes:
                buf = bytearray(core)
                for off, n in shared:
                    buf[off:off + n] = bytes(n)
                return bytes(buf)

            live = whole()
            s._take_snapshot()
            assert s.snapshot is not None, s.snapshot_status
            assert s.target_running and shared
            t.command("rewrite 5")                  # the target runs and rewrites
            again = whole()
            assert again != live                    # the shared page changed...
            assert masked(again) == masked(live)    # ...nothing else did
        finally:
            s.close()
        assert_thawed_and_undisturbed(t)
        assert_target_saw_no_child(t)


def test_live_asks_for_the_old_behaviour_and_notes_never_clone(agent, probe,
                                                               tmp_path: Path) -> None:
    with Target(probe) as t:
        with open_capture(agent.address, t.pid, snapshot=False) as core:
            assert not core.layout.snapshot and not core.layout.snapshot_status
            assert set(t.thread_states().values()) == {"t"}      # frozen throughout
            assert not children(t.pid)
        with open_capture(agent.address, t.pid, mode="notes") as core:
            assert not core.layout.snapshot and not core.layout.snapshot_status
            assert core.layout.target_running and not children(t.pid)
        with open_capture(agent.address, t.pid, mode="stacks") as core:
            assert core.layout.snapshot, core.layout.snapshot_status
        res = subprocess.run([sys.executable, "-m", "corepeek", "dump", "--agent", agent.address,
                              str(t.pid), "-o", str(tmp_path / "core"), "--live"],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert "(the whole transfer)" in res.stderr
        assert not [ln for ln in res.stderr.splitlines()
                    if ln.startswith(("snapshot:", "warning:"))], res.stderr
        assert_thawed_and_undisturbed(t)
        assert_target_saw_no_child(t)


# -- fallbacks, each from a real case ------------------------------------------------------


@pytest.fixture
def watched_agent(tmp_path: Path, require_root):  # type: ignore[no-untyped-def]
    a = start_agent(tmp_path, "--sessions-per-minute", "0", "--audit-log",
                    str(tmp_path / "audit.log"), "--metrics-address", "127.0.0.1:0")
    a.audit_path = tmp_path / "audit.log"                           # type: ignore[attr-defined]
    a.metrics_port = int(a.bound["metrics"].rsplit(":", 1)[1])      # type: ignore[attr-defined]
    try:
        yield a
    finally:
        stop_agent(a)


def _fallback(agent, t: Target, reason: str) -> str:  # type: ignore[no-untyped-def]
    """A default capture of ``t``: live, for ``reason``, everywhere it must say so."""
    key = f'corepeek_snapshot_fallbacks_total{{reason="{reason}"}}'
    before = scrape(agent.metrics_port).get(key, 0.0)
    with open_capture(agent.address, t.pid) as core:
        lay = core.layout
        assert not lay.snapshot and lay.snapshot_reason == reason, lay.snapshot_status
        assert lay.snapshot_status.startswith("snapshot not taken, live capture instead: ")
        assert set(t.thread_states().values()) == {"t"}     # live: frozen
        assert core_bytes(core, t.ready["pat_addr"], 4096) == pattern(1, 4096)
    line = audit(agent.audit_path, t.pid)
    assert line["snapshot"] == {"taken": False, "reason": reason,
                                "status": lay.snapshot_status}, line
    assert wait_until(lambda: scrape(agent.metrics_port).get(key, 0.0) == before + 1)
    assert_thawed_and_undisturbed(t)
    assert_target_saw_no_child(t)
    return lay.snapshot_status


def test_fallback_seccomp_forbidding_clone(watched_agent, probe, tmp_path: Path) -> None:
    with Target(probe, ["-S", "errno"]) as t:
        status = _fallback(watched_agent, t, "seccomp")
        assert "ERRNO" in status
        res = subprocess.run([sys.executable, "-m", "corepeek", "dump", "--agent",
                              watched_agent.address, str(t.pid), "-o", str(tmp_path / "c")],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        warn = [ln for ln in res.stderr.splitlines() if ln.startswith(("snapshot", "warning"))]
        assert warn == [f"warning: {status}"], res.stderr              # one line
        assert_thawed_and_undisturbed(t)


def test_fallback_clone_failing_in_the_target(watched_agent, probe) -> None:
    with Target(probe, ["-N"]) as t:                 # RLIMIT_NPROC 1: EAGAIN
        assert "clone() failed" in _fallback(watched_agent, t, "clone_failed")


def _own_memory_cgroup() -> Path | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, ctrl, path = line.split(":", 2)
        if "memory" in ctrl.split(","):
            base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            return base if (base / "memory.limit_in_bytes").exists() else None
    return None


def test_fallback_memory_a_cgroup_that_could_not_hold_the_copies(watched_agent, probe) -> None:
    """A target with 160 MiB of private memory moved into a memory cgroup
    limited to 128 MiB: if it rewrote everything while the clone lived, the
    copies would take it past its limit.  The capture is live, and says so."""
    parent = _own_memory_cgroup()
    if parent is None:
        pytest.skip("no cgroup v1 memory controller to make a limited cgroup in")
    cg = parent / f"corepeek-test-{os.getpid()}"
    cg.mkdir()
    try:
        (cg / "memory.limit_in_bytes").write_text(str(128 * MIB))
        with Target(probe, ["-m", "160"]) as t:
            (cg / "cgroup.procs").write_text(str(t.pid))
            assert Path(f"/proc/{t.pid}/cgroup").read_text().find(cg.name) > 0
            status = _fallback(watched_agent, t, "memory")
            assert "memory cgroup" in status and cg.name in status, status
    finally:
        for _ in range(50):
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def test_map_shared_memory_is_flagged_read_after_thaw(agent, probe) -> None:
    """MAP_SHARED memory is not copied: every shared segment, and only those
    and the over-budget MADV_DONTFORK ones, is flagged read_after_thaw."""
    with Target(probe) as t:
        with open_capture(agent.address, t.pid) as core:
            lay = core.layout
            assert lay.snapshot, lay.snapshot_status
            shared = {s.vaddr for s in lay.segments if s.shared}
            flagged = {s.vaddr for s in lay.segments if s.read_after_thaw}
            assert t.ready["sh_addr"] in shared
            assert shared and flagged == shared, (shared, flagged)
            t.command("rewrite 3")
            # The shared page shows the rewrite (not point-in-time), private does not.
            assert core_bytes(core, t.ready["sh_addr"], 4096) == pattern(3, 4096)
            assert core_bytes(core, t.ready["pat_addr"], 4096) == pattern(1, 4096)
        assert_thawed_and_undisturbed(t)
        assert_target_saw_no_child(t)


# -- the clone outlives what happens to the target -----------------------------------------


def test_the_target_exiting_mid_transfer_does_not_stop_the_capture(agent, probe) -> None:
    with Target(probe, ["-m", "32"]) as t:
        r = t.ready
        with open_capture(agent.address, t.pid) as core:
            assert core.layout.snapshot, core.layout.snapshot_status
            clone = children(t.pid)
            assert len(clone) == 1
            first = core.read_bytes(0, 4096)
            t.send_signal(signal.SIGKILL)
            assert wait_until(lambda: not os.path.exists(f"/proc/{t.pid}") or state(t.pid) in "ZX")
            assert core_bytes(core, r["pat_addr"], r["region_len"]) == pattern(1, r["region_len"])
            assert core_bytes(core, r["df_addr"], 4096) == pattern(7, 4096)
            whole = core.read_bytes(0, core.size)
            assert whole[:4096] == first and len(whole) == core.size
        # The clone is gone with the session (reaped by the agent, then init).
        assert wait_until(lambda: not os.path.exists(f"/proc/{clone[0]}"), 10), state(clone[0])


def test_the_target_calling_exec_mid_transfer_does_not_stop_the_capture(agent, build) -> None:
    exe = build("exec_loop")
    proc = subprocess.Popen([str(exe), "0"])
    try:
        deadline = time.monotonic() + 30
        done = 0
        while done < 2 and time.monotonic() < deadline:
            t0 = time.monotonic()
            with open_capture(agent.address, proc.pid) as core:
                if not core.layout.snapshot:
                    continue                     # caught mid-exec: another try
                clone = children(proc.pid)
                time.sleep(0.05)                 # exec_loop re-executes every ~5 ms
                data = core.read_bytes(0, core.size)
                assert data[:4] == b"\x7fELF" and len(data) == core.size
                done += 1
            # (a zombie removal stuck on the exec is left to a background thread)
            assert time.monotonic() - t0 < 8
            # The stream closed promptly and the clone is dead: reaped, or (if
            # the target exec'd meanwhile) a zombie the new image inherits.
            assert wait_until(lambda: all(state(c) in ("Z", "") for c in clone), 10)
        assert done == 2
    finally:
        proc.kill()
        proc.wait()


def test_a_restarted_agent_removes_the_clones_of_its_killed_predecessor(probe, tmp_path: Path,
                                                                        require_root) -> None:
    state_dir = tmp_path / "state"
    env = {"COREPEEK_STATE_DIR": str(state_dir)}
    for d in ("a1", "a2"):
        (tmp_path / d).mkdir()
    own = start_agent(tmp_path / "a1", env=env)
    decoy = subprocess.Popen(["sleep", "300"])   # a process the forged entries point at
    try:
        with Target(probe) as t:
            core = open_capture(own.address, t.pid)
            assert core.layout.snapshot
            clone = children(t.pid)
            assert len(clone) == 1
            entries = list(state_dir.glob("clone-*.json"))
            assert len(entries) == 1 and json.loads(entries[0].read_text())["clone_pid"] == clone[0]
            own.proc.send_signal(signal.SIGKILL)
            own.proc.wait(timeout=10)
            assert wait_until(lambda: state(clone[0]) == "Z"), state(clone[0])
            try:
                core.close()
            except Exception:  # noqa: BLE001 - the agent is dead
                pass
            # Forged entries of dead agents: a pid reused by another process
            # (start time differs), and a real process that is no clone.
            real = json.loads(entries[0].read_text())
            dstart = int(Path(f"/proc/{decoy.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
            for i, forged in enumerate([{**real, "clone_pid": decoy.pid},
                                        {**real, "clone_pid": decoy.pid, "clone_start": dstart,
                                         "target_pid": os.getpid()}]):
                (state_dir / f"clone-{real['agent_pid']}-9999{i}.json").write_text(
                    json.dumps(forged))
            again = start_agent(tmp_path / "a2", env=env)
            try:
                assert wait_until(lambda: not os.path.exists(f"/proc/{clone[0]}"), 10), \
                    state(clone[0])
                assert not list(state_dir.glob("clone-*.json"))
                assert decoy.poll() is None                      # never touched
                assert "snapshot clone left by a previous agent" in again.log()
            finally:
                stop_agent(again)
            assert_thawed_and_undisturbed(t)
            assert_target_saw_no_child(t)
    finally:
        decoy.kill()
        decoy.wait()
        stop_agent(own)


def test_the_clone_never_outlives_its_session(agent, probe) -> None:
    with Target(probe) as t:
        for _ in range(3):
            with open_capture(agent.address, t.pid) as core:
                assert core.layout.snapshot
                clone = children(t.pid)
            # Gone by the time the stream's close returned to the agent.
            assert wait_until(lambda: not os.path.exists(f"/proc/{clone[0]}"), 2)
        assert_thawed_and_undisturbed(t)
        assert_target_saw_no_child(t)
