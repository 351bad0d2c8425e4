"""The Upload RPC: capture a full core and write it straight to S3 (upload.py).

A mixin of :class:`~.service.CoreCaptureServicer`.  It is a Capture whose
reads the agent makes itself: the same gate (a stream slot of the caller's
identity), rate limit, policy on the pinned and frozen target, budget,
registry, lifetimes and audit line (which names the destination); and the
admitting rule must list the destination in ``uploads``.  The target is
thawed as soon as the copy is done (snapshot mode: once the clone exists).

A stored entry (``open.capture_id``) is uploaded the same way: the policy
on the stored target's facts must let the caller read it in full mode (a
notes-only identity cannot upload a stored full core), that same rule must
list the destination, and only full-mode entries are uploaded.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import grpc
from corepeek.v1 import capture_pb2 as pb

from .errors import (CorepeekError, InvalidRequest, PermissionDenied, SessionExpired,
                     as_corepeek_error)
from .keep import copy_readable
from .ratelimit import ByteBudget
from .session import MODE_FULL, CaptureSession
from .stored_session import StoredSession
from .upload import (Destination, MultipartWriter, check_allowed, parse_destination,
                     s3_client)

if TYPE_CHECKING:
    from .authz import CaptureGuard, Guard
    from .lifetime import Watchdog
    from .registry import SessionRegistry


class UploadRpcs:
    guard: Guard
    registry: SessionRegistry
    watchdog: Watchdog
    config: Any

    def Upload(self, request: pb.UploadRequest,
               context: grpc.ServicerContext) -> Iterator[pb.UploadProgress]:
        from .service import end_with_status, layout_message, session_options

        guard = self.guard.begin_capture(context)
        watch = self.watchdog.watch(context.cancel)
        session: CaptureSession | None = None
        stored: StoredSession | None = None
        writer: MultipartWriter | None = None
        registered = False
        try:
            if hasattr(request, "refuse"):                     # service.Undecodable
                raise request.refuse()
            dest = parse_destination(request.destination)
            guard.record.upload = dest.url
            options = session_options(request.open.options, self.config)
            if options.mode != MODE_FULL:
                raise InvalidRequest("an upload is a full core (mode FULL)")
            if request.open.capture_id:
                stored = self._open_stored_upload(request.open.capture_id, options, guard,
                                                  dest)
                yield pb.UploadProgress(layout=stored.layout_message())
                source: Any = stored
            else:
                if request.open.pid <= 0:
                    raise InvalidRequest("an upload needs a pid or a stored capture id")
                guard.admit(request.open.pid, request.open.start_time, options.mode)
                session = CaptureSession(
                    request.open.pid, start_time=request.open.start_time, options=options,
                    on_expire=end_with_status(context, SessionExpired.after(options.max_freeze)),
                    admit=guard)
                self.registry.add(session)
                registered = True
                if not context.add_callback(session.leave):
                    return
                session.open()
                rule = next((r for r in guard.policy.rules if r.name == guard.record.rule),
                            None)
                check_allowed(dest, rule.uploads if rule else (), guard.identity.key)
                yield pb.UploadProgress(layout=layout_message(session))
                source = session
            watch.touch()
            writer = MultipartWriter(s3_client(self.config.s3_endpoint_url), dest,
                                     progress=lambda _n: watch.touch())
            copy_readable(source, writer, guard)
            if session is not None:
                session.close()                                # thawed before the last part
            digest = writer.complete()
            writer = None
            size = source.layout.total_size if source.layout else 0
            yield pb.UploadProgress(done=True, url=dest.url, size=size, sha256=digest,
                                    bytes_uploaded=size)
        except CorepeekError as exc:
            guard.failed(exc.code, exc.details())
            context.abort(exc.code, exc.details())
        except grpc.RpcError:
            return
        except OSError as exc:
            err = as_corepeek_error(exc)
            guard.failed(err.code, err.details())
            context.abort(err.code, err.details())
        finally:
            if writer is not None:
                writer.abort()                                 # nothing under the key
            self.watchdog.forget(watch)
            if stored is not None:
                stored.close()
            frozen = self.registry.end(session, registered)
            if session is not None:
                guard.record.freeze_id = session.freeze_id
            sid = session.id if session else stored.id if stored else ""
            guard.finish(session_id=sid, frozen_seconds=frozen,
                         stop_seconds=(session.freeze.freeze_seconds
                                       if session and session.freeze and not session.joined
                                       else 0),
                         expired=bool(session and session.expired), active=context.is_active())

    def _open_stored_upload(self, entry_id: str, options: Any, guard: CaptureGuard,
                            dest: Destination) -> StoredSession:
        """A stored full core the caller may read in full mode (the policy on the
        stored target's facts, as Capture of a stored entry) and whose admitting
        rule lists ``dest``; audited as such."""
        guard.admit(0, 0, MODE_FULL)                   # rate limit, a rule names the client
        rec = guard.record
        rec.target = {"stored": entry_id[:64]}
        store = self._store()                          # type: ignore[attr-defined]
        stored = StoredSession(store, entry_id, guard.policy, guard.identity.names, MODE_FULL,
                               options.chunk_size)
        try:
            rule = stored.decision.rule
            if rule is None:                           # fail closed: no rule, no uploads
                raise PermissionDenied(f"no rule lets {guard.identity.key} upload {entry_id}")
            rec.pid, rec.rule = stored.facts.pid, rule.name
            rec.target.update(exe=stored.facts.exe, comm=stored.facts.comm,
                              uids=list(stored.facts.uids), start_time=stored.facts.start_time)
            if stored.entry.meta.get("mode", MODE_FULL) != MODE_FULL:
                raise InvalidRequest(
                    f"stored capture {entry_id} holds a {stored.entry.meta['mode']}-mode "
                    "capture; only full cores are uploaded")
            check_allowed(dest, rule.uploads, guard.identity.key)
            guard.budget = ByteBudget(stored.decision.budget)
        except BaseException:
            stored.close()
            raise
        return stored
