"""The policy file: parsing, validation, and decisions (no /proc, no gRPC)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corepeek_agent.policy import (MODE_FULL, MODE_NOTES, MODE_STACKS, PolicyError, TargetFacts,
                                   deny_all_policy, load_policy, local_default_policy,
                                   modes_admitted, parse_size, policy_from_dict)

ROOT = Path(__file__).resolve().parents[2]
ONCALL = "uri:spiffe://corp.test/oncall"


def facts(**kw: object) -> TargetFacts:
    base: dict[str, object] = dict(pid=4242, uids=(1000, 1000, 1000, 1000), exe="/srv/app/bin/app",
                                   comm="app", cgroup="/system.slice/app.service",
                                   container_id="", dumpable=True, start_time=77)
    base.update(kw)
    return TargetFacts(**base)  # type: ignore[arg-type]


def policy(*rules: dict[str, object], **top: object) -> object:
    return policy_from_dict({"version": 1, "rules": list(rules), **top})


def test_sizes() -> None:
    assert parse_size(4096, "x") == 4096
    assert parse_size("64KiB", "x") == 64 << 10
    assert parse_size("8G", "x") == 8 << 30
    assert parse_size("1 MiB", "x") == 1 << 20
    assert parse_size("unlimited", "x") is None and parse_size(None, "x") is None
    for bad in ("lots", "-1", -1, True, "1.5G"):
        with pytest.raises(PolicyError):
            parse_size(bad, "x")


def test_modes_imply_the_ones_below() -> None:
    assert modes_admitted([MODE_FULL]) == {MODE_NOTES, MODE_STACKS, MODE_FULL}
    assert modes_admitted([MODE_STACKS]) == {MODE_NOTES, MODE_STACKS}
    assert modes_admitted([MODE_NOTES]) == {MODE_NOTES}


def test_a_rule_grants_only_what_it_names() -> None:
    # GIVEN oncall may take notes and stacks of uid 1000's /srv/app programs
    p = policy({"name": "oncall", "clients": [ONCALL], "modes": ["stacks"],
                "targets": {"uid": [1000], "exe": ["/srv/app/bin/*"]}, "budget": "1MiB"})
    # THEN stacks is allowed with the rule's budget, full is not
    d = p.decide([ONCALL], facts(), MODE_STACKS)
    assert d.allowed and d.rule is not None and d.rule.name == "oncall" and d.budget == 1 << 20
    assert not p.decide([ONCALL], facts(), MODE_FULL).allowed
    # AND other programs, other uids, other clients get nothing
    assert not p.decide([ONCALL], facts(exe="/usr/bin/ssh-agent"), MODE_NOTES).allowed
    assert not p.decide([ONCALL], facts(uids=(0, 0, 0, 0)), MODE_NOTES).allowed
    assert not p.decide(["uri:spiffe://corp.test/intern"], facts(), MODE_NOTES).allowed
    assert not p.decide([], facts(), MODE_NOTES).allowed


def test_every_uid_must_be_allowed() -> None:
    """A setuid process (real 1000, effective 0) is not uid 1000's to capture."""
    p = policy({"clients": [ONCALL], "modes": ["full"], "targets": {"uid": [1000]}})
    assert not p.decide([ONCALL], facts(uids=(1000, 0, 0, 0)), MODE_NOTES).allowed


def test_nondumpable_needs_an_explicit_rule() -> None:
    open_rule = {"name": "any", "clients": [ONCALL], "modes": ["full"]}
    p = policy(open_rule)
    for dumpable in (False, None):
        d = p.decide([ONCALL], facts(dumpable=dumpable), MODE_NOTES)
        assert not d.allowed and "allow_nondumpable" in d.reason
    p2 = policy(open_rule, {"name": "agent", "clients": [ONCALL], "modes": ["notes"],
                            "targets": {"exe": ["/usr/bin/ssh-agent"]}, "allow_nondumpable": True})
    agent = facts(exe="/usr/bin/ssh-agent", comm="ssh-agent", dumpable=False)
    assert p2.decide([ONCALL], agent, MODE_NOTES).allowed
    assert not p2.decide([ONCALL], agent, MODE_FULL).allowed
    assert not p2.decide([ONCALL], facts(exe="/usr/bin/gpg-agent", dumpable=False),
                         MODE_NOTES).allowed
    with pytest.raises(PolicyError, match="needs an exe selector"):
        policy({"clients": [ONCALL], "modes": ["full"], "allow_nondumpable": True})


def test_allow_nondumpable_keyed_on_comm_alone_is_refused() -> None:
    """comm is the process's own choice: a setuid program run through a symlink named
    ssh-agent has comm ssh-agent (issue 19, finding 3)."""
    with pytest.raises(PolicyError, match="comm is chosen by the process"):
        policy({"clients": [ONCALL], "modes": ["full"], "targets": {"comm": ["ssh-agent"]},
                "allow_nondumpable": True})
    p = policy({"clients": [ONCALL], "modes": ["full"], "allow_nondumpable": True,
                "targets": {"comm": ["ssh-agent"], "exe": ["/usr/bin/ssh-agent"]}})
    assert not p.decide([ONCALL], facts(exe="/tmp/evil/ssh-agent", comm="ssh-agent",
                                        dumpable=False), MODE_NOTES).allowed


@pytest.mark.parametrize("text, line, key", [
    # a rule meant to be notes-only for uid 1000, with a second targets/modes pair
    ("version: 1\nrules:\n- name: r\n  clients: [local]\n  modes: [notes]\n"
     "  targets: {uid: [1000]}\n  targets: {}\n  modes: [full]\n", 7, "targets"),
    ("version: 1\nrules:\n- {name: a, clients: [local], modes: [notes]}\n"
     "rules:\n- {name: b, clients: [local], modes: [full]}\n", 4, "rules"),
    ("version: 1\nlimits: {sessions_per_minute: 1, sessions_per_minute: 0}\n", 2,
     "sessions_per_minute"),
])
def test_duplicate_keys_are_an_error_naming_the_line(tmp_path: Path, text: str, line: int,
                                                     key: str) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError, match=rf"line {line}: duplicate key '{key}'"):
        load_policy(path)


@pytest.mark.parametrize("name", ["*", "loc*", "l?cal", "[l]ocal", "uri:x", "dns:x"])
def test_local_identity_is_a_plain_name(name: str) -> None:
    with pytest.raises(PolicyError, match="local_identity"):
        policy({"clients": [name], "modes": ["full"]}, local_identity=name)


def test_the_local_identity_matches_only_itself() -> None:
    p = policy({"clients": ["ops"], "modes": ["full"]}, local_identity="ops")
    assert p.decide(["ops"], facts(), MODE_FULL).allowed
    assert not p.decide(["uri:ops"], facts(), MODE_NOTES).allowed
    assert not p.decide(["uri:spiffe://corp.test/x"], facts(), MODE_NOTES).allowed


def test_stack_bytes_and_environment_of_a_rule() -> None:
    p = policy({"name": "d", "clients": [ONCALL], "modes": ["stacks"]},
               {"name": "e", "clients": ["dns:x"], "modes": ["stacks"], "stack_bytes": "64KiB",
                "environment": True})
    d, e = p.rules
    assert (d.stack_bytes, d.environment) == (1 << 20, False)
    assert (e.stack_bytes, e.environment) == (64 << 10, True)
    for bad in ({"stack_bytes": "unlimited"}, {"environment": "yes"}):
        with pytest.raises(PolicyError):
            policy({"clients": [ONCALL], "modes": ["stacks"], **bad})


def test_cgroup_and_container_selectors() -> None:
    cid = "3f" * 32
    p = policy({"clients": [ONCALL], "modes": ["full"],
                "targets": {"cgroup": ["/system.slice/*"], "container": ["3f3f*"]}})
    assert p.decide([ONCALL], facts(container_id=cid), MODE_FULL).allowed
    assert not p.decide([ONCALL], facts(container_id=""), MODE_FULL).allowed
    assert not p.decide([ONCALL], facts(container_id=cid, cgroup="/user.slice/x"),
                        MODE_FULL).allowed


def test_client_patterns_spiffe_shorthand_and_globs() -> None:
    p = policy({"clients": ["spiffe://corp.test/sre/*", "dns:*.debug.corp.test"],
                "modes": ["notes"]})
    assert p.decide(["uri:spiffe://corp.test/sre/alice"], facts(), MODE_NOTES).allowed
    assert p.decide(["dns:box1.debug.corp.test"], facts(), MODE_NOTES).allowed
    assert not p.decide(["dns:spiffe://corp.test/sre/alice"], facts(), MODE_NOTES).allowed
    assert not p.decide(["local"], facts(), MODE_NOTES).allowed


@pytest.mark.parametrize("doc, match", [
    ({"rules": [{"clients": ["CN=oncall"], "modes": ["full"]}]}, "not an identity"),
    ({"rules": [{"clients": [ONCALL]}]}, "modes"),
    ({"rules": [{"clients": [ONCALL], "modes": ["everything"]}]}, "modes"),
    ({"rules": [{"clients": [ONCALL], "modes": ["full"], "target": {}}]}, "unknown key"),
    ({"rules": [{"clients": [ONCALL], "modes": ["full"], "targets": {"user": [1]}}]},
     "unknown key"),
    ({"rules": [{"clients": [ONCALL], "modes": ["full"], "targets": {"uid": ["root"]}}]}, "uid"),
    ({"rules": [{"clients": [], "modes": ["full"]}]}, "at least one"),
    ({"version": 2}, "version"),
    ({"limits": {"sessions_per_minute": -1}}, "sessions_per_minute"),
    ({"rules": [{"name": "a", "clients": [ONCALL], "modes": ["full"]},
                {"name": "a", "clients": [ONCALL], "modes": ["full"]}]}, "unique"),
    ([1, 2], "mapping"),
])
def test_bad_policies_are_refused_with_a_reason(doc: object, match: str) -> None:
    with pytest.raises(PolicyError, match=match):
        policy_from_dict(doc)


def test_builtin_defaults() -> None:
    local = local_default_policy()
    assert local.decide(["local"], facts(), MODE_FULL).allowed
    assert not local.decide(["local"], facts(dumpable=False), MODE_NOTES).allowed
    assert not local.decide([ONCALL], facts(), MODE_NOTES).allowed
    assert not deny_all_policy().decide([ONCALL], facts(), MODE_NOTES).allowed


def test_example_policy_file_loads_and_allows_the_local_demo() -> None:
    p = load_policy(ROOT / "deploy" / "policy.example.yaml")
    assert p.decide([p.local_identity], facts(uids=(0, 0, 0, 0), exe="/tmp/x/demo_target",
                                              comm="demo_target"), MODE_FULL).allowed
    assert not p.decide(["uri:spiffe://example.org/unknown"], facts(), MODE_NOTES).allowed


def test_toml_and_yaml_agree(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text(
        'version = 1\nlocal_identity = "me"\n[limits]\nsessions_per_minute = 5\n'
        '[[rules]]\nname = "r"\nclients = ["me"]\nmodes = ["notes"]\nbudget = "4KiB"\n'
        '[rules.targets]\nuid = [1000]\n')
    (tmp_path / "p.yaml").write_text(
        "version: 1\nlocal_identity: me\nlimits: {sessions_per_minute: 5}\n"
        "rules:\n- {name: r, clients: [me], modes: [notes], budget: 4KiB, targets: {uid: [1000]}}\n")
    a, b = load_policy(tmp_path / "p.toml"), load_policy(tmp_path / "p.yaml")
    assert a.rules == b.rules and a.sessions_per_minute == b.sessions_per_minute == 5
    with pytest.raises(PolicyError, match="cannot parse"):
        (tmp_path / "bad.yaml").write_text("rules: [")
        load_policy(tmp_path / "bad.yaml")
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "missing.yaml")


_MODES = st.sampled_from([MODE_NOTES, MODE_STACKS, MODE_FULL])


@given(rule_modes=st.lists(_MODES, min_size=1), mode=_MODES, dumpable=st.sampled_from([True, False, None]),
       uid=st.integers(0, 2000), named=st.booleans())
def test_decisions_never_exceed_the_rule(rule_modes: list[str], mode: str, dumpable: bool | None,
                                         uid: int, named: bool) -> None:
    p = policy({"clients": [ONCALL], "modes": rule_modes, "targets": {"uid": [1000]}})
    d = p.decide([ONCALL] if named else ["uri:spiffe://corp.test/other"],
                 facts(uids=(uid,) * 4, dumpable=dumpable), mode)
    expected = (named and uid == 1000 and dumpable is True
                and mode in modes_admitted(rule_modes))
    assert d.allowed == expected
