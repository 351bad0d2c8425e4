"""The corepeek command as a person uses it: ps, dump (sparse), notes, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from harness.checks import assert_thawed_and_undisturbed
from harness.targets import Target
from harness.tools import gdb_backtraces


def corepeek(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "corepeek", *args], capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_dump_writes_a_sparse_core_gdb_can_read(agent, build, require_root, tmp_path: Path) -> None:
    with Target(build("bigmem"), ["-m", "4", "-r", "512", "-s"]) as t:
        out = tmp_path / "big.core"
        res = corepeek("dump", "--agent", agent.address, str(t.pid), "-o", str(out))
        assert res.returncode == 0, res.stderr
        assert "wrote" in res.stderr and res.stdout == ""
        st = out.stat()
        assert st.st_size > 512 * 1024 * 1024
        assert st.st_blocks * 512 < 64 * 1024 * 1024, "holes were not left sparse"
        assert "main" in gdb_backtraces(out, build("bigmem"))[t.pid]
        assert_thawed_and_undisturbed(t)


def test_ps_lists_the_target(agent, build, require_root) -> None:
    with Target(build("threads")) as t:
        res = corepeek("ps", "--agent", agent.address, "--comm", t.exe.name[:15])
        assert res.returncode == 0, res.stderr
        assert any(line.split()[0] == str(t.pid) for line in res.stdout.splitlines()[1:])


def test_dump_of_unknown_pid_fails_with_one_line(agent, tmp_path: Path) -> None:
    res = corepeek("dump", "--agent", agent.address, "3999999", "-o", str(tmp_path / "x"))
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and "NOT_FOUND" in res.stderr, res.stderr


def test_unreachable_agent_fails_with_one_line(tmp_path: Path) -> None:
    res = corepeek("ps", "--agent", f"unix:{tmp_path}/nothing.sock", "--timeout", "2")
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and "UNAVAILABLE" in res.stderr, res.stderr


def test_agent_refuses_plaintext_tcp_off_loopback() -> None:
    res = corepeek("agent", "--listen", "0.0.0.0:0", "--insecure")
    assert res.returncode != 0
    assert "refusing" in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_dump_with_start_time_pins_the_process_ps_listed(agent, build, require_root,
                                                         tmp_path: Path) -> None:
    with Target(build("threads")) as t:
        res = corepeek("ps", "--agent", agent.address, "--comm", t.exe.name[:15], "--json")
        assert res.returncode == 0, res.stderr
        [listed] = [p for p in json.loads(res.stdout)["processes"] if p["pid"] == t.pid]
        start = int(listed["start_time"])
        # WHEN the start time is not the process's (the pid was reused, as far as
        # the client can tell) THEN a one-line error, and the target is never touched
        bad = corepeek("dump", "--agent", agent.address, str(t.pid), "--start-time",
                       str(start + 1), "-o", str(tmp_path / "stale.core"))
        assert bad.returncode == 1
        assert bad.stderr.count("\n") == 1 and "FAILED_PRECONDITION" in bad.stderr, bad.stderr
        assert "replaced" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
        assert not (tmp_path / "stale.core").exists() or \
            (tmp_path / "stale.core").stat().st_size == 0
        assert_thawed_and_undisturbed(t)
        # WHEN it is the right one THEN the dump works
        out = tmp_path / "pinned.core"
        good = corepeek("dump", "--agent", agent.address, str(t.pid), "--start-time", str(start),
                        "-o", str(out))
        assert good.returncode == 0, good.stderr
        assert set(gdb_backtraces(out, build("threads"))) == set(t.tids())
        assert_thawed_and_undisturbed(t)
