"""Building and running an agent server: the factory tests and the CLI share."""

from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import logging
import os
import signal
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
from corepeek.v1 import capture_pb2, capture_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .errors import CorepeekError
from .registry import SessionRegistry
from .service import AgentConfig, CoreCaptureServicer

log = logging.getLogger(__name__)

SERVICE_NAME = capture_pb2.DESCRIPTOR.services_by_name["CoreCaptureService"].full_name

# Keepalive: a client whose network path is cut is noticed within about
# time + timeout, and its session is cancelled (which thaws the target).
SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.so_reuseport", 0),
]


class InsecureListenRefused(CorepeekError):
    help = "use a unix: socket, or TCP on a loopback address with --insecure"


@dataclass(frozen=True)
class ListenAddress:
    """A parsed --listen value: ``unix:PATH`` or ``HOST:PORT``."""

    raw: str
    unix_path: str | None
    host: str | None
    port: int | None

    @classmethod
    def parse(cls, value: str) -> ListenAddress:
        if value.startswith("unix:"):
            path = value[len("unix:"):]
            path = path[2:] if path.startswith("//") else path
            return cls(value, path, None, None)
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit():
            raise CorepeekError(f"cannot parse listen address {value!r}: want unix:PATH or HOST:PORT")
        return cls(value, None, host.strip("[]"), int(port))

    @property
    def is_loopback(self) -> bool:
        if self.unix_path is not None:
            return True
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host or "").is_loopback
        except ValueError:
            return False

    @property
    def grpc_target(self) -> str:
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"


def raise_malloc_thresholds() -> None:
    """Keep large per-message buffers on the heap instead of a fresh mmap each.

    Measured in bench/: without it every 1 MiB message costs an mmap/munmap.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)
    libc.mallopt(m_trim_threshold, 128 * 1024 * 1024)


def create_server(address: str, *, insecure: bool = False,
                  config: AgentConfig = AgentConfig(),
                  socket_mode: int = 0o600) -> tuple[grpc.Server, int, SessionRegistry]:
    """Build (not start) an agent server; returns the server, bound port, registry.

    TCP without TLS is refused unless ``insecure`` and the host is loopback.
    """
    addr = ListenAddress.parse(address)
    if addr.unix_path is None and not (insecure and addr.is_loopback):
        raise InsecureListenRefused(
            f"refusing to listen on {address} without TLS: plaintext TCP is allowed only "
            "on loopback with --insecure")
    registry = SessionRegistry(config.max_sessions)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.max_sessions + 8,
                                                    thread_name_prefix="rpc"),
                         options=SERVER_OPTIONS,
                         maximum_concurrent_rpcs=config.max_sessions * 2 + 8)
    capture_pb2_grpc.add_CoreCaptureServiceServicer_to_server(
        CoreCaptureServicer(config, registry), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    if addr.unix_path is not None:
        if os.path.exists(addr.unix_path):
            os.unlink(addr.unix_path)
        old = os.umask(0o777 & ~socket_mode)
        try:
            port = server.add_insecure_port(addr.grpc_target)
        finally:
            os.umask(old)
    else:
        log.warning("INSECURE: serving plaintext gRPC on %s (loopback only)", address)
        port = server.add_insecure_port(addr.grpc_target)
    if port == 0 and addr.unix_path is None:
        raise CorepeekError(f"cannot bind {address}")
    return server, port, registry


def serve(address: str, *, insecure: bool = False, config: AgentConfig = AgentConfig(),
          socket_mode: int = 0o600, ready: threading.Event | None = None) -> None:
    """Run an agent until SIGTERM/SIGINT; thaws every target before exiting."""
    raise_malloc_thresholds()
    server, port, registry = create_server(address, insecure=insecure, config=config,
                                           socket_mode=socket_mode)
    server.start()
    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: thawing %d session(s) and stopping", signum, len(registry.active()))
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    log.info("corepeek agent listening on %s%s", address,
             f" (port {port})" if port and not address.startswith("unix:") else "")
    if ready is not None:
        ready.set()
    stop.wait()
    registry.thaw_all()
    server.stop(grace=2).wait()
