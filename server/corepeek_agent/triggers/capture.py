"""One firing: a capture the agent makes itself, written into its store.

It runs exactly as an interactive capture by the trigger's owner would: the
same :class:`~..authz.CaptureGuard` (rate limit, "is it the agent?", the
policy checked on the pinned and then the frozen target, the rule's budget),
the same session registry (``--max-sessions``, shared freezes), a snapshot by
default so the target runs while the core is read, and one audit line under
the owner's identity that names the trigger and the store entry.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc

from ..audit import SessionRecord
from ..authz import CaptureGuard, Guard, Identity
from ..errors import CorepeekError
from ..keep import keep_session
from ..registry import SessionRegistry
from ..service import AgentConfig, layout_message
from ..session import MODE_NOTES, CaptureSession, SessionOptions
from ..store.store import Store
from .evaluate import Firing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaptureContext:
    guard: Guard
    registry: SessionRegistry
    store: Store
    config: AgentConfig


def fire(firing: Firing, ctx: CaptureContext) -> str:
    """Capture the firing's process into the store; returns the entry id (raises
    CorepeekError when the policy or the target refuses)."""
    t, s = firing.trigger, firing.sample
    ident = Identity(t.owner, "trigger", f"trigger:{t.id}")
    cg = CaptureGuard(ctx.guard, ident, SessionRecord(
        kind="capture", identities=list(t.owner), peer=ident.peer,
        trigger={"id": t.id, "name": t.spec.name, "reason": firing.reason}))
    session: CaptureSession | None = None
    registered = False
    try:
        cg.admit(s.pid, s.start_time, t.spec.mode)
        session = CaptureSession(s.pid, start_time=s.start_time, admit=cg, options=SessionOptions(
            thread_timeout=ctx.config.default_thread_timeout,
            max_freeze=ctx.config.max_freeze_seconds, mode=t.spec.mode, snapshot=True,
            stack_bytes=0))
        ctx.registry.add(session)
        registered = True
        session.open()
        if t.spec.mode == MODE_NOTES:
            ctx.registry.remove(session)
            registered = False
        layout = layout_message(session)
        entry = keep_session(session, layout, cg, ctx.store, {
            "trigger_id": t.id, "trigger_name": t.spec.name, "reason": firing.reason,
            "owner": list(t.owner)})
        cg.record.trigger["entry"] = entry.id
        return entry.id
    except CorepeekError as exc:
        cg.failed(exc.code, exc.details())
        raise
    except OSError as exc:
        cg.failed(grpc.StatusCode.INTERNAL, str(exc))
        raise CorepeekError(f"agent error: {exc}") from None
    finally:
        frozen = ctx.registry.end(session, registered)
        if session is not None:
            cg.record.freeze_id = session.freeze_id
        cg.finish(session_id=session.id if session else "", frozen_seconds=frozen,
                  stop_seconds=(session.freeze.freeze_seconds
                                if session and session.freeze and not session.joined else 0))
