"""An i386 core that cannot fit ELF32 file offsets is refused with a clear status.

A 32-bit process maps less than 4 GiB, so the limit is reached only when the
header block or the notes come on top of an almost full address space.  The
real i386 target ``tests/targets32/fill4g.c`` fills its address space and adds
either 40000 VMAs (1.3 MB of program headers, visible in /proc/PID/maps: the
agent refuses before freezing anything) or 600 threads (notes of about 2 MB,
known only once frozen: the agent refuses right after the layout and thaws at
once).  Either way: FAILED_PRECONDITION, not ``struct.error``, and the target
runs on.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import grpc
import pytest

from corepeek.errors import CaptureError
from corepeek.remote import open_capture
from harness.targets import proc_status_field
from security_util import wait_audit

TARGETS32 = Path(__file__).resolve().parents[1] / "targets32"


@pytest.fixture(scope="module")
def fill4g(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fill4g") / "fill4g"
    res = subprocess.run(["gcc", "-m32", "-O1", "-pthread", "-Wall", "-Wextra", "-o", str(out),
                          str(TARGETS32 / "fill4g.c")], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.fail(f"cannot build fill4g with gcc -m32: {res.stderr.strip()[:300]}")
    return out




class Filler:
    def __init__(self, exe: Path, *args: str) -> None:
        self.proc = subprocess.Popen([str(exe), *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.ready = self.proc.stdout.readline()          # type: ignore[union-attr]
        assert self.ready.startswith("ready "), self.ready
        self.pid = self.proc.pid

    def beat(self) -> tuple[int, int]:
        """(heartbeats so far, longest heartbeat pause in µs)."""
        self.proc.stdin.write("\n")                       # type: ignore[union-attr]
        self.proc.stdin.flush()                           # type: ignore[union-attr]
        words = self.proc.stdout.readline().split()       # type: ignore[union-attr]
        assert words[0] == "beat", words
        return int(words[1]), int(words[2].split("=")[1])

    def assert_running_untraced(self) -> None:
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            state = proc_status_field(task / "status", "State") or ""
            assert state[:1] not in ("t", "T"), f"task {task.name} in state {state}"
            assert proc_status_field(task / "status", "TracerPid") == "0"
        before, _ = self.beat()
        time.sleep(0.1)
        after, _ = self.beat()
        assert after > before, "heartbeat stopped"

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def _refused(address: str, pid: int) -> CaptureError:
    with pytest.raises(CaptureError) as exc:
        open_capture(address, pid)
    assert exc.value.code == grpc.StatusCode.FAILED_PRECONDITION, exc.value
    text = str(exc.value)
    assert "32-bit core would need file offsets up to" in text, text
    assert "over the ELF32 limit of 4294967295" in text, text
    assert "coredump_filter" in text                      # the remedy
    return exc.value


def test_many_vmas_are_refused_before_anything_is_frozen(audited_agent, fill4g,
                                                         tmp_path: Path) -> None:
    t = Filler(fill4g, "vmas", "40000")
    try:
        _refused(audited_agent.address, t.pid)
        t.assert_running_untraced()
        line = wait_audit(tmp_path / "audit", pid=t.pid)
        assert line["code"] == "FAILED_PRECONDITION"
        # Never frozen: no thread was stopped, no freeze time.
        assert line["stop_micros"] == 0 and line["freeze_seconds"] == 0, line
    finally:
        t.close()


def test_many_threads_are_refused_right_after_the_layout_and_thawed(audited_agent, fill4g,
                                                                    tmp_path: Path) -> None:
    t = Filler(fill4g, "threads", "600")
    try:
        _refused(audited_agent.address, t.pid)
        t.assert_running_untraced()
        line = wait_audit(tmp_path / "audit", pid=t.pid)
        assert line["code"] == "FAILED_PRECONDITION"
        # Frozen for the layout only, then thawed at once.
        assert line["stop_micros"] > 0, line
        _, gap = t.beat()
        print(f"\nMEASURED ELF32 refusal after the layout: target frozen "
              f"{line['freeze_seconds'] * 1000:.1f} ms, longest heartbeat pause {gap / 1000:.1f} ms")
        assert line["freeze_seconds"] < 5.0, line
    finally:
        t.close()
