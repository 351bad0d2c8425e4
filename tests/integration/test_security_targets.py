"""Target protection on a Unix-socket agent: non-dumpable processes, pinned pids,
the socket's own access control, and an audit line for every session."""

from __future__ import annotations

import grp
import os
import stat
import subprocess
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

from security_util import (PublicBin, as_user, assert_untouched, audit_lines, wait_audit,
                           write_policy)

NOBODY = 65534


class Setup:
    def __init__(self, agent: AgentProcess, audit: Path, pub: PublicBin, threads: Path,
                 secret: Path, preload: Path) -> None:
        self.agent, self.audit, self.pub = agent, audit, pub
        self.threads, self.secret, self.preload = threads, secret, preload


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, build, require_root: None) -> Iterator[Setup]:
    pub = PublicBin()
    try:
        threads = pub.copy(build("threads"), "threads")
        secret = pub.copy(build("threads"), "secret-agent")
        preload = pub.nodump_preload()
        tmp = tmp_path_factory.mktemp("sec-targets")
        audit = tmp / "audit.jsonl"
        policy = write_policy(tmp / "policy.yaml", {"version": 1, "rules": [
            {"name": "local-public", "clients": ["local"],
             "targets": {"exe": [f"{pub.dir}/*"]}, "modes": ["full"]},
            {"name": "named-secret", "clients": ["local"],
             "targets": {"exe": [str(secret)]}, "modes": ["notes"],
             "allow_nondumpable": True},
        ]})
        agent = start_agent(tmp, "--policy", str(policy), "--audit-log", str(audit))
        try:
            yield Setup(agent, audit, pub, threads, secret, preload)
        finally:
            stop_agent(agent)
    finally:
        pub.cleanup()


def _refused(s: Setup, pid: int, **kw: object) -> CaptureError:
    with pytest.raises(CaptureError) as exc:
        open_capture(s.agent.address, pid, **kw)
    return exc.value


@pytest.mark.parametrize("uid", [0, NOBODY], ids=["root-target", "nobody-target"])
def test_nondumpable_targets_are_refused(setup: Setup, uid: int) -> None:
    exe, args = (setup.threads, []) if uid == 0 else as_user(setup.threads, uid)
    with Target(exe, args, env={"LD_PRELOAD": str(setup.preload)}) as t:
        # GIVEN a process that made itself non-dumpable (as ssh-agent does)
        if uid:
            assert os.stat(f"/proc/{t.pid}/status").st_uid == 0   # the kernel's own tell
        # WHEN a client the policy allows for this very program asks, in any mode
        for mode in ("full", "notes"):
            err = _refused(setup, t.pid, mode=mode)
            # THEN PERMISSION_DENIED before any freeze, and an audit line says why
            assert err.code == grpc.StatusCode.PERMISSION_DENIED, err
            assert "not dumpable" in str(err)
        assert_untouched(t)
        line = wait_audit(setup.audit, pid=t.pid, outcome="refused")
        assert line["target"]["dumpable"] is False and line["target"]["uids"][0] == uid
        assert line["freeze_seconds"] == 0 and line["data_bytes"] == 0
        # AND the listing does not show it
        with grpc.insecure_channel(setup.agent.address) as ch:
            resp = pb_grpc.CoreCaptureServiceStub(ch).ListProcesses(
                pb.ListProcessesRequest(pid=t.pid), timeout=10)
        assert [p.pid for p in resp.processes] == []


def test_a_nondumpable_program_the_policy_names_is_allowed_in_its_mode(setup: Setup) -> None:
    with Target(setup.secret, env={"LD_PRELOAD": str(setup.preload)}) as t:
        assert _refused(setup, t.pid, mode="full").code == grpc.StatusCode.PERMISSION_DENIED
        with open_capture(setup.agent.address, t.pid, mode="notes") as core:
            assert core.layout.exe == str(setup.secret)
        assert_thawed_and_undisturbed(t)
        line = wait_audit(setup.audit, pid=t.pid, outcome="ok")
        assert line["rule"] == "named-secret" and line["target"]["dumpable"] is False


def test_dumpable_nonroot_target_is_captured_and_listed(setup: Setup) -> None:
    exe, args = as_user(setup.threads, NOBODY)
    with Target(exe, args) as t:
        with grpc.insecure_channel(setup.agent.address) as ch:
            resp = pb_grpc.CoreCaptureServiceStub(ch).ListProcesses(
                pb.ListProcessesRequest(pid=t.pid), timeout=10)
        assert [(p.pid, p.uid) for p in resp.processes] == [(t.pid, NOBODY)]
        with open_capture(setup.agent.address, t.pid) as core:
            assert core.read_bytes(0, 4) == b"\x7fELF"
        assert_thawed_and_undisturbed(t)


def test_a_stale_start_time_is_refused(setup: Setup) -> None:
    """PID reuse: the client pinned the process it listed; a different process (here:
    the same pid with another start time) is FAILED_PRECONDITION, never frozen."""
    with Target(setup.threads) as t:
        with grpc.insecure_channel(setup.agent.address) as ch:
            listed = pb_grpc.CoreCaptureServiceStub(ch).ListProcesses(
                pb.ListProcessesRequest(pid=t.pid), timeout=10).processes[0]
        err = _refused(setup, t.pid, start_time=listed.start_time - 1)
        assert err.code == grpc.StatusCode.FAILED_PRECONDITION and "replaced" in str(err)
        assert_untouched(t)
        line = wait_audit(setup.audit, pid=t.pid, code="FAILED_PRECONDITION")
        assert line["requested_start_time"] == listed.start_time - 1
        with open_capture(setup.agent.address, t.pid, start_time=listed.start_time) as core:
            assert core.layout.start_time == listed.start_time
        assert_thawed_and_undisturbed(t)


def test_unknown_and_unlisted_pids(setup: Setup) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    err = _refused(setup, gone.pid)
    assert err.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED)
    # a process outside the policy (this test runner) is refused, not frozen
    err = _refused(setup, os.getpid(), mode="notes")
    assert err.code == grpc.StatusCode.PERMISSION_DENIED
    assert wait_audit(setup.audit, pid=os.getpid())["outcome"] == "refused"


def test_every_session_has_exactly_one_audit_line(setup: Setup) -> None:
    before = len(audit_lines(setup.audit))
    with Target(setup.threads) as t:
        with open_capture(setup.agent.address, t.pid, mode="stacks") as core:
            core.read_bytes(0, 64)
            core.read_bytes(core.layout.notes.offset, 16)
        _refused(setup, t.pid, start_time=1)
        with grpc.insecure_channel(setup.agent.address) as ch:       # an empty stream
            list(pb_grpc.CoreCaptureServiceStub(ch).Capture(iter(()), timeout=5))
        assert_thawed_and_undisturbed(t)
    deadline_lines = audit_lines(setup.audit)[before:]
    captures = [d for d in deadline_lines if d["kind"] == "capture"]
    assert [d["outcome"] for d in captures] == ["ok", "error", "empty"], captures
    ok = captures[0]
    assert ok["requests"] == 2 and ok["mode"] == "stacks" and ok["ranges"][0] == [0, 64]


def test_socket_mode_and_group(tmp_path: Path, require_root: None) -> None:
    group = grp.getgrgid(os.getgid() if os.getgid() else 65534)  # any group but root's
    a = start_agent(tmp_path, "--socket-mode", "660", "--socket-group", group.gr_name)
    try:
        st = os.stat(tmp_path / "agent.sock")
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == group.gr_gid and st.st_uid == 0
    finally:
        stop_agent(a)
    a = start_agent(tmp_path)
    try:
        assert stat.S_IMODE(os.stat(tmp_path / "agent.sock").st_mode) == 0o600
        log = a.log()
        assert "NO POLICY" in log            # the local default is loud
    finally:
        stop_agent(a)
