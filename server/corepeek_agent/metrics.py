"""Agent observability: Prometheus metrics, a plaintext health port, JSON logs.

``corepeek agent --metrics-address HOST:PORT`` serves ``/metrics`` (Prometheus
text format) with:

| metric | type | labels | what |
|---|---|---|---|
| ``corepeek_sessions_active`` | gauge | — | Capture sessions holding a ``--max-sessions`` slot now (opening, frozen or serving; a notes session gives its slot back once its target is thawed) |
| ``corepeek_sessions_max`` | gauge | — | ``--max-sessions`` |
| ``corepeek_targets_frozen`` | gauge | — | targets stopped by this agent right now |
| ``corepeek_freeze_seconds`` | histogram | — | how long each captured target stayed frozen |
| ``corepeek_stop_seconds`` | histogram | — | time to stop every thread of a target |
| ``corepeek_served_bytes_total`` | counter | ``kind`` = data, hole | core bytes served (holes are described, not sent) |
| ``corepeek_captures_total`` | counter | ``result``, ``mode`` | Capture streams ended, by outcome |
| ``corepeek_list_requests_total`` | counter | ``result`` | ListProcesses calls |
| ``corepeek_refusals_total`` | counter | ``rpc`` = capture, list, rpc, policy; ``code`` | every refusal: unnamed client, too many streams, rate, no `open` in time, policy reload refused, ... |

No label carries a pid, an executable or a client identity: cardinality stays
bounded on a busy host, and the metrics leak nothing the audit log guards.
``result`` is the audit log's ``outcome`` (ok, refused, error, cancelled,
expired, empty).

How it hooks in without touching the Capture handler: every Capture and
ListProcesses call already ends with exactly one audit record
(``authz.CaptureGuard.finish`` / ``ListGuard.finish`` -> ``Guard.audit.write``),
carrying the outcome, the mode, the bytes served and the freeze duration.
:func:`instrument` wraps the guard's :class:`~corepeek_agent.audit.AuditLog`
in an :class:`AuditTap` that counts each record before writing it, and reads
the gauges from the :class:`~corepeek_agent.registry.SessionRegistry` when
scraped.  Counters therefore move when a session *ends*.

``--health-address HOST:PORT`` serves only ``grpc.health.v1.Health`` in
plaintext, for kubelet ``grpc:`` probes, which cannot present a client
certificate to the mutual-TLS listener.  ``--log-format json`` turns every
agent log line into one JSON object.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

FREEZE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                  120.0, 300.0)
STOP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
RESULTS = ("ok", "refused", "error", "cancelled", "expired")
MODES = ("full", "stacks", "notes")


def _target_frozen(session: Any) -> bool:
    """Is this session's target stopped now?  From the session lifecycle: opened
    (freezing started), not closed, and its tracer has not let the target go
    (snapshot mode lets it go once the clone exists)."""
    if not getattr(session, "opened_at", 0.0) or session.closed.is_set():
        return False
    freezer = getattr(session, "_freezer", None)
    return freezer is not None and not freezer.target_detached_at and \
        not freezer.thawed.is_set()


class _SessionGauges(Collector):
    """Gauges read from the session registry at scrape time."""

    def __init__(self, registry: Any) -> None:
        self._registry = registry

    def collect(self) -> Iterator[GaugeMetricFamily]:
        active = self._registry.active()
        yield GaugeMetricFamily("corepeek_sessions_active",
                                "Capture sessions holding a --max-sessions slot now",
                                value=len(active))
        yield GaugeMetricFamily("corepeek_sessions_max", "Limit on concurrent sessions",
                                value=self._registry.max_sessions)
        yield GaugeMetricFamily("corepeek_targets_frozen",
                                "Target processes this agent holds stopped right now",
                                value=len({id(getattr(s, "_freezer", None))
                                           for s in active if _target_frozen(s)}))


class AgentMetrics:
    """The agent's Prometheus metrics, in a registry of their own (so several
    agents in one process, as in tests, do not collide)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.captures = Counter("corepeek_captures", "Capture streams ended, by outcome",
                                ["result", "mode"], registry=r)
        self.listings = Counter("corepeek_list_requests", "ListProcesses calls, by outcome",
                                ["result"], registry=r)
        self.freeze = Histogram("corepeek_freeze_seconds",
                                "How long each captured target stayed frozen",
                                buckets=FREEZE_BUCKETS, registry=r)
        self.stop = Histogram("corepeek_stop_seconds",
                              "Time the agent took to stop every thread of a target",
                              buckets=STOP_BUCKETS, registry=r)
        self.served = Counter("corepeek_served_bytes", "Core bytes served to clients",
                              ["kind"], registry=r)
        self.snapshot_fallbacks = Counter(
            "corepeek_snapshot_fallbacks", "Captures that wanted a snapshot and ran live "
            "instead, by reason (docs/snapshot.md)", ["reason"], registry=r)
        self.refusals = Counter("corepeek_refusals", "Calls the agent refused, by RPC kind "
                                "and gRPC status", ["rpc", "code"], registry=r)
        for mode in MODES:
            for result in ("ok", "error"):
                self.captures.labels(result=result, mode=mode)
        for kind in ("data", "hole"):
            self.served.labels(kind=kind)
        self.listings.labels(result="ok")
        self._watching = False
        self._http: Any = None

    # -- observing ----------------------------------------------------------------

    def observe(self, record: Any) -> None:
        """Count one finished call from its audit record (``audit.SessionRecord``)."""
        kind = getattr(record, "kind", "")
        outcome = getattr(record, "outcome", "") or "error"
        if outcome == "refused":
            self.refusals.labels(rpc=kind or "rpc", code=getattr(record, "code", "") or "").inc()
        if kind == "list":
            self.listings.labels(result=outcome).inc()
            return
        if kind != "capture":
            return
        self.captures.labels(result=outcome, mode=getattr(record, "mode", "") or "").inc()
        reason = (getattr(record, "snapshot", None) or {}).get("reason", "")
        if reason:
            self.snapshot_fallbacks.labels(reason=reason).inc()
        data, hole = int(getattr(record, "data_bytes", 0)), int(getattr(record, "hole_bytes", 0))
        if data:
            self.served.labels(kind="data").inc(data)
        if hole:
            self.served.labels(kind="hole").inc(hole)
        frozen = float(getattr(record, "freeze_seconds", 0.0))
        stop_us = int(getattr(record, "stop_micros", 0))
        if stop_us > 0:
            self.stop.observe(stop_us / 1e6)
        joined = getattr(record, "freeze_id", "") not in ("", getattr(record, "session_id", ""))
        if frozen > 0 and not joined and (stop_us > 0 or getattr(record, "session_id", "")):
            self.freeze.observe(frozen)         # once per freeze, not per joining session

    def watch(self, sessions: Any) -> None:
        """Read the gauges from ``sessions`` (a SessionRegistry) at each scrape."""
        if not self._watching:
            self.registry.register(_SessionGauges(sessions))
            self._watching = True

    def instrument(self, guard: Any, sessions: Any) -> None:
        """Observe every call ``guard`` audits and the sessions of ``sessions``."""
        if not isinstance(guard.audit, AuditTap):
            guard.audit = AuditTap(guard.audit, self)
        self.watch(sessions)

    # -- serving --------------------------------------------------------------------

    def serve(self, address: str) -> int:
        """Serve ``/metrics`` on ``HOST:PORT`` (plain HTTP); returns the bound port."""
        host, port = split_host_port(address)
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        bound = int(server.server_port)
        log.info("metrics on http://%s/metrics", f"{host}:{bound}")
        return bound

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class AuditTap:
    """An AuditLog that tells :class:`AgentMetrics` about each record it writes."""

    def __init__(self, inner: Any, metrics: AgentMetrics) -> None:
        self.inner = inner
        self.metrics = metrics

    def write(self, record: Any) -> None:
        try:
            self.metrics.observe(record)
        except Exception:  # noqa: BLE001 - metrics never break auditing
            log.exception("metrics: cannot observe an audit record")
        self.inner.write(record)

    def reopen(self) -> None:
        self.inner.reopen()

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"want HOST:PORT, not {address!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


# -- plaintext health port -----------------------------------------------------------------

class HealthPort:
    """A second gRPC server with only the health service, in plaintext.

    Kubelet ``grpc:`` probes connect without a client certificate, so they
    cannot reach the mutual-TLS listener; this port answers them.  It carries
    no capture service and nothing but SERVING / NOT_SERVING.
    """

    def __init__(self, address: str) -> None:
        from concurrent import futures

        import grpc
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc

        self._pb = health_pb2
        self.servicer = health.HealthServicer()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2,
                                                             thread_name_prefix="health"),
                                  options=[("grpc.so_reuseport", 0),
                                           ("grpc.max_receive_message_length", 4096)],
                                  maximum_concurrent_rpcs=8)
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, self.server)
        host, port = split_host_port(address)
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.port = self.server.add_insecure_port(target)
        if not self.port:
            raise OSError(f"cannot bind the health port {address}")
        log.info("health on %s", f"{host}:{self.port}")
        self.set_serving(False)

    def start(self) -> None:
        self.server.start()

    def set_serving(self, serving: bool) -> None:
        from corepeek.v1 import capture_pb2

        status = (self._pb.HealthCheckResponse.SERVING if serving
                  else self._pb.HealthCheckResponse.NOT_SERVING)
        name = capture_pb2.DESCRIPTOR.services_by_name["CoreCaptureService"].full_name
        for service in ("", name):
            self.servicer.set(service, status)

    def stop(self) -> None:
        self.set_serving(False)
        self.server.stop(grace=1).wait()


# -- JSON logs ---------------------------------------------------------------------------------

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time (UTC), level, logger, message, thread, and any
    ``extra=`` fields; exceptions as ``exception`` text."""

    def format(self, record: logging.LogRecord) -> str:
        t = time.gmtime(record.created)
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "thread": record.threadName,
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, separators=(",", ":"))


def configure_logging(fmt: str) -> None:
    """``text`` (unchanged) or ``json``: switch every root handler's formatter."""
    if fmt == "text":
        return
    if fmt != "json":
        raise ValueError(f"unknown log format {fmt!r}")
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig()
    for handler in root.handlers:
        handler.setFormatter(JsonLogFormatter())


__all__ = ["AgentMetrics", "AuditTap", "HealthPort", "JsonLogFormatter", "configure_logging",
           "split_host_port"]
