"""triggers/persist.py: the RPC-added triggers' state file, in a real directory."""

from __future__ import annotations

import json
import math
import os
import stat
import time
from pathlib import Path

from corepeek_agent.triggers.persist import FILE_NAME, TriggerState, from_record, to_record
from corepeek_agent.triggers.spec import Selector, Trigger, TriggerSpec


def state_in(tmp: Path) -> TriggerState:
    (tmp / "store").mkdir(mode=0o700)
    return TriggerState(os.open(tmp / "store", os.O_RDONLY | os.O_DIRECTORY))


def trig(tid: str = "abc123", **spec: object) -> Trigger:
    s = TriggerSpec(selector=Selector(comm=("app*",), exe=("/srv/*",)), **(spec or {
        "rss_above": 1 << 30}))
    return Trigger(tid, s, ("spiffe://x/a", "a.example"), "rpc")


def test_round_trip_keeps_spec_owner_counts_and_the_cooldown(tmp_path: Path) -> None:
    st = state_in(tmp_path)
    t = trig(cpu_above=90.0, cpu_for=30.0, cooldown=600.0, count=3, mode="notes", name="n")
    t.fired, t.last_fired = 1, time.time() - 100
    st.save([t])
    assert stat.S_IMODE((tmp_path / "store" / FILE_NAME).stat().st_mode) == 0o600
    (back,) = st.load()
    assert (back.id, back.spec, back.owner, back.source, back.fired) == (
        t.id, t.spec, t.owner, "rpc", 1)
    assert 99 <= time.monotonic() - back.last_fired_mono <= 102    # 100 s into its cool-down


def test_never_fired_has_no_cooldown_running() -> None:
    back = from_record(to_record(trig()), time.time(), time.monotonic())
    assert back.last_fired_mono == -math.inf and back.fired == 0


def test_invalid_records_and_files_restore_nothing_of_them(tmp_path: Path) -> None:
    st = state_in(tmp_path)
    good, bad = to_record(trig("good1")), to_record(trig("bad1"))
    bad["spec"]["selector"] = {"pid": 0, "comm": [], "exe": [], "cgroup": [], "container": []}
    odd = {**to_record(trig("odd1")), "owner": []}
    path = tmp_path / "store" / FILE_NAME
    path.write_text(json.dumps({"version": 1, "triggers": [good, bad, odd, {"id": 3}]}))
    assert [t.id for t in st.load()] == ["good1"]        # empty selector, no owner: dropped
    for text in ("{not json", json.dumps({"version": 2, "triggers": [good]}), "[]"):
        path.write_text(text)
        assert st.load() == []


def test_a_leftover_temporary_file_is_removed(tmp_path: Path) -> None:
    st = state_in(tmp_path)
    (tmp_path / "store" / f".{FILE_NAME}.deadbeef").write_text("partial")
    assert st.load() == []
    assert os.listdir(tmp_path / "store") == []
