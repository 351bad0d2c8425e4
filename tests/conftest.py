"""Shared fixtures: a real corepeek agent subprocess on a Unix socket.

Integration tests talk to it over real gRPC; nothing here mocks the kernel,
the agent or gRPC. The agent helpers live in ``harness.agents``. At the end of
the run no process the tests started may still be alive (pytest_sessionfinish).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.agents import AgentProcess, start_agent, stop_agent, wait_healthy  # noqa: F401


# Every process the suite starts inherits this marker, so the end-of-run check
# below finds our leftovers among the processes of other suites on the machine.
RUN_MARKER = "COREPEEK_TEST_RUN"
os.environ[RUN_MARKER] = uuid.uuid4().hex


def _our_processes() -> list[tuple[int, str, str, str, int]]:
    """(pid, comm, cmdline, state, tracer pid) of live processes carrying this run's marker,
    except pytest itself (and threads: /proc lists processes)."""
    needle = f"{RUN_MARKER}={os.environ[RUN_MARKER]}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if needle not in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                continue
            status = dict(line.split(":\t", 1) for line in
                          Path(f"/proc/{entry}/status").read_text().splitlines() if ":\t" in line)
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if status.get("State", "").startswith("Z"):
            continue   # a zombie is dead; its parent (one of ours, then reported) reaps it
        found.append((int(entry), status.get("Name", "?"), cmdline.decode(errors="replace").strip(),
                      status.get("State", "?"), int(status.get("TracerPid", "0"))))
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if a process the tests started outlives them, or is left
    stopped or traced (brief grace for processes that are exiting)."""
    deadline = time.monotonic() + 5
    while (left := _our_processes()) and time.monotonic() < deadline:
        time.sleep(0.1)
    if left:
        lines = [f"pid {pid} ({comm}) state {state} tracer {tracer}: {cmd}"
                 for pid, comm, cmd, state, tracer in left]
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        reporter.write_sep("=", "processes started by the tests are still alive", red=True)
        for line in lines:
            reporter.write_line(line, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("integration tests need root (CAP_SYS_PTRACE) to run the agent")


@pytest.fixture(scope="session")
def agent(tmp_path_factory: pytest.TempPathFactory, require_root: None) -> Iterator[AgentProcess]:
    """One agent for the whole test session (tests that kill agents start their own)."""
    # The test suite opens far more sessions per minute than a person would.
    a = start_agent(tmp_path_factory.mktemp("agent"), "--sessions-per-minute", "0")
    yield a
    stop_agent(a)
