"""Issue 19, findings 1 and 2: a certificate-holding client cannot starve the agent,
and no session lives for ever.

Real agents over mutual TLS (``security_pki``) or a Unix socket, real targets,
real idle streams: a client no rule names is refused before any request is read;
each identity holds at most ``--max-streams-per-client`` streams; a stream
without an ``open`` ends after ``--first-request-timeout``; an idle session
after ``--idle-timeout``, any session after ``--max-session-lifetime``; health
checks and listings keep answering throughout.  Every refusal has an audit line
and moves ``corepeek_refusals_total``.
"""

from __future__ import annotations

import statistics
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from corepeek.errors import CaptureError
from corepeek.remote import open_capture
from corepeek.v1 import capture_pb2 as pb
from corepeek.v1 import capture_pb2_grpc as pb_grpc
from harness.agents import AgentProcess, start_agent, stop_agent
from harness.checks import assert_thawed_and_undisturbed
from harness.targets import Target

from security_pki import ONCALL, PKI, READER_DNS, KeyPair, make_pki
from security_util import (assert_untouched, audit_lines, credentials, tls_channel,
                           tls_options, wait_audit, wait_clean, write_policy)

pytestmark = pytest.mark.usefixtures("require_root")

CAPTURE = "/corepeek.v1.CoreCaptureService/Capture"
STRANGER = "uri:spiffe://corepeek.test/stranger"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


class TLSAgent:
    def __init__(self, agent: AgentProcess, address: str, audit: Path, metrics: int) -> None:
        self.agent, self.address, self.audit, self.metrics = agent, address, audit, metrics

    def metric(self, name: str, **labels: str) -> float:
        """A sample of the agent's Prometheus metrics (0 when absent)."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics",
                                      timeout=5).read().decode()
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            head, _, value = line.rpartition(" ")
            if head.startswith(name + "{") and all(f'{k}="{v}"' in head
                                                   for k, v in labels.items()):
                return float(value)
            if head == name and not want:
                return float(value)
        return 0.0


def start_tls_agent(tmp: Path, pki: PKI, exe: Path, *extra: str,
                    limits: dict | None = None) -> TLSAgent:
    audit = tmp / "audit.jsonl"
    doc: dict = {"version": 1, "rules": [
        {"name": "oncall", "clients": [ONCALL], "targets": {"exe": [str(exe)]},
         "modes": ["full"]},
        {"name": "reader", "clients": [f"dns:{READER_DNS}"], "targets": {"exe": [str(exe)]},
         "modes": ["notes"]}]}
    if limits:
        doc["limits"] = limits
    policy = write_policy(tmp / "policy.yaml", doc)
    agent = start_agent(tmp, "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
                        "--tls-ca", str(pki.ca.path), "--policy", str(policy),
                        "--audit-log", str(audit), "--metrics-address", "127.0.0.1:0",
                        *extra, listen="127.0.0.1:0",
                        credentials=credentials(pki, pki.stranger))
    # Port 0: the agent binds free ports itself and logs them (no probe-and-release race).
    return TLSAgent(agent, agent.address, audit, int(agent.bound["metrics"].rsplit(":", 1)[1]))


class IdleStreams:
    """``n`` Capture streams of one identity that never send a request."""

    def __init__(self, address: str, pki: PKI, pair: KeyPair, n: int, channels: int = 4) -> None:
        self._stop = threading.Event()
        self._stack = ExitStack()
        chans = [self._stack.enter_context(tls_channel(address, pki, pair))
                 for _ in range(channels)]
        self.calls = [pb_grpc.CoreCaptureServiceStub(chans[i % channels]).Capture(
            self._requests(), timeout=60) for i in range(n)]

    def _requests(self) -> Iterator[pb.CaptureRequest]:
        self._stop.wait()
        return
        yield  # noqa: unreachable - a generator that sends nothing until closed

    def codes(self, timeout: float = 10.0) -> list[grpc.StatusCode | None]:
        """The status of every stream that ended within ``timeout`` (None: still open)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not all(c.done() for c in self.calls):
            time.sleep(0.05)
        return [c.code() if c.done() else None for c in self.calls]

    def close(self) -> None:
        self._stop.set()
        for c in self.calls:
            c.cancel()
        self._stack.close()


def list_seconds(address: str, pki: PKI, pair: KeyPair, rounds: int = 5) -> list[float]:
    """Wall time of ``rounds`` ListProcesses calls (each with a fresh connection)
    and a health check on each."""
    out = []
    for _ in range(rounds):
        t0 = time.monotonic()
        try:
            with tls_channel(address, pki, pair) as ch:
                health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
                pb_grpc.CoreCaptureServiceStub(ch).ListProcesses(pb.ListProcessesRequest(),
                                                                 timeout=5)
        except grpc.RpcError as exc:
            print(f"\nListProcesses/health failed: {exc.code()}")     # noqa: T201
            out.append(float("inf"))
            continue
        out.append(time.monotonic() - t0)
    return out


def test_unnamed_streams_cannot_starve_a_named_client(tmp_path: Path, pki: PKI, build) -> None:
    """Finding 1: 48 idle streams of an identity no rule names."""
    a = start_tls_agent(tmp_path, pki, build("threads"))
    try:
        with Target(build("threads")) as t:
            quiet = list_seconds(a.address, pki, pki.oncall)
            # WHEN a certificate no rule names opens 48 Capture streams and sends nothing
            idle = IdleStreams(a.address, pki, pki.stranger, 48)
            try:
                time.sleep(0.5)
                # THEN a named client's listing and health check answer as before
                busy = list_seconds(a.address, pki, pki.oncall)
                print(f"\nnamed ListProcesses+health, seconds: without idle streams "
                      f"{statistics.median(quiet):.3f} (max {max(quiet):.3f}), with 48 idle "
                      f"unnamed streams {statistics.median(busy):.3f} (max {max(busy):.3f})")
                assert max(busy) < 1.0 and max(quiet) < 1.0, (quiet, busy)
                # AND each idle stream was refused at once, before any request was read
                codes = idle.codes()
                assert codes == [grpc.StatusCode.PERMISSION_DENIED] * 48, codes
                with open_capture(a.address, t.pid, tls=tls_options(pki, pki.oncall)) as core:
                    assert core.read_bytes(0, 4) == b"\x7fELF"
            finally:
                idle.close()
            assert_thawed_and_undisturbed(t)
        # AND every refusal is audited and counted
        refused = [d for d in audit_lines(a.audit)
                   if d["identities"] == [STRANGER] and d["outcome"] == "refused"]
        assert len(refused) == 48
        assert {(d["kind"], d["code"], d["pid"], d["method"]) for d in refused} == {
            ("capture", "PERMISSION_DENIED", 0, CAPTURE)}
        assert a.metric("corepeek_refusals_total", rpc="capture",
                        code="PERMISSION_DENIED") == 48
    finally:
        stop_agent(a.agent)


def test_one_identity_holds_only_its_streams_and_health_keeps_answering(
        tmp_path: Path, pki: PKI, build) -> None:
    """A named identity's idle streams are capped; the held ones end at the first-request
    deadline; health, listings and the other identity's captures answer meanwhile."""
    a = start_tls_agent(tmp_path, pki, build("threads"), "--max-sessions", "2",
                        "--max-streams-per-client", "3", "--first-request-timeout", "2")
    try:
        with Target(build("threads")) as t1, Target(build("threads")) as t2, \
                Target(build("threads")) as t3:
            oncall = tls_options(pki, pki.oncall)
            list_seconds(a.address, pki, pki.reader, rounds=1)     # warm up the listing path
            # GIVEN both capture slots hold a frozen target (--max-sessions 2) ...
            with open_capture(a.address, t1.pid, tls=oncall, mode="stacks"), \
                    open_capture(a.address, t2.pid, tls=oncall, mode="stacks"):
                # WHEN oncall opens 10 more streams and sends nothing
                idle = IdleStreams(a.address, pki, pki.oncall, 10)
                opened = time.monotonic()
                try:
                    time.sleep(0.5)
                    early = [c.code() if c.done() else None for c in idle.calls]
                    # THEN it holds one more (3 per identity), the rest are refused at once
                    assert early.count(None) == 1, early
                    assert early.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 9, early
                    # AND a health check and another identity's listing answer in time
                    busy = list_seconds(a.address, pki, pki.reader, rounds=3)
                    assert max(busy) < 1.0, busy
                    # AND the other identity gets a clear RESOURCE_EXHAUSTED for a capture
                    with pytest.raises(CaptureError) as exc:
                        open_capture(a.address, t3.pid, tls=tls_options(pki, pki.reader),
                                     mode="notes")
                    assert exc.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                    # AND the held stream ends at the first-request deadline
                    codes = idle.codes(timeout=6)
                    ended = time.monotonic() - opened
                    assert None not in codes and 1.8 < ended < 5, (codes, ended)
                finally:
                    idle.close()
            for t in (t1, t2):
                wait_clean(t.pid)
                assert_thawed_and_undisturbed(t)
            assert_untouched(t3)
        lines = audit_lines(a.audit)
        late = [d for d in lines if d["code"] == "DEADLINE_EXCEEDED"]
        assert len(late) == 1 and late[0]["outcome"] == "refused", late
        assert "no `open` request within 2 s" in late[0]["details"]
        capped = [d for d in lines if d["identities"] == [f"uri:{ONCALL}"]
                  and d["code"] == "RESOURCE_EXHAUSTED"]
        assert len(capped) == 9 and "limit 3 per client" in capped[0]["details"]
        assert a.metric("corepeek_refusals_total", rpc="capture",
                        code="RESOURCE_EXHAUSTED") >= 10
    finally:
        stop_agent(a.agent)


def test_listings_are_rate_limited_per_identity(tmp_path: Path, pki: PKI, build) -> None:
    a = start_tls_agent(tmp_path, pki, build("threads"), limits={"sessions_per_minute": 3})
    try:
        with tls_channel(a.address, pki, pki.reader) as ch:
            stub = pb_grpc.CoreCaptureServiceStub(ch)
            for _ in range(3):
                stub.ListProcesses(pb.ListProcessesRequest(), timeout=5)
            with pytest.raises(grpc.RpcError) as rpc:
                stub.ListProcesses(pb.ListProcessesRequest(), timeout=5)
            assert rpc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "listings in the last minute" in rpc.value.details()
        # another identity has its own allowance
        with tls_channel(a.address, pki, pki.oncall) as ch:
            pb_grpc.CoreCaptureServiceStub(ch).ListProcesses(pb.ListProcessesRequest(),
                                                             timeout=5)
        line = wait_audit(a.audit, kind="list", code="RESOURCE_EXHAUSTED")
        assert line["outcome"] == "refused" and line["identities"] == [f"dns:{READER_DNS}"]
        assert a.metric("corepeek_refusals_total", rpc="list", code="RESOURCE_EXHAUSTED") == 1
    finally:
        stop_agent(a.agent)


# -- lifetimes (Unix socket) -------------------------------------------------------------

def test_idle_notes_streams_do_not_block_captures(tmp_path: Path, build) -> None:
    """Finding 2: 16 idle notes streams (--max-sessions 16) once made every capture
    fail; now a notes session gives back its pid and slot once thawed, and the
    idle timeout ends the stream."""
    audit = tmp_path / "audit.jsonl"
    a = start_agent(tmp_path, "--idle-timeout", "3", "--audit-log", str(audit))
    try:
        with ExitStack() as stack:
            targets = [stack.enter_context(Target(build("threads"))) for _ in range(17)]
            # GIVEN 16 notes sessions whose clients went idle after the layout
            notes = [stack.enter_context(open_capture(a.address, t.pid, mode="notes"))
                     for t in targets[:16]]
            opened = time.monotonic()
            # WHEN a full capture of another process and a second look at one of them ask
            with open_capture(a.address, targets[16].pid) as core:
                # THEN both are served at once
                assert core.read_bytes(0, core.size)[:4] == b"\x7fELF"
            with open_capture(a.address, targets[0].pid, mode="notes") as again:
                assert again.layout.pid == targets[0].pid
            # AND the idle notes streams are ended by the agent after --idle-timeout
            time.sleep(max(0.0, opened + 4.5 - time.monotonic()))
            for core in notes:
                with pytest.raises(CaptureError):
                    core.read_bytes(0, 64)
            for t in targets:
                assert_thawed_and_undisturbed(t)
        idle = [d for d in audit_lines(audit) if "--idle-timeout" in d.get("details", "")]
        assert len(idle) >= 16 and {d["outcome"] for d in idle} == {"expired"}
    finally:
        stop_agent(a)


def test_every_session_has_a_maximum_lifetime(tmp_path: Path, build) -> None:
    audit = tmp_path / "audit.jsonl"
    a = start_agent(tmp_path, "--max-session-lifetime", "2", "--audit-log", str(audit))
    try:
        with Target(build("threads")) as t:
            for mode in ("notes", "stacks"):
                with open_capture(a.address, t.pid, mode=mode) as core:
                    opened = time.monotonic()
                    # WHEN a busy client keeps reading past the lifetime
                    with pytest.raises(CaptureError):
                        while time.monotonic() - opened < 8:
                            core.read_bytes(0, 64)
                            time.sleep(0.2)
                    # THEN the agent ended the session on time
                    assert 1.8 < time.monotonic() - opened < 4
                wait_clean(t.pid)
                line = wait_audit(audit, mode=mode, outcome="expired")
                assert "maximum session lifetime of 2 s" in line["details"]
            assert_thawed_and_undisturbed(t)
    finally:
        stop_agent(a)
