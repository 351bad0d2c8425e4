"""Live progress of a collection on a terminal (tqdm, imported only when shown)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any


class Progress:
    """Live progress on a terminal: one overall bar, and one bar per host (up to
    ``max_host_bars``; beyond that the overall bar counts hosts done)."""

    def __init__(self, enabled: bool, file: Any = None, max_host_bars: int = 16) -> None:
        self.enabled = enabled
        self.file = file if file is not None else sys.stderr
        self.max_host_bars = max_host_bars
        self._lock = threading.Lock()
        self._overall: Any = None
        self._hosts: dict[str, Any] = {}
        self._left: dict[str, int] = {}
        self._host_errors: dict[str, int] = {}
        self._host_bytes: dict[str, int] = {}
        self._bytes = 0
        self._ok = 0
        self._err = 0

    def _bar(self, **kw: Any) -> Any:
        from tqdm import tqdm
        return tqdm(file=self.file, dynamic_ncols=True, **{"leave": True, **kw})

    def listing(self, agents: int) -> Callable[[], None]:
        """A bar for the listing phase; returns its ``tick`` (call once per agent)."""
        if not self.enabled:
            return lambda: None
        bar = self._bar(total=agents, desc="listing", unit="agent", leave=False)
        self._overall = bar

        def tick() -> None:
            with self._lock:
                bar.update(1)
        return tick

    def start(self, per_host: dict[str, int], labels: dict[str, str] | None = None) -> None:
        """Bars for the captures: ``per_host`` maps a host key (the agent's address)
        to its number of captures, ``labels`` a key to the name shown."""
        if not self.enabled:
            return
        if self._overall is not None:
            self._overall.close()
        labels = labels or {}
        total = sum(per_host.values())
        self._left = dict(per_host)
        self._overall = self._bar(total=total, desc="captures", unit="core", position=0)
        if len(per_host) <= self.max_host_bars:
            names = {k: labels.get(k, k) for k in per_host}
            width = max((len(n) for n in names.values()), default=4)
            for i, key in enumerate(sorted(per_host, key=lambda k: names[k]), start=1):
                self._hosts[key] = self._bar(total=per_host[key], desc=names[key].ljust(width),
                                             unit="core", position=i)
        self._postfix()

    def _postfix(self) -> None:
        hosts_done = sum(1 for n in self._left.values() if n == 0)
        self._overall.set_postfix_str(
            f"ok={self._ok} err={self._err} {self._bytes / 1048576:.1f}MiB "
            f"hosts {hosts_done}/{len(self._left)}", refresh=True)

    def received(self, host: str, n: int) -> None:
        if not self.enabled or self._overall is None:
            return
        with self._lock:
            self._bytes += n
            self._host_bytes[host] = self._host_bytes.get(host, 0) + n

    def done(self, host: str, ok: bool) -> None:
        if not self.enabled or self._overall is None:
            return
        with self._lock:
            if ok:
                self._ok += 1
            else:
                self._err += 1
            self._left[host] = self._left.get(host, 1) - 1
            if not ok:
                self._host_errors[host] = self._host_errors.get(host, 0) + 1
            bar = self._hosts.get(host)
            if bar is not None:
                errors = self._host_errors.get(host, 0)
                bar.set_postfix_str(f"{self._host_bytes.get(host, 0) / 1048576:.1f}MiB"
                                    + (f" errors={errors}" if errors else ""), refresh=False)
                bar.update(1)
            self._overall.update(1)
            self._postfix()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._overall is not None:          # top line first: tqdm keeps the order
            self._overall.close()
        for bar in self._hosts.values():
            bar.close()
        self._hosts.clear()
        self._overall = None
