"""Limits that keep one client from holding the host: concurrent sessions, freeze
duration, request size, sessions per minute and bytes per session."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from corepeek.errors import CaptureError
from corepeek.remote import open_capture
from corepeek.v1 import capture_pb2 as pb
from corepeek.v1 import capture_pb2_grpc as pb_grpc
from harness.agents import start_agent, stop_agent
from harness.checks import assert_thawed_and_undisturbed
from harness.targets import Target

from security_util import traced_or_stopped, wait_audit, write_policy

pytestmark = pytest.mark.usefixtures("require_root")


def test_concurrent_sessions_are_capped(tmp_path: Path, build) -> None:
    a = start_agent(tmp_path, "--max-sessions", "1", "--audit-log", str(tmp_path / "audit"))
    try:
        with Target(build("threads")) as t1, Target(build("threads")) as t2:
            with open_capture(a.address, t1.pid, mode="stacks", snapshot=False):
                # WHEN a second session would freeze a second process
                with pytest.raises(CaptureError) as exc:
                    open_capture(a.address, t2.pid, mode="notes")
                # THEN RESOURCE_EXHAUSTED, and t2 is never touched
                assert exc.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert traced_or_stopped(t2.pid) == {}
            assert_thawed_and_undisturbed(t1)
            # the slot is free again once the first session ended
            with open_capture(a.address, t2.pid, mode="notes"):
                pass
            assert_thawed_and_undisturbed(t2)
        line = wait_audit(tmp_path / "audit", pid=t2.pid, code="RESOURCE_EXHAUSTED")
        assert line["outcome"] == "refused"
    finally:
        stop_agent(a)


def test_max_freeze_thaws_and_ends_the_stream(tmp_path: Path, build) -> None:
    a = start_agent(tmp_path, "--max-freeze", "1", "--audit-log", str(tmp_path / "audit"))
    try:
        with Target(build("threads")) as t:
            t.command("resetgap")
            core = open_capture(a.address, t.pid, snapshot=False)
            try:
                opened = time.monotonic()
                assert set(t.thread_states().values()) == {"t"}
                # WHEN the client holds the stream open past --max-freeze
                while traced_or_stopped(t.pid):
                    assert time.monotonic() - opened < 5, "not thawed after --max-freeze"
                    time.sleep(0.02)
                thawed_after = time.monotonic() - opened
                # THEN the agent thawed the target on time and ended the stream
                assert 0.8 < thawed_after < 3, thawed_after
                with pytest.raises(CaptureError) as exc:
                    core.read_bytes(0, 4096)
                assert exc.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
                assert "the agent's --max-freeze of 1 s ended the capture" in str(exc.value)
            finally:
                core.close()
            st = assert_thawed_and_undisturbed(t)
            # The target's own clock: its heartbeat stalled for about
            # --max-freeze and no longer (the audit value below is clamped).
            assert 900_000 <= st["maxgap_us"] <= 2_000_000, st
            line = wait_audit(tmp_path / "audit", pid=t.pid)
            assert line["outcome"] == "expired" and line["code"] == "DEADLINE_EXCEEDED"
            assert 0.9 <= line["freeze_seconds"] <= 1.5
        assert a.proc.poll() is None
    finally:
        stop_agent(a)


def test_oversized_requests_are_refused_before_parsing(tmp_path: Path, build) -> None:
    a = start_agent(tmp_path)
    try:
        with Target(build("threads")) as t, grpc.insecure_channel(a.address) as ch:
            # an `open` padded with a 100 KB unknown field: larger than any real request
            raw = pb.CaptureRequest(open=pb.OpenCapture(pid=t.pid)).SerializeToString()
            raw += b"\x7a" + _varint(100_000) + b"\0" * 100_000       # field 15, bytes
            call = ch.stream_stream("/corepeek.v1.CoreCaptureService/Capture")(
                iter([raw]), timeout=10)
            with pytest.raises(grpc.RpcError) as rpc:
                list(call)
            assert rpc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            with pytest.raises(grpc.RpcError) as rpc:
                pb_grpc.CoreCaptureServiceStub(ch).ListProcesses(
                    pb.ListProcessesRequest(exe_glob="*" * 100_000), timeout=10)
            assert rpc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert traced_or_stopped(t.pid) == {}
            assert_thawed_and_undisturbed(t)
    finally:
        stop_agent(a)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def test_sessions_per_minute_per_client(tmp_path: Path, build) -> None:
    a = start_agent(tmp_path, "--sessions-per-minute", "3", "--audit-log", str(tmp_path / "audit"))
    try:
        with Target(build("threads")) as t:
            for _ in range(3):
                with open_capture(a.address, t.pid, mode="notes"):
                    pass
            with pytest.raises(CaptureError) as exc:
                open_capture(a.address, t.pid, mode="notes")
            assert exc.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "sessions in the last minute" in str(exc.value)
            assert_thawed_and_undisturbed(t)
        line = wait_audit(tmp_path / "audit", pid=t.pid, code="RESOURCE_EXHAUSTED")
        assert line["identities"] == ["local"] and line["freeze_seconds"] == 0
    finally:
        stop_agent(a)


def test_byte_budget_per_session(tmp_path: Path, build) -> None:
    budget = 256 * 1024
    policy = write_policy(tmp_path / "policy.yaml", {"version": 1, "rules": [
        {"name": "local-small", "clients": ["local"], "modes": ["full"], "budget": budget}]})
    a = start_agent(tmp_path, "--policy", str(policy), "--audit-log", str(tmp_path / "audit"))
    try:
        with Target(build("threads")) as t:
            with open_capture(a.address, t.pid, chunk_bytes=64 * 1024, snapshot=False) as core:
                assert core.size > budget
                # headers and notes fit in the budget ...
                core.read_bytes(0, core.layout.notes.offset + core.layout.notes.length)
                # ... the whole core does not: the stream ends with RESOURCE_EXHAUSTED
                with pytest.raises(CaptureError) as exc:
                    core.read_bytes(0, core.size)
                assert exc.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "budget" in str(exc.value)
            assert_thawed_and_undisturbed(t)
            line = wait_audit(tmp_path / "audit", pid=t.pid)
            assert line["code"] == "RESOURCE_EXHAUSTED" and line["data_bytes"] <= budget
    finally:
        stop_agent(a)
