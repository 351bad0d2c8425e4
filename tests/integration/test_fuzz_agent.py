"""Fuzzing a live agent: random request sequences and raw junk on the wire.

Hypothesis drives one real agent (Unix socket, a policy that allows only the
fuzz target's program) with random Capture streams: random first messages,
pids (the target, unknown, this runner, init, out of range), start times,
options, read offsets and lengths, second opens, empty messages, and streams
half-closed or cancelled at random points.  After every stream the target
must not be stopped or traced; at the end the agent is still healthy, logged
no traceback, and the target carried on undisturbed.  Only these codes may
come back (docs/security.md lists what each means):
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corepeek.v1 import capture_pb2 as pb
from corepeek.v1 import capture_pb2_grpc as pb_grpc
from harness.agents import AgentProcess, start_agent, stop_agent
from harness.checks import assert_thawed_and_undisturbed
from harness.targets import Target

from security_util import audit_lines, wait_clean, write_policy

S = grpc.StatusCode
DOCUMENTED = {S.OK, S.INVALID_ARGUMENT, S.NOT_FOUND, S.FAILED_PRECONDITION, S.PERMISSION_DENIED,
              S.RESOURCE_EXHAUSTED, S.ABORTED, S.DEADLINE_EXCEEDED, S.CANCELLED}

U64 = (1 << 64) - 1
FUZZ_SETTINGS = settings(max_examples=250, deadline=None, database=None,
                         suppress_health_check=[HealthCheck.too_slow,
                                                HealthCheck.function_scoped_fixture])


@dataclass
class Live:
    agent: AgentProcess
    target: Target
    start_time: int
    gone_pid: int
    audit: Path
    streams: int = 0


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, build, require_root: None) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("fuzz")
    exe = build("threads")
    policy = write_policy(tmp / "policy.yaml", {"version": 1, "rules": [
        {"name": "fuzz-target-only", "clients": ["local"], "targets": {"exe": [str(exe)]},
         "modes": ["full"]}]})
    audit = tmp / "audit.jsonl"
    agent = start_agent(tmp, "--policy", str(policy), "--audit-log", str(audit),
                        "--sessions-per-minute", "0", "--max-sessions", "4",
                        "--max-freeze", "10")
    try:
        with Target(exe) as t:
            start = int(Path(f"/proc/{t.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
            gone = subprocess.Popen(["true"])
            gone.wait()
            yield Live(agent, t, start, gone.pid, audit)
            wait_clean(t.pid)
            assert_thawed_and_undisturbed(t)
    finally:
        alive = agent.proc.poll() is None
        stopping = time.monotonic()
        stop_agent(agent)
        stop_seconds = time.monotonic() - stopping
    assert alive, f"the agent died:\n{agent.log()}"
    # SIGTERM ends the agent promptly even after undecodable messages (gRPC never
    # finishes stopping those calls; the agent bounds its wait).
    assert agent.proc.returncode == 0 and stop_seconds < 8, (agent.proc.returncode, stop_seconds)
    # gRPC logs a traceback of its own for a message that does not parse
    # (test_undecodable_messages); any other traceback is a handler that raised.
    log = agent.log()
    for marker in ("Exception iterating responses", "Exception calling application",
                   "corepeek_agent/"):
        assert marker not in log, log[-4000:]


# -- strategies -------------------------------------------------------------------------

PIDS = st.sampled_from(["target"] * 6 + ["gone", "self", 0, -1, 1, -(1 << 31), (1 << 31) - 1,
                                        4_194_304])
START_TIMES = st.one_of(st.just("real"), st.just(0), st.integers(0, U64))
OFFSETS = st.one_of(st.integers(0, 1 << 20), st.integers(0, U64))
LENGTHS = st.one_of(st.integers(0, 1 << 18), st.integers(0, U64))

VALID_OPTIONS = st.builds(
    dict, mode=st.integers(0, 3), freeze_timeout_ms=st.sampled_from([0, 100, 500, 10_000]),
    max_chunk_bytes=st.sampled_from([0, 4096, 65536, 1 << 20, 3 << 20]),
    stack_bytes_per_thread=st.sampled_from([0, 1, 4096, 1 << 20, U64]))
WILD_OPTIONS = st.builds(
    dict,
    mode=st.integers(-(1 << 31), (1 << 31) - 1),
    freeze_timeout_ms=st.integers(0, (1 << 32) - 1),
    max_chunk_bytes=st.sampled_from([1, 4095, (3 << 20) + 1, (1 << 32) - 1]),
    stack_bytes_per_thread=st.integers(0, U64))
OPTIONS = st.sampled_from([VALID_OPTIONS] * 4 + [WILD_OPTIONS]).flatmap(lambda s: s)

OPEN = st.tuples(st.just("open"), PIDS, START_TIMES, OPTIONS)
READ = st.tuples(st.just("read"), OFFSETS, LENGTHS, st.integers(0, U64))
EMPTY = st.tuples(st.just("empty"))
# Weighted choices (st.one_of does not weight repeated branches).
MESSAGES = st.sampled_from([READ] * 6 + [OPEN, EMPTY]).flatmap(lambda s: s)
FIRST = st.sampled_from([OPEN] * 7 + [READ, EMPTY]).flatmap(lambda s: s)
CANCEL = st.sampled_from([None] * 6 + [0, 1, 2, 3])
STREAMS = st.tuples(FIRST, st.lists(MESSAGES, max_size=5), CANCEL)


def _message(live: Live, m: tuple) -> pb.CaptureRequest:
    if m[0] == "empty":
        return pb.CaptureRequest()
    if m[0] == "read":
        return pb.CaptureRequest(read=pb.ReadRange(offset=m[1], length=m[2], request_id=m[3]))
    _, pid, start, opts = m
    pid = {"target": live.target.pid, "gone": live.gone_pid, "self": os.getpid()}.get(pid, pid)
    start = live.start_time if start == "real" else start
    return pb.CaptureRequest(open=pb.OpenCapture(pid=pid, start_time=start,
                                                 options=pb.CaptureOptions(**opts)))


def _run(ch: grpc.Channel, requests: list, cancel_after: int | None) -> grpc.StatusCode:
    call = pb_grpc.CoreCaptureServiceStub(ch).Capture(iter(requests), timeout=30)
    got = 0
    try:
        if cancel_after == 0:
            call.cancel()
        for _ in call:
            got += 1
            if cancel_after is not None and got >= cancel_after:
                call.cancel()
                break
        return call.code()
    except grpc.RpcError as exc:
        return exc.code()


@FUZZ_SETTINGS
@given(stream=STREAMS)
def test_random_request_sequences(live: Live, stream: tuple) -> None:
    first, rest, cancel_after = stream
    requests = [_message(live, first)] + [_message(live, m) for m in rest]
    with grpc.insecure_channel(live.agent.address) as ch:
        code = _run(ch, requests, cancel_after)
    live.streams += 1
    assert code in DOCUMENTED, (code, requests)
    wait_clean(live.target.pid)
    assert live.agent.proc.poll() is None


@FUZZ_SETTINGS
@given(payloads=st.lists(st.binary(max_size=256), min_size=1, max_size=3))
def test_undecodable_messages(live: Live, payloads: list[bytes]) -> None:
    with grpc.insecure_channel(live.agent.address) as ch:
        call = ch.stream_stream("/corepeek.v1.CoreCaptureService/Capture")(iter(payloads),
                                                                           timeout=30)
        try:
            for _ in call:
                pass
            code = call.code()
        except grpc.RpcError as exc:
            code = exc.code()
    # The agent decodes requests itself: junk is INVALID_ARGUMENT, never INTERNAL
    # (the same rule as test_bad_input.py).
    assert code in DOCUMENTED, (code, payloads)
    wait_clean(live.target.pid)


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.binary(max_size=512), preface=st.booleans())
def test_junk_on_the_socket(live: Live, junk: bytes, preface: bool) -> None:
    path = live.agent.address[len("unix:"):]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        s.connect(path)
        try:
            s.sendall((H2_PREFACE if preface else b"") + junk)
            s.shutdown(socket.SHUT_WR)
            while s.recv(4096):
                pass
        except (OSError, socket.timeout):
            pass
    with grpc.insecure_channel(live.agent.address) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_audit_saw_the_streams(live: Live) -> None:
    """Runs after the fuzzers (file order): each stream that reached the agent is audited."""
    def refusals() -> int:
        return sum(d.get("pid") == os.getpid() and d["code"] == "PERMISSION_DENIED"
                   for d in audit_lines(live.audit))

    before = refusals()
    with grpc.insecure_channel(live.agent.address) as ch:    # one certain refusal
        assert _run(ch, [pb.CaptureRequest(open=pb.OpenCapture(pid=os.getpid()))], None) == \
            S.PERMISSION_DENIED
    # Readiness instead of a sleep: wait until that refusal is audited.
    deadline = time.monotonic() + 5
    while refusals() <= before:
        assert time.monotonic() < deadline, "the refusal was never audited"
        time.sleep(0.02)
    lines = audit_lines(live.audit)
    captures = [d for d in lines if d["kind"] == "capture"]
    assert live.streams and len(captures) >= live.streams // 2, (len(captures), live.streams)
    assert all(d["code"] in {c.name for c in DOCUMENTED} for d in captures)
    refused_at_open = [d for d in captures if d["outcome"] == "refused" and not d["requests"]]
    assert refused_at_open and all(d["data_bytes"] == 0 and d["freeze_seconds"] == 0
                                   for d in refused_at_open)
