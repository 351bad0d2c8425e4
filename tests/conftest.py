"""Shared fixtures: a real corepeek agent subprocess on a Unix socket.

Integration tests talk to it over real gRPC; nothing here mocks the kernel,
the agent or gRPC. The agent helpers live in ``harness.agents``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from harness.agents import AgentProcess, start_agent, stop_agent, wait_healthy  # noqa: F401


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
