"""The agent's --triggers file: triggers the operator sets, parsed strictly.

YAML (duplicate keys are an error naming the line, as in the policy)::

    version: 1
    interval: 1.0                # seconds between two samples of /proc
    triggers:
      - name: app-memory
        identity: local          # the policy identity its firings run as
                                 # (default: the policy's local identity)
        select: {comm: [app], exe: ["/srv/app/*"], pid: 0, cgroup: [], container: []}
        rss_above: 2GiB          # or cpu_above: 90 + cpu_for: 30, threads_above: N,
                                 #    fds_above: N, every: SECONDS
        only: notes              # notes, stacks or full (default full)
        count: 1                 # firings in all (default 1)
        cooldown: 600            # seconds between two firings

A firing is checked against the policy like an interactive capture by that
identity, at the time it fires.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..policy import MODE_FULL, PolicyError, load_yaml_strict, parse_size
from .spec import Selector, TriggerError, TriggerSpec, validate

DEFAULT_INTERVAL = 1.0
MIN_INTERVAL, MAX_INTERVAL = 0.05, 3600.0

_TOP = {"version", "interval", "triggers"}
_TRIGGER = {"name", "identity", "select", "rss_above", "cpu_above", "cpu_for", "threads_above",
            "fds_above", "every", "only", "count", "cooldown"}
_SELECT = {"pid", "comm", "exe", "cgroup", "container"}


@dataclass(frozen=True)
class ConfiguredTrigger:
    spec: TriggerSpec
    identity: str                   # "" = the policy's local identity


@dataclass(frozen=True)
class TriggerConfig:
    interval: float
    triggers: tuple[ConfiguredTrigger, ...]


def _keys(obj: object, allowed: set[str], where: str) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise TriggerError(f"{where}: expected a mapping")
    unknown = set(obj) - allowed
    if unknown:
        raise TriggerError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))} "
                           f"(known: {', '.join(sorted(allowed))})")
    return obj


def _strs(obj: object, where: str) -> tuple[str, ...]:
    if obj is None:
        return ()
    if isinstance(obj, str):
        obj = [obj]
    if not isinstance(obj, list) or not all(isinstance(s, str) and s for s in obj):
        raise TriggerError(f"{where}: expected a list of non-empty strings")
    return tuple(obj)


def _number(obj: Mapping[str, Any], key: str, where: str, kind: type = float) -> Any:
    value = obj.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and not isinstance(value, int)):
        raise TriggerError(f"{where}.{key}: expected a{'n integer' if kind is int else ' number'}")
    return kind(value)


def trigger_from_dict(obj: object, index: int) -> ConfiguredTrigger:
    where = f"triggers[{index}]"
    t = _keys(obj, _TRIGGER, where)
    name = t.get("name", f"trigger-{index}")
    if not isinstance(name, str):
        raise TriggerError(f"{where}.name: expected a string")
    where = f"trigger {name!r}"
    sel = _keys(t.get("select") or {}, _SELECT, f"{where}.select")
    pid = _number(sel, "pid", f"{where}.select", int)
    identity = t.get("identity", "")
    if not isinstance(identity, str):
        raise TriggerError(f"{where}.identity: expected a string")
    try:
        rss = parse_size(t.get("rss_above", 0), f"{where}.rss_above") or 0
    except PolicyError as exc:
        raise TriggerError(str(exc)) from None
    only = t.get("only", MODE_FULL)
    spec = TriggerSpec(
        selector=Selector(pid=pid, comm=_strs(sel.get("comm"), f"{where}.select.comm"),
                          exe=_strs(sel.get("exe"), f"{where}.select.exe"),
                          cgroup=_strs(sel.get("cgroup"), f"{where}.select.cgroup"),
                          container=_strs(sel.get("container"), f"{where}.select.container")),
        rss_above=rss, cpu_above=_number(t, "cpu_above", where),
        cpu_for=_number(t, "cpu_for", where), threads_above=_number(t, "threads_above", where, int),
        fds_above=_number(t, "fds_above", where, int), every=_number(t, "every", where),
        mode=only if isinstance(only, str) else "?", count=_number(t, "count", where, int) or 1,
        cooldown=_number(t, "cooldown", where), name=name)
    try:
        return ConfiguredTrigger(validate(spec), identity)
    except TriggerError as exc:
        raise TriggerError(f"{where}: {exc}") from None


def triggers_from_dict(doc: object, source: str = "<dict>") -> TriggerConfig:
    top = _keys(doc if doc is not None else {}, _TOP, source)
    if top.get("version", 1) != 1:
        raise TriggerError(f"{source}: version {top.get('version')!r} is not supported (want 1)")
    interval = _number({"interval": top.get("interval", DEFAULT_INTERVAL)}, "interval", source)
    if not MIN_INTERVAL <= interval <= MAX_INTERVAL:
        raise TriggerError(f"{source}: interval must be between {MIN_INTERVAL} and "
                           f"{MAX_INTERVAL:g} seconds")
    raw = top.get("triggers") or []
    if not isinstance(raw, list):
        raise TriggerError(f"{source}: triggers: expected a list")
    items = tuple(trigger_from_dict(t, i) for i, t in enumerate(raw))
    names = [c.spec.name for c in items]
    if len(set(names)) != len(names):
        raise TriggerError(f"{source}: trigger names must be unique")
    return TriggerConfig(interval, items)


def load_triggers(path: str | Path) -> TriggerConfig:
    """Parse and validate a triggers file; raises :class:`TriggerError` with the reason."""
    p = Path(path)
    try:
        text = p.read_bytes()
        doc = load_yaml_strict(text)
    except OSError as exc:
        raise TriggerError(f"cannot read triggers file {p}: {exc.strerror}") from None
    except PolicyError as exc:
        raise TriggerError(f"triggers file {p}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any parser error is a config error
        raise TriggerError(f"cannot parse triggers file {p}: {exc}") from None
    return triggers_from_dict(doc, source=str(p))
