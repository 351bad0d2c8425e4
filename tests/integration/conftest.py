"""Fixtures for integration tests: built targets, and captures through the agent."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

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
