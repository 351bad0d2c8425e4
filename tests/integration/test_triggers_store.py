"""Triggers and the store with a real agent, real targets and real gRPC.

An agent runs with --store and a policy whose local rule may add triggers; a
target (tests/targets/growmem.c) grows its memory or spins a CPU on command.
What is proved: the RSS trigger fires once, within two sampling intervals of
the crossing; the CPU trigger fires only after its window; count limits and
cool-downs hold; identities the policy does not allow cannot add triggers
(and an unnamed one is refused at stream start); the stored entry is served
by offset and length byte-identical to what the capture wrote, loads in gdb,
survives an agent restart; a corrupted entry is reported and not served;
every captured target is thawed and undisturbed.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from corepeek.channel import open_channel
from corepeek.errors import CaptureError
from corepeek.remote import open_capture
from corepeek.v1 import capture_pb2 as pb
from corepeek.v1 import capture_pb2_grpc as pb_grpc
from harness.agents import AgentProcess, start_agent, stop_agent
from harness.checks import assert_thawed_and_undisturbed
from harness.targets import Target
from harness.tools import gdb_backtraces_text, gdb_read_memory

INTERVAL = 0.5
# Sampling and evaluating take well under 50 ms here (bench/trigger_sampling.py);
# a loaded 2-CPU machine may delay one sweep's thread by about that much.
SWEEP_SLACK = 0.25


def policy_file(tmp: Path, *, triggers: bool = True, modes: str = "full",
                clients: str = "local", keep: bool = False) -> Path:
    p = tmp / f"policy-{time.monotonic_ns()}.yaml"
    p.write_text(f"version: 1\nrules:\n  - name: local-rule\n    clients: [{clients}]\n"
                 f"    modes: [{modes}]\n    triggers: {'true' if triggers else 'false'}\n"
                 f"    keep: {'true' if keep else 'false'}\n")
    return p


def agent_with_store(tmp: Path, store: Path, *extra: str, policy: Path | None = None
                     ) -> AgentProcess:
    return start_agent(tmp, "--policy", str(policy or policy_file(tmp)), "--store", str(store),
                       "--trigger-interval", str(INTERVAL), "--sessions-per-minute", "0",
                       *extra)


@pytest.fixture()
def store_agent(tmp_path: Path, require_root: None) -> Iterator[AgentProcess]:
    a = agent_with_store(tmp_path, tmp_path / "store")
    yield a
    stop_agent(a)


def stub(agent: AgentProcess) -> pb_grpc.CoreCaptureServiceStub:
    return pb_grpc.CoreCaptureServiceStub(open_channel(agent.address))


def add(agent: AgentProcess, pid: int, **spec: object) -> pb.TriggerInfo:
    return stub(agent).AddTrigger(pb.AddTriggerRequest(spec=pb.TriggerSpec(
        selector=pb.TriggerSelector(pid=pid), **spec)), timeout=10)


def trigger(agent: AgentProcess, trigger_id: str) -> pb.TriggerInfo:
    found = [t for t in stub(agent).ListTriggers(pb.ListTriggersRequest(), timeout=10).triggers
             if t.id == trigger_id]
    assert found, f"trigger {trigger_id} is gone"
    return found[0]


def captures(agent: AgentProcess) -> list[pb.StoredCapture]:
    return list(stub(agent).ListCaptures(pb.ListCapturesRequest(), timeout=10).captures)


def wait_for(what: str, cond: Callable[[], object], timeout: float, agent: AgentProcess) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := cond():
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout} s\n{agent.log()[-4000:]}")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "corepeek", *args], capture_output=True,
                          text=True, timeout=120)


def index_sha256(store: Path, entry_id: str) -> str:
    """The SHA-256 the agent computed over the capture's bytes as it wrote them."""
    with sqlite3.connect(f"file:{store / 'index.sqlite'}?mode=ro", uri=True) as db:
        return db.execute("SELECT sha256 FROM entries WHERE id = ?", (entry_id,)).fetchone()[0]


def audit_lines(agent: AgentProcess) -> list[dict[str, object]]:
    return [json.loads(line) for line in agent.log().splitlines() if line.startswith("{")]


def test_rss_trigger_captures_once_into_the_store(store_agent: AgentProcess, build,
                                                  tmp_path: Path) -> None:
    exe = build("growmem")
    with Target(exe) as target:
        info = add(store_agent, target.pid, rss_above_bytes=48 << 20, count=3,
                   cooldown_seconds=600, mode=pb.CAPTURE_MODE_FULL)
        time.sleep(3 * INTERVAL)
        assert trigger(store_agent, info.id).fired == 0          # below the threshold
        grown = target.command("grow 64")
        crossed = time.time()
        fired = wait_for("the firing", lambda: trigger(store_agent, info.id).last_fired,
                         2 * INTERVAL + 5, store_agent)
        assert fired - crossed <= 2 * INTERVAL + SWEEP_SLACK, (
            f"fired {fired - crossed:.3f} s after the crossing (interval {INTERVAL} s)")
        entries = wait_for("the stored entry", lambda: captures(store_agent), 30, store_agent)
        time.sleep(4 * INTERVAL)                               # still above: the cool-down holds
        assert trigger(store_agent, info.id).fired == 1
        assert len(captures(store_agent)) == 1
        assert_thawed_and_undisturbed(target)
        (entry,) = entries                                     # type: ignore[misc]
        assert (entry.pid, entry.trigger_id, entry.owner, entry.corrupt) == (
            target.pid, info.id, "local", False)
        assert entry.stored_bytes < entry.core_size
        exe_id = subprocess.run(["readelf", "-n", str(exe)], capture_output=True,
                                text=True).stdout.split("Build ID:")[1].split()[0]
        assert exe_id in entry.build_ids

        # Audited under the owner's identity, naming the trigger and the entry.
        fired_lines = [a for a in audit_lines(store_agent)
                       if a.get("kind") == "capture" and a.get("trigger")]
        assert [(a["identities"], a["trigger"]["id"], a["trigger"]["entry"], a["outcome"])
                for a in fired_lines] == [(["local"], info.id, entry.id, "ok")]

        # Served by id through Capture: byte-identical to what the capture wrote.
        out = tmp_path / "stored.core"
        r = cli("dump", "--agent", store_agent.address, "--capture", entry.id, "-o", str(out))
        assert r.returncode == 0, r.stderr
        data = out.read_bytes()
        assert len(data) == entry.core_size
        assert hashlib.sha256(data).hexdigest() == index_sha256(tmp_path / "store", entry.id)
        # ... by any offset and length
        with open_capture(store_agent.address, 0, capture_id=entry.id) as core:
            assert core.layout.pid == target.pid and core.layout.total_size == len(data)
            for off, n in [(0, 64), (4095, 3), (len(data) // 3, 1 << 20),
                           (len(data) - 10, 10), (len(data) // 2 + 17, 2 * (1 << 20) + 5)]:
                assert core.read_bytes(off, n) == data[off:off + n]
        # ... and it loads in gdb, the grown memory as the target wrote it.
        assert "main" in gdb_backtraces_text(out, exe)
        addr = int(grown["addr"])
        words = struct.unpack("<512Q", gdb_read_memory(out, exe, addr + 8 * 4096, 4096))
        assert words == tuple(0xC0DE000000000000 | (4096 + i) for i in range(512))
        assert_thawed_and_undisturbed(target)


def test_cpu_trigger_fires_after_its_window(store_agent: AgentProcess, build) -> None:
    window = 2.0
    with Target(build("growmem")) as target:
        # 5% of a CPU: the spinning thread gets at least that on a loaded 2-CPU
        # machine (load 16 measured while the suites of six helpers ran); the
        # idle target (a 10 ms heartbeat) stays far below it.
        info = add(store_agent, target.pid, cpu_above_percent=5, cpu_for_seconds=window,
                   mode=pb.CAPTURE_MODE_NOTES)
        time.sleep(window + 2 * INTERVAL)
        assert trigger(store_agent, info.id).fired == 0          # idle for a whole window
        target.command("spin")
        spun = time.time()
        try:
            fired = wait_for("the firing", lambda: trigger(store_agent, info.id).last_fired,
                             window + 10, store_agent)
        finally:
            target.command("calm")
        held = fired - spun
        assert window <= held <= window + 2 * INTERVAL + SWEEP_SLACK, f"fired after {held:.2f} s"
        (entry,) = wait_for("the stored entry", lambda: captures(store_agent), 30, store_agent)
        assert entry.mode == pb.CAPTURE_MODE_NOTES and entry.pid == target.pid
        assert_thawed_and_undisturbed(target)
        # A notes capture keeps only headers and notes: memory is never readable.
        with open_capture(store_agent.address, 0, capture_id=entry.id, mode="notes") as core:
            lay = core.layout
            assert core.read_bytes(lay.notes.offset, lay.notes.length)
        with open_capture(store_agent.address, 0, capture_id=entry.id) as core, \
                pytest.raises(CaptureError, match="PERMISSION_DENIED"):
            core.read_bytes(core.layout.segments[0].file_offset, 4096)


def test_count_and_cooldown_hold(store_agent: AgentProcess, build) -> None:
    with Target(build("growmem")) as target:
        info = add(store_agent, target.pid, every_seconds=1, count=2, cooldown_seconds=3,
                   mode=pb.CAPTURE_MODE_NOTES)
        first = wait_for("the first firing", lambda: trigger(store_agent, info.id).last_fired,
                         5, store_agent)
        second = wait_for("the second firing",
                          lambda: (t := trigger(store_agent, info.id)).fired == 2 and t.last_fired,
                          10, store_agent)
        assert 3.0 <= second - first <= 3.0 + 2 * INTERVAL + SWEEP_SLACK      # the cool-down
        time.sleep(5)
        assert trigger(store_agent, info.id).fired == 2                        # the count
        wait_for("two entries", lambda: len(captures(store_agent)) == 2, 20, store_agent)
        assert_thawed_and_undisturbed(target)


def test_store_limits_evict_oldest_first_and_the_index_survives_a_restart(
        tmp_path: Path, require_root: None, build) -> None:
    store = tmp_path / "store"
    agent = agent_with_store(tmp_path, store, "--store-max-per-program", "2")
    try:
        with Target(build("growmem")) as target:
            info = add(agent, target.pid, every_seconds=1, count=3, mode=pb.CAPTURE_MODE_NOTES)
            seen: list[str] = []

            def three_fired() -> bool:
                seen.extend(c.id for c in captures(agent) if c.id not in seen)
                return trigger(agent, info.id).fired == 3 and len(seen) == 3
            wait_for("three captures", three_fired, 30, agent)
            kept = wait_for("eviction", lambda: [c.id for c in captures(agent)]
                            if len(captures(agent)) == 2 else None, 10, agent)
            assert kept == seen[1:], f"kept {kept} of {seen}: the oldest must go first"
            assert not (store / f"{seen[0]}.zst").exists()
            assert_thawed_and_undisturbed(target)
    finally:
        stop_agent(agent)
    again = agent_with_store(tmp_path, store)
    try:
        assert [c.id for c in captures(again)] == kept
        with open_capture(again.address, 0, capture_id=kept[0], mode="notes") as core:
            assert core.read_bytes(core.layout.notes.offset, core.layout.notes.length)
    finally:
        stop_agent(again)


def test_a_corrupted_entry_is_reported_and_not_served(tmp_path: Path, require_root: None,
                                                      build) -> None:
    store = tmp_path / "store"
    agent = agent_with_store(tmp_path, store)
    try:
        with Target(build("growmem")) as target:
            target.command("grow 8")
            add(agent, target.pid, every_seconds=1, count=1)
            (entry,) = wait_for("the entry", lambda: captures(agent), 30, agent)
            assert_thawed_and_undisturbed(target)
        path = store / f"{entry.id}.zst"
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        path.write_bytes(bytes(raw))
        r = cli("dump", "--agent", agent.address, "--capture", entry.id, "-o",
                str(tmp_path / "bad.core"))
        assert r.returncode == 1 and "DATA_LOSS" in r.stderr and "checksum" in r.stderr, r.stderr
        assert not (tmp_path / "bad.core").exists() or (tmp_path / "bad.core").stat().st_size == 0
        (listed,) = captures(agent)
        assert listed.corrupt
        r = cli("captures", "--agent", agent.address)
        assert "CORRUPT" in r.stdout, r.stdout
    finally:
        stop_agent(agent)


def test_identities_the_policy_does_not_allow_cannot_add_triggers(
        tmp_path: Path, require_root: None) -> None:
    agent = agent_with_store(tmp_path, tmp_path / "store", policy=policy_file(tmp_path,
                                                                              triggers=False))
    try:
        with pytest.raises(grpc.RpcError) as err:
            add(agent, 1, every_seconds=5)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "triggers: true" in err.value.details()
        r = cli("triggers", "add", "--agent", agent.address, "--pid", "1", "--every", "5")
        assert r.returncode == 1 and "PERMISSION_DENIED" in r.stderr
        refused = [a for a in audit_lines(agent) if a.get("kind") == "trigger"]
        assert refused and all(a["outcome"] == "refused" for a in refused)
    finally:
        stop_agent(agent)
    # A policy that names nobody on this socket: refused at stream start, audited.
    agent = agent_with_store(tmp_path, tmp_path / "store2", policy=policy_file(
        tmp_path, clients='"uri:spiffe://corp.test/someone"'))
    try:
        for call in (lambda: add(agent, 1, every_seconds=5),
                     lambda: stub(agent).ListTriggers(pb.ListTriggersRequest(), timeout=10),
                     lambda: stub(agent).ListCaptures(pb.ListCapturesRequest(), timeout=10)):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "not allowed to use this agent" in err.value.details()
        methods = [a.get("method") for a in audit_lines(agent) if a.get("outcome") == "refused"]
        assert {"/corepeek.v1.CoreCaptureService/AddTrigger",
                "/corepeek.v1.CoreCaptureService/ListCaptures"} <= set(methods)
    finally:
        stop_agent(agent)


def test_a_notes_only_identity_reads_only_the_notes_of_a_stored_core(
        tmp_path: Path, require_root: None, build) -> None:
    store = tmp_path / "store"
    agent = agent_with_store(tmp_path, store)
    try:
        with Target(build("growmem")) as target:
            add(agent, target.pid, every_seconds=1, count=1)
            (entry,) = wait_for("the entry", lambda: captures(agent), 30, agent)
            assert_thawed_and_undisturbed(target)
    finally:
        stop_agent(agent)
    agent = agent_with_store(tmp_path, store, policy=policy_file(tmp_path, modes="notes"))
    try:
        with pytest.raises(CaptureError, match="PERMISSION_DENIED"):
            open_capture(agent.address, 0, capture_id=entry.id, mode="full")
        with open_capture(agent.address, 0, capture_id=entry.id, mode="notes") as core:
            lay = core.layout
            assert lay.mode == pb.CAPTURE_MODE_NOTES
            assert [(r.offset, r.length) for r in lay.readable] == [
                (0, lay.headers.length), (lay.notes.offset, lay.notes.length)] or all(
                r.offset + r.length <= lay.notes.offset + lay.notes.length for r in lay.readable)
            assert core.read_bytes(lay.notes.offset, lay.notes.length)
            with pytest.raises(CaptureError, match="PERMISSION_DENIED"):
                core.read_bytes(lay.segments[0].file_offset, 4096)
    finally:
        stop_agent(agent)


def test_a_capture_the_client_asks_to_keep_is_stored_byte_identical(
        tmp_path: Path, require_root: None, build) -> None:
    exe = build("growmem")
    agent = agent_with_store(tmp_path, tmp_path / "store", policy=policy_file(tmp_path,
                                                                              keep=True))
    try:
        with Target(exe) as target:
            target.command("grow 16")
            live = tmp_path / "live.core"
            r = cli("dump", "--agent", agent.address, str(target.pid), "--snapshot", "--keep",
                    "-o", str(live))
            assert r.returncode == 0, r.stderr
            assert_thawed_and_undisturbed(target)
        entry_id = r.stderr.split("kept in the agent's store as ")[1].split()[0]
        (entry,) = captures(agent)
        assert entry.id == entry_id and entry.owner == "local" and not entry.trigger_id
        stored = tmp_path / "stored.core"
        r = cli("dump", "--agent", agent.address, "--capture", entry_id, "-o", str(stored))
        assert r.returncode == 0, r.stderr
        assert hashlib.sha256(stored.read_bytes()).digest() == hashlib.sha256(
            live.read_bytes()).digest()                # the very capture that was kept
        assert "main" in gdb_backtraces_text(stored, exe)
    finally:
        stop_agent(agent)
    # Without `keep: true` in the rule: refused, nothing stored, target thawed.
    agent = agent_with_store(tmp_path, tmp_path / "store2")
    try:
        with Target(exe) as target:
            r = cli("dump", "--agent", agent.address, str(target.pid), "--keep",
                    "-o", str(tmp_path / "refused.core"))
            assert r.returncode == 1 and "PERMISSION_DENIED" in r.stderr and "keep" in r.stderr
            assert_thawed_and_undisturbed(target)
        assert captures(agent) == []
    finally:
        stop_agent(agent)


def test_a_configured_trigger_fires_as_the_identity_it_names(tmp_path: Path, require_root: None,
                                                            build) -> None:
    with Target(build("growmem")) as target:
        conf = tmp_path / "triggers.yaml"
        conf.write_text(f"version: 1\ninterval: {INTERVAL}\ntriggers:\n"
                        f"  - name: from-config\n    identity: local\n"
                        f"    select: {{pid: {target.pid}}}\n    every: 1\n"
                        f"    only: notes\n")
        agent = start_agent(tmp_path, "--policy", str(policy_file(tmp_path, triggers=False)),
                            "--store", str(tmp_path / "store"), "--triggers", str(conf),
                            "--sessions-per-minute", "0")
        try:
            (entry,) = wait_for("the configured firing", lambda: captures(agent), 30, agent)
            assert entry.pid == target.pid and entry.owner == "local"
            assert entry.mode == pb.CAPTURE_MODE_NOTES
            assert_thawed_and_undisturbed(target)
            # listed to the identity it runs as, but never removed over RPC
            (t,) = stub(agent).ListTriggers(pb.ListTriggersRequest(), timeout=10).triggers
            assert (t.source, t.owner, t.fired, t.spec.name) == ("config", "local", 1,
                                                                 "from-config")
            with pytest.raises(grpc.RpcError) as err:
                stub(agent).RemoveTrigger(pb.RemoveTriggerRequest(id=t.id), timeout=10)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        finally:
            stop_agent(agent)
    bad = tmp_path / "bad.yaml"
    bad.write_text("triggers:\n  - select: {comm: [a]}\n    every: 5\n    every: 6\n")
    r = cli("agent", "--listen", f"unix:{tmp_path / 'x.sock'}", "--store", str(tmp_path / "s2"),
            "--triggers", str(bad))
    assert r.returncode == 1 and "duplicate key 'every'" in r.stderr, r.stderr


def test_collect_stored_gathers_the_entries_of_the_stores(tmp_path: Path, require_root: None,
                                                         build) -> None:
    store = tmp_path / "store"
    agent = agent_with_store(tmp_path, store, policy=policy_file(tmp_path, keep=True))
    try:
        with Target(build("growmem")) as target:
            target.command("grow 4")
            for i in range(2):
                r = cli("dump", "--agent", agent.address, str(target.pid), "--snapshot",
                        "--keep", "-o", str(tmp_path / f"live{i}.core"))
                assert r.returncode == 0, r.stderr
            assert_thawed_and_undisturbed(target)
        ids = [c.id for c in captures(agent)]
        assert len(ids) == 2
        out = tmp_path / "collected"
        r = cli("collect", "--agents", agent.address, "--stored", "--since", "1h",
                "--out", str(out), "--no-progress", "--json")
        assert r.returncode == 0, r.stderr
        manifest = json.loads(r.stdout)
        assert [c["status"] for c in manifest["captures"]] == ["ok", "ok"]
        got = sorted(hashlib.sha256((out / c["path"]).read_bytes()).hexdigest()
                     for c in manifest["captures"])
        assert got == sorted(index_sha256(store, i) for i in ids)
        time.sleep(2)
        r = cli("collect", "--agents", agent.address, "--stored", "--since", "1s",
                "--out", str(tmp_path / "none"), "--no-progress", "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["captures"] == [], r.stderr
    finally:
        stop_agent(agent)
