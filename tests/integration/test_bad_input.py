"""Bad input gets a precise gRPC status, never a hang or a frozen target."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from typing import TypeVar

import grpc
import pytest

from corepeek.errors import CaptureError
from corepeek.remote import open_capture
from corepeek.v1 import capture_pb2 as pb
from corepeek.v1 import capture_pb2_grpc as pb_grpc
from harness.checks import assert_thawed_and_undisturbed
from harness.targets import Target

T = TypeVar("T")


def _drain(call: Iterator[T]) -> tuple[list[T], grpc.RpcError | None]:
    """Every response of a streaming call, and the error that ended it (if any)."""
    got: list[T] = []
    try:
        for r in call:
            got.append(r)
    except grpc.RpcError as exc:
        return got, exc
    return got, None


def _stream(address: str, *requests: pb.CaptureRequest) -> tuple[list[pb.CaptureResponse], grpc.RpcError | None]:
    with grpc.insecure_channel(address) as ch:
        return _drain(pb_grpc.CoreCaptureServiceStub(ch).Capture(iter(requests), timeout=20))


def _free_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            open(f"/proc/{pid}/stat").close()
            pid -= 1
        except FileNotFoundError:
            return pid


def test_unknown_pid_is_not_found(agent) -> None:
    with pytest.raises(CaptureError) as exc:
        open_capture(agent.address, _free_pid())
    assert exc.value.code == grpc.StatusCode.NOT_FOUND


def test_read_before_open_is_invalid_argument(agent) -> None:
    _, err = _stream(agent.address, pb.CaptureRequest(read=pb.ReadRange(offset=0, length=10)))
    assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_second_open_is_invalid_argument_and_thaws(agent, build, require_root) -> None:
    with Target(build("threads")) as t:
        open_req = pb.CaptureRequest(open=pb.OpenCapture(pid=t.pid))
        got, err = _stream(agent.address, open_req, open_req)
        assert got and got[0].WhichOneof("response") == "layout"
        assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert_thawed_and_undisturbed(t)


def test_zero_length_and_huge_reads_are_invalid(agent, build, require_root) -> None:
    with Target(build("threads")) as t:
        for rng in (pb.ReadRange(offset=0, length=0), pb.ReadRange(offset=0, length=1 << 60),
                    pb.ReadRange(offset=1 << 63, length=1)):
            _, err = _stream(agent.address, pb.CaptureRequest(open=pb.OpenCapture(pid=t.pid)),
                             pb.CaptureRequest(read=rng))
            assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT, rng
        assert_thawed_and_undisturbed(t)


def test_changed_start_time_is_failed_precondition(agent, build, require_root) -> None:
    with Target(build("threads")) as t:
        start = int(open(f"/proc/{t.pid}/stat").read().rsplit(")", 1)[1].split()[19])
        with pytest.raises(CaptureError) as exc:
            open_capture(agent.address, t.pid, start_time=start + 1)
        assert exc.value.code == grpc.StatusCode.FAILED_PRECONDITION
        with open_capture(agent.address, t.pid, start_time=start) as core:
            assert core.layout.start_time == start
        assert_thawed_and_undisturbed(t)


def test_target_traced_by_another_debugger_is_failed_precondition(agent, build, require_root) -> None:
    with Target(build("threads")) as t:
        gdb = subprocess.Popen(["gdb", "-q", "-nx", "-p", str(t.pid)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            for _ in range(200):
                if t.tracer_pid():
                    break
                time.sleep(0.05)
            assert t.tracer_pid() == gdb.pid
            with pytest.raises(CaptureError) as exc:
                open_capture(agent.address, t.pid)
            assert exc.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert f"already traced by pid {gdb.pid} (gdb)" in str(exc.value)
            assert t.tracer_pid() == gdb.pid        # gdb's session is untouched
        finally:
            try:
                gdb.communicate("detach\nquit\n", timeout=30)
            except subprocess.TimeoutExpired:
                gdb.kill()              # never leave gdb (and its tracee) behind
                gdb.communicate()
                raise
        t.wait_state("SR")
        assert_thawed_and_undisturbed(t)


def test_second_capture_of_the_same_pid_joins_or_waits(agent, build, require_root) -> None:
    """Joining is the default; a client that wants its own freeze gets ABORTED
    after its wait (more in test_shared_capture.py)."""
    with Target(build("threads")) as t:
        with open_capture(agent.address, t.pid) as first:
            with open_capture(agent.address, t.pid) as second:
                assert second.layout.joined
                assert second.layout.freeze_id == first.layout.session_id
            with pytest.raises(CaptureError) as exc:
                open_capture(agent.address, t.pid, wait_exclusive=0.2)
            assert exc.value.code == grpc.StatusCode.ABORTED
        assert_thawed_and_undisturbed(t)


def _raw_capture(address: str, *frames: bytes) -> tuple[list[bytes], grpc.RpcError | None]:
    """Capture with hand-made request bytes (no protobuf on this side)."""
    with grpc.insecure_channel(address) as ch:
        return _drain(ch.stream_stream("/corepeek.v1.CoreCaptureService/Capture",
                                       request_serializer=None, response_deserializer=None)(
            iter(frames), timeout=20))


def test_undecodable_requests_are_invalid_argument_not_internal(agent, build,
                                                               require_root) -> None:
    garbage = b"\x0a\xff\xff\xff\xff\xff"        # field 1, length-delimited, length too large
    _, err = _raw_capture(agent.address, garbage)
    assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert "undecodable CaptureRequest" in (err.details() or "")
    with grpc.insecure_channel(agent.address) as ch:
        lister = ch.unary_unary("/corepeek.v1.CoreCaptureService/ListProcesses",
                                request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as exc:
            lister(garbage, timeout=20)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Garbage after a good `open`: the session is refused mid-stream and thawed.
    with Target(build("threads")) as t:
        good = pb.CaptureRequest(open=pb.OpenCapture(pid=t.pid)).SerializeToString()
        got, err = _raw_capture(agent.address, good, garbage)
        assert len(got) == 1 and pb.CaptureResponse.FromString(got[0]).HasField("layout")
        assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
        assert_thawed_and_undisturbed(t)
