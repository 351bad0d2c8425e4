"""Who may capture what: the agent's policy file, parsed and matched.

Pure logic, no /proc and no gRPC: a :class:`Policy` answers "may these client
identities capture a process with these facts in this mode?".  The facts are
gathered elsewhere (``authz.target_facts``).

File format (YAML, or TOML when the name ends in ``.toml``)::

    version: 1
    local_identity: local          # identity of peers without a certificate
    limits:
      sessions_per_minute: 60      # per client identity (0 = no limit)
      budget: unlimited            # default bytes of core data per session
    rules:
      - name: oncall-full
        clients: ["uri:spiffe://corp.example/oncall", "dns:debug.corp.example"]
        targets:                   # every listed selector must match (omitted = any)
          uid: [1000, 1001]        # all of the process's real/effective/saved/fs uids
          exe: ["/srv/app/bin/*"]  # fnmatch globs on /proc/PID/exe
          comm: ["app-*"]          # globs on /proc/PID/comm
          cgroup: ["/system.slice/app.service"]   # globs on the cgroup v2 path
          container: ["3f2a9c*"]   # globs on the container id found in the cgroup path
        modes: [full]              # required; notes < stacks < full: a mode admits those below
        budget: 8GiB               # per session; overrides limits.budget
        stack_bytes: 1MiB          # stacks mode: cap on stack bytes per thread (default 1 MiB)
        environment: false         # stacks mode: serve argv/environment strings (default: zeros)
        allow_nondumpable: false   # true only with an exe selector (comm is the process's choice)
        triggers: false            # may add triggers (AddTrigger); their firings are checked
                                   # against these rules like interactive captures
        keep: false                # may ask the agent to keep a capture in its store
        uploads: ["s3://cores/team-a/*"]   # where Upload may write full cores (globs; default none)

Client identities are typed strings: ``uri:<SAN URI>`` (a SPIFFE id is a URI
SAN; ``spiffe://...`` alone is shorthand for ``uri:spiffe://...``),
``dns:<SAN DNS name>``, or the ``local_identity`` for Unix-socket peers.  The
certificate's CN is never an identity.  ``clients`` entries are globs, except
the local identity, which is a plain name and matches only itself.

The file fails closed: unknown keys, a key written twice anywhere (YAML would
silently keep the last one), a glob as ``local_identity`` and
``allow_nondumpable`` without an ``exe`` selector are errors.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CorepeekError

MODE_NOTES, MODE_STACKS, MODE_FULL = "notes", "stacks", "full"
MODE_ORDER = (MODE_NOTES, MODE_STACKS, MODE_FULL)
DEFAULT_LOCAL_IDENTITY = "local"
DEFAULT_SESSIONS_PER_MINUTE = 60
DEFAULT_STACK_BYTES = 1 << 20      # stacks mode: stack bytes per thread a rule allows
_GLOB_CHARS = frozenset("*?[]")

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(i?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


class PolicyError(CorepeekError):
    """The policy file cannot be used; the agent refuses to start (or keeps the old one)."""

    help = "fix the policy file (see deploy/policy.example.yaml and docs/security.md)"


def parse_size(value: object, where: str) -> int | None:
    """Bytes from ``123``, ``"64KiB"``, ``"8G"`` (binary units); None for unlimited."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("unlimited", "none")):
        return None
    if isinstance(value, bool):
        raise PolicyError(f"{where}: expected a size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise PolicyError(f"{where}: a size cannot be negative")
        return value
    if isinstance(value, str) and (m := _SIZE.match(value)):
        return int(m.group(1)) * _UNITS[m.group(2).upper()]
    raise PolicyError(f"{where}: cannot read {value!r} as a size (e.g. 512MiB, 8GiB, unlimited)")


def modes_admitted(modes: Iterable[str]) -> frozenset[str]:
    """A mode admits every mode below it: full > stacks > notes."""
    top = max((MODE_ORDER.index(m) for m in modes), default=-1)
    return frozenset(MODE_ORDER[:top + 1])


def normalize_client(pattern: str) -> str:
    return f"uri:{pattern}" if pattern.startswith("spiffe://") else pattern


@dataclass(frozen=True)
class TargetFacts:
    """What the policy may look at about a process (gathered by ``authz``)."""

    pid: int
    uids: tuple[int, ...]          # real, effective, saved, filesystem
    exe: str
    comm: str
    cgroup: str
    container_id: str
    dumpable: bool | None          # None: could not be determined (treated as not)
    start_time: int = 0

    @property
    def uid(self) -> int:
        return self.uids[0] if self.uids else -1


def _globs(items: Iterable[str], value: str) -> bool:
    return any(fnmatch.fnmatchcase(value, g) for g in items)


@dataclass(frozen=True)
class TargetSelector:
    """Every non-empty selector must match; an empty selector matches any process."""

    uids: frozenset[int] | None = None
    exe: tuple[str, ...] = ()
    comm: tuple[str, ...] = ()
    cgroup: tuple[str, ...] = ()
    container: tuple[str, ...] = ()

    @property
    def names_program(self) -> bool:
        """True when the selector names programs by ``exe``, as non-dumpable needs.

        ``comm`` does not count: a process chooses its own comm (prctl
        PR_SET_NAME, or the name of a symlink it was run through), so a comm
        selector would let any user's setuid program in.
        """
        return bool(self.exe)

    def matches(self, f: TargetFacts) -> bool:
        if self.uids is not None and not (f.uids and set(f.uids) <= self.uids):
            return False
        if self.exe and not _globs(self.exe, f.exe):
            return False
        if self.comm and not _globs(self.comm, f.comm):
            return False
        if self.cgroup and not _globs(self.cgroup, f.cgroup):
            return False
        if self.container and not (f.container_id and _globs(self.container, f.container_id)):
            return False
        return True


@dataclass(frozen=True)
class Rule:
    name: str
    clients: tuple[str, ...]
    targets: TargetSelector = TargetSelector()
    modes: frozenset[str] = frozenset(MODE_ORDER)
    budget: int | None = None
    allow_nondumpable: bool = False
    stack_bytes: int = DEFAULT_STACK_BYTES      # stacks mode, per thread
    environment: bool = False                   # stacks mode: argv/env strings served
    triggers: bool = False                      # may add triggers over RPC (fail closed)
    keep: bool = False                          # may ask for CaptureOptions.keep
    uploads: tuple[str, ...] = ()               # s3:// globs Upload may write to
    local_identity: str = DEFAULT_LOCAL_IDENTITY

    def names_client(self, identities: Iterable[str]) -> bool:
        ids = list(identities)
        for c in self.clients:
            if c == self.local_identity:        # a plain name, never a glob
                if c in ids:
                    return True
            elif any(fnmatch.fnmatchcase(i, c) for i in ids if i.startswith(("uri:", "dns:"))):
                return True
        return False


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    rule: Rule | None = None
    budget: int | None = None


@dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...]
    local_identity: str = DEFAULT_LOCAL_IDENTITY
    sessions_per_minute: int = DEFAULT_SESSIONS_PER_MINUTE
    default_budget: int | None = None
    source: str = "<built-in>"
    notes: tuple[str, ...] = field(default=(), compare=False)

    def rules_for(self, identities: Iterable[str]) -> list[Rule]:
        ids = list(identities)
        return [r for r in self.rules if r.names_client(ids)]

    def decide(self, identities: Iterable[str], facts: TargetFacts, mode: str) -> Decision:
        """The first rule naming a client identity and the target that admits the mode."""
        rules = self.rules_for(identities)
        if not rules:
            return Decision(False, "no policy rule names this client")
        matching = [r for r in rules if r.targets.matches(facts)]
        if not matching:
            # Says nothing about the process: the client may not know what it is.
            return Decision(False, f"no rule for this client covers pid {facts.pid}")
        if facts.dumpable is not True:
            matching = [r for r in matching if r.allow_nondumpable]
            if not matching:
                why = ("not dumpable (PR_SET_DUMPABLE 0 or a setuid/setgid program)"
                       if facts.dumpable is False else "of unknown dumpability")
                return Decision(False, f"pid {facts.pid} is {why}; a rule must name it and "
                                       "set allow_nondumpable")
        for r in matching:
            if mode in r.modes:
                return Decision(True, f"rule {r.name}", r,
                                r.budget if r.budget is not None else self.default_budget)
        allowed = sorted(set().union(*(r.modes for r in matching)), key=MODE_ORDER.index)
        return Decision(False, f"mode {mode} is not allowed for pid {facts.pid} "
                               f"(allowed: {', '.join(allowed) or 'none'})")

    def may_set_triggers(self, identities: Iterable[str]) -> bool:
        """Some rule naming the client lets it add triggers (``triggers: true``)."""
        return any(r.triggers for r in self.rules_for(identities))

    def may_capture(self, identities: Iterable[str], facts: TargetFacts) -> bool:
        """Some mode is allowed (what ListProcesses shows)."""
        return self.decide(identities, facts, MODE_NOTES).allowed


# -- built-in policies ----------------------------------------------------------

def local_default_policy() -> Policy:
    """No --policy on a Unix socket (or --insecure loopback): local peers may capture
    any dumpable process in any mode, without a rate limit (whoever may open the
    socket is trusted like root), and nobody else anything."""
    return Policy(rules=(Rule(name="builtin-local-full", clients=(DEFAULT_LOCAL_IDENTITY,)),),
                  sessions_per_minute=0,
                  source="<built-in: local peers may capture every dumpable process>")


def deny_all_policy() -> Policy:
    """No --policy on a TLS listener: nothing is allowed until a policy says so."""
    return Policy(rules=(), source="<built-in: deny every client>")


# -- loading --------------------------------------------------------------------

_TOP_KEYS = {"version", "local_identity", "limits", "rules"}
_LIMIT_KEYS = {"sessions_per_minute", "budget"}
_RULE_KEYS = {"name", "clients", "targets", "modes", "budget", "allow_nondumpable",
              "stack_bytes", "environment", "triggers", "keep", "uploads"}
_TARGET_KEYS = {"uid", "exe", "comm", "cgroup", "container"}


def _check_keys(obj: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(obj) - allowed
    if unknown:
        raise PolicyError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))} "
                          f"(known: {', '.join(sorted(allowed))})")


def _mapping(obj: object, where: str) -> Mapping[str, Any]:
    if obj is None:
        return {}
    if not isinstance(obj, Mapping):
        raise PolicyError(f"{where}: expected a mapping, got {type(obj).__name__}")
    return obj


def _str_list(obj: object, where: str) -> tuple[str, ...]:
    if obj is None:
        return ()
    if isinstance(obj, str):
        obj = [obj]
    if not isinstance(obj, list) or not all(isinstance(s, str) and s for s in obj):
        raise PolicyError(f"{where}: expected a list of non-empty strings")
    return tuple(obj)


def _selector(obj: object, where: str) -> TargetSelector:
    t = _mapping(obj, where)
    _check_keys(t, _TARGET_KEYS, where)
    uids: frozenset[int] | None = None
    if "uid" in t:
        raw = t["uid"] if isinstance(t["uid"], list) else [t["uid"]]
        if not all(isinstance(u, int) and not isinstance(u, bool) and u >= 0 for u in raw):
            raise PolicyError(f"{where}.uid: expected a list of uids (integers)")
        uids = frozenset(raw)
    return TargetSelector(uids=uids, exe=_str_list(t.get("exe"), f"{where}.exe"),
                          comm=_str_list(t.get("comm"), f"{where}.comm"),
                          cgroup=_str_list(t.get("cgroup"), f"{where}.cgroup"),
                          container=_str_list(t.get("container"), f"{where}.container"))


def _rule(obj: object, index: int, local_identity: str) -> Rule:
    where = f"rules[{index}]"
    r = _mapping(obj, where)
    _check_keys(r, _RULE_KEYS, where)
    name = r.get("name", f"rule-{index}")
    if not isinstance(name, str) or not name:
        raise PolicyError(f"{where}.name: expected a string")
    where = f"rule {name!r}"
    clients = tuple(normalize_client(c) for c in _str_list(r.get("clients"), f"{where}.clients"))
    if not clients:
        raise PolicyError(f"{where}: `clients` must name at least one identity")
    for c in clients:
        if not (c.startswith(("uri:", "dns:")) or c == local_identity):
            raise PolicyError(f"{where}: client {c!r} is not an identity: use uri:..., "
                              f"dns:..., spiffe://... or the local identity {local_identity!r} "
                              "(certificate CNs are not identities)")
    if "modes" not in r:
        raise PolicyError(f"{where}: `modes` is required (some of {', '.join(MODE_ORDER)})")
    modes_raw = _str_list(r.get("modes"), f"{where}.modes")
    bad = [m for m in modes_raw if m not in MODE_ORDER]
    if bad or not modes_raw:
        raise PolicyError(f"{where}.modes: expected some of {', '.join(MODE_ORDER)}")
    allow_nd = _bool(r, "allow_nondumpable", where)
    targets = _selector(r.get("targets"), f"{where}.targets")
    if allow_nd and not targets.names_program:
        raise PolicyError(f"{where}: allow_nondumpable needs an exe selector naming the "
                          "programs (comm is chosen by the process itself: a setuid program "
                          "run through a symlink takes the symlink's name)")
    stack_bytes = parse_size(r.get("stack_bytes", DEFAULT_STACK_BYTES), f"{where}.stack_bytes")
    if stack_bytes is None:
        raise PolicyError(f"{where}.stack_bytes: expected a size (e.g. 1MiB), not unlimited")
    return Rule(name=name, clients=clients, targets=targets, modes=modes_admitted(modes_raw),
                budget=parse_size(r.get("budget"), f"{where}.budget"), allow_nondumpable=allow_nd,
                stack_bytes=stack_bytes, environment=_bool(r, "environment", where),
                triggers=_bool(r, "triggers", where), keep=_bool(r, "keep", where),
                uploads=_uploads(r.get("uploads"), f"{where}.uploads"),
                local_identity=local_identity)


def _uploads(obj: object, where: str) -> tuple[str, ...]:
    globs = _str_list(obj, where)
    bad = [g for g in globs if not g.startswith("s3://") or len(g.split("/")) < 4]
    if bad:
        raise PolicyError(f"{where}: expected s3://bucket/prefix globs, got {bad[0]!r}")
    return globs


def _bool(r: Mapping[str, Any], key: str, where: str) -> bool:
    value = r.get(key, False)
    if not isinstance(value, bool):
        raise PolicyError(f"{where}.{key}: expected true or false")
    return value


def policy_from_dict(doc: object, source: str = "<dict>") -> Policy:
    top = _mapping(doc, "policy")
    _check_keys(top, _TOP_KEYS, "policy")
    if top.get("version", 1) != 1:
        raise PolicyError(f"policy version {top.get('version')!r} is not supported (want 1)")
    local = top.get("local_identity", DEFAULT_LOCAL_IDENTITY)
    if (not isinstance(local, str) or not local or local.startswith(("uri:", "dns:", "spiffe:"))
            or _GLOB_CHARS & set(local)):
        raise PolicyError(f"local_identity: expected a plain name such as `local`, not "
                          f"{local!r} (no glob characters, no uri:/dns: prefix)")
    limits = _mapping(top.get("limits"), "limits")
    _check_keys(limits, _LIMIT_KEYS, "limits")
    spm = limits.get("sessions_per_minute", DEFAULT_SESSIONS_PER_MINUTE)
    if not isinstance(spm, int) or isinstance(spm, bool) or spm < 0:
        raise PolicyError("limits.sessions_per_minute: expected an integer >= 0 (0 = no limit)")
    rules_raw = top.get("rules") or []
    if not isinstance(rules_raw, list):
        raise PolicyError("rules: expected a list")
    rules = tuple(_rule(r, i, local) for i, r in enumerate(rules_raw))
    names = [r.name for r in rules]
    if len(set(names)) != len(names):
        raise PolicyError("rule names must be unique")
    return Policy(rules=rules, local_identity=local, sessions_per_minute=spm,
                  default_budget=parse_size(limits.get("budget"), "limits.budget"),
                  source=source)


def load_yaml_strict(text: bytes | str) -> object:
    """``yaml.safe_load``, except that a key written twice in one mapping is a
    :class:`PolicyError` naming its line (PyYAML keeps the last one silently)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        pass

    def construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
        loader.flatten_mapping(node)
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
                seen.setdefault(key, line)
            except TypeError:       # an unhashable key: the constructor will say so
                continue
            if first is not None:
                raise PolicyError(f"line {line}: duplicate key {key!r} (first at line {first}); "
                                  "a policy key may appear only once")
        return loader.construct_mapping(node, deep=True)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                                 construct_mapping)
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass


def load_policy(path: str | Path) -> Policy:
    """Parse and validate a policy file; raises :class:`PolicyError` with the reason."""
    p = Path(path)
    try:
        text = p.read_bytes()
    except OSError as exc:
        raise PolicyError(f"cannot read policy {p}: {exc.strerror}") from None
    try:
        if p.suffix == ".toml":
            import tomllib
            doc: object = tomllib.loads(text.decode())
        else:
            doc = load_yaml_strict(text)
    except PolicyError as exc:
        raise PolicyError(f"policy {p}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any parser error is a policy error
        raise PolicyError(f"cannot parse policy {p}: {exc}") from None
    return policy_from_dict(doc, source=str(p))
