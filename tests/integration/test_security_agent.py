"""Issue 19, findings 3-7 on the agent side: policies fail closed, the socket is set up
without races, the agent protects itself, and stacks mode is bounded by policy.

Real agents (subprocesses), real targets (a setuid-root program run by an
unprivileged user through a symlink, a process with a secret in its
environment, a thread whose stack lives on the heap), cores checked with gdb.
"""

from __future__ import annotations

import grp
import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from corepeek.errors import CaptureError
from corepeek.partial import write_partial_core
from corepeek.remote import open_capture
from corepeek_agent.authz import PIDFD_COREDUMP_SKIP, pidfd_info
from corepeek_format import regions
from harness.agents import start_agent, stop_agent
from harness.checks import assert_thawed_and_undisturbed
from harness.targets import Target
from harness.tools import gdb_backtraces

from security_util import (PublicBin, as_user, assert_untouched, traced_or_stopped,
                           wait_audit, write_policy)

pytestmark = pytest.mark.usefixtures("require_root")

NOBODY = 65534
SECRET = "AKIAcorepeekTESTsecret0123456789abcdefXYZ"


def run_agent(tmp: Path, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """An agent that is expected to refuse to start: its exit and output."""
    return subprocess.run([sys.executable, "-m", "corepeek", "agent", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=tmp,
                          stdin=subprocess.DEVNULL)


def assert_one_line_refusal(res: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert res.returncode != 0, res
    err = [line for line in res.stderr.splitlines() if line.startswith("corepeek:")]
    assert len(err) == 1, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    for n in needles:
        assert n in err[0], err[0]


# -- policies fail closed (finding 4) ---------------------------------------------------

BAD_POLICIES = {
    # a notes-only rule for uid 1000 followed by a second targets/modes pair
    "duplicate-in-rule": ("version: 1\nrules:\n- name: r\n  clients: [local]\n"
                          "  modes: [notes]\n  targets: {uid: [1000]}\n"
                          "  targets: {}\n  modes: [full]\n", "line 7: duplicate key 'targets'"),
    "duplicate-rules": ("version: 1\nrules:\n- {name: a, clients: [local], modes: [notes]}\n"
                        "rules:\n- {name: b, clients: [local], modes: [full]}\n",
                        "line 4: duplicate key 'rules'"),
    "glob-local-identity": ("version: 1\nlocal_identity: '*'\nrules:\n"
                            "- {name: a, clients: ['*'], modes: [full]}\n", "local_identity"),
    "comm-only-nondumpable": ("version: 1\nrules:\n- name: agents\n  clients: [local]\n"
                              "  targets: {comm: [ssh-agent]}\n  modes: [full]\n"
                              "  allow_nondumpable: true\n", "needs an exe selector"),
}


@pytest.mark.parametrize("name", sorted(BAD_POLICIES))
def test_a_policy_the_agent_refuses_stops_it_at_start(tmp_path: Path, name: str) -> None:
    text, needle = BAD_POLICIES[name]
    (tmp_path / "policy.yaml").write_text(text)
    res = run_agent(tmp_path, "--listen", f"unix:{tmp_path / 'a.sock'}",
                    "--policy", str(tmp_path / "policy.yaml"))
    assert_one_line_refusal(res, needle)
    assert not (tmp_path / "a.sock").exists()


def test_a_refused_policy_is_kept_out_on_reload(tmp_path: Path, build) -> None:
    audit = tmp_path / "audit.jsonl"
    policy = write_policy(tmp_path / "policy.yaml", {"version": 1, "rules": [
        {"name": "notes-only", "clients": ["local"], "modes": ["notes"]}]})
    a = start_agent(tmp_path, "--policy", str(policy), "--audit-log", str(audit))
    try:
        with Target(build("threads")) as t:
            for name in ("duplicate-in-rule", "glob-local-identity"):
                # WHEN the file is replaced by one that would grant full captures
                policy.write_text(BAD_POLICIES[name][0])
                a.proc.send_signal(signal.SIGHUP)
                line = wait_audit(audit, kind="policy", outcome="refused")
                assert BAD_POLICIES[name][1] in line["details"]
                audit.write_text("")
                # THEN the old policy stays: full is still refused, notes allowed
                with pytest.raises(CaptureError) as exc:
                    open_capture(a.address, t.pid, mode="full")
                assert exc.value.code == grpc.StatusCode.PERMISSION_DENIED
                with open_capture(a.address, t.pid, mode="notes"):
                    pass
            assert_thawed_and_undisturbed(t)
        assert "policy reload failed, keeping the old policy" in a.log()
        assert a.proc.poll() is None
    finally:
        stop_agent(a)


# -- setuid program through a symlink (finding 3) -------------------------------------------

@pytest.fixture()
def pub() -> Iterator[PublicBin]:
    p = PublicBin()
    yield p
    p.cleanup()


def test_a_setuid_program_symlinked_as_an_allowed_comm_is_not_captured(
        tmp_path: Path, build, pub: PublicBin) -> None:
    # GIVEN a setuid-root program an unprivileged user runs through a symlink named
    # like the program a rule allows
    suid = pub.copy(build("threads"), "suid-threads")
    os.chown(suid, 0, 0)
    suid.chmod(0o4755)
    link = pub.dir / "ssh-agent"
    link.symlink_to(suid)
    exe, args = as_user(link, NOBODY)
    with Target(exe, args) as t:
        assert (t.status()["reply"], Path(f"/proc/{t.pid}/comm").read_text().strip()) == (
            "status", "ssh-agent")
        assert os.stat(f"/proc/{t.pid}/status").st_uid == 0          # setuid: not dumpable
        # WHEN the operator keys allow_nondumpable on comm, as in the issue
        comm_only = write_policy(tmp_path / "comm.yaml", {"version": 1, "rules": [
            {"name": "agents", "clients": ["local"], "targets": {"comm": ["ssh-agent"]},
             "modes": ["full"], "allow_nondumpable": True}]})
        # THEN the agent refuses the policy and does not start
        res = run_agent(tmp_path, "--listen", f"unix:{tmp_path / 'x.sock'}",
                        "--policy", str(comm_only))
        assert_one_line_refusal(res, "comm is chosen by the process")
        # AND with the rule keyed on the real program, the impostor is refused untouched
        audit = tmp_path / "audit.jsonl"
        by_exe = write_policy(tmp_path / "exe.yaml", {"version": 1, "rules": [
            {"name": "agents", "clients": ["local"], "modes": ["full"],
             "targets": {"exe": ["/usr/bin/ssh-agent"], "comm": ["ssh-agent"]},
             "allow_nondumpable": True},
            {"name": "public", "clients": ["local"], "modes": ["full"],
             "targets": {"exe": [f"{pub.dir}/*"]}}]})
        a = start_agent(tmp_path, "--policy", str(by_exe), "--audit-log", str(audit))
        try:
            for mode in ("full", "notes"):
                with pytest.raises(CaptureError) as exc:
                    open_capture(a.address, t.pid, mode=mode)
                assert exc.value.code == grpc.StatusCode.PERMISSION_DENIED
                assert "not dumpable" in str(exc.value)
            assert_untouched(t)
            line = wait_audit(audit, pid=t.pid, outcome="refused")
            assert line["target"]["comm"] == "ssh-agent" and line["target"]["exe"] == str(suid)
            assert line["data_bytes"] == 0 and line["freeze_seconds"] == 0
        finally:
            stop_agent(a)


# -- the socket (finding 5) ---------------------------------------------------------------

def _sock_dir(tmp: Path, mode: int = 0o755) -> Path:
    d = tmp / "run"
    d.mkdir()
    d.chmod(mode)
    return d


@pytest.mark.parametrize("what", ["regular-file", "symlink", "dangling-symlink", "directory"])
def test_anything_but_a_stale_socket_at_the_path_is_refused(tmp_path: Path, what: str) -> None:
    d = _sock_dir(tmp_path)
    path = d / "agent.sock"
    secret = tmp_path / "root-only"
    secret.write_text("do not touch")
    secret.chmod(0o600)
    if what == "regular-file":
        path.write_text("precious")
    elif what == "symlink":
        path.symlink_to(secret)
    elif what == "dangling-symlink":
        path.symlink_to(tmp_path / "nowhere")
    else:
        path.mkdir()
    group = grp.getgrgid(65534).gr_name
    res = run_agent(tmp_path, "--listen", f"unix:{path}", "--socket-mode", "660",
                    "--socket-group", group)
    assert_one_line_refusal(res, str(path))
    # nothing was deleted, and the file a symlink points to kept its owner and mode
    assert os.path.lexists(path)
    if what == "regular-file":
        assert path.read_text() == "precious"
    st = os.stat(secret)
    assert (stat.S_IMODE(st.st_mode), st.st_gid, secret.read_text()) == (0o600, 0,
                                                                         "do not touch")


def test_a_stale_socket_is_replaced_and_a_live_one_refused(tmp_path: Path) -> None:
    d = _sock_dir(tmp_path)
    path = d / "agent.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()                                       # a socket file nobody listens on
    group = grp.getgrgid(65534)
    a = start_agent(tmp_path, "--socket-mode", "660", "--socket-group", group.gr_name,
                    listen=f"unix:{path}")
    try:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
        assert (st.st_uid, st.st_gid) == (0, group.gr_gid)
        res = run_agent(tmp_path, "--listen", f"unix:{path}")
        assert_one_line_refusal(res, "running agent")
        assert a.proc.poll() is None
    finally:
        stop_agent(a)


@pytest.mark.parametrize("mode, gid, ok", [(0o777, 0, False), (0o1777, 0, False),
                                           (0o775, 65534, False), (0o775, "socket", True),
                                           (0o755, 0, True)])
def test_a_socket_directory_others_can_write_is_refused(tmp_path: Path, mode: int,
                                                        gid: int | str, ok: bool) -> None:
    sock_group = next(g for g in grp.getgrall() if g.gr_gid not in (0, 65534))
    d = _sock_dir(tmp_path, mode)
    os.chown(d, 0, sock_group.gr_gid if gid == "socket" else int(gid))
    d.chmod(mode)
    args = ["--listen", f"unix:{d / 'agent.sock'}", "--socket-mode", "660",
            "--socket-group", sock_group.gr_name]
    if ok:
        a = start_agent(tmp_path, *args[2:], listen=args[1])
        stop_agent(a)
        return
    res = run_agent(tmp_path, *args)
    assert_one_line_refusal(res, "socket directory", str(d))
    assert not (d / "agent.sock").exists()


# -- the agent protects itself (finding 6) ------------------------------------------------

def test_an_agent_cannot_be_captured(tmp_path: Path) -> None:
    first = tmp_path / "first"
    second = tmp_path / "second"
    first.mkdir()
    second.mkdir()
    a = start_agent(first, "--audit-log", str(first / "audit.jsonl"))
    b = start_agent(second)
    try:
        # the agent made itself non-dumpable at start-up
        fd = os.pidfd_open(a.proc.pid)
        try:
            assert pidfd_info(fd).coredump_mask == PIDFD_COREDUMP_SKIP
        finally:
            os.close(fd)
        # WHEN a second agent is asked for the first one's core, in any mode
        for mode in ("full", "notes"):
            with pytest.raises(CaptureError) as exc:
                open_capture(b.address, a.proc.pid, mode=mode)
            # THEN it refuses: the first agent is not dumpable
            assert exc.value.code == grpc.StatusCode.PERMISSION_DENIED
            assert "not dumpable" in str(exc.value)
        # AND an agent asked for its own pid (or one of its threads) says so
        tids = sorted(int(x) for x in os.listdir(f"/proc/{a.proc.pid}/task"))
        for pid in (a.proc.pid, tids[-1]):
            with pytest.raises(CaptureError) as exc:
                open_capture(a.address, pid, mode="notes")
            assert exc.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert f"pid {pid} is the agent itself" in str(exc.value)
        assert traced_or_stopped(a.proc.pid) == {}
        line = wait_audit(first / "audit.jsonl", pid=a.proc.pid)
        assert line["code"] == "FAILED_PRECONDITION" and line["freeze_seconds"] == 0
        assert a.proc.poll() is None and b.proc.poll() is None
    finally:
        stop_agent(b)
        stop_agent(a)


# -- stacks mode is bounded by policy (finding 7) --------------------------------------------

def _stacks_policy(tmp: Path, **rule: object) -> Path:
    return write_policy(tmp / "policy.yaml", {"version": 1, "rules": [
        {"name": "stacks", "clients": ["local"], "modes": ["stacks"], **rule}]})


def test_a_stacks_core_has_no_environment_and_still_unwinds(tmp_path: Path, build) -> None:
    exe = build("threads")
    audit = tmp_path / "audit.jsonl"
    a = start_agent(tmp_path, "--policy", str(_stacks_policy(tmp_path)),
                    "--audit-log", str(audit))
    try:
        with Target(exe, env={"AWS_SECRET_ACCESS_KEY": SECRET}) as t:
            environ = Path(f"/proc/{t.pid}/environ").read_bytes()
            assert SECRET.encode() in environ
            out = tmp_path / "stacks.core"
            with open_capture(a.address, t.pid, mode="stacks") as core:
                assert core.layout.environment_hidden
                assert core.layout.stack_bytes_per_thread == 1 << 20
                write_partial_core(core, out)
                # a read of the environment strings is refused outright
                st = Path(f"/proc/{t.pid}/stat").read_text().rpartition(")")[2].split()
                env_start, env_end = int(st[47]), int(st[48])
                for off, n in regions.vaddr_range_to_file(list(core.layout.segments),
                                                          env_start, env_end - env_start):
                    with pytest.raises(CaptureError) as exc:
                        core.read_bytes(off, n)
                    assert exc.value.code == grpc.StatusCode.PERMISSION_DENIED
            assert_thawed_and_undisturbed(t)
            # THEN the secret is nowhere in the core, and gdb unwinds every thread
            assert SECRET.encode() not in out.read_bytes()
            assert b"AWS_SECRET_ACCESS_KEY" not in out.read_bytes()
            bts = gdb_backtraces(out, exe)
            assert set(bts) == set(t.tids())
            assert all(frames and "??" not in frames for frames in bts.values()), bts
            assert "main" in bts[t.pid]
            line = wait_audit(audit, pid=t.pid, mode="stacks")
            assert line["exposure"] == {"stack_bytes": 1 << 20, "stack_bytes_requested": 0,
                                        "environment": False}
    finally:
        stop_agent(a)
    # a rule that allows the environment serves it: the test above can see a leak
    (tmp_path / "b").mkdir()
    a = start_agent(tmp_path / "b", "--policy",
                    str(_stacks_policy(tmp_path / "b", environment=True)))
    try:
        with Target(exe, env={"AWS_SECRET_ACCESS_KEY": SECRET}) as t:
            out = tmp_path / "env.core"
            with open_capture(a.address, t.pid, mode="stacks") as core:
                assert not core.layout.environment_hidden
                write_partial_core(core, out)
            assert_thawed_and_undisturbed(t)
            assert SECRET.encode() in out.read_bytes()
    finally:
        stop_agent(a)


def test_a_heap_stack_exposes_no_more_than_the_cap(tmp_path: Path, build) -> None:
    cap = 256 << 10
    audit = tmp_path / "audit.jsonl"
    a = start_agent(tmp_path, "--policy", str(_stacks_policy(tmp_path, stack_bytes="256KiB")),
                    "--audit-log", str(audit))
    try:
        with Target(build("heap_stack")) as t:
            buf, buf_len = int(t.ready["buf_addr"]), int(t.ready["buf_len"])
            # WHEN a stacks client asks for 64 MiB per thread
            with open_capture(a.address, t.pid, mode="stacks", stack_bytes=64 << 20) as core:
                lay = core.layout
                # THEN it gets the rule's cap, and says so
                assert lay.stack_bytes_per_thread == cap
                heap_ranges = regions.vaddr_range_to_file(list(lay.segments), buf, buf_len)
                readable = [(r.offset, r.length) for r in lay.readable]
                exposed = sum(n for o, n in regions.merge(readable)
                              for h, hn in heap_ranges
                              for n in [max(0, min(o + n, h + hn) - max(o, h))])
                # the thread's own 64 KiB stack sits inside the buffer: at most the cap
                # (plus the red zone below the stack pointer) of it is readable
                assert 0 < exposed <= cap + 4096, exposed
                data = b"".join(core.read_bytes(o, n) for o, n in regions.merge(readable))
                assert data.count(b"H" * 4096) * 4096 <= cap
            assert_thawed_and_undisturbed(t)
            line = wait_audit(audit, pid=t.pid, mode="stacks")
            assert line["exposure"]["stack_bytes"] == cap
            assert line["exposure"]["stack_bytes_requested"] == 64 << 20
    finally:
        stop_agent(a)


def test_full_mode_is_unchanged(tmp_path: Path, build) -> None:
    a = start_agent(tmp_path)
    try:
        with Target(build("threads"), env={"AWS_SECRET_ACCESS_KEY": SECRET}) as t:
            with open_capture(a.address, t.pid) as core:
                assert SECRET.encode() in core.read_bytes(0, core.size)
                assert not core.layout.environment_hidden
            assert_thawed_and_undisturbed(t)
    finally:
        stop_agent(a)
