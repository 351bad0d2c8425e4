"""Socket buffers sized by the agent (sockbuf.py), seen on the kernel's sockets.

A real agent server (``create_server``) on a Unix socket and on loopback TCP;
a real client connects; the test then finds the agent's accepted socket in
its own descriptor table and asks the kernel for SO_SNDBUF.  Without
CAP_NET_ADMIN (a child process whose bounding set lacks it), a size above
``net.core.wmem_max`` is capped, the shortfall is logged once, and the
connections are served anyway.
"""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from corepeek_agent.server import create_server
from corepeek_agent.service import AgentConfig
from corepeek_agent.sockbuf import DEFAULT_BUFFER_BYTES

WMEM_MAX = int(Path("/proc/sys/net/core/wmem_max").read_text())
WMEM_DEFAULT = int(Path("/proc/sys/net/core/wmem_default").read_text())


def _own_sockets() -> Iterator[socket.socket]:
    """Duplicates of every socket of this process (closed by the caller)."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            yield socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue


def accepted_sndbuf(unix_path: str | None, port: int | None) -> list[int]:
    """SO_SNDBUF of the server side of each connection to the agent."""
    found = []
    for s in _own_sockets():
        with s:
            try:
                local, peer = s.getsockname(), s.getpeername()
            except OSError:
                continue                             # the listener: no peer
            if unix_path is not None and s.family == socket.AF_UNIX and local == unix_path:
                found.append(s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))
            elif port is not None and s.family in (socket.AF_INET, socket.AF_INET6) \
                    and local[1] == port and peer[1] != port:
                found.append(s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))
    return found


@contextmanager
def served(address: str, config: AgentConfig) -> Iterator[tuple[str, int]]:
    server, port, _registry = create_server(address, insecure=True, config=config)
    server.start()
    gc.collect()            # the options list is gone: the mutator must not be
    target = address if address.startswith("unix:") else f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(target) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                        timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
            yield target, port
    finally:
        server.stop(0).wait(5)


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_accepted_connections_get_the_agents_send_buffer(tmp_path: Path, transport: str,
                                                         require_root: None) -> None:
    # GIVEN an agent with the default socket buffer (4 MiB; root may pass wmem_max)
    address = f"unix:{tmp_path}/a.sock" if transport == "unix" else "127.0.0.1:0"
    with served(address, AgentConfig()) as (_target, port):
        # WHEN a client is connected
        sizes = accepted_sndbuf(f"{tmp_path}/a.sock" if transport == "unix" else None,
                                port if transport == "tcp" else None)
    # THEN the kernel reports twice the size set (its bookkeeping), far above
    # the default a Unix socket gets (accepted Unix sockets inherit nothing)
    assert sizes == [2 * DEFAULT_BUFFER_BYTES], sizes
    assert 2 * DEFAULT_BUFFER_BYTES > WMEM_DEFAULT


def test_zero_keeps_the_kernels_default(tmp_path: Path) -> None:
    with served(f"unix:{tmp_path}/a.sock", AgentConfig(socket_buffer_bytes=0)):
        sizes = accepted_sndbuf(f"{tmp_path}/a.sock", None)
    assert sizes == [WMEM_DEFAULT], sizes


def test_root_passes_wmem_max_with_sndbufforce(tmp_path: Path, require_root: None) -> None:
    big = 2 * WMEM_MAX
    with served(f"unix:{tmp_path}/a.sock", AgentConfig(socket_buffer_bytes=big)):
        sizes = accepted_sndbuf(f"{tmp_path}/a.sock", None)
    assert sizes == [2 * big], sizes


def test_without_cap_net_admin_the_cap_applies_is_logged_once_and_streams_go_on(
        tmp_path: Path, require_root: None) -> None:
    # GIVEN an agent process without CAP_NET_ADMIN asking for twice wmem_max
    big = 2 * WMEM_MAX
    script = textwrap.dedent(f"""
        import logging, sys
        sys.path[:0] = {sys.path!r}
        logging.basicConfig(level=logging.WARNING, format="%(name)s %(message)s")
        from test_sockbuf import served, accepted_sndbuf
        from corepeek_agent.service import AgentConfig
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        with served("unix:{tmp_path}/a.sock", AgentConfig(socket_buffer_bytes={big})) as (t, _):
            # a second connection (not the first channel's shared subchannel)
            own = [("grpc.use_local_subchannel_pool", 1)]
            with grpc.insecure_channel(t, options=own) as second:
                health_pb2_grpc.HealthStub(second).Check(health_pb2.HealthCheckRequest(),
                                                         timeout=10)
                print("SIZES", sorted(accepted_sndbuf("{tmp_path}/a.sock", None)))
    """)
    # WHEN two clients connect
    res = subprocess.run(["setpriv", "--bounding-set", "-net_admin", "--inh-caps", "-net_admin",
                          sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, cwd=Path(__file__).parent)
    # THEN both are served with the capped size, and one warning says why
    assert res.returncode == 0, res.stderr
    assert f"SIZES [{2 * WMEM_MAX}, {2 * WMEM_MAX}]" in res.stdout, res.stdout + res.stderr
    warnings = [ln for ln in res.stderr.splitlines() if "socket buffers smaller than asked" in ln]
    assert len(warnings) == 1, res.stderr
    assert "wmem_max" in warnings[0] and f"SO_SNDBUF {big}" in warnings[0]
