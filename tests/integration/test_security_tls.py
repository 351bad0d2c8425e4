"""Mutual TLS and the policy over TCP: only a certificate the policy names gets anything.

A real agent listens on 127.0.0.1 with certificates made by ``security_pki``;
real targets run; every refusal is checked on the wire (handshake failure or
PERMISSION_DENIED), on the target (never stopped or traced) and in the audit
log (refused sessions have a line).
"""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import subprocess
import sys
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
from harness.checks import assert_thawed_and_undisturbed
from harness.targets import Target

from security_pki import ONCALL, PKI, READER_DNS, make_pki
from security_util import (assert_untouched, audit_lines, credentials, tls_channel,
                           tls_options, traced_or_stopped, wait_audit, write_policy)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


class TLSAgent:
    def __init__(self, agent: AgentProcess, address: str, audit: Path, policy: Path) -> None:
        self.agent, self.address, self.audit, self.policy = agent, address, audit, policy


def _start_tls_agent(tmp: Path, pki: PKI, policy: dict, *extra: str,
                     cert: Path | None = None, key: Path | None = None,
                     ca: Path | None = None) -> TLSAgent:
    audit = tmp / "audit.jsonl"
    policy_path = write_policy(tmp / "policy.yaml", policy)
    agent = start_agent(tmp, "--tls-cert", str(cert or pki.server.cert),
                        "--tls-key", str(key or pki.server.key), "--tls-ca", str(ca or pki.ca.path),
                        "--policy", str(policy_path), "--audit-log", str(audit), *extra,
                        listen="127.0.0.1:0", credentials=credentials(pki, pki.stranger))
    return TLSAgent(agent, agent.address, audit, policy_path)


def _policy(threads_exe: Path) -> dict:
    return {"version": 1, "rules": [
        {"name": "oncall-threads", "clients": [ONCALL],
         "targets": {"exe": [str(threads_exe)]}, "modes": ["full"]},
        {"name": "reader-notes", "clients": [f"dns:{READER_DNS}"],
         "targets": {"exe": [str(threads_exe)]}, "modes": ["notes"]},
    ]}


@pytest.fixture(scope="module")
def tls_agent(tmp_path_factory: pytest.TempPathFactory, pki: PKI, build,
              require_root: None) -> Iterator[TLSAgent]:
    a = _start_tls_agent(tmp_path_factory.mktemp("tls-agent"), pki, _policy(build("threads")))
    yield a
    stop_agent(a.agent)


def _refused_capture(a: TLSAgent, pki: PKI, pair, pid: int, mode: str = "full") -> CaptureError:
    with pytest.raises(CaptureError) as exc:
        open_capture(a.address, pid, tls=tls_options(pki, pair), mode=mode, snapshot=False)
    return exc.value


# -- the transport -------------------------------------------------------------------------

@pytest.mark.parametrize("who", ["no-certificate", "unknown-ca", "expired"])
def test_bad_client_certificates_fail_the_handshake(tls_agent: TLSAgent, pki: PKI, build,
                                                    who: str) -> None:
    pair = {"no-certificate": None, "unknown-ca": pki.foreign, "expired": pki.expired}[who]
    with Target(build("threads")) as t:
        # WHEN a client with no / a foreign / an expired certificate (all carrying the
        # privileged identity where they have one) asks for a capture and a listing
        err = _refused_capture(tls_agent, pki, pair, t.pid)
        # THEN the TLS handshake fails before any handler runs: nothing is served
        assert err.code == grpc.StatusCode.UNAVAILABLE, err
        with tls_channel(tls_agent.address, pki, pair) as ch:
            with pytest.raises(grpc.RpcError) as rpc:
                pb_grpc.CoreCaptureServiceStub(ch).ListProcesses(pb.ListProcessesRequest(),
                                                                 timeout=5)
            assert rpc.value.code() == grpc.StatusCode.UNAVAILABLE
        assert_untouched(t)
    # AND no session reached the handler
    assert not [d for d in _lines(tls_agent) if d.get("pid") == t.pid]


def _lines(a: TLSAgent) -> list[dict]:
    return audit_lines(a.audit)


def test_plaintext_client_and_junk_get_nothing(tls_agent: TLSAgent, pki: PKI) -> None:
    with grpc.insecure_channel(tls_agent.address) as ch:
        with pytest.raises(grpc.RpcError) as rpc:
            pb_grpc.CoreCaptureServiceStub(ch).ListProcesses(pb.ListProcessesRequest(), timeout=5)
        assert rpc.value.code() == grpc.StatusCode.UNAVAILABLE
    for junk in (b"\x00" * 64, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                 b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(range(256)),
                 b"\x16\x03\x01\x02\x00" + b"\xff" * 512):
        with socket.create_connection(("127.0.0.1", int(tls_agent.address.rsplit(":", 1)[1])),
                                      timeout=5) as s:
            s.sendall(junk)
            s.settimeout(5)
            try:
                while s.recv(4096):
                    pass
            except (ConnectionResetError, TimeoutError, socket.timeout):
                pass
    assert tls_agent.agent.proc.poll() is None
    # the agent still serves a good client
    with tls_channel(tls_agent.address, pki, pki.oncall) as ch:
        pb_grpc.CoreCaptureServiceStub(ch).ListProcesses(pb.ListProcessesRequest(pid=1), timeout=5)


# -- identities and the policy ----------------------------------------------------------------

@pytest.mark.parametrize("who", ["stranger", "cn-only"])
def test_identities_the_policy_does_not_name_are_denied(tls_agent: TLSAgent, pki: PKI, build,
                                                        who: str) -> None:
    pair = {"stranger": pki.stranger, "cn-only": pki.cn_only}[who]
    with Target(build("threads")) as t:
        # WHEN a valid certificate the policy does not name asks (cn-only's CN is the
        # privileged SPIFFE id, which must not count)
        err = _refused_capture(tls_agent, pki, pair, t.pid)
        # THEN PERMISSION_DENIED, the target never frozen, and the refusal audited,
        # at stream start: before the request (and so the pid) was read
        assert err.code == grpc.StatusCode.PERMISSION_DENIED, err
        assert_untouched(t)
        ids = [] if who == "cn-only" else ["uri:spiffe://corepeek.test/stranger"]
        line = wait_audit(tls_agent.audit, kind="capture", identities=ids, outcome="refused")
        assert line["code"] == "PERMISSION_DENIED" and line["data_bytes"] == 0
        assert line["pid"] == 0 and line["requests"] == 0
        assert line["method"] == "/corepeek.v1.CoreCaptureService/Capture"
        with tls_channel(tls_agent.address, pki, pair) as ch:
            with pytest.raises(grpc.RpcError) as rpc:
                pb_grpc.CoreCaptureServiceStub(ch).ListProcesses(pb.ListProcessesRequest(),
                                                                 timeout=5)
            assert rpc.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_oncall_takes_a_full_core_and_it_is_audited(tls_agent: TLSAgent, pki: PKI,
                                                    build) -> None:
    with Target(build("threads")) as t:
        with open_capture(tls_agent.address, t.pid, tls=tls_options(pki, pki.oncall),
                          snapshot=False) as core:
            assert set(t.thread_states().values()) == {"t"}
            data = core.read_bytes(0, core.size)
            assert data[:4] == b"\x7fELF" and len(data) == core.size
            sid = core.layout.session_id
        assert_thawed_and_undisturbed(t)
        line = wait_audit(tls_agent.audit, session=sid)
        assert line["outcome"] == "ok" and line["code"] == "OK"
        assert line["identities"] == [f"uri:{ONCALL}"] and line["rule"] == "oncall-threads"
        assert line["target"]["exe"] == str(build("threads")) and line["target"]["uids"][0] == 0
        assert line["ranges"] == [[0, core.size]] and line["requests"] == 1
        assert line["data_bytes"] + line["hole_bytes"] == core.size
        assert line["peer"].startswith("ipv4:127.0.0.1:") and line["freeze_seconds"] > 0
        assert "ELF" not in tls_agent.audit.read_text()   # never memory contents


def test_other_targets_are_denied_even_to_oncall(tls_agent: TLSAgent, pki: PKI) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        err = _refused_capture(tls_agent, pki, pki.oncall, sleeper.pid)
        assert err.code == grpc.StatusCode.PERMISSION_DENIED and "no rule" in str(err)
        assert traced_or_stopped(sleeper.pid) == {}
    finally:
        sleeper.kill()
        sleeper.wait()


def test_reader_may_take_notes_but_not_memory(tls_agent: TLSAgent, pki: PKI, build) -> None:
    with Target(build("threads")) as t:
        err = _refused_capture(tls_agent, pki, pki.reader, t.pid, mode="full")
        assert err.code == grpc.StatusCode.PERMISSION_DENIED and "mode full" in str(err)
        assert_untouched(t)
        with open_capture(tls_agent.address, t.pid, tls=tls_options(pki, pki.reader),
                          mode="notes") as core:
            notes = core.read_bytes(core.layout.notes.offset, core.layout.notes.length)
            assert len(notes) == core.layout.notes.length
        assert_thawed_and_undisturbed(t)
        line = wait_audit(tls_agent.audit, pid=t.pid, mode="notes")
        assert line["identities"] == [f"dns:{READER_DNS}"] and line["outcome"] == "ok"


def test_listing_shows_only_capturable_processes(tls_agent: TLSAgent, pki: PKI, build) -> None:
    with Target(build("threads")) as t:
        with tls_channel(tls_agent.address, pki, pki.oncall) as ch:
            resp = pb_grpc.CoreCaptureServiceStub(ch).ListProcesses(pb.ListProcessesRequest(),
                                                                    timeout=10)
        pids = {p.pid for p in resp.processes}
        assert t.pid in pids
        assert tls_agent.agent.proc.pid not in pids and 1 not in pids
        assert {p.exe for p in resp.processes} == {str(build("threads"))}
    line = wait_audit(tls_agent.audit, kind="list", identities=[f"uri:{ONCALL}"])
    assert line["listed"] == len(resp.processes)


# -- refusing to start insecurely ---------------------------------------------------------------

def test_agent_refuses_plaintext_tcp_off_loopback(tmp_path: Path, require_root: None) -> None:
    res = subprocess.run([sys.executable, "-m", "corepeek", "agent", "--listen",
                          "0.0.0.0:0", "--insecure"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode != 0 and "without TLS" in res.stderr
    res = subprocess.run([sys.executable, "-m", "corepeek", "agent", "--listen",
                          "127.0.0.1:0"], capture_output=True, text=True, timeout=30)
    assert res.returncode != 0 and "without TLS" in res.stderr


# -- rotation and reload ------------------------------------------------------------------------

def _server_cert_der(address: str, pki: PKI) -> bytes:
    ctx = ssl.create_default_context(cafile=str(pki.ca.path))
    ctx.load_cert_chain(pki.oncall.cert, pki.oncall.key)
    ctx.set_alpn_protocols(["h2"])
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as s:
            der = s.getpeercert(binary_form=True)
            assert der is not None
            return der


def test_certificates_rotate_without_a_restart(tmp_path: Path, pki: PKI, build,
                                               require_root: None) -> None:
    # GIVEN an agent whose certificate files live in a directory we can rewrite
    live = tmp_path / "live"
    live.mkdir()
    for name, src in (("agent.crt", pki.server.cert), ("agent.key", pki.server.key),
                      ("ca.pem", pki.ca.path)):
        shutil.copy(src, live / name)
    a = _start_tls_agent(tmp_path, pki, _policy(build("threads")), cert=live / "agent.crt",
                         key=live / "agent.key", ca=live / "ca.pem")
    try:
        with Target(build("threads")) as t:
            assert _server_cert_der(a.address, pki) == ssl.PEM_cert_to_DER_cert(
                pki.server.cert.read_text())
            # the foreign CA's client is refused at first
            assert _refused_capture(a, pki, pki.foreign, t.pid).code == grpc.StatusCode.UNAVAILABLE
            # WHEN a new server certificate is installed and the client CA bundle gains
            # the other CA (rename into place, as a deployment tool does)
            new = pki.ca.issue("server-rotated", ips=("127.0.0.1",), server=True)
            shutil.copy(new.key, live / "agent.key.new")
            shutil.copy(new.cert, live / "agent.crt.new")
            (live / "ca.pem.new").write_bytes(pki.ca.path.read_bytes()
                                              + pki.other_ca.path.read_bytes())
            for name in ("agent.key", "agent.crt", "ca.pem"):
                (live / f"{name}.new").rename(live / name)
            # THEN the next handshakes use them, with the same agent process
            deadline = time.monotonic() + 5
            want = ssl.PEM_cert_to_DER_cert(new.cert.read_text())
            while _server_cert_der(a.address, pki) != want:
                assert time.monotonic() < deadline, "the agent kept the old certificate"
                time.sleep(0.1)
            with open_capture(a.address, t.pid, tls=tls_options(pki, pki.foreign),
                              mode="notes") as core:
                assert core.layout.pid == t.pid
            assert_thawed_and_undisturbed(t)
            # AND a broken rotation (a key that does not match) is refused, the agent
            # keeps serving with the last good pair
            shutil.copy(pki.oncall.key, live / "agent.key")
            assert _server_cert_der(a.address, pki) == want
            assert "TLS reload skipped" in a.agent.log()
        assert a.agent.proc.poll() is None
    finally:
        stop_agent(a.agent)


def test_sighup_reloads_the_policy(tmp_path: Path, pki: PKI, build, require_root: None) -> None:
    a = _start_tls_agent(tmp_path, pki, _policy(build("threads")))
    try:
        with Target(build("threads")) as t:
            assert _refused_capture(a, pki, pki.stranger, t.pid).code == \
                grpc.StatusCode.PERMISSION_DENIED
            # a broken policy is refused on reload: the old one stays
            a.policy.write_text("rules: [")
            a.agent.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 5
            while "policy reload failed" not in a.agent.log():   # readiness, not a sleep
                assert time.monotonic() < deadline, a.agent.log()[-2000:]
                time.sleep(0.02)
            assert _refused_capture(a, pki, pki.stranger, t.pid).code == \
                grpc.StatusCode.PERMISSION_DENIED
            doc = _policy(build("threads"))
            doc["rules"].append({"name": "stranger-notes",
                                 "clients": ["spiffe://corepeek.test/stranger"],
                                 "modes": ["notes"]})
            write_policy(a.policy, doc)
            a.agent.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 5
            while "policy reloaded" not in a.agent.log():
                assert time.monotonic() < deadline
                time.sleep(0.05)
            with open_capture(a.address, t.pid, tls=tls_options(pki, pki.stranger),
                              mode="notes") as core:
                assert core.layout.pid == t.pid
            assert_thawed_and_undisturbed(t)
    finally:
        stop_agent(a.agent)


# -- the command line over TLS -----------------------------------------------------------------

def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os
    return subprocess.run([sys.executable, "-m", "corepeek", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


def test_cli_ps_and_dump_over_tls(tls_agent: TLSAgent, pki: PKI, build,
                                  tmp_path: Path) -> None:
    flags = ["--tls-ca", str(pki.ca.path), "--tls-cert", str(pki.oncall.cert),
             "--tls-key", str(pki.oncall.key)]
    with Target(build("threads")) as t:
        ps = _cli("ps", "--agent", tls_agent.address, "--json", *flags)
        assert ps.returncode == 0, ps.stderr
        assert str(t.pid) in ps.stdout
        out = tmp_path / "core"
        dump = _cli("-q", "dump", "--agent", tls_agent.address, str(t.pid), "-o", str(out), *flags)
        assert dump.returncode == 0, dump.stderr
        assert out.read_bytes()[:4] == b"\x7fELF"
        # the same through the environment, with the server name given explicitly
        env = {"COREPEEK_TLS_CA": str(pki.ca.path), "COREPEEK_TLS_CERT": str(pki.oncall.cert),
               "COREPEEK_TLS_KEY": str(pki.oncall.key), "COREPEEK_TLS_SERVER_NAME": "localhost"}
        notes = _cli("notes", "--agent", tls_agent.address, str(t.pid), "--json", env=env)
        assert notes.returncode == 0, notes.stderr
        # a server name the agent's certificate does not carry fails verification
        bad = _cli("notes", "--agent", tls_agent.address, str(t.pid),
                   "--tls-server-name", "wrong.example", *flags)
        assert bad.returncode == 1 and "UNAVAILABLE" in bad.stderr
        # no TLS flags for a TCP agent: the stranger gets nothing, the plaintext try fails
        plain = _cli("ps", "--agent", tls_agent.address)
        assert plain.returncode == 1
        assert_thawed_and_undisturbed(t)
