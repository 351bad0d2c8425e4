"""Shared fixtures: a real corepeek agent subprocess on a Unix socket.

Integration tests talk to it over real gRPC; nothing here mocks the kernel,
the agent or gRPC.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class AgentProcess:
    """A running ``corepeek agent`` and the address clients use."""

    proc: subprocess.Popen[bytes]
    address: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def wait_healthy(address: str, proc: subprocess.Popen[bytes], log_path: Path,
                 timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"agent exited ({proc.returncode}):\n{log_path.read_text()}")
        try:
            with grpc.insecure_channel(address) as ch:
                resp = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=1)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"agent at {address} not healthy after {timeout}s:\n{log_path.read_text()}")


def start_agent(tmp: Path, *extra: str, listen: str | None = None,
                env: dict[str, str] | None = None) -> AgentProcess:
    """Start ``python -m corepeek agent`` and wait until its health check serves."""
    sock = tmp / "agent.sock"
    listen = listen or f"unix:{sock}"
    log_path = tmp / f"agent-{time.monotonic_ns()}.log"
    logf = open(log_path, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "corepeek", "-v", "agent", "--listen", listen, *extra],
        stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})})
    logf.close()
    address = listen if listen.startswith("unix:") else listen
    try:
        wait_healthy(address, proc, log_path)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return AgentProcess(proc, address, log_path)


def stop_agent(agent: AgentProcess) -> None:
    if agent.proc.poll() is None:
        agent.proc.terminate()
        try:
            agent.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            agent.proc.kill()
            agent.proc.wait()


@pytest.fixture(scope="session")
def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("integration tests need root (CAP_SYS_PTRACE) to run the agent")


@pytest.fixture(scope="session")
def agent(tmp_path_factory: pytest.TempPathFactory, require_root: None) -> Iterator[AgentProcess]:
    """One agent for the whole test session (tests that kill agents start their own)."""
    a = start_agent(tmp_path_factory.mktemp("agent"))
    yield a
    stop_agent(a)
