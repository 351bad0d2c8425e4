"""SharedHold bookkeeping: who thaws a shared freeze, and when.

The freeze itself is proven with real targets in
tests/integration/test_shared_capture.py; this pins the rules the sessions
rely on: the last member releases exactly once, the shared reader is
disposed of only after the last user, and expiry reaches every member.
"""

from __future__ import annotations

import threading

from corepeek_agent.shared import SharedHold


def test_last_member_releases_once_and_last_user_disposes() -> None:
    events: list[str] = []
    hold = SharedHold(42, "a")
    assert hold.enter("a", None) and hold.enter("b", None)
    hold.set_release(lambda: events.append("release"))
    hold.ready.set()
    hold._dispose = lambda: events.append("dispose")     # as publish() sets it
    hold.leave("a")
    assert events == [] and not hold.released.is_set()
    hold.leave("a")                                      # idempotent
    assert hold.members == 1
    hold.leave("b")                                      # b left (a notes session) ...
    assert events == ["release"] and hold.released.is_set()
    hold.done("a")
    assert events == ["release"]                         # ... but still reads: no dispose
    hold.done("b")
    assert events == ["release", "dispose"]
    assert not hold.enter("c", None)                     # a released hold takes nobody


def test_expiry_reaches_every_member_and_concurrent_leaves_release_once() -> None:
    hold = SharedHold(7, "m0")
    told: list[str] = []
    released = []
    for i in range(32):
        assert hold.enter(f"m{i}", lambda i=i: told.append(f"m{i}"))
    hold.set_release(lambda: released.append(1))
    hold.expire()
    assert sorted(told) == sorted(f"m{i}" for i in range(32))
    threads = [threading.Thread(target=hold.done, args=(f"m{i}",)) for i in range(32)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert released == [1]


def test_nobody_joins_while_the_target_is_let_go_and_released_comes_after() -> None:
    """A new freeze may start only once the old tracer thread is gone."""
    hold = SharedHold(9, "a")
    assert hold.enter("a", None)
    seen: list[tuple[bool, bool, bool]] = []

    def release() -> None:            # runs while the target is being let go
        seen.append((hold.closing, hold.released.is_set(), hold.enter("late", None)))

    hold.set_release(release)
    hold.leave("a")
    assert seen == [(True, False, False)]
    assert hold.released.is_set() and hold.ready.is_set()
