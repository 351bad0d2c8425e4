"""A dump that fails leaves nothing under the user's file name.

Real failures during a real capture: the target killed, the agent killed,
the agent's --max-freeze ending the session, the client interrupted (SIGINT,
SIGTERM).  The client is paused with SIGSTOP once its temporary file holds
some data, so the failure always lands mid-dump however fast the machine is,
then continued.  After each: exit status non-zero, one line on stderr, no
file under the final name, no temporary left, and a live target thawed and
undisturbed.  Also: ``-o`` never writes through a planted symlink and never
keeps an existing file's mode.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.agents import AgentProcess, start_agent, stop_agent
from harness.checks import assert_thawed_and_undisturbed, wait_thawed
from harness.targets import Target
from harness.tools import gdb_backtraces

TOUCH_MIB = 768                # big enough that the pause always comes before the end
PAUSE_AT = 16 << 20            # bytes in the temporary file when the client is paused


def start_dump(address: str, pid: int, out: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "corepeek", "dump", "--agent", address,
                             str(pid), "-o", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)


def temporaries(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*.tmp"))


def pause_mid_dump(proc: subprocess.Popen[str], out: Path, timeout: float = 60) -> int:
    """SIGSTOP the client once its temporary file holds PAUSE_AT bytes; returns that size."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for tmp in temporaries(out):
            try:
                size = tmp.stat().st_size
            except FileNotFoundError:
                continue
            if size >= PAUSE_AT:
                os.kill(proc.pid, signal.SIGSTOP)
                assert proc.poll() is None and not out.exists(), "the dump ended too soon"
                return size
        assert proc.poll() is None, f"dump ended before the pause: {proc.communicate()}"
        time.sleep(0.002)
    raise AssertionError("the dump's temporary file did not grow")


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def assert_one_line(err: str) -> str:
    print(f"stderr: {err}", end="")
    assert err.count("\n") == 1 and err.startswith("corepeek: "), err
    assert "Traceback" not in err, err
    return err


def assert_nothing_left(out: Path) -> None:
    assert not out.exists() and not out.is_symlink(), f"{out} exists after a failed dump"
    assert temporaries(out) == [], temporaries(out)
    assert not out.with_name(out.name + ".partial").exists()


@pytest.fixture
def own_agent(tmp_path: Path, require_root: None) -> Iterator[list[AgentProcess]]:
    """Agents this test may kill or configure; stopped at the end."""
    agents: list[AgentProcess] = []
    yield agents
    for a in agents:
        stop_agent(a)


@pytest.fixture
def bigmem_target(build, require_root) -> Iterator[Target]:  # type: ignore[no-untyped-def]
    with Target(build("bigmem"), ["-m", str(TOUCH_MIB)]) as t:
        yield t


def test_target_killed_mid_dump(agent, bigmem_target: Target, tmp_path: Path) -> None:
    out = tmp_path / "core"
    # --live: a snapshot's clone keeps the image and the dump completes
    # (test_snapshot_default.py); a live capture loses its target.
    proc = start_dump(agent.address, bigmem_target.pid, out, "--live")
    pause_mid_dump(proc, out)
    bigmem_target.send_signal(signal.SIGKILL)
    # (its killed threads stay zombies until the agent's tracer reaps them)
    code, err = finish(proc)
    assert bigmem_target.wait_exit(10) == -signal.SIGKILL
    assert code == 1, err
    assert "no core written to" in assert_one_line(err)
    assert_nothing_left(out)


def test_agent_killed_mid_dump_keep_partial(own_agent, bigmem_target: Target,
                                            tmp_path: Path) -> None:
    a = start_agent(tmp_path, "--sessions-per-minute", "0")
    own_agent.append(a)
    out = tmp_path / "core"
    proc = start_dump(a.address, bigmem_target.pid, out, "--keep-partial")
    paused_at = pause_mid_dump(proc, out)
    a.proc.kill()
    a.proc.wait()
    wait_thawed(bigmem_target)                     # the kernel detaches a dead tracer's tracees
    code, err = finish(proc)
    assert code == 1, err
    assert "UNAVAILABLE" in assert_one_line(err)
    partial = out.with_name("core.partial")
    assert f"kept as {partial}" in err, err
    assert not out.exists() and temporaries(out) == []
    st = partial.stat()
    assert st.st_size >= paused_at and stat.S_IMODE(st.st_mode) == 0o600
    assert partial.read_bytes()[:4] == b"\x7fELF"
    assert_thawed_and_undisturbed(bigmem_target)


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
def test_client_interrupted_mid_dump(agent, bigmem_target: Target, tmp_path: Path,
                                     how: str) -> None:
    out = tmp_path / "core"
    proc = start_dump(agent.address, bigmem_target.pid, out)
    pause_mid_dump(proc, out)
    os.kill(proc.pid, getattr(signal, how))        # delivered when it continues
    t0 = time.monotonic()
    code, err = finish(proc)
    took = time.monotonic() - t0
    assert code == 130, err
    assert "interrupted; no core written to" in assert_one_line(err)
    assert took < 10, f"the client took {took:.1f} s to stop"
    assert_nothing_left(out)
    thaw = wait_thawed(bigmem_target)
    print(f"MEASURED {how}: client exited {took * 1000:.0f} ms after SIGCONT, target thawed "
          f"{thaw * 1000:.1f} ms after that")
    assert_thawed_and_undisturbed(bigmem_target)


def test_max_freeze_ends_the_dump(own_agent, bigmem_target: Target, tmp_path: Path) -> None:
    a = start_agent(tmp_path, "--sessions-per-minute", "0", "--max-freeze", "1")
    own_agent.append(a)
    out = tmp_path / "core"
    proc = start_dump(a.address, bigmem_target.pid, out, "--live")   # frozen throughout
    pause_mid_dump(proc, out)
    thaw = wait_thawed(bigmem_target, timeout=10)  # the agent's watchdog thaws it
    print(f"MEASURED max-freeze 1 s: thawed {thaw:.2f} s after the client paused")
    code, err = finish(proc)
    assert code == 1, err
    line = assert_one_line(err)
    assert "DEADLINE_EXCEEDED: the agent's --max-freeze of 1 s ended the capture" in line
    assert "no core written to" in line
    assert_nothing_left(out)
    assert_thawed_and_undisturbed(bigmem_target)


# -- where the core goes ---------------------------------------------------------------------

NOBODY = 65534


def test_dump_replaces_a_planted_symlink_and_never_writes_through_it(
        agent, build, require_root, tmp_path: Path) -> None:
    # GIVEN a root-only file, and a world-writable sticky directory in which an
    # unprivileged user planted a symlink to it under the name root will dump to
    vault = tmp_path / "vault"
    vault.mkdir(mode=0o700)
    secret = vault / "shadow"
    secret.write_bytes(b"root:$6$secret\n")
    secret.chmod(0o600)
    shared = Path(tempfile.mkdtemp(prefix="corepeek-shared-", dir="/tmp"))  # like /tmp
    shared.chmod(0o1777)
    link = shared / "core"
    try:
        subprocess.run(["ln", "-s", str(secret), str(link)], check=True, user=NOBODY)
        assert link.is_symlink() and link.lstat().st_uid == NOBODY
        dump_through_the_link(agent, build, secret, link)
        assert sorted(p.name for p in shared.iterdir()) == ["core"]
    finally:
        shutil.rmtree(shared)


def dump_through_the_link(agent, build, secret: Path,  # type: ignore[no-untyped-def]
                          link: Path) -> None:
    # WHEN root dumps there
    with Target(build("threads")) as t:
        res = subprocess.run([sys.executable, "-m", "corepeek", "dump", "--agent",
                              agent.address, str(t.pid), "-o", str(link)],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert_thawed_and_undisturbed(t)
        # THEN the secret file is untouched; the name is now root's own 0600 core
        assert secret.read_bytes() == b"root:$6$secret\n"
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        st = link.lstat()
        assert stat.S_ISREG(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o600
        assert "main" in gdb_backtraces(link, build("threads"))[t.pid]


def test_dump_over_an_existing_file_does_not_keep_its_mode(agent, build, require_root,
                                                         tmp_path: Path) -> None:
    out = tmp_path / "core"
    out.write_bytes(b"an old core")
    out.chmod(0o644)
    with Target(build("threads")) as t:
        res = subprocess.run([sys.executable, "-m", "corepeek", "dump", "--agent",
                              agent.address, str(t.pid), "-o", str(out), "--only", "stacks"],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert_thawed_and_undisturbed(t)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600 and out.read_bytes()[:4] == b"\x7fELF"


def test_unwritable_destination_fails_before_the_capture(agent, build, require_root,
                                                        tmp_path: Path) -> None:
    with Target(build("threads")) as t:
        res = subprocess.run([sys.executable, "-m", "corepeek", "dump", "--agent",
                              agent.address, str(t.pid), "-o", str(tmp_path)],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 1 and "is a directory" in res.stderr, res.stderr
        assert res.stderr.count("\n") == 1
        assert_thawed_and_undisturbed(t)
        assert f'"pid":{t.pid},' not in agent.log(), "the target was captured anyway"
