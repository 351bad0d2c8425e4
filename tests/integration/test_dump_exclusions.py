"""coredump_filter and MADV_DONTDUMP in a real capture: what the kernel would
leave out of a core never comes back from the agent, in any byte of the file."""

from __future__ import annotations

from pathlib import Path

from elftools.elf.elffile import ELFFile

from harness.capture import capture_file
from harness.checks import assert_thawed_and_undisturbed
from harness.targets import Target
from harness.tools import gcore

SEEDS = {"dontdump": 0xA1, "shared": 0xB2, "kept": 0xC3}


def _region(seed: int, size: int) -> bytes:
    """dumpfilter.c's bytes for one region (its LCG)."""
    out, x = bytearray(size), seed
    for i in range(size):
        x = (x * 1103515245 + 12345) & 0xFFFFFFFF
        out[i] = (x >> 16) & 0xFF
    return bytes(out)


def _loads(core: Path) -> dict[int, tuple[int, int]]:
    """{p_vaddr: (p_filesz, p_memsz)} of the core's PT_LOAD segments."""
    with open(core, "rb") as f:
        return {s.header.p_vaddr: (s.header.p_filesz, s.header.p_memsz)
                for s in ELFFile(f).iter_segments() if s.header.p_type == "PT_LOAD"}


def _check_core(core: Path, t: Target, *, shared_kept: bool, by_gdb: bool = False) -> None:
    """Kept regions are whole in the core; excluded ones have a PT_LOAD with no file
    bytes (as the kernel writes; gcore leaves the segment out) and none of their bytes
    appear anywhere in the file."""
    size = int(t.ready["size"])
    loads, data = _loads(core), core.read_bytes()
    want_kept = {"dontdump": False, "shared": shared_kept, "kept": True}
    for name, kept in want_kept.items():
        addr, pattern = int(t.ready[f"{name}_addr"]), _region(SEEDS[name], size)
        seg = next(((v, fs, ms) for v, (fs, ms) in loads.items() if v <= addr < v + ms),
                   None)
        assert seg is not None or (by_gdb and not kept), (name, f"{addr:#x}", "no PT_LOAD")
        probe = pattern[4096:4096 + 256]                # 256 bytes found nowhere else
        if kept:
            assert seg[1] == seg[2], (name, seg)
            assert probe in data, f"{name}: its bytes are missing from {core.name}"
        else:
            if seg is not None:
                assert seg[0] == addr and seg[1] == 0, (name, seg)
            assert probe not in data, f"{name}: excluded bytes came back in {core.name}"


def test_madv_dontdump_and_coredump_filter_are_honoured(agent, build, tmp_path: Path) -> None:
    with Target(build("dumpfilter")) as t:
        filter_path = Path(f"/proc/{t.pid}/coredump_filter")
        # Default filter (0x33): shared anonymous memory is dumped, DONTDUMP is not.
        capture_file(agent.address, t.pid, tmp_path / "default.core")
        _check_core(tmp_path / "default.core", t, shared_kept=True)
        assert_thawed_and_undisturbed(t)
        # Bit 1 cleared: the shared mapping is left out too.
        filter_path.write_text("0x31")
        capture_file(agent.address, t.pid, tmp_path / "filtered.core")
        _check_core(tmp_path / "filtered.core", t, shared_kept=False)
        assert_thawed_and_undisturbed(t)
        # gdb's gcore, which reads the same smaps flags and filter, agrees.
        gcore(t.pid, tmp_path / "gcore.core")
        _check_core(tmp_path / "gcore.core", t, shared_kept=False, by_gdb=True)
        assert_thawed_and_undisturbed(t)
