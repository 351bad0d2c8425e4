"""Live sessions of one agent, with the limits that keep the agent bounded."""

from __future__ import annotations

import threading

import grpc

from .errors import CorepeekError, ResourceExhausted
from .session import CaptureSession


class TargetBusy(CorepeekError):
    """Another session is capturing this pid; only one may freeze it at a time."""

    code = grpc.StatusCode.ABORTED
    help = "retry once the other capture has ended"


class SessionRegistry:
    def __init__(self, max_sessions: int) -> None:
        self.max_sessions = max_sessions
        self._lock = threading.Lock()
        self._by_pid: dict[int, CaptureSession] = {}

    def add(self, session: CaptureSession) -> None:
        with self._lock:
            if session.pid in self._by_pid:
                raise TargetBusy(f"pid {session.pid} is already being captured")
            if len(self._by_pid) >= self.max_sessions:
                raise ResourceExhausted(
                    f"the agent already runs {self.max_sessions} capture sessions")
            self._by_pid[session.pid] = session

    def remove(self, session: CaptureSession) -> None:
        with self._lock:
            if self._by_pid.get(session.pid) is session:
                del self._by_pid[session.pid]

    def active(self) -> list[CaptureSession]:
        with self._lock:
            return list(self._by_pid.values())

    def thaw_all(self) -> None:
        """Thaw every target (agent shutdown)."""
        for s in self.active():
            s.thaw()
