"""The policy's target selectors end to end, over mutual TLS: uid, comm, cgroup and
container each admit the process they name and nothing next to it.

One TLS agent on 127.0.0.1 with one rule per selector for the on-call
certificate; for each selector a real target it names is captured (and proven
thawed and undisturbed) and a near miss is refused before any freeze.  The
cgroup and container targets live in real cgroup v2 groups (a private cgroup2
mount; a container id is a 64-hex ``docker-<id>.scope`` group, as docker and
containerd name them).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
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

from security_pki import ONCALL, PKI, make_pki
from security_util import (PublicBin, as_user, assert_untouched, credentials, tls_options,
                           wait_audit, write_policy)

NOBODY = 65534
CONTAINER = "c0ffee" + "5e1ec7" * 8 + "0123456789"            # 64 hex digits
OTHER_CONTAINER = "bad" + "0" * 61


@dataclass
class Env:
    agent: AgentProcess
    pki: PKI
    audit: Path
    pub: PublicBin
    cgroups: Path               # a private cgroup2 mount
    group: str                  # our top-level group in it


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, require_root: None) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("selectors")
    pki = make_pki(tmp / "pki")
    group = f"corepeek-sel-{os.getpid()}"
    policy = write_policy(tmp / "policy.yaml", {"version": 1, "rules": [
        {"name": "by-uid", "clients": [ONCALL], "targets": {"uid": [NOBODY]}, "modes": ["full"]},
        {"name": "by-comm", "clients": [ONCALL], "targets": {"comm": ["cpsel-comm-ok"]},
         "modes": ["full"]},
        {"name": "by-cgroup", "clients": [ONCALL], "targets": {"cgroup": [f"/{group}/allowed"]},
         "modes": ["full"]},
        {"name": "by-container", "clients": [ONCALL], "targets": {"container": ["c0ffee*"]},
         "modes": ["full"]},
    ]})
    audit = tmp / "audit.jsonl"
    pub = PublicBin()
    mount = Path(tempfile.mkdtemp(prefix="corepeek-cg2-"))
    subprocess.run(["mount", "-t", "cgroup2", "none", str(mount)], check=True)
    agent = None
    try:
        for sub in ("allowed", "other", f"docker-{CONTAINER}.scope",
                    f"docker-{OTHER_CONTAINER}.scope"):
            (mount / group / sub).mkdir(parents=True)
        agent = start_agent(tmp, "--tls-cert", str(pki.server.cert), "--tls-key",
                            str(pki.server.key), "--tls-ca", str(pki.ca.path), "--policy",
                            str(policy), "--audit-log", str(audit),
                            "--sessions-per-minute", "0", listen="127.0.0.1:0",
                            credentials=credentials(pki, pki.stranger))
        yield Env(agent, pki, audit, pub, mount, group)
    finally:
        if agent is not None:
            stop_agent(agent)
        if (mount / group).exists():
            for sub in (mount / group).iterdir():
                if sub.is_dir():
                    sub.rmdir()         # targets are gone: every group is empty
            (mount / group).rmdir()
        subprocess.run(["umount", str(mount)], check=True)
        mount.rmdir()
        pub.cleanup()


def _captured(e: Env, t: Target, rule: str) -> None:
    with open_capture(e.agent.address, t.pid, tls=tls_options(e.pki, e.pki.oncall),
                      snapshot=False) as core:
        assert core.read_bytes(0, 4) == b"\x7fELF"
        assert set(t.thread_states().values()) == {"t"}
    assert_thawed_and_undisturbed(t)
    assert wait_audit(e.audit, pid=t.pid, outcome="ok")["rule"] == rule


def _refused(e: Env, t: Target) -> None:
    with pytest.raises(CaptureError) as exc:
        open_capture(e.agent.address, t.pid, tls=tls_options(e.pki, e.pki.oncall), snapshot=False)
    assert exc.value.code == grpc.StatusCode.PERMISSION_DENIED, exc.value
    assert_untouched(t)
    assert wait_audit(e.audit, pid=t.pid)["outcome"] == "refused"


def _in_cgroup(e: Env, t: Target, sub: str) -> None:
    (e.cgroups / e.group / sub / "cgroup.procs").write_text(str(t.pid))
    assert Path(f"/proc/{t.pid}/cgroup").read_text().splitlines()[-1] == \
        f"0::/{e.group}/{sub}"


def test_uid_selector(env: Env, build) -> None:
    exe = env.pub.copy(build("threads"), "threads")
    with Target(*as_user(exe, NOBODY)) as t:
        _captured(env, t, "by-uid")
    with Target(exe) as t:                          # the same program as root
        _refused(env, t)


def test_comm_selector(env: Env, build) -> None:
    with Target(env.pub.copy(build("threads"), "cpsel-comm-ok")) as t:
        _captured(env, t, "by-comm")
    with Target(env.pub.copy(build("threads"), "cpsel-comm-no")) as t:
        _refused(env, t)


def test_cgroup_selector(env: Env, build) -> None:
    with Target(build("threads")) as t:
        _in_cgroup(env, t, "allowed")
        _captured(env, t, "by-cgroup")
    with Target(build("threads")) as t:
        _in_cgroup(env, t, "other")
        _refused(env, t)


def test_container_selector(env: Env, build) -> None:
    with Target(build("threads")) as t:
        _in_cgroup(env, t, f"docker-{CONTAINER}.scope")
        _captured(env, t, "by-container")
        line = wait_audit(env.audit, pid=t.pid)
        assert line["target"]["cgroup"] == f"/{env.group}/docker-{CONTAINER}.scope"
    with Target(build("threads")) as t:
        _in_cgroup(env, t, f"docker-{OTHER_CONTAINER}.scope")
        _refused(env, t)
