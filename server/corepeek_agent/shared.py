"""One freeze (or snapshot) of a target, shared by every session that reads it.

A fleet collection and an engineer may capture the same process at once.  The
first session freezes the target and builds the layout; a later session on the
same pid joins that state instead of stopping the target a second time.  Its
own policy check, mode, readable ranges and audit line still apply.  The
target thaws when the last member leaves, and the agent's --max-freeze counts
from the first freeze, so joining never extends how long a target is stopped.

This module holds only the bookkeeping (members, readiness, release, expiry
fan-out); what is shared, the frozen state itself, is a :class:`HeldState`
the first session publishes once its open succeeded.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeldState:
    """What a joining session borrows from the session that froze the target.

    ``freezer`` and ``reader`` stay owned by the hold: they are released by
    the last member to leave, never by a joiner.
    """

    freeze_id: str                  # the first session's id
    start_time: int
    comm: str
    exe: str
    opened_at: float
    freezer: Any                    # freezer.Freezer
    reader: Any                     # memory.MemoryReader or snapshot.SnapshotReader
    layout: Any                     # elfcore.layout.CoreLayout
    threads: tuple[Any, ...]
    freeze: Any                     # freezer.FreezeResult
    dumped: list[Any]
    anon_private: list[bool]
    snapshot: Any                   # snapshot.Snapshot | None
    read_after_thaw: frozenset[int]
    # False once the target runs again and no clone keeps its memory (a notes
    # capture thaws as soon as its notes are built): only notes may be joined.
    holds_memory: bool
    files: Any = None               # mapped_files.FileTable


class SharedHold:
    """Members, readiness and release of one freeze of ``pid``."""

    def __init__(self, pid: int, freeze_id: str) -> None:
        self.pid = pid
        self.freeze_id = freeze_id
        self._lock = threading.Lock()
        # Members keep the target held; users (members and the sessions that
        # left but still serve their notes) keep the shared reader open.
        self._members: dict[str, Callable[[], None] | None] = {}
        self._users: set[str] = set()
        self._release: Callable[[], None] | None = None
        self._dispose: Callable[[], None] | None = None
        self.state: HeldState | None = None
        # Set once the first session's open ended (published or failed).
        self.ready = threading.Event()
        # The last member left: the target is being let go (``closing``), then
        # it was (``released``: its tracer thread is gone, a new freeze may start).
        self.closing = False
        self.released = threading.Event()

    def enter(self, session_id: str, on_expire: Callable[[], None] | None) -> bool:
        """Become a member; False if the hold was released meanwhile."""
        with self._lock:
            if self.closing:
                return False
            self._members[session_id] = on_expire
            self._users.add(session_id)
            return True

    def set_release(self, release: Callable[[], None]) -> None:
        """What the last member's leave runs: let the target go."""
        with self._lock:
            self._release = release

    def publish(self, state: HeldState, dispose: Callable[[], None]) -> None:
        """The first session opened: joiners may use ``state``; ``dispose``
        (close the shared reader) runs once the last user is done."""
        with self._lock:
            self.state, self._dispose = state, dispose
        self.ready.set()

    def done(self, session_id: str) -> None:
        """A session closed: leave, and dispose of the shared state if it was the last user."""
        self.leave(session_id)
        with self._lock:
            self._users.discard(session_id)
        self._dispose_if_unused()

    def _dispose_if_unused(self) -> None:
        with self._lock:
            if self._users or not self.released.is_set():
                return
            dispose, self._dispose = self._dispose, None
        if dispose is not None:
            dispose()

    def leave(self, session_id: str) -> bool:
        """Stop being a member (idempotent); the last one releases the target.

        Returns True if this call released it.
        """
        with self._lock:
            if session_id not in self._members:
                return False
            del self._members[session_id]
            if self._members or self.closing:
                return False
            self.closing = True
            release, self._release = self._release, None
        try:
            if release is not None:
                release()
        finally:
            self.released.set()
            self.ready.set()        # a failed open may leave before it published
            self._dispose_if_unused()
        return True

    @property
    def members(self) -> int:
        with self._lock:
            return len(self._members)

    def expire(self) -> None:
        """The maximum freeze ended the hold: tell every member's stream."""
        with self._lock:
            callbacks = [cb for cb in self._members.values() if cb is not None]
        for cb in callbacks:
            try:
                cb()
            except Exception:
                log.exception("pid %d: expiry callback failed", self.pid)

    def joinable(self, mode_needs_memory: bool) -> bool:
        """Ready, not released, and holding what a session of that mode reads."""
        state = self.state
        if not self.ready.is_set() or self.closing or state is None:
            return False
        if not mode_needs_memory:
            return True
        # The tracer thread ends at the thaw or when --max-freeze expires.
        return state.holds_memory and not state.freezer.thawed.is_set()
