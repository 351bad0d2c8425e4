"""The servicer's RPCs for triggers and the store, and Capture of a stored entry.

A mixin of :class:`~.service.CoreCaptureServicer` (which maps errors to
statuses): every one of these RPCs passes the stream-start gate first (an
identity no rule names never gets here), is rate limited per identity, and
writes one audit line.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import grpc
from corepeek.v1 import capture_pb2 as pb

from .audit import SessionRecord
from .authz import CaptureGuard, Guard
from .errors import CorepeekError, InvalidRequest, PermissionDenied
from .lifetime import StreamWatch
from .policy import MODE_FULL, MODE_NOTES, MODE_STACKS
from .ratelimit import ByteBudget
from .keep import keep_session
from .session import CaptureSession, SessionOptions
from .stored_session import StoredSession, stored_facts
from .store.store import Store
from .triggers.spec import Selector, Trigger, TriggerSpec

if TYPE_CHECKING:
    from .triggers.engine import TriggerEngine

_MODES = {pb.CAPTURE_MODE_UNSPECIFIED: MODE_FULL, pb.CAPTURE_MODE_FULL: MODE_FULL,
          pb.CAPTURE_MODE_STACKS: MODE_STACKS, pb.CAPTURE_MODE_NOTES: MODE_NOTES}
_MODE_ENUM = {v: k for k, v in _MODES.items() if k}


class NotConfigured(CorepeekError):
    code = grpc.StatusCode.FAILED_PRECONDITION


def spec_from_pb(m: pb.TriggerSpec) -> TriggerSpec:
    if m.mode not in _MODES:
        raise InvalidRequest(f"unknown capture mode {m.mode}")
    sel = m.selector
    if any(len(s) > 4096 for s in (*sel.comm, *sel.exe, *sel.cgroup, *sel.container)) or sum(
            map(len, (sel.comm, sel.exe, sel.cgroup, sel.container))) > 64:
        raise InvalidRequest("selectors are limited to 64 globs of 4096 characters")
    return TriggerSpec(
        selector=Selector(pid=sel.pid, comm=tuple(sel.comm), exe=tuple(sel.exe),
                          cgroup=tuple(sel.cgroup), container=tuple(sel.container)),
        rss_above=m.rss_above_bytes, cpu_above=m.cpu_above_percent, cpu_for=m.cpu_for_seconds,
        threads_above=m.threads_above, fds_above=m.fds_above, every=m.every_seconds,
        mode=_MODES[m.mode], count=m.count or 1, cooldown=m.cooldown_seconds, name=m.name)


def trigger_info(t: Trigger) -> pb.TriggerInfo:
    s, sel = t.spec, t.spec.selector
    return pb.TriggerInfo(
        id=t.id, owner=t.owner_key, source=t.source, fired=t.fired, last_fired=t.last_fired,
        last_error=t.last_error, spec=pb.TriggerSpec(
            selector=pb.TriggerSelector(pid=sel.pid, comm=sel.comm, exe=sel.exe,
                                        cgroup=sel.cgroup, container=sel.container),
            rss_above_bytes=s.rss_above, cpu_above_percent=s.cpu_above, cpu_for_seconds=s.cpu_for,
            threads_above=s.threads_above, fds_above=s.fds_above, every_seconds=s.every,
            mode=_MODE_ENUM[s.mode], count=s.count, cooldown_seconds=s.cooldown, name=s.name))


class StoreRpcs:
    guard: Guard
    engine: TriggerEngine | None
    store: Store | None

    def _record(self, context: grpc.ServicerContext, kind: str) -> tuple[Any, SessionRecord]:
        ident = self.guard.identify(context)
        rec = SessionRecord(kind=kind, identities=list(ident.names), peer=ident.peer)
        return ident, rec

    def _unary(self, request: Any, context: grpc.ServicerContext, kind: str, body: Any) -> Any:
        """Run ``body(identity, record)`` with the rate limit, the status mapping
        and the audit line every one of these RPCs has."""
        ident, rec = self._record(context, kind)
        try:
            if hasattr(request, "refuse"):          # service.Undecodable
                raise request.refuse()
            if not self.guard.policy.rules_for(ident.names):     # reloaded since the gate
                raise PermissionDenied(f"{ident.key} is not allowed to use this agent")
            self.guard.list_rate.acquire(ident.key)
            return body(ident, rec)
        except CorepeekError as exc:
            refused = exc.code in (grpc.StatusCode.PERMISSION_DENIED,
                                   grpc.StatusCode.RESOURCE_EXHAUSTED)
            rec.fail("refused" if refused else "error", exc.code.name, exc.details())
            context.abort(exc.code, exc.details())
        finally:
            self.guard.audit.write(rec)

    def _engine(self) -> TriggerEngine:
        if self.engine is None:
            raise NotConfigured("this agent runs no triggers",
                                help="start it with --store DIR (and optionally --triggers FILE)")
        return self.engine

    def _store(self) -> Store:
        if self.store is None:
            raise NotConfigured("this agent keeps no store", help="start it with --store DIR")
        return self.store

    def AddTrigger(self, request: pb.AddTriggerRequest,
                   context: grpc.ServicerContext) -> pb.TriggerInfo:
        def body(ident: Any, rec: SessionRecord) -> pb.TriggerInfo:
            engine = self._engine()
            policy = self.guard.policy
            if not policy.may_set_triggers(ident.names):
                raise PermissionDenied(f"{ident.key} may not add triggers",
                                       help="a policy rule naming it needs `triggers: true`")
            spec = spec_from_pb(request.spec)
            if not any(spec.mode in r.modes for r in policy.rules_for(ident.names)
                       if r.triggers):
                raise PermissionDenied(f"no rule lets {ident.key} capture in {spec.mode} mode")
            t = engine.add(spec, ident.names)
            rec.trigger = {"id": t.id, "action": "add", "condition": spec.describe(),
                           "mode": spec.mode, "count": spec.count, "cooldown": spec.cooldown}
            return trigger_info(t)
        return self._unary(request, context, "trigger", body)

    def ListTriggers(self, request: pb.ListTriggersRequest,
                     context: grpc.ServicerContext) -> pb.ListTriggersResponse:
        def body(ident: Any, rec: SessionRecord) -> pb.ListTriggersResponse:
            engine = self._engine()
            sees_config = self.guard.policy.may_set_triggers(ident.names)
            shown = [t for t in engine.triggers()
                     if t.owner == ident.names or (sees_config and t.source == "config")]
            rec.listed = len(shown)
            return pb.ListTriggersResponse(triggers=[trigger_info(t) for t in shown])
        return self._unary(request, context, "trigger", body)

    def RemoveTrigger(self, request: pb.RemoveTriggerRequest,
                      context: grpc.ServicerContext) -> pb.RemoveTriggerResponse:
        def body(ident: Any, rec: SessionRecord) -> pb.RemoveTriggerResponse:
            removed = self._engine().remove(request.id, ident.names)
            rec.trigger = {"id": request.id[:64], "action": "remove", "removed": removed}
            return pb.RemoveTriggerResponse(removed=removed)
        return self._unary(request, context, "trigger", body)

    def ListCaptures(self, request: pb.ListCapturesRequest,
                     context: grpc.ServicerContext) -> pb.ListCapturesResponse:
        def body(ident: Any, rec: SessionRecord) -> pb.ListCapturesResponse:
            policy = self.guard.policy
            out = []
            for e in self._store().entries():
                if not policy.may_capture(ident.names, stored_facts(e)):
                    continue
                m = e.meta
                out.append(pb.StoredCapture(
                    id=e.id, pid=m.get("pid", 0), start_time=m.get("start_time", 0),
                    comm=m.get("comm", ""), exe=m.get("exe", ""),
                    trigger_id=m.get("trigger_id", ""), owner=",".join(m.get("owner", [])),
                    build_ids=[b["build_id"] for b in m.get("build_ids", [])],
                    time=e.time, core_size=e.core_size, stored_bytes=e.stored_bytes,
                    mode=_MODE_ENUM[m.get("mode", MODE_FULL)], corrupt=bool(e.corrupt),
                    cgroup=m.get("facts", {}).get("cgroup", "")))
            rec.listed = len(out)
            return pb.ListCapturesResponse(captures=out, hostname=socket.gethostname())
        return self._unary(request, context, "captures", body)

    def keep_capture(self, session: CaptureSession, layout: pb.CoreLayout,
                     guard: CaptureGuard) -> str:
        """CaptureOptions.keep: the open session into the store; the entry id."""
        store = self._store()
        rule = next((r for r in guard.policy.rules if r.name == guard.record.rule), None)
        if rule is None or not rule.keep:
            raise PermissionDenied(f"{guard.identity.key} may not ask the agent to keep "
                                   "captures", help="the admitting policy rule needs `keep: true`")
        entry = keep_session(session, layout, guard, store, {"kept": True}, charge=False)
        guard.record.target["kept"] = entry.id
        return entry.id

    def serve_stored(self, entry_id: str, options: SessionOptions,
                     request_iterator: Iterator[pb.CaptureRequest], guard: CaptureGuard,
                     watch: StreamWatch, compressor: Any) -> Iterator[Any]:
        """Capture of a stored entry: layout, then reads, as for a live pid."""
        store = self._store()
        guard.admit(0, 0, options.mode)             # rate limit, a rule names the client
        session = StoredSession(store, entry_id, guard.policy, guard.identity.names,
                                options.mode, options.chunk_size)
        try:
            rec = guard.record
            rec.pid, rec.rule = session.facts.pid, session.decision.rule.name  # type: ignore[union-attr]
            rec.target = {"stored": entry_id, "exe": session.facts.exe,
                          "comm": session.facts.comm, "uids": list(session.facts.uids),
                          "start_time": session.facts.start_time}
            guard.budget = ByteBudget(session.decision.budget)
            layout = session.layout_message()
            if compressor is not None:
                layout.compression = pb.COMPRESSION_ZSTD
            rec.session_id = session.id
            yield pb.CaptureResponse(layout=layout)
            watch.touch()
            for req in request_iterator:
                watch.touch()
                for msg in self._answer(session, req, guard, compressor):  # type: ignore[attr-defined]
                    yield msg
                    watch.touch()
        finally:
            session.close()
