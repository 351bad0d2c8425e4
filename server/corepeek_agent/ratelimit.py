"""Per-client limits: sessions and listings per minute (sliding window), concurrent
streams, and bytes per session."""

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

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic,
                 what: str = "sessions") -> None:
        self.per_minute = per_minute
        self.what = what
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
                raise RateLimited(f"client {key} already opened {len(starts)} {self.what} in the "
                                  f"last minute (limit {self.per_minute}); retry in {retry:.0f} s")
            starts.append(now)

    def _expire(self, now: float) -> None:
        for key in list(self._starts):
            q = self._starts[key]
            while q and now - q[0] >= WINDOW_SECONDS:
                q.popleft()
            if not q:
                del self._starts[key]


class TooManyStreams(ResourceExhausted):
    help = "close streams you do not use, or wait for them to end"


class StreamSlots:
    """Concurrent streams: at most ``total`` in all, and a per-key limit given at
    acquire time, so one client can never hold every worker thread."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._lock = threading.Lock()
        self._by_key: dict[str, int] = {}
        self._used = 0

    def acquire(self, key: str, per_key: int) -> Callable[[], None]:
        """Take a slot for ``key``; returns the (idempotent) release, or raises
        :class:`TooManyStreams`."""
        with self._lock:
            held = self._by_key.get(key, 0)
            if held >= per_key:
                raise TooManyStreams(f"client {key} already has {held} streams open on this "
                                     f"agent (limit {per_key} per client)")
            if self._used >= self.total:
                raise TooManyStreams(f"the agent already serves {self._used} streams "
                                     f"(limit {self.total})")
            self._by_key[key] = held + 1
            self._used += 1
        released = threading.Event()

        def release() -> None:
            with self._lock:
                if released.is_set():
                    return
                released.set()
                self._used -= 1
                left = self._by_key[key] - 1
                if left:
                    self._by_key[key] = left
                else:
                    del self._by_key[key]
        return release

    def held(self, key: str | None = None) -> int:
        with self._lock:
            return self._used if key is None else self._by_key.get(key, 0)


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
