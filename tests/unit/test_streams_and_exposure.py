"""Pure logic of issue 19's agent gates: stream slots, stream lifetimes, stacks exposure."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corepeek_agent.exposure import Exposure, subtract
from corepeek_agent.lifetime import Lifetimes, StreamWatch
from corepeek_agent.ratelimit import StreamSlots, TooManyStreams


def test_stream_slots_cap_each_key_and_the_total() -> None:
    slots = StreamSlots(total=5)
    a = [slots.acquire("a", 3) for _ in range(3)]
    with pytest.raises(TooManyStreams, match="limit 3 per client"):
        slots.acquire("a", 3)
    b = [slots.acquire("b", 3) for _ in range(2)]
    with pytest.raises(TooManyStreams, match="already serves 5 streams"):
        slots.acquire("c", 3)
    a[0]()
    a[0]()                                  # a release is idempotent
    assert slots.held("a") == 2 and slots.held() == 4
    slots.acquire("c", 3)
    for r in a[1:] + b:
        r()
    assert slots.held() == 1 and slots.held("a") == 0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_stream_must_open_in_time_then_stay_busy_and_end_at_its_lifetime() -> None:
    clock, cancelled = Clock(), []
    w = StreamWatch(lambda: cancelled.append(1), Lifetimes(first_request=2, idle=5, maximum=20),
                    clock=clock)
    clock.now += 1.9
    assert w.overdue(clock.now) == ""
    clock.now += 0.2
    assert "no `open` request within 2 s" in w.overdue(clock.now)
    w.touch()                               # the open arrived
    clock.now += 4.9
    assert w.overdue(clock.now) == ""
    clock.now += 0.2
    assert "idle for 5 s" in (why := w.overdue(clock.now))
    w.fire(why)
    w.fire("again")
    assert cancelled == [1] and not w.refused and w.reason == why
    busy = StreamWatch(lambda: None, Lifetimes(first_request=2, idle=5, maximum=20), clock=clock)
    for _ in range(25):
        clock.now += 1
        busy.touch()
    assert "maximum session lifetime of 20 s" in busy.overdue(clock.now)


def test_the_clients_stack_request_is_clamped_to_the_rule() -> None:
    e = Exposure(stack_bytes=1 << 20, environment=False)
    assert e.clamp(0) == 1 << 20
    assert e.clamp(64 << 10) == 64 << 10
    assert e.clamp(1 << 30) == 1 << 20


_RANGES = st.lists(st.tuples(st.integers(0, 200), st.integers(0, 50)), max_size=8)


@given(ranges=_RANGES, holes=_RANGES)
def test_subtract_removes_exactly_the_holes(ranges: list[tuple[int, int]],
                                            holes: list[tuple[int, int]]) -> None:
    def cover(rs: list[tuple[int, int]]) -> set[int]:
        return {b for o, n in rs for b in range(o, o + n)}

    merged: list[tuple[int, int]] = []
    for o, n in sorted(r for r in ranges if r[1]):
        if merged and o <= merged[-1][0] + merged[-1][1]:
            end = max(merged[-1][0] + merged[-1][1], o + n)
            merged[-1] = (merged[-1][0], end - merged[-1][0])
        else:
            merged.append((o, n))
    out = subtract(merged, holes)
    assert cover(out) == cover(merged) - cover(holes)
    assert out == sorted(out) and all(n > 0 for _, n in out)
