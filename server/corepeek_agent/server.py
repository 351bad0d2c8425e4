"""Building and running an agent server: the factory tests and the CLI share."""

from __future__ import annotations

import ctypes
import ctypes.util
import grp
import ipaddress
import logging
import os
import signal
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
from corepeek.v1 import capture_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from . import authz
from .authz import Guard
from .errors import CorepeekError
from .gate import UNARY_WORKERS, GateLimits, RpcGate
from .registry import SessionRegistry
from .service import AgentConfig, CoreCaptureServicer, add_capture_service
from .sockbuf import buffer_options
from .store.limits import StoreLimits
from .store.store import Store
from .triggers.capture import CaptureContext
from .triggers.config import DEFAULT_INTERVAL, load_triggers
from .triggers.engine import TriggerEngine
from .triggers.persist import TriggerState
from .snapshot import ledger
from .tls import ReloadingCertificates, TLSConfigError, TLSFiles
from .unixsocket import bind_unix

log = logging.getLogger(__name__)

SERVICE_NAME = capture_pb2.DESCRIPTOR.services_by_name["CoreCaptureService"].full_name

SERVER_OPTIONS = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.so_reuseport", 0),
    # Requests are small (open/read messages, health, reflection): refuse
    # anything larger before it is parsed.
    ("grpc.max_receive_message_length", 64 * 1024),
    ("grpc.max_metadata_size", 16 * 1024),
]


def server_options(config: AgentConfig) -> list[tuple[str, object]]:
    """Keepalive: a client whose network path is cut is noticed within about
    keepalive + timeout, and its session is cancelled (which thaws the target).
    Socket send buffers sized for the stream (sockbuf.py)."""
    return [("grpc.keepalive_time_ms", int(config.keepalive_seconds * 1000)),
            ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout_seconds * 1000)),
            *SERVER_OPTIONS, *buffer_options(config.socket_buffer_bytes)]


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


PR_SET_DUMPABLE = 4


def protect_self() -> None:
    """Make the agent non-dumpable: no core of it on a crash, and other agents
    (and unprivileged debuggers) refuse it, for its memory holds the TLS key and
    what it listed of other processes."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_DUMPABLE, 0) failed: %s", os.strerror(ctypes.get_errno()))


def resolve_group(group: str | int) -> int:
    """A group name or number as a gid."""
    if isinstance(group, int) or str(group).isdigit():
        return int(group)
    try:
        return grp.getgrnam(str(group)).gr_gid
    except KeyError:
        raise CorepeekError(f"no group named {group!r}") from None


def gate_limits(config: AgentConfig) -> GateLimits:
    """Concurrent streams: ``--max-sessions`` plus one client's share in all; a TLS
    identity gets ``--max-streams-per-client``; the local identity (there is no
    other on a Unix or --insecure listener) may use them all."""
    total = config.max_sessions + config.max_streams_per_client
    return GateLimits(streams=total, per_client=config.max_streams_per_client,
                      local_per_client=total)


def create_server(address: str, *, insecure: bool = False,
                  config: AgentConfig = AgentConfig(),
                  socket_mode: int = 0o600, socket_group: str | int | None = None,
                  tls: TLSFiles | None = None, guard: Guard | None = None,
                  certificates: ReloadingCertificates | None = None,
                  registry: SessionRegistry | None = None, store: Store | None = None,
                  engine: TriggerEngine | None = None,
                  ) -> tuple[grpc.Server, int, SessionRegistry]:
    """Build (not start) an agent server; returns the server, bound port, registry.

    TCP needs mutual TLS (``tls``); plaintext TCP is refused unless ``insecure``
    and the host is loopback.  A Unix socket is created with ``socket_mode``
    and, if given, owned by ``socket_group``: its file mode is the only access
    control gRPC offers for it.  ``guard`` (policy, limits, audit) defaults to
    the built-in policy of the transport: local peers may capture every dumpable
    process, TLS peers nothing.
    """
    addr = ListenAddress.parse(address)
    if tls is not None and certificates is None:
        certificates = ReloadingCertificates(tls)
    if addr.unix_path is not None and certificates is not None:
        raise TLSConfigError(f"{address} is a Unix socket: TLS is for TCP listeners "
                             "(protect the socket with --socket-mode/--socket-group)")
    if addr.unix_path is None and certificates is None and not (insecure and addr.is_loopback):
        raise InsecureListenRefused(
            f"refusing to listen on {address} without TLS: pass --tls-cert, --tls-key and "
            "--tls-ca (plaintext TCP is allowed only on loopback with --insecure)")
    if guard is None:
        guard = Guard.for_listener(local_transport=certificates is None)
    registry = registry or SessionRegistry(config.max_sessions)
    gate = RpcGate(guard, gate_limits(config))
    # Streams keep a worker each for their whole life and are capped by the
    # gate; the extra workers let refusals run while every slot is held.
    # Unary calls (health, listings) run on the gate's own pool.
    workers = gate.limits.streams + 4
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers,
                                                    thread_name_prefix="rpc"),
                         interceptors=(gate,), options=server_options(config),
                         maximum_concurrent_rpcs=workers + UNARY_WORKERS + 16)
    add_capture_service(CoreCaptureServicer(config, registry, guard, store, engine), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    if addr.unix_path is not None:
        gid = resolve_group(socket_group) if socket_group is not None else None
        port = bind_unix(addr.unix_path, socket_mode, gid,
                         lambda: server.add_insecure_port(addr.grpc_target))
        log.info("unix socket %s mode %o group %s", addr.unix_path, socket_mode,
                 gid if gid is not None else os.getegid())
    elif certificates is not None:
        port = server.add_secure_port(addr.grpc_target, certificates.credentials())
        log.info("mutual TLS on %s: client certificates must chain to %s",
                 address, certificates.files.ca)
    else:
        log.warning("INSECURE: serving plaintext gRPC on %s (loopback only): every local "
                    "user who can connect gets the policy's local identity", address)
        port = server.add_insecure_port(addr.grpc_target)
    if port == 0 and addr.unix_path is None:
        raise CorepeekError(f"cannot bind {address}")
    return server, port, registry


def serve(address: str, *, insecure: bool = False, config: AgentConfig = AgentConfig(),
          socket_mode: int = 0o600, ready: threading.Event | None = None,
          socket_group: str | int | None = None, tls: TLSFiles | None = None,
          policy_path: str | None = None, audit_log: str | None = None,
          sessions_per_minute: int | None = None, metrics_address: str | None = None,
          health_address: str | None = None, log_format: str = "text",
          store_path: str | None = None, store_limits: StoreLimits = StoreLimits(),
          triggers_path: str | None = None, trigger_interval: float | None = None) -> None:
    """Run an agent until SIGTERM/SIGINT; thaws every target before exiting.

    SIGHUP reloads the TLS certificates (they also reload by themselves when
    the files change), the policy file, and reopens the audit log.
    ``metrics_address`` (Prometheus ``/metrics``), ``health_address``
    (plaintext gRPC health only, for kubelet probes) and ``log_format``
    (``text``/``json``): see ``metrics.py``.
    """
    from .metrics import AgentMetrics, HealthPort, configure_logging

    configure_logging(log_format)
    protect_self()
    if authz.FORCE_PROC_DUMPABLE:
        log.warning("COREPEEK_TEST_PROC_DUMPABLE=1 (tests only): dumpability from /proc, "
                    "not PIDFD_INFO_COREDUMP")
    raise_malloc_thresholds()
    # Clones a killed predecessor left (their zombies under their targets).
    ledger.sweep(config.clone_state_dir, config.default_thread_timeout)
    certificates = ReloadingCertificates(tls) if tls is not None else None
    guard = Guard.for_listener(local_transport=certificates is None, policy_path=policy_path,
                               audit_path=audit_log, sessions_per_minute=sessions_per_minute)
    trigger_config = load_triggers(triggers_path) if triggers_path else None
    if trigger_config is not None and not store_path:
        raise CorepeekError("--triggers needs --store DIR: triggered captures go to the store")
    registry = SessionRegistry(config.max_sessions)
    store = Store(store_path, store_limits) if store_path else None
    engine = None
    if store is not None:
        interval = trigger_interval or (trigger_config.interval if trigger_config
                                        else DEFAULT_INTERVAL)
        engine = TriggerEngine(CaptureContext(guard, registry, store, config), interval,
                               trigger_config, TriggerState(store.dir_fd))
    server, port, registry = create_server(address, insecure=insecure, config=config,
                                           socket_mode=socket_mode, socket_group=socket_group,
                                           guard=guard, certificates=certificates,
                                           registry=registry, store=store, engine=engine)
    metrics = AgentMetrics() if metrics_address else None
    if metrics is not None:
        metrics.instrument(guard, registry)      # observes audit records + the registry
        metrics.serve(metrics_address)
    health_port = HealthPort(health_address) if health_address else None
    if health_port is not None:
        health_port.start()
    server.start()
    if engine is not None:
        engine.start()
        log.info("store %s; triggers sampled every %g s", store_path, engine.interval)
    if health_port is not None:
        health_port.set_serving(True)
    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: thawing %d session(s) and stopping", signum, len(registry.active()))
        stop.set()

    def _on_hup(_signum: int, _frame: object) -> None:
        log.warning("SIGHUP: reloading certificates and policy, reopening the audit log")
        if certificates is not None:
            certificates.request_reload()
        guard.reload()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGHUP, _on_hup)
    log.info("corepeek agent listening on %s%s", address,
             f" (port {port})" if port and not address.startswith("unix:") else "")
    if ready is not None:
        ready.set()
    stop.wait()
    if health_port is not None:
        health_port.set_serving(False)
    if engine is not None:
        engine.stop()
    registry.thaw_all()
    # Bounded: gRPC never completes the shutdown of a call it aborted itself
    # because a message did not parse (measured, grpcio 1.85), and every
    # target is already thawed.
    if not server.stop(grace=2).wait(timeout=3):
        log.warning("gRPC did not finish stopping in time; exiting anyway")
    if store is not None:
        store.close()
    guard.audit.close()
    if health_port is not None:
        health_port.stop()
    if metrics is not None:
        metrics.close()
