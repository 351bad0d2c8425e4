"""The condition evaluator: samples of processes in, firings out.  Pure logic.

Called once per sampling interval with what the sampler read.  Conditions on
RSS, threads and fds are levels, checked on each sample; CPU is a rate, so a
process must stay above the percentage over every interval for ``cpu_for``
seconds after the first sample that saw it above (ProcDump's "-c N -s T"); ``every`` fires on a period.
A trigger fires at most once per sweep, never more than ``count`` times in
all, and not again before ``cooldown`` seconds have passed (per trigger, so
one trigger can never capture a host's processes in a burst).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .spec import Trigger


@dataclass(frozen=True)
class Sample:
    """One process as the sampler saw it at ``time`` (monotonic seconds)."""

    pid: int
    start_time: int                 # clock ticks after boot: tells pid reuse apart
    comm: str
    time: float
    rss_bytes: int = 0
    cpu_ticks: int = 0              # utime + stime
    threads: int = 0
    fds: int = -1                   # -1: not read (no trigger needs it)
    exe: str = ""
    cgroup: str = ""
    container: str = ""

    @property
    def key(self) -> tuple[int, int]:
        return self.pid, self.start_time


@dataclass(frozen=True)
class Firing:
    trigger: Trigger
    sample: Sample
    reason: str                     # what crossed, in words, for the audit line


@dataclass
class _Cpu:
    time: float
    ticks: int
    above_since: float | None = None


class Evaluator:
    """Keeps the per-process state CPU windows need, between sweeps."""

    def __init__(self, clock_ticks: int = 100) -> None:
        self.clock_ticks = clock_ticks
        self._cpu: dict[tuple[str, tuple[int, int]], _Cpu] = {}

    def sweep(self, triggers: Iterable[Trigger], samples: list[Sample],
              now: float) -> list[Firing]:
        """Firings of this sweep; each one is already counted on its trigger."""
        out: list[Firing] = []
        live: set[tuple[str, tuple[int, int]]] = set()
        for t in triggers:
            sel = t.spec.selector
            candidates = [s for s in samples
                          if sel.matches(s.pid, s.comm, s.exe, s.cgroup, s.container)]
            hit: Firing | None = None
            for s in candidates:
                live.add((t.id, s.key))
                reason = self._crossed(t, s)
                if reason and hit is None:
                    hit = Firing(t, s, reason)
            if hit is not None and self._may_fire(t, now):
                t.fired += 1
                t.last_fired_mono = now
                out.append(hit)
        for key in set(self._cpu) - live:        # processes gone or no longer selected
            del self._cpu[key]
        return out

    @staticmethod
    def _may_fire(t: Trigger, now: float) -> bool:
        if t.exhausted:
            return False
        wait = max(t.spec.cooldown, t.spec.every)
        return now - t.last_fired_mono >= wait

    def _crossed(self, t: Trigger, s: Sample) -> str:
        spec = t.spec
        if spec.rss_above:
            return f"rss {s.rss_bytes} > {spec.rss_above}" if s.rss_bytes > spec.rss_above else ""
        if spec.threads_above:
            return (f"threads {s.threads} > {spec.threads_above}"
                    if s.threads > spec.threads_above else "")
        if spec.fds_above:
            return f"fds {s.fds} > {spec.fds_above}" if s.fds > spec.fds_above else ""
        if spec.every:
            return f"every {spec.every:g} s"
        return self._cpu_crossed(t, s)

    def _cpu_crossed(self, t: Trigger, s: Sample) -> str:
        key = (t.id, s.key)
        prev = self._cpu.get(key)
        self._cpu[key] = cur = _Cpu(s.time, s.cpu_ticks)
        if prev is None or s.time <= prev.time:
            return ""
        pct = (s.cpu_ticks - prev.ticks) / self.clock_ticks / (s.time - prev.time) * 100
        if pct < t.spec.cpu_above:
            return ""                    # below in this interval: the window starts over
        # The window counts from the first sample that saw the rate above, never
        # from before it: a process fires no sooner than ``cpu_for`` after it began
        # to burn (and at most about two intervals later).
        cur.above_since = prev.above_since if prev.above_since is not None else s.time
        held = s.time - cur.above_since
        if held + 1e-9 < t.spec.cpu_for:
            return ""
        return f"cpu {pct:.0f}% > {t.spec.cpu_above:g}% for {held:.1f} s"
