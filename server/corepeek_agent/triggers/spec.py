"""What a trigger is: a selector, one condition, a mode, a count and a cool-down.

Pure data and validation; the same rules for the --triggers file and the
AddTrigger RPC, so both refuse the same things with the same words.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

from ..errors import InvalidRequest
from ..policy import MODE_FULL, MODE_ORDER

CONDITIONS = ("rss_above", "cpu_above", "threads_above", "fds_above", "every")
MAX_COUNT = 1000
MAX_SECONDS = 7 * 86400.0
DEFAULT_COUNT = 1
MIN_PERIOD = 1.0            # `every`: no tighter than once a second


class TriggerError(InvalidRequest):
    """A trigger that cannot be used (INVALID_ARGUMENT over RPC, a start error from a file)."""

    help = "see docs/fleet.md (triggers) for the fields a trigger takes"


def _globs(patterns: tuple[str, ...], value: str) -> bool:
    return any(fnmatch.fnmatchcase(value, g) for g in patterns)


@dataclass(frozen=True)
class Selector:
    """Every non-empty selector must match (as the policy's target selectors)."""

    pid: int = 0
    comm: tuple[str, ...] = ()
    exe: tuple[str, ...] = ()
    cgroup: tuple[str, ...] = ()
    container: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.pid or self.comm or self.exe or self.cgroup or self.container)

    @property
    def needs_exe(self) -> bool:
        return bool(self.exe)

    @property
    def needs_cgroup(self) -> bool:
        return bool(self.cgroup or self.container)

    def matches(self, pid: int, comm: str, exe: str = "", cgroup: str = "",
                container: str = "") -> bool:
        if self.pid and pid != self.pid:
            return False
        if self.comm and not _globs(self.comm, comm):
            return False
        if self.exe and not _globs(self.exe, exe):
            return False
        if self.cgroup and not _globs(self.cgroup, cgroup):
            return False
        return not self.container or bool(container and _globs(self.container, container))


@dataclass(frozen=True)
class TriggerSpec:
    """One trigger.  Exactly one of the condition fields is set."""

    selector: Selector
    rss_above: int = 0              # bytes
    cpu_above: float = 0.0          # percent of one CPU ...
    cpu_for: float = 0.0            # ... held this many seconds
    threads_above: int = 0
    fds_above: int = 0
    every: float = 0.0              # seconds
    mode: str = MODE_FULL
    count: int = DEFAULT_COUNT
    cooldown: float = 0.0
    name: str = ""

    @property
    def condition(self) -> str:
        return next(c for c in CONDITIONS if getattr(self, c))

    def describe(self) -> str:
        c = self.condition
        if c == "cpu_above":
            return f"cpu above {self.cpu_above:g}% for {self.cpu_for:g} s"
        return f"{c.replace('_', ' ')} {getattr(self, c):g}"


def _seconds(value: float, what: str, allow_zero: bool = True) -> float:
    if not math.isfinite(value) or value < 0 or value > MAX_SECONDS or (
            not allow_zero and value == 0):
        raise TriggerError(f"{what} must be between {'0' if allow_zero else 'above 0'} and "
                           f"{MAX_SECONDS:g} seconds")
    return float(value)


def validate(spec: TriggerSpec) -> TriggerSpec:
    """The spec, checked (raises :class:`TriggerError` naming what is wrong)."""
    set_ = [c for c in CONDITIONS if getattr(spec, c)]
    if len(set_) != 1:
        raise TriggerError("a trigger needs exactly one condition (rss_above, cpu_above with "
                           f"cpu_for, threads_above, fds_above or every); got "
                           f"{', '.join(set_) or 'none'}")
    if spec.selector.empty:
        raise TriggerError("a trigger needs a selector (pid, comm, exe, cgroup or container): "
                           "watching every process is not allowed")
    if spec.selector.pid < 0:
        raise TriggerError(f"invalid pid {spec.selector.pid}")
    for what in ("rss_above", "threads_above", "fds_above"):
        if getattr(spec, what) < 0:
            raise TriggerError(f"{what} cannot be negative")
    if spec.cpu_above:
        if not math.isfinite(spec.cpu_above) or not 0 < spec.cpu_above <= 100_000:
            raise TriggerError("cpu_above is a percentage of one CPU, above 0")
        _seconds(spec.cpu_for, "cpu_for", allow_zero=False)
    elif spec.cpu_for:
        raise TriggerError("cpu_for goes with cpu_above")
    if spec.every:
        _seconds(spec.every, "every")
        if spec.every < MIN_PERIOD:
            raise TriggerError(f"every must be at least {MIN_PERIOD:g} second")
    _seconds(spec.cooldown, "cooldown")
    if spec.mode not in MODE_ORDER:
        raise TriggerError(f"mode must be one of {', '.join(MODE_ORDER)}")
    if not 1 <= spec.count <= MAX_COUNT:
        raise TriggerError(f"count must be between 1 and {MAX_COUNT}")
    if len(spec.name) > 200:
        raise TriggerError("name is limited to 200 characters")
    return spec


@dataclass
class Trigger:
    """A trigger the agent holds: its spec, who set it, and what it did so far."""

    id: str
    spec: TriggerSpec
    owner: tuple[str, ...]          # the identity names of who set it
    source: str                     # "config" or "rpc"
    fired: int = 0
    last_fired: float = 0.0         # Unix time
    last_fired_mono: float = field(default=-math.inf, repr=False)
    last_error: str = ""

    @property
    def owner_key(self) -> str:
        return ",".join(self.owner)

    @property
    def exhausted(self) -> bool:
        return self.fired >= self.spec.count
