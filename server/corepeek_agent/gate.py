"""Admission at RPC start, before any request is read: one place for every method.

The peer's identity is known when an RPC starts (TLS handshake, or the Unix
socket), so a client no policy rule names is refused with PERMISSION_DENIED
before a handler reads anything, and each identity may hold only a few
streams at once: an RPC of the synchronous gRPC server keeps a worker thread
for its whole life, so idle streams are how one certificate could starve
everyone (issue 19, finding 1).

* ``Health/Check`` is open to every authenticated peer (kubelet-style probes,
  and a client checking it reached the right agent); everything else —
  Capture, ListProcesses, reflection, ``Health/Watch`` — needs a rule naming
  the client.
* Streaming RPCs take a slot from :class:`~.ratelimit.StreamSlots`: per TLS
  identity ``--max-streams-per-client``; the local identity (every peer of
  the Unix socket, which gRPC cannot tell apart) up to ``--max-sessions``.
* Unary RPCs (health checks, listings) run on a pool of their own, so they
  keep answering while every capture slot is taken.

Every refusal is audited (one line, ``outcome: refused``) and so counted in
the metrics (``corepeek_refusals_total``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc

from .audit import SessionRecord
from .authz import Guard, Identity
from .errors import CorepeekError, PermissionDenied
from .ratelimit import StreamSlots

log = logging.getLogger(__name__)

OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check"})
_KINDS = {"/corepeek.v1.CoreCaptureService/Capture": "capture",
          "/corepeek.v1.CoreCaptureService/ListProcesses": "list",
          "/corepeek.v1.CoreCaptureService/AddTrigger": "trigger",
          "/corepeek.v1.CoreCaptureService/ListTriggers": "trigger",
          "/corepeek.v1.CoreCaptureService/RemoveTrigger": "trigger",
          "/corepeek.v1.CoreCaptureService/ListCaptures": "captures",
          "/corepeek.v1.CoreCaptureService/Upload": "capture"}
UNARY_WORKERS = 8


@dataclass(frozen=True)
class GateLimits:
    streams: int                 # concurrent streaming RPCs, all clients
    per_client: int              # ... of one TLS identity
    local_per_client: int        # ... of the local identity (all socket peers)


class RpcGate(grpc.ServerInterceptor):
    """Wraps every method handler with the admission check (see module doc)."""

    def __init__(self, guard: Guard, limits: GateLimits,
                 unary_pool: futures.ThreadPoolExecutor | None = None) -> None:
        self.guard = guard
        self.limits = limits
        self.slots = StreamSlots(limits.streams)
        self.unary_pool = unary_pool or futures.ThreadPoolExecutor(
            max_workers=UNARY_WORKERS, thread_name_prefix="rpc-unary")

    def intercept_service(self, continuation: Callable[[Any], Any],
                          details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        if handler.unary_unary is not None:
            behavior = handler.unary_unary
            if method not in OPEN_METHODS:
                behavior = self._gated_unary(method, behavior)
            behavior = _on_pool(behavior, self.unary_pool)
            return handler._replace(unary_unary=behavior)
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=self._gated_stream(method, handler.unary_stream))
        if handler.stream_stream is not None:
            return handler._replace(stream_stream=self._gated_stream(method,
                                                                     handler.stream_stream))
        return handler._replace(stream_unary=self._gated_unary(method, handler.stream_unary,
                                                               stream=True))

    # -- admission -------------------------------------------------------------

    def _admit(self, method: str, context: grpc.ServicerContext,
               stream: bool) -> Callable[[], None]:
        """Check the client; returns the release of its stream slot or aborts the RPC."""
        ident = self.guard.identify(context)
        try:
            if not self.guard.policy.rules_for(ident.names):
                raise PermissionDenied(
                    f"{ident.key or 'a client without a SAN URI or DNS name'} is not allowed "
                    "to use this agent",
                    help="ask the agent's operator to add a rule for this identity to the policy")
            if not stream:
                return lambda: None
            per = (self.limits.local_per_client if ident.transport == "local"
                   else self.limits.per_client)
            return self.slots.acquire(ident.key, per)
        except CorepeekError as exc:
            self._refused(method, ident, exc)
            context.abort(exc.code, exc.details())
            raise       # not reached: abort raises

    def _refused(self, method: str, ident: Identity, exc: CorepeekError) -> None:
        rec = SessionRecord(kind=_KINDS.get(method, "rpc"), identities=list(ident.names),
                            peer=ident.peer, method=method)
        rec.fail("refused", exc.code.name, exc.details())
        self.guard.audit.write(rec)

    def _gated_stream(self, method: str, inner: Callable[..., Iterator[Any]]
                      ) -> Callable[..., Iterator[Any]]:
        def behavior(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            release = self._admit(method, context, stream=True)
            context.add_callback(release)     # also when gRPC drops the generator
            try:
                yield from inner(request, context)
            finally:
                release()
        return behavior

    def _gated_unary(self, method: str, inner: Callable[..., Any],
                     stream: bool = False) -> Callable[..., Any]:
        def behavior(request: Any, context: grpc.ServicerContext) -> Any:
            release = self._admit(method, context, stream=stream)
            try:
                return inner(request, context)
            finally:
                release()
        return behavior


def _on_pool(behavior: Callable[..., Any], pool: futures.ThreadPoolExecutor
             ) -> Callable[..., Any]:
    """Run ``behavior`` on ``pool`` (gRPC reads ``experimental_thread_pool``)."""
    def run(request: Any, context: grpc.ServicerContext) -> Any:
        return behavior(request, context)
    run.experimental_thread_pool = pool     # type: ignore[attr-defined]
    return run
