"""Real corepeek agents as subprocesses, for tests that talk to them over gRPC."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class AgentProcess:
    """A running ``corepeek agent`` and the address clients use."""

    proc: subprocess.Popen[bytes]
    address: str
    log_path: Path
    bound: dict[str, str] = field(default_factory=dict)   # port-0 listeners: kind -> host:port

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def wait_healthy(address: str, proc: subprocess.Popen[bytes], log_path: Path,
                 timeout: float = 20.0,
                 credentials: grpc.ChannelCredentials | None = None,
                 options: tuple[tuple[str, object], ...] = ()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"agent exited ({proc.returncode}):\n{log_path.read_text()}")
        try:
            with (grpc.secure_channel(address, credentials, options=options)
                  if credentials is not None else grpc.insecure_channel(address)) as ch:
                resp = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=1)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"agent at {address} not healthy after {timeout}s:\n{log_path.read_text()}")


def start_agent(tmp: Path, *extra: str, listen: str | None = None,
                env: dict[str, str] | None = None,
                credentials: grpc.ChannelCredentials | None = None,
                channel_options: tuple[tuple[str, object], ...] = ()) -> AgentProcess:
    """Start ``python -m corepeek agent`` and wait until its health check serves.

    ``credentials`` (and ``channel_options``) are for the health check of a
    TLS agent: a client certificate the agent's CA signed.
    """
    sock = tmp / "agent.sock"
    listen = listen or f"unix:{sock}"
    ports = port_zero_listeners(listen, extra)
    log_path = tmp / f"agent-{time.monotonic_ns()}.log"
    logf = open(log_path, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "corepeek", "-v", "agent", "--listen", listen, *extra],
        stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})})
    logf.close()
    try:
        # Port 0: the agent binds a free port itself and logs it; no probe-and-release race.
        bound = wait_bound_ports(ports, proc, log_path) if ports else {}
        address = bound.get("listen", listen)
        wait_healthy(address, proc, log_path, credentials=credentials, options=channel_options)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return AgentProcess(proc, address, log_path, bound)


# What the agent logs once each kind of listener is bound (see server.py, metrics.py).
_BOUND_PATTERNS = {
    "listen": re.compile(r"corepeek agent listening on (\S+?):0 \(port (\d+)\)"),
    "metrics": re.compile(r"metrics on http://(\S+?):(\d+)/metrics"),
    "health": re.compile(r"health on (\S+?):(\d+)\b"),
}


def port_zero_listeners(listen: str, extra: tuple[str, ...]) -> list[str]:
    """Which listeners ('listen', 'metrics', 'health') were asked to bind port 0."""
    kinds = ["listen"] if listen.endswith(":0") else []
    for flag, kind in (("--metrics-address", "metrics"), ("--health-address", "health")):
        if flag in extra and extra[extra.index(flag) + 1].endswith(":0"):
            kinds.append(kind)
    return kinds


def wait_bound_ports(kinds: list[str], proc: subprocess.Popen[bytes], log_path: Path,
                     timeout: float = 20.0) -> dict[str, str]:
    """{kind: 'host:port'} for each port-0 listener, read from the agent's log."""
    deadline = time.monotonic() + timeout
    while True:
        text = log_path.read_text(errors="replace")
        found = {k: f"{m.group(1)}:{m.group(2)}" for k in kinds
                 if (m := _BOUND_PATTERNS[k].search(text))}
        if len(found) == len(kinds):
            return found
        if proc.poll() is not None:
            raise RuntimeError(f"agent exited ({proc.returncode}):\n{text}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"agent never logged its {kinds} ports:\n{text}")
        time.sleep(0.05)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL; always reaps."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stop_agent(agent: AgentProcess) -> None:
    stop_process(agent.proc)


