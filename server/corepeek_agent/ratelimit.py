"""Per-client limits: sessions per minute (sliding window) and bytes per session."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from .errors import ResourceExhausted

WINDOW_SECONDS = 60.0


class RateLimited(ResourceExhausted):
    help = "wait a minute, or raise limits.sessions_per_minute in the agent's policy"


class BudgetExceeded(ResourceExhausted):
    help = "read less (a notes or stacks capture), or ask for a larger budget in the policy"


class SessionRateLimiter:
    """At most ``per_minute`` sessions in any 60 s window for each client key."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._lock = threading.Lock()
        self._starts: dict[str, deque[float]] = {}

    def acquire(self, key: str) -> None:
        """Count one session for ``key``; raises :class:`RateLimited` over the limit."""
        if self.per_minute <= 0:
            return
        now = self._clock()
        with self._lock:
            self._expire(now)
            starts = self._starts.setdefault(key, deque())
            if len(starts) >= self.per_minute:
                retry = WINDOW_SECONDS - (now - starts[0])
                raise RateLimited(f"client {key} already opened {len(starts)} sessions in the "
                                  f"last minute (limit {self.per_minute}); retry in {retry:.0f} s")
            starts.append(now)

    def _expire(self, now: float) -> None:
        for key in list(self._starts):
            q = self._starts[key]
            while q and now - q[0] >= WINDOW_SECONDS:
                q.popleft()
            if not q:
                del self._starts[key]


class ByteBudget:
    """Bytes of core data one session may still send; holes (zeros) are free."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.used = 0

    def charge(self, n: int) -> None:
        if self.limit is not None and self.used + n > self.limit:
            raise BudgetExceeded(f"this session's budget of {self.limit} bytes is spent "
                                 f"({self.used} sent, {n} more asked)")
        self.used += n
