"""Fixtures for integration tests: built targets, and captures through the agent."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.agents import AgentProcess, start_agent, stop_agent
from harness.checks import ptrace_available
from harness.targets import build_target


@pytest.fixture(scope="session", autouse=True)
def _ptrace_ok() -> None:
    ok, why = ptrace_available()
    if not ok:
        pytest.fail(f"ptrace is not usable here, integration tests cannot run: {why}")


@pytest.fixture(scope="session")
def build(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """build(name, m32=False) -> path of the compiled target (cached per session)."""
    out = tmp_path_factory.mktemp("targets")
    return lambda name, m32=False: build_target(name, out, m32=m32)


@pytest.fixture
def audited_agent(tmp_path: Path, require_root: None) -> Iterator[AgentProcess]:
    """An agent of the test's own, writing its audit log to ``tmp_path / "audit"``."""
    a = start_agent(tmp_path, "--sessions-per-minute", "0", "--audit-log",
                    str(tmp_path / "audit"))
    yield a
    stop_agent(a)


@pytest.fixture
def s3_server() -> Iterator[str]:
    """A real S3-compatible server (moto's, in-process) on a loopback port it binds itself."""
    from moto.server import ThreadedMotoServer   # the [test] extra installs it: no skip

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()
