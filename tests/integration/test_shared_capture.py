"""Two captures of one pid share its freeze (docs/design.md, "Shared captures").

A second session on a pid the agent already holds frozen (or snapshotted)
joins that state: both read the same stopped moment, the target is stopped
once, and it thaws when the last session closes.  A client that wants a
freeze of its own waits (``wait_exclusive``, ``dump --wait``) and gets
ABORTED if the pid is still held when the wait ends.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from corepeek.dump import write_full_core
from corepeek.errors import CaptureError
from corepeek.remote import RemoteCore, open_capture
from corepeek.v1 import capture_pb2 as pb
from harness.checks import assert_thawed_and_undisturbed, wait_thawed
from harness.targets import Target
from security_util import audit_lines, wait_audit




def frozen(t: Target) -> bool:
    return set(t.thread_states().values()) == {"t"}


def dump_both(cores: list[RemoteCore], outs: list[Path]) -> None:
    """Pull every core at the same time, each from its own thread."""
    errors: list[BaseException] = []

    def pull(core: RemoteCore, out: Path) -> None:
        try:
            write_full_core(core, out)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=pull, args=pair) for pair in zip(cores, outs)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors, errors


def test_two_live_captures_share_one_freeze(audited_agent, build, tmp_path: Path) -> None:
    with Target(build("threads"), watcher=build("parent_watch")) as t:
        t.command("resetgap")
        opened = time.monotonic()
        a = open_capture(audited_agent.address, t.pid, snapshot=False)
        try:
            b = open_capture(audited_agent.address, t.pid, snapshot=False)
        except BaseException:
            a.close()
            raise
        try:
            # THEN b joined a's freeze: same freeze id, flagged joined
            assert not a.layout.joined and b.layout.joined
            assert a.layout.freeze_id == b.layout.freeze_id == a.layout.session_id
            assert b.layout.session_id != a.layout.session_id
            assert b.layout.stopped_micros >= a.layout.stopped_micros
            outs = [tmp_path / "core.a", tmp_path / "core.b"]
            dump_both([a, b], outs)
            assert outs[0].stat().st_size == a.size == b.size
            assert outs[0].read_bytes() == outs[1].read_bytes()
            # WHEN the first closes, the target stays frozen for the second
            a.close()
            time.sleep(0.2)
            assert frozen(t), t.thread_states()
            assert b.read_bytes(0, 64)[:4] == b"\x7fELF"
        finally:
            a.close()
            b.close()
        closed = time.monotonic()
        wait_thawed(t)
        # THEN it was stopped once: the heartbeat's longest gap spans both
        # captures (two freezes would leave a running gap in between).
        span_us = (closed - opened) * 1e6
        st = assert_thawed_and_undisturbed(t)
        assert st is not None
        print(f"\nMEASURED shared live capture: target stopped {st['maxgap_us'] / 1e6:.3f} s "
              f"in one gap, {span_us / 1e6:.3f} s from first open to last close")
        assert st["maxgap_us"] >= 0.8 * span_us, (st["maxgap_us"], span_us)
    # One audit line each, both naming the one freeze.
    audit = tmp_path / "audit"
    la = wait_audit(audit, session=a.layout.session_id)
    lb = wait_audit(audit, session=b.layout.session_id)
    assert la["outcome"] == lb["outcome"] == "ok"
    assert la["freeze_id"] == lb["freeze_id"] == a.layout.session_id
    assert la["stop_micros"] > 0 and lb["stop_micros"] == 0     # only a stopped threads
    assert len([d for d in audit_lines(audit) if d.get("pid") == t.pid]) == 2


def test_two_snapshot_captures_share_one_clone(audited_agent, build, tmp_path: Path) -> None:
    with Target(build("snapshot_probe")) as t:
        a = open_capture(audited_agent.address, t.pid, snapshot=True)
        try:
            b = open_capture(audited_agent.address, t.pid, snapshot=True)
        except BaseException:
            a.close()
            raise
        try:
            assert a.layout.snapshot and b.layout.snapshot and b.layout.joined
            assert a.layout.freeze_id == b.layout.freeze_id
            # One stop, made before either layout was sent: the same final figure.
            assert a.layout.target_running and b.layout.target_running
            assert a.layout.stopped_micros == b.layout.stopped_micros > 0
            assert not frozen(t)                 # the target runs while both read
            outs = [tmp_path / "core.a", tmp_path / "core.b"]
            dump_both([a, b], outs)
            assert outs[0].read_bytes() == outs[1].read_bytes()
            a.close()
            assert b.read_bytes(0, 64)[:4] == b"\x7fELF"     # the clone outlives a
        finally:
            a.close()
            b.close()
        wait_thawed(t)
        assert_thawed_and_undisturbed(t)
    audit = tmp_path / "audit"
    assert wait_audit(audit, session=b.layout.session_id)["freeze_id"] == a.layout.session_id


def test_notes_session_joining_a_full_one_gets_only_notes(audited_agent, build) -> None:
    with Target(build("threads")) as t:
        with open_capture(audited_agent.address, t.pid, snapshot=False) as full:
            with open_capture(audited_agent.address, t.pid, mode="notes") as notes:
                assert notes.layout.joined and notes.layout.mode == pb.CAPTURE_MODE_NOTES
                assert notes.layout.total_size == full.layout.total_size
                first_data = min(s.file_offset for s in full.layout.segments if s.file_size)
                assert notes.layout.readable and all(
                    r.offset + r.length <= first_data for r in notes.layout.readable)
                assert notes.read_bytes(full.layout.notes.offset, 64) == \
                    full.read_bytes(full.layout.notes.offset, 64)
                # The notes session does not keep the target frozen: closing
                # the full one thaws it although the notes stream is open.
                full.close()
                wait_thawed(t)
                assert notes.read_bytes(full.layout.notes.offset, 16)
                with pytest.raises(CaptureError) as exc:
                    notes.read_bytes(first_data, 4096)
                assert exc.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert_thawed_and_undisturbed(t)


def test_wait_exclusive_refuses_while_held_then_gets_its_own_freeze(audited_agent,
                                                                    build) -> None:
    with Target(build("threads")) as t:
        with open_capture(audited_agent.address, t.pid, snapshot=False) as first:
            t0 = time.monotonic()
            with pytest.raises(CaptureError) as exc:
                open_capture(audited_agent.address, t.pid, wait_exclusive=1.0, snapshot=False)
            waited = time.monotonic() - t0
            assert exc.value.code == grpc.StatusCode.ABORTED
            assert f"pid {t.pid} was still held by another capture after waiting 1 s" in \
                str(exc.value)
            assert 0.9 < waited < 5, waited
            assert frozen(t)                      # the first capture is untouched
            first_id = first.layout.freeze_id
            # WHEN the holder closes during the wait, the waiter freezes afresh
            threading.Timer(0.5, first.close).start()
            with open_capture(audited_agent.address, t.pid, wait_exclusive=10,
                              snapshot=False) as own:
                assert not own.layout.joined and own.layout.freeze_id != first_id
                assert frozen(t)
        wait_thawed(t)
        assert_thawed_and_undisturbed(t)


def test_cli_dump_wait_and_summary(audited_agent, build, tmp_path: Path) -> None:
    with Target(build("threads")) as t:
        cmd = [sys.executable, "-m", "corepeek", "dump", "--agent", audited_agent.address,
               str(t.pid)]
        with open_capture(audited_agent.address, t.pid, snapshot=False):
            res = subprocess.run(cmd + ["-o", str(tmp_path / "c1"), "--wait", "0.5"],
                                 capture_output=True, text=True, timeout=60)
            assert res.returncode == 1, res.stderr
            assert "ABORTED" in res.stderr and "still held by another capture" in res.stderr
            assert not (tmp_path / "c1").exists() or (tmp_path / "c1").stat().st_size == 0
            # Without --wait, a dump joins the capture in progress.
            res = subprocess.run(cmd + ["-o", str(tmp_path / "c2")], capture_output=True,
                                 text=True, timeout=120)
            assert res.returncode == 0, res.stderr
            assert "(shared with another capture) (the whole transfer)" in res.stderr, res.stderr
        res = subprocess.run(cmd + ["-o", str(tmp_path / "c3"), "--live"], capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        line = res.stderr.strip().splitlines()[-1]
        assert "target stopped for " in line and "(the whole transfer)" in line, line
        stopped = float(line.split("target stopped for ")[1].split(" s")[0])
        assert 0 < stopped < 60, line
        res = subprocess.run(cmd + ["-o", str(tmp_path / "c4"), "--only", "notes"],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert "thawed once the notes were built" in res.stderr, res.stderr
        assert_thawed_and_undisturbed(t)


def test_many_clients_joining_and_leaving_at_random_never_fail_or_leave_it_frozen(
        audited_agent, build, tmp_path: Path) -> None:
    """Sessions arrive while others close (the hold is being let go, or is a
    notes-only one): each either joins or freezes afresh, never fails."""
    import random
    failures: list[str] = []
    modes = ["full", "notes", "stacks", "full"]

    with Target(build("threads")) as t:
        def client(seed: int) -> None:
            rnd = random.Random(seed)
            for _ in range(6):
                mode = rnd.choice(modes)
                try:
                    with open_capture(audited_agent.address, t.pid, mode=mode,
                                      snapshot=rnd.random() < 0.3) as core:
                        assert core.read_bytes(0, 4)[:4] == b"\x7fELF"
                        time.sleep(rnd.random() * 0.05)
                except Exception as exc:  # noqa: BLE001 - collected and asserted below
                    failures.append(f"{mode}: {exc}")
                time.sleep(rnd.random() * 0.1)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(180)
        assert not failures, failures
        wait_thawed(t)
        assert_thawed_and_undisturbed(t)
    lines = [d for d in audit_lines(tmp_path / "audit") if d.get("pid") == t.pid]
    assert len(lines) == 48 and all(d["outcome"] == "ok" for d in lines)
    joined = [d for d in lines if d["freeze_id"] != d["session"]]
    freezes = {d["freeze_id"] for d in lines}
    print(f"\nMEASURED 48 captures by 8 clients: {len(freezes)} freezes, {len(joined)} joined")
    assert joined and len(freezes) > 1
