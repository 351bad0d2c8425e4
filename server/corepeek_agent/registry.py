"""Live sessions of one agent, with the limits that keep the agent bounded.

Sessions on one pid share its freeze (:mod:`.shared`): the registry decides,
for each new session, whether it freezes the target afresh or joins the hold
another session already has, and how long a session that wants its own freeze
waits for the current hold to end.
"""

from __future__ import annotations

import threading
import time

import grpc

from .errors import CorepeekError, ResourceExhausted
from .session import MODE_NOTES, CaptureSession
from .shared import SharedHold

# How often a waiting session looks again at the hold it waits for.
WAIT_POLL = 0.05
# A joiner waits at most this long for the first session's open (freeze and
# layout) to finish; an open is bounded well below it.
MAX_OPEN_WAIT = 120.0


class TargetBusy(CorepeekError):
    """The pid was still held by another capture when the client's wait ended."""

    code = grpc.StatusCode.ABORTED
    help = ("retry later, or leave out --wait to join the capture in progress "
            "(it then reads the same freeze)")


class SessionRegistry:
    def __init__(self, max_sessions: int) -> None:
        self.max_sessions = max_sessions
        self._lock = threading.Lock()
        self._sessions: dict[str, CaptureSession] = {}
        self._holds: dict[int, SharedHold] = {}

    def add(self, session: CaptureSession, wait_exclusive: float = 0.0) -> None:
        """Register ``session`` and attach it to the hold it will freeze or join.

        By default a session joins a hold whose state it can read (any hold
        for a notes session; one that still holds the target's memory
        otherwise).  With ``wait_exclusive`` > 0 it wants a freeze of its own:
        it waits up to that many seconds for the current hold to end, then
        raises :class:`TargetBusy`.
        """
        start = time.monotonic()
        needs_memory = session.options.mode != MODE_NOTES
        while True:
            with self._lock:
                if len(self._sessions) >= self.max_sessions:
                    raise ResourceExhausted(
                        f"the agent already runs {self.max_sessions} capture sessions")
                hold = self._holds.get(session.pid)
                # Free for a new freeze: nothing holds the target (a hold being
                # released is waited for: its tracer thread must be gone first).
                free = (hold is None or hold.released.is_set()
                        or (hold.ready.is_set() and not hold.closing
                            and not hold.joinable(mode_needs_memory=True)))
                if free:
                    hold = SharedHold(session.pid, session.id)
                    session.attach(hold, host=True)
                    self._holds[session.pid] = hold
                    self._sessions[session.id] = session
                    return
                assert hold is not None
                if not wait_exclusive and hold.joinable(needs_memory):
                    if session.attach(hold, host=False):
                        self._sessions[session.id] = session
                        return
                    continue                    # released meanwhile: look again
            waited = time.monotonic() - start
            if wait_exclusive and waited >= wait_exclusive:
                raise TargetBusy(f"pid {session.pid} was still held by another capture "
                                 f"after waiting {wait_exclusive:g} s")
            if waited >= MAX_OPEN_WAIT:
                raise TargetBusy(f"pid {session.pid}: the capture in progress did not finish "
                                 f"opening within {MAX_OPEN_WAIT:g} s")
            # Not ready yet (the first session is still freezing), or a hold we
            # wait to end: look again shortly.
            (hold.ready if not hold.ready.is_set() else hold.released).wait(WAIT_POLL)

    def remove(self, session: CaptureSession) -> None:
        with self._lock:
            self._sessions.pop(session.id, None)
            hold = self._holds.get(session.pid)
            if hold is not None and hold.released.is_set():
                del self._holds[session.pid]

    def end(self, session: CaptureSession | None, registered: bool) -> float:
        """Close ``session`` (it leaves its freeze: the last one out thaws) and
        forget it; the seconds it kept its target frozen, within max-freeze."""
        if session is None:
            return 0.0
        frozen = min(session.frozen_seconds, session.options.max_freeze)
        session.close()
        if registered:
            self.remove(session)
        return frozen

    def active(self) -> list[CaptureSession]:
        with self._lock:
            return list(self._sessions.values())

    def thaw_all(self) -> None:
        """Thaw every target (agent shutdown)."""
        for s in self.active():
            s.thaw()
