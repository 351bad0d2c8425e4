"""The seed RFC's rule: a thread that does not freeze in time gets zeroed registers.

A vfork() parent sleeps in D state until its child exits and does not honour
PTRACE_INTERRUPT before then.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

from elftools.elf.elffile import ELFFile

from harness.capture import capture_file
from harness.checks import assert_thawed_and_undisturbed
from harness.targets import Target


def _prstatus_by_tid(core: Path) -> dict[int, bytes]:
    out = {}
    with open(core, "rb") as f:
        for seg in ELFFile(f).iter_segments():
            if seg["p_type"] != "PT_NOTE":
                continue
            for n in seg.iter_notes():
                if n["n_type"] == "NT_PRSTATUS":
                    raw = n["n_desc"] if isinstance(n["n_desc"], bytes) else None
                    f.seek(n["n_offset"] + 12 + ((n["n_namesz"] + 3) & ~3))
                    raw = f.read(n["n_descsz"])
                    out[struct.unpack_from("<i", raw, 32)[0]] = raw
    return out


def test_vfork_parent_is_reported_unfrozen_with_zero_registers(agent, build, require_root,
                                                                tmp_path: Path) -> None:
    with Target(build("vfork_parent"), ["4"]) as t:
        vforker = int(t.ready["vfork_tid"])
        core = tmp_path / "vfork.core"
        t0 = time.monotonic()

        layout = capture_file(agent.address, t.pid, core, freeze_timeout_ms=300)

        assert time.monotonic() - t0 < 3, "the capture waited for the D-state thread"
        frozen = {th.tid: th.frozen for th in layout.threads}
        assert frozen[vforker] is False
        assert all(v for tid, v in frozen.items() if tid != vforker), frozen
        prstatus = _prstatus_by_tid(core)
        assert prstatus[vforker][112:112 + 27 * 8] == bytes(27 * 8)
        assert any(prstatus[t.pid][112:112 + 27 * 8] != bytes(27 * 8) for _ in [0])
        # The vfork child exits after its sleep; the parent thread then runs on.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not t.status()["vfork_returned"]:
            time.sleep(0.1)
        st = t.status()
        assert st["vfork_returned"] == 1 and st["child_status"] == 0, st
        assert_thawed_and_undisturbed(t)
