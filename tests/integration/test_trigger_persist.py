"""Triggers added over the RPC survive an agent restart (real agent, real restarts).

Proved: after a SIGTERM and a new agent on the same store, the RPC-added
triggers are back under the identity that set them, with their counts; a
removed one stays removed; a cool-down started before the restart still
holds; a restored trigger fires after the restart, audited under its owner;
the policy is checked again when it fires (a policy that no longer allows
its mode refuses the capture); the state file is 0600; a state file that
does not parse restores nothing and the agent still serves.
"""

from __future__ import annotations

import stat
import time
from pathlib import Path

from corepeek.v1 import capture_pb2 as pb
from harness.agents import stop_agent
from harness.checks import assert_thawed_and_undisturbed
from harness.targets import Target
from test_triggers_store import (INTERVAL, add, agent_with_store, audit_lines, captures,
                                 policy_file, stub, trigger, wait_for)


def listed(agent) -> dict[str, pb.TriggerInfo]:
    return {t.id: t for t in stub(agent).ListTriggers(pb.ListTriggersRequest(),
                                                      timeout=10).triggers}


def test_rpc_triggers_survive_a_restart_with_counts_cooldowns_and_policy(
        tmp_path: Path, require_root: None, build) -> None:
    store = tmp_path / "store"
    agent = agent_with_store(tmp_path, store)
    with Target(build("growmem")) as target:
        try:
            cooled = add(agent, target.pid, rss_above_bytes=48 << 20, count=2,
                         cooldown_seconds=600, mode=pb.CAPTURE_MODE_NOTES, name="cooled")
            later = add(agent, target.pid, rss_above_bytes=96 << 20, count=1,
                        mode=pb.CAPTURE_MODE_NOTES, name="later")
            full = add(agent, target.pid, rss_above_bytes=160 << 20, count=1,
                       mode=pb.CAPTURE_MODE_FULL, name="full")
            gone = add(agent, target.pid, threads_above=1000, name="gone")
            assert stub(agent).RemoveTrigger(pb.RemoveTriggerRequest(id=gone.id),
                                             timeout=10).removed
            target.command("grow 64")
            wait_for("the first firing", lambda: trigger(agent, cooled.id).fired == 1
                     and captures(agent), 30, agent)
            before = trigger(agent, cooled.id)
        finally:
            stop_agent(agent)
        state = store / "triggers.json"
        assert stat.S_IMODE(state.stat().st_mode) == 0o600

        agent = agent_with_store(tmp_path, store)
        try:
            back = listed(agent)
            assert set(back) == {cooled.id, later.id, full.id}        # "gone" stays gone
            for t in back.values():
                assert (t.owner, t.source) == ("local", "rpc")
            assert (back[cooled.id].fired, back[cooled.id].last_fired) == (
                1, before.last_fired)
            assert back[later.id].spec.rss_above_bytes == 96 << 20
            assert back[later.id].spec.name == "later"
            time.sleep(4 * INTERVAL)          # still above 48 MiB: the cool-down holds
            assert trigger(agent, cooled.id).fired == 1
            assert len(captures(agent)) == 1

            target.command("grow 64")         # 128 MiB: the restored "later" fires
            wait_for("the restored trigger's firing",
                     lambda: trigger(agent, later.id).fired == 1 and len(captures(agent)) == 2,
                     30, agent)
            fired = [a for a in audit_lines(agent) if a.get("kind") == "capture"
                     and (a.get("trigger") or {}).get("id") == later.id]
            assert fired and fired[-1]["identities"] == ["local"]
            assert fired[-1]["outcome"] == "ok"
            assert_thawed_and_undisturbed(target)
        finally:
            stop_agent(agent)

        # A policy that no longer allows full captures: the restored trigger fires
        # and its capture is refused at firing time.
        agent = agent_with_store(tmp_path, store, policy=policy_file(tmp_path, modes="notes"))
        try:
            assert full.id in listed(agent)
            target.command("grow 64")         # 192 MiB
            wait_for("the refused firing", lambda: trigger(agent, full.id).last_error, 30, agent)
            refused = [a for a in audit_lines(agent) if a.get("kind") == "capture"
                       and (a.get("trigger") or {}).get("id") == full.id]
            assert refused and refused[-1]["outcome"] != "ok"
            assert len(captures(agent)) == 2
            assert_thawed_and_undisturbed(target)
        finally:
            stop_agent(agent)

    state.write_text("{not json")
    agent = agent_with_store(tmp_path, store)
    try:
        assert listed(agent) == {}
        assert "does not parse" in agent.log()
        assert len(captures(agent)) == 2
    finally:
        stop_agent(agent)
