"""The freeze changes nothing the target can observe — except what signal(7) says.

Each test freezes a real target through the agent, acts on it while frozen,
closes the stream and proves the target carried on exactly as before.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from corepeek.remote import open_capture
from harness.checks import assert_thawed_and_undisturbed, wait_thawed
from harness.targets import Target, sigqueue

SIGRT = signal.SIGRTMIN + 2


def _frozen_states(t: Target) -> dict[int, str]:
    return t.thread_states()


def test_frozen_while_the_stream_is_open_and_running_after(agent, build, require_root) -> None:
    with Target(build("threads"), watcher=build("parent_watch")) as t:
        with open_capture(agent.address, t.pid, snapshot=False) as core:
            states = _frozen_states(t)
            assert set(states.values()) == {"t"}, states
            assert core.layout.freeze_micros > 0
        assert_thawed_and_undisturbed(t)
        woke = t.command("wake")
        assert (woke["nanosleep"], woke["pipe"], woke["cond"]) == ("ok", "ok", "ok"), woke


def test_signals_sent_during_the_freeze_arrive_after_it_in_order(agent, build, require_root) -> None:
    with Target(build("threads"), watcher=build("parent_watch")) as t:
        before = t.status()
        with open_capture(agent.address, t.pid, snapshot=False):
            t.send_signal(signal.SIGUSR1)
            for payload in (11, 22, 33, 44):
                sigqueue(t.pid, SIGRT, payload)
            time.sleep(0.1)
            assert set(t.thread_states().values()) == {"t"}
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            st = t.status()
            if len(st["rt"]) >= len(before["rt"]) + 4 and st["usr1"] > before["usr1"]:
                break
            time.sleep(0.05)
        assert st["usr1"] == before["usr1"] + 1
        assert st["rt"][-4:] == [11, 22, 33, 44], st["rt"]
        assert st["rt_dropped"] == 0
        assert_thawed_and_undisturbed(t)


def test_signal_arriving_during_the_seize_is_not_lost(agent, build, require_root) -> None:
    # A storm of signals while capturing repeatedly: some arrive between SEIZE
    # and the interrupt stop (signal-delivery-stops), which must be handed back.
    with Target(build("threads")) as t:
        sent = 0
        for _ in range(20):
            sigqueue(t.pid, SIGRT, sent)
            sent += 1
            with open_capture(agent.address, t.pid, snapshot=False):
                sigqueue(t.pid, SIGRT, sent)
                sent += 1
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(t.status()["rt"]) < sent:
            time.sleep(0.05)
        assert t.status()["rt"] == list(range(sent))
        assert_thawed_and_undisturbed(t)


def test_a_stopped_process_stays_stopped(agent, build, require_root, tmp_path: Path) -> None:
    with Target(build("threads"), watcher=build("parent_watch")) as t:
        t.send_signal(signal.SIGSTOP)
        t.wait_state("T")
        seen_before = t.watch_status()
        with open_capture(agent.address, t.pid, snapshot=False) as core:
            assert core.layout.total_size > 0
        assert_thawed_and_undisturbed(t, expect_stopped=True)
        assert t.watch_status()["events"] == seen_before["events"]
        t.send_signal(signal.SIGCONT)
        t.wait_state("SR")
        # Our own SIGSTOP/SIGCONT are visible to the parent; nothing else is.
        assert_thawed_and_undisturbed(t, check_parent=False)


PROBES = ("epoll", "semop", "semtimedop", "sigtimedwait", "recv")


def _probe_counts(t: Target) -> dict[str, int]:
    st = t.status()
    return {k[:-len("_eintr")]: int(v) for k, v in st.items() if k.endswith("_eintr")}


def _settled_counts(t: Target, base: dict[str, int],
                    probes: tuple[str, ...] = PROBES) -> dict[str, int]:
    """Counts once every probe in ``probes`` returned once more and blocked again.

    A readiness wait, not a sleep: the probes' EINTR returns land one by one
    after a stop ends; each probe thread is back in its call ('S') when done.
    """
    deadline = time.monotonic() + 5
    while True:
        counts = _probe_counts(t)
        back = all(counts[p] > base[p] for p in probes)
        if back and all(s == "S" for tid, s in t.thread_states().items()
                        if tid in {int(t.ready[f"tid_{p}"]) for p in probes}):
            return _probe_counts(t)
        assert time.monotonic() < deadline, f"probes never returned: {counts} from {base}"
        time.sleep(0.01)


def test_eintr_after_a_freeze_is_exactly_what_any_stop_causes(agent, build, require_root) -> None:
    """signal(7): these calls fail with EINTR after a stop, whatever stopped them.

    Measured side by side: one corepeek freeze and one SIGSTOP/SIGCONT each
    make every probe return EINTR once — no more, no less — and poll() never.
    """
    with Target(build("eintr_probe")) as t:
        base = _probe_counts(t)
        with open_capture(agent.address, t.pid, snapshot=False):
            assert set(t.thread_states().values()) == {"t"}
        after_freeze = _settled_counts(t, base)
        t.send_signal(signal.SIGSTOP)
        t.wait_state("T")
        t.send_signal(signal.SIGCONT)
        t.wait_state("SR")
        after_stop = _settled_counts(t, after_freeze)
        assert_thawed_and_undisturbed(t)
        assert t.status()["probe_other"] == 0
    by_freeze = {k: after_freeze[k] - base[k] for k in base}
    by_sigstop = {k: after_stop[k] - after_freeze[k] for k in base}
    assert by_freeze == {**{p: 1 for p in PROBES}, "poll": 0}, by_freeze
    assert by_freeze == by_sigstop, (by_freeze, by_sigstop)


def test_poll_is_not_interrupted_and_keeps_its_deadline(agent, build, require_root) -> None:
    """A poll() with a 1 s timeout, frozen in its middle, returns 0 at its old
    deadline (or at the thaw if that is later), never with EINTR, never re-armed."""
    timeout_us = 1_000_000
    with Target(build("eintr_probe")) as t:
        # Freeze a poll about 0.2 s after it started (readiness: its start time).
        deadline = time.monotonic() + 10
        while True:
            st = t.status()
            started = int(st["poll_start_us"])
            into = time.monotonic() * 1e6 - started
            if 150_000 <= into <= 400_000:
                break
            assert time.monotonic() < deadline, st
            time.sleep(0.02)
        with open_capture(agent.address, t.pid, snapshot=False):
            assert set(t.thread_states().values()) == {"t"}
            time.sleep(0.5)                       # hold the freeze across the poll
        wait_thawed(t)
        thawed_us = time.monotonic() * 1e6
        deadline = time.monotonic() + 5
        while int((st := t.status())["poll_last_start_us"]) < started:
            assert time.monotonic() < deadline, st
            time.sleep(0.02)
        assert int(st["poll_last_start_us"]) == started, st
        ended = int(st["poll_last_end_us"])
        assert st["poll_eintr"] == 0 and st["probe_other"] == 0, st
        # Not early, and not re-armed with a fresh timeout after the thaw.
        assert ended >= started + timeout_us, (ended - started)
        assert ended <= max(started + timeout_us, thawed_us) + 250_000, (ended - started,
                                                                          thawed_us - started)
        assert_thawed_and_undisturbed(t)


def test_cgroup_v1_freezer_causes_the_same_eintr(build, require_root, tmp_path: Path) -> None:
    root = Path("/sys/fs/cgroup/freezer")
    if not (root / "tasks").exists():
        pytest.skip("no cgroup v1 freezer hierarchy on this machine")
    group = root / f"corepeek-test-{os.getpid()}"
    group.mkdir()
    try:
        with Target(build("eintr_probe")) as t:
            base = _probe_counts(t)
            for tid in t.tids():
                (group / "tasks").write_text(str(tid))
            (group / "freezer.state").write_text("FROZEN")
            deadline = time.monotonic() + 5
            while (group / "freezer.state").read_text().strip() != "FROZEN":
                assert time.monotonic() < deadline, "cgroup never froze"
                time.sleep(0.01)
            (group / "freezer.state").write_text("THAWED")
            _settled_counts(t, base, ("epoll", "semop", "semtimedop"))
            diff = {k: v - base[k] for k, v in _probe_counts(t).items()}
            for tid in t.tids():
                (root / "tasks").write_text(str(tid))
    finally:
        group.rmdir()
    # The kernel's own freezer interrupts the same class of calls (not all of
    # them: docs/measurements.md lists epoll_wait, semop, semtimedop for cgroup v1).
    assert diff["epoll"] == 1 and diff["semop"] == 1 and diff["semtimedop"] == 1, diff
