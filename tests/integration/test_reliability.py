"""Faults around a capture never leave the target frozen, traced or disturbed.

Every case ends by checking the invariant: the target runs (not t/T unless it
was stopped before), no thread is traced, its heartbeat advances, nothing it
was sent is lost. Thaw times are measured against a stated bound.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from harness.agents import AgentProcess, start_agent, stop_agent
from corepeek.errors import CaptureError
from corepeek.remote import open_capture
from corepeek.v1 import capture_pb2 as pb
from corepeek.v1 import capture_pb2_grpc as pb_grpc
from harness.checks import assert_thawed_and_undisturbed, wait_thawed
from harness.targets import Target, churn_data_rounds


def wait_frozen(t: Target, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if set(t.thread_states().values()) == {"t"}:
            return
        time.sleep(0.005)
    pytest.fail(f"target never frozen: {t.thread_states()}")


@pytest.fixture
def own_agent(tmp_path: Path, require_root: None) -> Iterator[AgentProcess]:
    a = start_agent(tmp_path, "--max-freeze", "3", "--sessions-per-minute", "0")
    yield a
    stop_agent(a)


def test_client_killed_mid_stream_thaws_the_target(agent, build, tmp_path: Path) -> None:
    client = textwrap.dedent(f"""
        import sys, time
        from corepeek.remote import open_capture
        core = open_capture({agent.address!r}, int(sys.argv[1]), snapshot=False)
        core.read_bytes(0, 4096)
        print("open", flush=True)
        time.sleep(600)
    """)
    with Target(build("threads"), watcher=build("parent_watch")) as t:
        proc = subprocess.Popen([sys.executable, "-c", client, str(t.pid)], stdout=subprocess.PIPE)
        try:
            assert proc.stdout.readline() == b"open\n"
            wait_frozen(t)
            proc.kill()
            thaw = wait_thawed(t, timeout=5)
        finally:
            proc.kill()
            proc.wait()
        print(f"\nMEASURED client SIGKILL -> thawed in {thaw * 1000:.1f} ms")
        assert thaw < 2.0
        assert_thawed_and_undisturbed(t)


def test_client_that_stops_reading_is_cut_off_by_the_max_freeze(own_agent, build) -> None:
    with Target(build("bigmem"), ["-m", "256"]) as t:
        with grpc.insecure_channel(own_agent.address) as ch:
            reqs: queue.Queue[pb.CaptureRequest | None] = queue.Queue()
            reqs.put(pb.CaptureRequest(open=pb.OpenCapture(
                pid=t.pid, options=pb.CaptureOptions(freeze_mode=pb.FREEZE_MODE_LIVE))))
            call = pb_grpc.CoreCaptureServiceStub(ch).Capture(iter(reqs.get, None))
            layout = next(call).layout
            t0 = time.monotonic()
            reqs.put(pb.CaptureRequest(read=pb.ReadRange(offset=0, length=layout.total_size)))
            # Never read the answer: the agent blocks on flow control.
            time.sleep(0.5)
            assert set(t.thread_states().values()) == {"t"}
            wait_thawed(t, timeout=10)
            frozen_for = time.monotonic() - t0
            reqs.put(None)
            call.cancel()
        print(f"\nMEASURED stalled client: frozen {frozen_for:.3f} s with --max-freeze 3")
        assert frozen_for < 3 + 1.0, frozen_for           # --max-freeze 3
        assert_thawed_and_undisturbed(t)
        assert "maximum freeze duration" in own_agent.log()


def test_agent_killed_mid_freeze_leaves_the_target_running(build, tmp_path: Path,
                                                            require_root) -> None:
    a = start_agent(tmp_path)
    try:
        with Target(build("threads"), watcher=build("parent_watch")) as t:
            core = open_capture(a.address, t.pid, snapshot=False)
            wait_frozen(t)
            a.proc.kill()
            thaw = wait_thawed(t, timeout=5)
            with pytest.raises(CaptureError):
                core.read_bytes(0, 4096)
            core.close()
            print(f"\nMEASURED agent SIGKILL -> thawed in {thaw * 1000:.1f} ms")
            assert thaw < 1.0
            assert_thawed_and_undisturbed(t)
    finally:
        stop_agent(a)


def test_agent_sigterm_thaws_every_session_then_exits(build, tmp_path: Path, require_root) -> None:
    a = start_agent(tmp_path)
    try:
        with Target(build("threads")) as t1, Target(build("threads")) as t2:
            cores = [open_capture(a.address, t.pid, snapshot=False) for t in (t1, t2)]
            wait_frozen(t1)
            wait_frozen(t2)
            a.proc.send_signal(signal.SIGTERM)
            assert a.proc.wait(timeout=10) == 0
            for t in (t1, t2):
                wait_thawed(t, timeout=1)
                assert_thawed_and_undisturbed(t)
            for c in cores:
                with pytest.raises(CaptureError):
                    c.read_bytes(0, 4096)
                c.close()
    finally:
        stop_agent(a)


def test_target_killed_mid_stream_gives_not_found_and_the_agent_carries_on(agent, build) -> None:
    with Target(build("threads")) as t:
        with open_capture(agent.address, t.pid, snapshot=False) as core:
            seg = next(s for s in core.layout.segments if s.file_size >= 4096 and not s.name)
            t.send_signal(signal.SIGKILL)
            # Readiness: every thread is dead (zombies the tracer has yet to reap).
            t.wait_state("ZX")
            with pytest.raises(CaptureError) as exc:
                core.read_bytes(seg.file_offset, 4096)
            assert exc.value.code == grpc.StatusCode.NOT_FOUND, exc.value
    with Target(build("threads")) as t:
        with open_capture(agent.address, t.pid, snapshot=False) as core:
            assert core.read_bytes(0, 4) == b"\x7fELF"
        assert_thawed_and_undisturbed(t)


def _traced_threads(pid: int) -> list[int]:
    """Threads of pid with a tracer; threads vanishing under exec are skipped."""
    traced = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if "TracerPid:\t0\n" not in status:
            traced.append(int(tid))
    return traced


def _exec_generation(pid: int, timeout: float = 2.0) -> int:
    """exec_loop's argv[1]; /proc/PID/cmdline reads empty while an execve
    replaces the memory it lives in, so read again until it is there."""
    deadline = time.monotonic() + timeout
    while True:
        args = open(f"/proc/{pid}/cmdline").read().split("\0")
        if len(args) > 1 and args[1].isdigit():
            return int(args[1])
        assert time.monotonic() < deadline, f"no generation in {args!r}"
        time.sleep(0.001)


def _wait_generation_above(pid: int, gen: int, timeout: float = 5.0) -> int:
    """Wait until exec_loop re-executed past generation ``gen``."""
    deadline = time.monotonic() + timeout
    while (now := _exec_generation(pid)) <= gen:
        assert time.monotonic() < deadline, f"exec_loop stuck at generation {now}"
        time.sleep(0.005)
    return now


def test_target_that_keeps_calling_exec(agent, build) -> None:
    exe = build("exec_loop")
    proc = subprocess.Popen([str(exe), "0"])
    outcomes: dict[str, int] = {}
    try:
        # Readiness: exec_loop has no protocol; it is running once it re-executed.
        _wait_generation_above(proc.pid, 0)
        for _ in range(30):
            try:
                with open_capture(agent.address, proc.pid, snapshot=False) as core:
                    assert core.read_bytes(0, 4) == b"\x7fELF"
                    core.read_bytes(0, core.size)
                outcomes["ok"] = outcomes.get("ok", 0) + 1
            except CaptureError as exc:
                assert exc.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
                                    grpc.StatusCode.ABORTED), exc
                outcomes[exc.code.name] = outcomes.get(exc.code.name, 0) + 1
            assert not _traced_threads(proc.pid)
        _wait_generation_above(proc.pid, _exec_generation(proc.pid))  # still re-executing
        assert outcomes.get("ok", 0) >= 10, outcomes
    finally:
        proc.kill()
        proc.wait()


def test_threads_created_and_exiting_during_the_freeze(agent, build) -> None:
    with Target(build("churn"), ["-n", "4"]) as t:
        for _ in range(20):
            with open_capture(agent.address, t.pid, snapshot=False) as core:
                listed = {th.tid for th in core.layout.threads}
                assert all(th.frozen for th in core.layout.threads)
                alive_now = set(t.tids())
                # Nothing runs while frozen: every live thread was caught.
                assert alive_now <= listed, alive_now - listed
        st = assert_thawed_and_undisturbed(t)
        assert st is not None and st["check_fail"] == 0 and st["spawned"] > 100


def test_zombie_group_leader(agent, build, tmp_path: Path) -> None:
    from harness.capture import capture_file
    from harness.tools import gdb_backtraces, gdb_read_memory

    with Target(build("churn"), ["-z", "-n", "0"]) as t:
        deadline = time.monotonic() + 5
        while t.state() != "Z" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert t.state() == "Z"
        out = tmp_path / "zl.core"
        layout = capture_file(agent.address, t.pid, out)
        tids = {th.tid for th in layout.threads}
        assert t.pid not in tids and tids == set(t.tids()) - {t.pid}
        assert all(th.frozen for th in layout.threads)
        data = gdb_read_memory(out, build("churn"), int(t.ready["data_addr"]), 4096)
        churn_data_rounds(data)  # the checker's real pattern, not zeros
        # libthread_db still lists the exiting leader (as for a kernel core),
        # with no registers; every live thread unwinds.
        bts = gdb_backtraces(out, build("churn"))
        assert set(bts) == tids | {t.pid}
        assert any("cp_checker" in bts[tid] for tid in tids)
        st = t.status()
        assert st["eintr"] == 0 and st["check_fail"] == 0


def _agent_resources(pid: int) -> tuple[int, int, int]:
    """(non-socket fds, threads, RSS KiB); client connections close asynchronously."""
    fds = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            fds += not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except FileNotFoundError:
            pass                      # closed while we looked
    threads = len(os.listdir(f"/proc/{pid}/task"))
    rss = int(next(l for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS")).split()[1])
    return fds, threads, rss


@pytest.mark.parametrize("count", [
    pytest.param(60, id="ci"),
    pytest.param(1000, id="endurance"),   # ~2 min: in CI (docs/reliability.md)
])
def test_many_sequential_captures_keep_the_agent_flat(own_agent, build, count: int) -> None:
    with Target(build("churn"), ["-n", "1"]) as t:
        def one() -> None:
            with open_capture(own_agent.address, t.pid, snapshot=False) as core:
                core.read_bytes(0, core.size)
        for _ in range(10):
            one()
        before = _agent_resources(own_agent.proc.pid)
        for _ in range(count):
            one()
        after = _agent_resources(own_agent.proc.pid)
        st = assert_thawed_and_undisturbed(t)
        assert st is not None and st["check_fail"] == 0
    assert after[0] == before[0], f"agent fds {before[0]} -> {after[0]}"
    assert after[1] <= before[1] + 2, f"agent threads {before[1]} -> {after[1]}"
    assert after[2] - before[2] < 30 * 1024, f"agent RSS {before[2]} -> {after[2]} KiB"


def test_32_concurrent_sessions_and_the_33rd_is_refused(build, tmp_path: Path,
                                                        require_root) -> None:
    from concurrent.futures import ThreadPoolExecutor
    from contextlib import ExitStack

    a = start_agent(tmp_path, "--max-sessions", "32")
    try:
        with ExitStack() as stack:
            targets = [stack.enter_context(Target(build("bigmem"), ["-m", "16", "-t", "2"]))
                       for _ in range(33)]
            cores = list(ThreadPoolExecutor(8).map(
                lambda t: stack.enter_context(open_capture(a.address, t.pid, snapshot=False)),
                targets[:32]))
            with pytest.raises(CaptureError) as exc:
                open_capture(a.address, targets[32].pid, snapshot=False)
            assert exc.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            sizes = list(ThreadPoolExecutor(8).map(lambda c: len(c.read_bytes(0, c.size)), cores))
            assert all(s == c.size for s, c in zip(sizes, cores))
            rss_kib = _agent_resources(a.proc.pid)[2]
            for c in cores:
                c.close()
            for t in targets:
                wait_thawed(t, timeout=2)
                assert_thawed_and_undisturbed(t)
        assert rss_kib < 400 * 1024, f"agent RSS {rss_kib} KiB with 32 sessions"
    finally:
        stop_agent(a)
