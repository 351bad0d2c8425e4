"""The CLI as people use it: the agent found without --agent, flags after the
subcommand, a target named like pgrep, and names the target chose escaped."""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.agents import start_agent, stop_agent
from harness.checks import assert_thawed_and_undisturbed
from harness.targets import Target

LOCAL_SOCKET = Path("/run/corepeek.sock")
HOSTILE_COMM = "x\n\x1b[2Jy"
HOSTILE_THREAD = "w\x7f\x1b]0;t\a"


def unique_copy(exe: Path, tmp_path: Path) -> Path:
    """``exe`` under a name (hence comm) no other process on the machine has: other
    test sessions may run the same target binary at the same time."""
    copy = tmp_path / f"cp{secrets.token_hex(6)}"            # 14 characters: the whole comm
    shutil.copy(exe, copy)
    return copy


def corepeek(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "COREPEEK_AGENT"}
    return subprocess.run([sys.executable, "-m", "corepeek", *args], capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL,
                          env={**environ, **(env or {})})


# -- which agent ------------------------------------------------------------------------------

def test_agent_from_the_environment(agent, build, require_root, tmp_path: Path) -> None:
    with Target(unique_copy(build("threads"), tmp_path)) as t:
        res = corepeek("ps", "--comm", t.exe.name, env={"COREPEEK_AGENT": agent.address})
        assert res.returncode == 0, res.stderr
        assert [int(line.split()[0]) for line in res.stdout.splitlines()[1:]] == [t.pid]


@pytest.fixture
def local_socket_lock() -> Iterator[None]:
    """/run/corepeek.sock is the machine's: held exclusively, and left as found."""
    os.makedirs("/run/lock", exist_ok=True)
    with open("/run/lock/corepeek-tests-local-socket.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if LOCAL_SOCKET.exists() or LOCAL_SOCKET.is_symlink():
            pytest.fail(f"{LOCAL_SOCKET} exists: a real agent runs here; this test would "
                        "shadow it")
        try:
            yield
        finally:
            LOCAL_SOCKET.unlink(missing_ok=True)


def test_agent_defaults_to_the_local_socket_then_fails_clearly(
        build, require_root, tmp_path: Path, local_socket_lock: None) -> None:
    a = start_agent(tmp_path, "--sessions-per-minute", "0", listen=f"unix:{LOCAL_SOCKET}")
    try:
        with Target(unique_copy(build("threads"), tmp_path)) as t:
            res = corepeek("ps", "--comm", t.exe.name)
            assert res.returncode == 0, res.stderr
            assert str(t.pid) in res.stdout
    finally:
        stop_agent(a)
    LOCAL_SOCKET.unlink(missing_ok=True)
    res = corepeek("ps")
    assert res.returncode == 2, res
    assert res.stderr.count("\n") == 1 and "--agent" in res.stderr \
        and "COREPEEK_AGENT" in res.stderr and str(LOCAL_SOCKET) in res.stderr, res.stderr


# -- flags after the subcommand ------------------------------------------------------------------

def test_quiet_after_the_subcommand(agent, build, require_root, tmp_path: Path) -> None:
    with Target(build("threads")) as t:
        loud = corepeek("dump", "--agent", agent.address, str(t.pid), "--only", "notes",
                        "-o", str(tmp_path / "a"))
        quiet = corepeek("dump", "--agent", agent.address, str(t.pid), "--only", "notes",
                         "-o", str(tmp_path / "b"), "-q")
        assert_thawed_and_undisturbed(t)
    assert loud.returncode == quiet.returncode == 0, (loud.stderr, quiet.stderr)
    assert "wrote" in loud.stderr and quiet.stderr == ""
    assert (tmp_path / "b").read_bytes()[:4] == b"\x7fELF"


# -- naming the target ------------------------------------------------------------------------

def test_dump_by_comm_captures_the_one_match(agent, build, require_root,
                                            tmp_path: Path) -> None:
    threads = unique_copy(build("threads"), tmp_path)
    out = tmp_path / "core"
    with Target(threads) as t:
        res = corepeek("dump", "--agent", agent.address, "--comm", threads.name,
                       "--only", "notes", "-o", str(out))
        assert res.returncode == 0, res.stderr
        assert f"capturing pid {t.pid} " in res.stderr and f"core of pid {t.pid} " in res.stderr
        assert_thawed_and_undisturbed(t)
    notes = corepeek("notes", "--agent", agent.address, "--exe", f"*/{threads.name}")
    assert notes.returncode == 1 and "no process matches --exe" in notes.stderr, notes.stderr
    assert notes.stderr.count("\n") == 1


def test_several_matches_are_listed_and_exit_2(agent, build, require_root,
                                               tmp_path: Path) -> None:
    threads = build("threads")
    with Target(threads) as a, Target(threads) as b:
        res = corepeek("dump", "--agent", agent.address, "--exe", str(threads),
                       "-o", str(tmp_path / "core"))
        assert res.returncode == 2, res.stderr
        rows = res.stderr.splitlines()
        assert rows[0].startswith("corepeek: 2 processes match --exe"), res.stderr
        listed = {int(r.split()[0]): r for r in rows[2:]}
        assert set(listed) == {a.pid, b.pid}
        for t in (a, b):
            start = int(open(f"/proc/{t.pid}/stat").read().rsplit(")", 1)[1].split()[19])
            assert listed[t.pid].split()[1] == str(start) and str(threads) in listed[t.pid]
            assert_thawed_and_undisturbed(t)
    assert not list(tmp_path.iterdir()), "nothing is written when the target is ambiguous"
    both = corepeek("dump", "--agent", agent.address, "1", "--comm", "x")
    assert both.returncode == 2 and "not both" in both.stderr


# -- hostile names ---------------------------------------------------------------------------

@pytest.fixture
def hostile(build, require_root, tmp_path: Path) -> Iterator[Target]:
    """hostile_name, run from a directory whose name holds a newline."""
    evil_dir = tmp_path / "bin\n  666 forged"
    evil_dir.mkdir()
    exe = evil_dir / "hostile"
    shutil.copy(build("hostile_name"), exe)
    with Target(exe) as t:
        assert Path(f"/proc/{t.pid}/comm").read_text() == HOSTILE_COMM + "\n"
        yield t


def assert_no_control_chars(text: str) -> None:
    bad = sorted({c for c in text if (ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) <= 0x9F})
    assert not bad, f"raw control characters reached the terminal: {bad!r}"


def test_ps_escapes_a_hostile_comm_and_exe(agent, hostile: Target) -> None:
    res = corepeek("ps", "--agent", agent.address, "--comm", HOSTILE_COMM)
    assert res.returncode == 0, res.stderr
    assert_no_control_chars(res.stdout)
    header, *rows = res.stdout.splitlines()
    assert len(rows) == 1, f"a forged line: {rows}"
    assert "x\\n\\x1b[2Jy" in rows[0] and "bin\\n  666 forged/hostile" in rows[0]
    exact = corepeek("ps", "--agent", agent.address, "--comm", HOSTILE_COMM, "--json")
    [proc] = json.loads(exact.stdout)["processes"]
    assert proc["comm"] == HOSTILE_COMM and proc["exe"] == str(hostile.exe)
    assert_thawed_and_undisturbed(hostile)


def test_notes_and_dump_escape_hostile_names(agent, hostile: Target, tmp_path: Path) -> None:
    text = corepeek("notes", "--agent", agent.address, str(hostile.pid))
    assert text.returncode == 0, text.stderr
    assert_no_control_chars(text.stdout)
    assert "(x\\n\\x1b[2Jy)" in text.stdout and "w\\x7f\\x1b]0;t\\x07" in text.stdout
    assert "bin\\n  666 forged/hostile" in text.stdout        # the exe, and the mapping name
    exact = json.loads(corepeek("notes", "--agent", agent.address, str(hostile.pid),
                                "--json").stdout)
    assert exact["comm"] == HOSTILE_COMM and exact["exe"] == str(hostile.exe)
    assert HOSTILE_THREAD in {t["comm"] for t in exact["threads"]}
    dump = corepeek("dump", "--agent", agent.address, "--comm", HOSTILE_COMM,
                    "--only", "notes", "-o", str(tmp_path / "core"))
    assert dump.returncode == 0, dump.stderr
    assert_no_control_chars(dump.stderr)
    assert dump.stderr.count("\n") == 2 and "x\\n\\x1b[2Jy" in dump.stderr
    assert_thawed_and_undisturbed(hostile)


def test_stored_captures_list_escapes_hostile_names(hostile: Target, tmp_path: Path) -> None:
    """A kept capture of a target that chose a hostile comm and exe path: `corepeek
    captures` shows them escaped on one line each; --json keeps them exact."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nrules:\n  - name: local-rule\n    clients: [local]\n"
                      "    modes: [full, notes]\n    keep: true\n")
    a = start_agent(tmp_path, "--policy", str(policy), "--store", str(tmp_path / "store"),
                    "--sessions-per-minute", "0")
    try:
        kept = corepeek("dump", "--agent", a.address, str(hostile.pid), "--only", "notes",
                        "--keep", "-o", str(tmp_path / "core"))
        assert kept.returncode == 0, kept.stderr
        listed = corepeek("captures", "--agent", a.address)
        assert listed.returncode == 0, listed.stderr
        assert_no_control_chars(listed.stdout)
        header, *rows = listed.stdout.splitlines()
        assert len(rows) == 1, f"a forged line: {rows}"
        assert "x\\n\\x1b[2Jy" in rows[0] and "bin\\n  666 forged/hostile" in rows[0]
        [entry] = json.loads(corepeek("captures", "--agent", a.address,
                                      "--json").stdout)["captures"]
        assert entry["comm"] == HOSTILE_COMM and entry["exe"] == str(hostile.exe)
    finally:
        stop_agent(a)
    assert_thawed_and_undisturbed(hostile)
