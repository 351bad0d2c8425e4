"""Identity from the TLS auth context, pidfd facts, rate limits, budgets, audit ranges,
and TLS file loading: the pieces of the agent's security that need no agent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from corepeek_agent import authz
from corepeek_agent.audit import AuditLog, RangeSet, SessionRecord
from corepeek_agent.errors import AgentItself, PermissionDenied, ProcessGone, ResourceExhausted
from corepeek_agent.policy import local_default_policy, policy_from_dict
from corepeek_agent.ratelimit import ByteBudget, SessionRateLimiter
from corepeek_agent.session import pidfd_exited
from corepeek_agent.tls import ReloadingCertificates, TLSConfigError, TLSFiles, load_set

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from security_pki import ONCALL, make_pki  # noqa: E402


class FakeContext:
    def __init__(self, auth: dict[str, list[bytes]], peer: str = "ipv4:127.0.0.1:5555") -> None:
        self._auth, self._peer = auth, peer

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth

    def peer(self) -> str:
        return self._peer


# -- identity -----------------------------------------------------------------------

def test_identity_comes_from_typed_sans_never_the_cn() -> None:
    ctx = FakeContext({"transport_security_type": [b"ssl"],
                       "x509_common_name": [b"root"],
                       "x509_subject_alternative_name": [ONCALL.encode(), b"h.example"],
                       "peer_uri": [ONCALL.encode()], "peer_dns": [b"h.example"],
                       "peer_spiffe_id": [ONCALL.encode()]})
    ident = authz.identify(ctx, local_transport=False, local_identity="local")  # type: ignore[arg-type]
    assert ident.names == ("dns:h.example", f"uri:{ONCALL}") and ident.transport == "tls"


def test_a_certificate_without_san_has_no_identity() -> None:
    ctx = FakeContext({"transport_security_type": [b"ssl"], "x509_common_name": [ONCALL.encode()]})
    ident = authz.identify(ctx, local_transport=True, local_identity="local")  # type: ignore[arg-type]
    assert ident.names == () and ident.key.startswith("anonymous@")


def test_local_peers_get_the_configured_name_only_on_local_transports() -> None:
    ctx = FakeContext({"transport_security_type": [b"insecure"]}, peer="unix:")
    assert authz.identify(ctx, local_transport=True, local_identity="ops").names == ("ops",)  # type: ignore[arg-type]
    assert authz.identify(ctx, local_transport=False, local_identity="ops").names == ()  # type: ignore[arg-type]


def test_guard_refuses_unnamed_clients_before_looking_at_a_target(tmp_path: Path) -> None:
    guard = authz.Guard(policy_from_dict({"rules": [{"clients": ["dns:a"], "modes": ["notes"]}]}),
                        local_transport=False, audit=AuditLog(str(tmp_path / "audit")))
    cg = guard.begin_capture(FakeContext({"transport_security_type": [b"ssl"],  # type: ignore[arg-type]
                                          "peer_dns": [b"b"]}))
    with pytest.raises(PermissionDenied):
        cg.admit(os.getpid(), 0, "notes")
    cg.failed(grpc.StatusCode.PERMISSION_DENIED, "no")
    cg.finish()
    line = json.loads((tmp_path / "audit").read_text())
    assert line["identities"] == ["dns:b"] and line["outcome"] == "refused"
    assert line["code"] == "PERMISSION_DENIED" and line["pid"] == os.getpid()
    assert (tmp_path / "audit").stat().st_mode & 0o777 == 0o600


# -- pidfd facts ----------------------------------------------------------------------

NONDUMPABLE = textwrap.dedent("""
    import ctypes, sys, time
    if sys.argv[1] == "0":
        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)   # PR_SET_DUMPABLE 0
    print("ready", flush=True)
    time.sleep(60)
""")


@pytest.mark.parametrize("dumpable", [True, False])
def test_pidfd_facts_tell_dumpability(dumpable: bool) -> None:
    child = subprocess.Popen([sys.executable, "-c", NONDUMPABLE, "1" if dumpable else "0"],
                             stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        fd = os.pidfd_open(child.pid)
        try:
            info = authz.pidfd_info(fd)
            if info.coredump_mask is None:
                pytest.skip("kernel without PIDFD_INFO_COREDUMP (Linux < 6.16)")
            f = authz.target_facts(child.pid, fd)
            assert f.dumpable is dumpable
            assert f.uids == (os.getuid(), os.geteuid(), os.getuid(), os.geteuid())
            assert f.exe == os.readlink(f"/proc/{child.pid}/exe")
        finally:
            os.close(fd)
    finally:
        child.kill()
        child.wait()


def test_pidfd_pins_the_process_not_the_number() -> None:
    """After the process behind a pidfd is gone (and its pid perhaps reused), the
    pidfd says so; the session checks this after freezing (session.pidfd_exited)."""
    child = subprocess.Popen(["sleep", "60"])
    fd = os.pidfd_open(child.pid)
    try:
        assert not pidfd_exited(fd)
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert pidfd_exited(fd)
        with pytest.raises(ProcessGone):
            authz.pidfd_info(fd)
        # fdinfo shows Pid: -1 once the process is reaped
        fdinfo = Path(f"/proc/self/fdinfo/{fd}").read_text()
        assert "Pid:\t-1" in fdinfo
    finally:
        os.close(fd)


def test_container_ids_from_cgroup_paths() -> None:
    cid = "0123456789abcdef" * 4
    for path in (f"/system.slice/docker-{cid}.scope", f"/docker/{cid}",
                 f"/kubepods.slice/kubepods-besteffort.slice/cri-containerd-{cid}.scope",
                 f"/machine.slice/libpod-{cid}.scope/container"):
        assert authz.container_id(path) == cid, path
    assert authz.container_id("/user.slice/user-0.slice/session-1.scope") == ""


# -- limits -----------------------------------------------------------------------------

def test_rate_limit_is_a_sliding_minute_per_client() -> None:
    now = [1000.0]
    rl = SessionRateLimiter(3, clock=lambda: now[0])
    for _ in range(3):
        rl.acquire("a")
    with pytest.raises(ResourceExhausted):
        rl.acquire("a")
    rl.acquire("b")                       # other clients are not affected
    now[0] += 59.0
    with pytest.raises(ResourceExhausted):
        rl.acquire("a")
    now[0] += 1.0
    rl.acquire("a")
    SessionRateLimiter(0).acquire("x")    # 0 = unlimited


def test_byte_budget() -> None:
    b = ByteBudget(100)
    b.charge(60)
    b.charge(40)
    with pytest.raises(ResourceExhausted):
        b.charge(1)
    ByteBudget(None).charge(1 << 60)


# -- audit ------------------------------------------------------------------------------

@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 50)), max_size=40))
def test_rangeset_merges_like_a_set_of_bytes(adds: list[tuple[int, int]]) -> None:
    rs = RangeSet()
    covered: set[int] = set()
    for off, n in adds:
        rs.add(off, n)
        covered.update(range(off, off + n))
    ranges = rs.ranges()
    assert {b for off, n in ranges for b in range(off, off + n)} == covered
    for (o1, n1), (o2, _) in zip(ranges, ranges[1:]):
        assert o1 + n1 < o2                    # sorted, disjoint, not touching


def test_audit_line_has_no_memory_and_reopens(tmp_path: Path) -> None:
    log = AuditLog(str(tmp_path / "a.log"))
    rec = SessionRecord(kind="capture", identities=["local"], peer="unix:")
    rec.served(0, 4096, hole=False)
    rec.served(4096, 8192, hole=True)
    rec.served(1 << 20, 10, hole=False)
    log.write(rec)
    (tmp_path / "a.log").rename(tmp_path / "a.log.1")
    log.reopen()
    log.write(SessionRecord(kind="list", identities=["local"], peer="unix:"))
    log.close()
    first = json.loads((tmp_path / "a.log.1").read_text())
    assert first["ranges"] == [[0, 12288], [1 << 20, 10]]
    assert first["data_bytes"] == 4106 and first["hole_bytes"] == 8192
    assert json.loads((tmp_path / "a.log").read_text())["kind"] == "list"


# -- TLS files --------------------------------------------------------------------------

def test_tls_files_are_checked(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    good = TLSFiles(pki.server.cert, pki.server.key, pki.ca.path)
    assert load_set(good).cert == pki.server.cert.read_bytes()
    with pytest.raises(TLSConfigError, match="not the private key"):
        load_set(TLSFiles(pki.server.cert, pki.oncall.key, pki.ca.path))
    with pytest.raises(TLSConfigError, match="cannot read"):
        load_set(TLSFiles(pki.server.cert, tmp_path / "nope", pki.ca.path))
    with pytest.raises(TLSConfigError, match="no PEM certificate"):
        load_set(TLSFiles(pki.server.key, pki.server.key, pki.ca.path))
    with pytest.raises(TLSConfigError, match="all three"):
        TLSFiles.from_args(str(pki.server.cert), None, None)
    assert TLSFiles.from_args(None, None, None) is None


def test_certificate_fetcher_reloads_only_good_changes(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    files = TLSFiles(tmp_path / "s.crt", tmp_path / "s.key", tmp_path / "ca.pem")
    files.cert.write_bytes(pki.server.cert.read_bytes())
    files.key.write_bytes(pki.server.key.read_bytes())
    files.ca.write_bytes(pki.ca.path.read_bytes())
    certs = ReloadingCertificates(files)
    assert certs.fetch() is None                      # unchanged: keep the current config
    # a half-done rotation (new cert, old key) is skipped, the old set kept
    new = pki.ca.issue("server2", ips=("127.0.0.1",), server=True)
    files.cert.write_bytes(new.cert.read_bytes())
    assert certs.fetch() is None and certs.loaded.cert == pki.server.cert.read_bytes()
    # the key arrives: the new pair is served from the next handshake on
    files.key.write_bytes(new.key.read_bytes())
    time.sleep(0.01)
    assert certs.fetch() is not None and certs.loaded.cert == new.cert.read_bytes()
    assert certs.fetch() is None
    certs.request_reload()                            # SIGHUP forces a reload
    assert certs.fetch() is not None and certs.reloads == 2


def test_local_default_guard_without_policy() -> None:
    guard = authz.Guard(local_default_policy(), local_transport=True)
    cg = guard.begin_capture(FakeContext({"transport_security_type": [b"insecure"]}, "unix:"))  # type: ignore[arg-type]
    child = subprocess.Popen(["sleep", "30"])
    try:
        cg.admit(child.pid, 0, "full")
        fd = os.pidfd_open(child.pid)
        try:
            grant = cg(child.pid, fd)                   # a dumpable process
        finally:
            os.close(fd)
    finally:
        child.kill()
        child.wait()
    assert cg.record.rule == "builtin-local-full" and cg.budget.limit is None
    assert (grant.stack_bytes, grant.environment) == (1 << 20, False)


def test_the_agent_never_admits_itself() -> None:
    guard = authz.Guard(local_default_policy(), local_transport=True)
    ctx = FakeContext({"transport_security_type": [b"insecure"]}, "unix:")
    for pid in (os.getpid(), threading.get_native_id()):
        with pytest.raises(AgentItself, match=f"pid {pid} is the agent itself"):
            guard.begin_capture(ctx).admit(pid, 0, "notes")  # type: ignore[arg-type]


# -- client channel ---------------------------------------------------------------------

def test_client_refuses_plaintext_off_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    from corepeek.channel import TLSOptions, open_channel
    from corepeek.errors import CaptureError

    for k in ("CA", "CERT", "KEY", "SERVER_NAME"):
        monkeypatch.delenv(f"COREPEEK_TLS_{k}", raising=False)
    with pytest.raises(CaptureError, match="--tls-ca"):
        open_channel("10.1.2.3:7443")
    open_channel("127.0.0.1:7443").close()          # loopback: an --insecure agent
    open_channel("unix:/nonexistent").close()
    with pytest.raises(CaptureError, match="go together"):
        open_channel("10.1.2.3:7443", TLSOptions(ca="/x", cert="/y"))
    monkeypatch.setenv("COREPEEK_TLS_CA", "/nonexistent/ca.pem")
    with pytest.raises(CaptureError, match="cannot read"):
        open_channel("10.1.2.3:7443")
