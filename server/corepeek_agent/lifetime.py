"""Every Capture stream has a lifetime: a deadline for its first request, an idle
timeout and a maximum lifetime, in every mode.

A stream that waits for its client holds a worker thread (gRPC Python's
handlers are synchronous) and, once opened, a session slot and its pid; a
frozen target also waits.  One watchdog thread per agent checks every stream
a few times a second and cancels the RPC of one that overstayed: the handler
then unwinds, thaws and audits why (``StreamWatch.reason``).  The handler only
``touch``es its watch when a request arrives or a response was sent, which
costs an attribute store.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

CHECK_INTERVAL = 0.1


@dataclass(frozen=True)
class Lifetimes:
    first_request: float = 5.0      # seconds from stream start to its `open`
    idle: float = 60.0              # seconds without a request or a response sent
    maximum: float = 900.0          # seconds from stream start, whatever happens


class StreamWatch:
    """The clock of one stream; ``reason`` says why it was ended ("" = it was not)."""

    def __init__(self, cancel: Callable[[], None], limits: Lifetimes,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._cancel = cancel
        self.limits = limits
        self._clock = clock
        self.started = self.last = clock()
        self.opened = False
        self.reason = ""
        self.refused = False        # ended before its first request: a refusal

    def touch(self, opened: bool = True) -> None:
        """Progress: a request arrived or a response went out."""
        self.last = self._clock()
        self.opened = self.opened or opened

    def overdue(self, now: float) -> str:
        """Why the stream must end now, or ""."""
        lim = self.limits
        if now - self.started >= lim.maximum:
            return (f"the stream reached the agent's maximum session lifetime of "
                    f"{lim.maximum:g} s (--max-session-lifetime)")
        if not self.opened:
            if now - self.started >= lim.first_request:
                return (f"no `open` request within {lim.first_request:g} s of the stream's "
                        "start (--first-request-timeout)")
        elif now - self.last >= lim.idle:
            return (f"the client was idle for {lim.idle:g} s (--idle-timeout); the session "
                    "was ended")
        return ""

    def fire(self, reason: str) -> None:
        if self.reason:
            return
        self.reason, self.refused = reason, not self.opened
        try:
            self._cancel()
        except Exception:   # noqa: BLE001 - the RPC may be gone already
            log.debug("cancel of an overdue stream failed", exc_info=True)


class Watchdog:
    """One thread that ends overdue streams, started with the first watch."""

    def __init__(self, limits: Lifetimes, interval: float = CHECK_INTERVAL) -> None:
        self.limits = limits
        self._interval = interval
        self._lock = threading.Lock()
        self._watches: set[StreamWatch] = set()
        self._thread: threading.Thread | None = None

    def watch(self, cancel: Callable[[], None]) -> StreamWatch:
        w = StreamWatch(cancel, self.limits)
        with self._lock:
            self._watches.add(w)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="stream-watchdog",
                                                daemon=True)
                self._thread.start()
        return w

    def forget(self, w: StreamWatch) -> None:
        with self._lock:
            self._watches.discard(w)

    def _run(self) -> None:
        while True:
            time.sleep(self._interval)
            now = time.monotonic()
            with self._lock:
                due = [(w, why) for w in self._watches if (why := w.overdue(now))]
                for w, _ in due:
                    self._watches.discard(w)
            for w, why in due:
                log.warning("ending a stream: %s", why)
                w.fire(why)
