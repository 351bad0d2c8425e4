"""The Upload RPC: capture a full core and write it straight to S3 (upload.py).

A mixin of :class:`~.service.CoreCaptureServicer`.  It is a Capture whose
reads the agent makes itself: the same gate (a stream slot of the caller's
identity), rate limit, policy on the pinned and frozen target, budget,
registry, lifetimes and audit line (which names the destination); and the
admitting rule must list the destination in ``uploads``.  The target is
thawed as soon as the copy is done (snapshot mode: once the clone exists).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import grpc
from corepeek.v1 import capture_pb2 as pb

from .errors import CorepeekError, InvalidRequest, SessionExpired, as_corepeek_error
from .keep import copy_readable
from .session import MODE_FULL, CaptureSession
from .upload import MultipartWriter, check_allowed, parse_destination, s3_client

if TYPE_CHECKING:
    from .authz import Guard
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
        writer: MultipartWriter | None = None
        registered = False
        try:
            if hasattr(request, "refuse"):                     # service.Undecodable
                raise request.refuse()
            dest = parse_destination(request.destination)
            guard.record.upload = dest.url
            options = session_options(request.open.options, self.config)
            if options.mode != MODE_FULL or request.open.capture_id or request.open.pid <= 0:
                raise InvalidRequest("an upload is the full core of a live pid (mode FULL)")
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
            rule = next((r for r in guard.policy.rules if r.name == guard.record.rule), None)
            check_allowed(dest, rule.uploads if rule else (), guard.identity.key)
            yield pb.UploadProgress(layout=layout_message(session))
            watch.touch()
            writer = MultipartWriter(s3_client(self.config.s3_endpoint_url), dest,
                                     progress=lambda _n: watch.touch())
            copy_readable(session, writer, guard)
            session.close()                                    # thawed before the last part
            digest = writer.complete()
            writer = None
            yield pb.UploadProgress(done=True, url=dest.url, size=session.layout.total_size
                                    if session.layout else 0, sha256=digest,
                                    bytes_uploaded=session.layout.total_size
                                    if session.layout else 0)
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
            frozen = self.registry.end(session, registered)
            if session is not None:
                guard.record.freeze_id = session.freeze_id
            guard.finish(session_id=session.id if session else "", frozen_seconds=frozen,
                         stop_seconds=(session.freeze.freeze_seconds
                                       if session and session.freeze and not session.joined
                                       else 0),
                         expired=bool(session and session.expired), active=context.is_active())
