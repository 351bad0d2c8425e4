"""Failures reach the client as statuses that say what happened and what to do.

Real failures only: an agent with a short --max-freeze and a client that
holds its stream (idle, or stalled on flow control), a target traced by
strace.  Each test also proves the target was thawed and undisturbed.
"""

from __future__ import annotations

import queue
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from corepeek.errors import CaptureError
from corepeek.remote import open_capture
from corepeek.v1 import capture_pb2 as pb
from corepeek.v1 import capture_pb2_grpc as pb_grpc
from harness.agents import AgentProcess, start_agent, stop_agent
from harness.checks import assert_thawed_and_undisturbed, wait_thawed
from harness.targets import Target

MAX_FREEZE_TEXT = ("the agent's --max-freeze of 1.5 s ended the capture; the target was "
                   "thawed (use --snapshot, or ask for a longer --max-freeze)")


@pytest.fixture
def short_freeze_agent(tmp_path: Path, require_root: None) -> Iterator[AgentProcess]:
    a = start_agent(tmp_path, "--max-freeze", "1.5", "--sessions-per-minute", "0")
    yield a
    stop_agent(a)


def test_max_freeze_reaches_an_idle_client_as_deadline_exceeded(short_freeze_agent,
                                                                build) -> None:
    with Target(build("threads")) as t:
        with open_capture(short_freeze_agent.address, t.pid, snapshot=False) as core:
            opened = time.monotonic()
            assert set(t.thread_states().values()) == {"t"}
            wait_thawed(t, timeout=10)
            thawed = time.monotonic() - opened
            assert 1.3 < thawed < 3.0, thawed
            with pytest.raises(CaptureError) as exc:
                core.read_bytes(0, 4096)
        assert exc.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert MAX_FREEZE_TEXT in str(exc.value), str(exc.value)
        assert_thawed_and_undisturbed(t)


def test_max_freeze_reaches_a_stalled_client_as_deadline_exceeded(short_freeze_agent,
                                                                  build) -> None:
    with Target(build("bigmem"), ["-m", "256"]) as t:
        with grpc.insecure_channel(short_freeze_agent.address) as ch:
            reqs: queue.Queue[pb.CaptureRequest | None] = queue.Queue()
            reqs.put(pb.CaptureRequest(open=pb.OpenCapture(pid=t.pid)))
            call = pb_grpc.CoreCaptureServiceStub(ch).Capture(iter(reqs.get, None))
            layout = next(call).layout
            reqs.put(pb.CaptureRequest(read=pb.ReadRange(offset=0, length=layout.total_size)))
            # The client reads nothing: the agent blocks on flow control.
            wait_thawed(t, timeout=10)
            with pytest.raises(grpc.RpcError) as exc:
                for _ in call:
                    pass
            reqs.put(None)
        assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, exc.value
        assert exc.value.details() == MAX_FREEZE_TEXT
        assert_thawed_and_undisturbed(t)


def test_max_freeze_counts_from_the_first_freeze_for_every_joined_session(
        short_freeze_agent, build) -> None:
    with Target(build("threads")) as t:
        with open_capture(short_freeze_agent.address, t.pid, snapshot=False) as a:
            opened = time.monotonic()
            time.sleep(0.7)
            with open_capture(short_freeze_agent.address, t.pid, snapshot=False) as b:
                assert b.layout.joined
                wait_thawed(t, timeout=10)
                thawed = time.monotonic() - opened
                # 1.5 s after a's freeze, not after b joined (2.2 s)
                assert 1.3 < thawed < 2.0, thawed
                for core in (a, b):
                    with pytest.raises(CaptureError) as exc:
                        core.read_bytes(0, 4096)
                    assert exc.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
                    assert MAX_FREEZE_TEXT in str(exc.value)
        assert_thawed_and_undisturbed(t)


def test_target_traced_by_strace_is_refused_naming_the_tracer(agent, build) -> None:
    with Target(build("threads")) as t:
        others = [tid for tid in t.tids() if tid != t.pid]
        strace = subprocess.Popen(["strace", "-q", "-o", "/dev/null", "-p", str(t.pid)],
                                  stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 10
            while t.tracer_pids().get(t.pid) != strace.pid:
                assert time.monotonic() < deadline, "strace never attached"
                time.sleep(0.02)
            with pytest.raises(CaptureError) as exc:
                open_capture(agent.address, t.pid, snapshot=False)
            assert exc.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert f"already traced by pid {strace.pid} (strace)" in str(exc.value), \
                str(exc.value)
            # Untouched: strace still traces the main thread, nobody else any.
            tracers = t.tracer_pids()
            assert tracers[t.pid] == strace.pid
            assert all(tracers[tid] == 0 for tid in others), tracers
            assert "t" not in {t.thread_states()[tid] for tid in others}
        finally:
            strace.terminate()
            strace.wait(10)
        wait_thawed(t)
        assert_thawed_and_undisturbed(t)


@pytest.mark.parametrize("wait", [-1.0, 301.0, float("nan")])
def test_bad_wait_exclusive_is_invalid_argument_and_freezes_nothing(agent, build,
                                                                    wait: float) -> None:
    with Target(build("threads")) as t:
        with pytest.raises(CaptureError) as exc:
            open_capture(agent.address, t.pid, wait_exclusive=wait, snapshot=False)
        assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "wait_exclusive_seconds must be between 0 and 300" in str(exc.value)
        assert_thawed_and_undisturbed(t)
