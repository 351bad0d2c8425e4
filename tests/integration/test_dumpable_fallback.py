"""The dumpability fallback of kernels without PIDFD_INFO_COREDUMP, forced on this one.

An agent started with COREPEEK_TEST_PROC_DUMPABLE=1 (test only, see authz.py)
judges dumpability from /proc (``authz._dumpable_from_proc``).  Against real
targets — non-dumpable through prctl(PR_SET_DUMPABLE, 0), a setuid-root
program run by ``nobody``, a plain ``nobody`` process — it must decide as an
agent that asks the kernel does: refuse the first two before any freeze,
capture the last.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from corepeek.errors import CaptureError
from corepeek.remote import open_capture
from harness.agents import AgentProcess, start_agent, stop_agent
from harness.checks import assert_thawed_and_undisturbed
from harness.targets import Target

from security_util import PublicBin, as_user, assert_untouched, wait_audit, write_policy

NOBODY = 65534


@dataclass
class Agents:
    fallback: AgentProcess          # /proc only
    kernel: AgentProcess            # PIDFD_INFO_COREDUMP
    fallback_audit: Path
    kernel_audit: Path
    threads: Path                   # world-executable copy of the threads target
    setuid: Path                    # setuid-root copy of it
    preload: Path                   # makes a process non-dumpable at start


@pytest.fixture(scope="module")
def agents(tmp_path_factory: pytest.TempPathFactory, build, require_root: None) -> Iterator[Agents]:
    pub = PublicBin()
    started: list[AgentProcess] = []
    try:
        threads = pub.copy(build("threads"), "threads")
        setuid = pub.copy(build("threads"), "threads-setuid")
        os.chown(setuid, 0, 0)
        setuid.chmod(0o4755)
        preload = pub.nodump_preload()
        tmp = tmp_path_factory.mktemp("dumpable-fallback")
        policy = write_policy(tmp / "policy.yaml", {"version": 1, "rules": [
            {"name": "local-public", "clients": ["local"],
             "targets": {"exe": [f"{pub.dir}/*"]}, "modes": ["full"]}]})
        audits = []
        for name, env in (("fallback", {"COREPEEK_TEST_PROC_DUMPABLE": "1"}), ("kernel", {})):
            (tmp / name).mkdir()
            audit = tmp / name / "audit.jsonl"
            audits.append(audit)
            started.append(start_agent(tmp / name, "--policy", str(policy), "--audit-log",
                                       str(audit), "--sessions-per-minute", "0", env=env))
        yield Agents(started[0], started[1], audits[0], audits[1], threads, setuid, preload)
    finally:
        for a in started:
            stop_agent(a)
        pub.cleanup()


def _refusal(agent: AgentProcess, pid: int) -> CaptureError:
    with pytest.raises(CaptureError) as exc:
        open_capture(agent.address, pid, snapshot=False)
    return exc.value


def test_the_fallback_agent_really_skips_pidfd_coredump(agents: Agents) -> None:
    assert "COREPEEK_TEST_PROC_DUMPABLE=1" in agents.fallback.log()
    assert "COREPEEK_TEST_PROC_DUMPABLE" not in agents.kernel.log()


def test_nondumpable_nobody_target_is_refused_like_with_pidfd_info(agents: Agents) -> None:
    exe, args = as_user(agents.threads, NOBODY)
    with Target(exe, args, env={"LD_PRELOAD": str(agents.preload)}) as t:
        assert os.stat(f"/proc/{t.pid}/status").st_uid == 0     # what the fallback reads
        for agent, audit in ((agents.fallback, agents.fallback_audit),
                             (agents.kernel, agents.kernel_audit)):
            err = _refusal(agent, t.pid)
            assert err.code == grpc.StatusCode.PERMISSION_DENIED, err
            assert "not dumpable" in str(err), err
            line = wait_audit(audit, pid=t.pid, outcome="refused")
            assert line["target"]["dumpable"] is False and line["freeze_seconds"] == 0
            assert_untouched(t)


def test_setuid_root_program_run_by_nobody_is_refused_like_with_pidfd_info(
        agents: Agents) -> None:
    exe, args = as_user(agents.setuid, NOBODY)
    with Target(exe, args) as t:
        uids = Path(f"/proc/{t.pid}/status").read_text().split("Uid:")[1].split()[:2]
        assert uids == [str(NOBODY), "0"], uids                 # real nobody, effective root
        by_kernel = _refusal(agents.kernel, t.pid)
        by_proc = _refusal(agents.fallback, t.pid)
        assert by_kernel.code == by_proc.code == grpc.StatusCode.PERMISSION_DENIED
        # The kernel says "not dumpable"; /proc cannot tell for an effective root
        # and the fallback fails closed.
        assert "not dumpable" in str(by_kernel), by_kernel
        assert "unknown dumpability" in str(by_proc), by_proc
        assert wait_audit(agents.kernel_audit, pid=t.pid)["target"]["dumpable"] is False
        assert wait_audit(agents.fallback_audit, pid=t.pid)["target"]["dumpable"] is None
        assert_untouched(t)


def test_nondumpable_root_target_is_refused_by_the_fallback(agents: Agents) -> None:
    with Target(agents.threads, env={"LD_PRELOAD": str(agents.preload)}) as t:
        for agent in (agents.kernel, agents.fallback):
            assert _refusal(agent, t.pid).code == grpc.StatusCode.PERMISSION_DENIED
        assert wait_audit(agents.fallback_audit, pid=t.pid)["target"]["dumpable"] is None
        assert_untouched(t)


def test_dumpable_nobody_target_is_captured_through_the_fallback(agents: Agents) -> None:
    exe, args = as_user(agents.threads, NOBODY)
    with Target(exe, args) as t:
        with open_capture(agents.fallback.address, t.pid, snapshot=False) as core:
            assert core.read_bytes(0, 4) == b"\x7fELF"
            assert set(t.thread_states().values()) == {"t"}
        assert_thawed_and_undisturbed(t)
        line = wait_audit(agents.fallback_audit, pid=t.pid, outcome="ok")
        assert line["target"]["dumpable"] is True
