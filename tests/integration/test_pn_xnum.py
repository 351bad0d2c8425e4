"""PN_XNUM end to end: a process with more than 65,535 mappings gives a core whose
program header count lives in section header 0, and pyelftools, gdb and
eu-readelf all read it."""

from __future__ import annotations

import fcntl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from harness.capture import capture_file
from harness.checks import assert_thawed_and_undisturbed
from harness.targets import Target
from harness.tools import gdb_read_memory

PN_XNUM = 0xFFFF
PAGES = 70_000                              # one mapping per page
MAX_MAP_COUNT = Path("/proc/sys/vm/max_map_count")


@pytest.fixture
def many_mappings_allowed(require_root: None) -> Iterator[None]:
    """vm.max_map_count raised for the test (machine-global: serialised, restored)."""
    with open("/run/lock/corepeek-tests-max_map_count.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        before = MAX_MAP_COUNT.read_text().strip()
        try:
            if int(before) < PAGES + 1000:
                MAX_MAP_COUNT.write_text(str(PAGES + 1000))
            yield
        finally:
            MAX_MAP_COUNT.write_text(before)


def _mapping_count(pid: int) -> int:
    with open(f"/proc/{pid}/maps") as f:
        return sum(1 for _ in f)


def test_core_of_a_process_with_more_than_65535_mappings(agent, build, many_mappings_allowed,
                                                         tmp_path: Path) -> None:
    exe = build("manymaps")
    with Target(exe, [str(PAGES)], ready_timeout=60) as t:
        maps = _mapping_count(t.pid)
        assert maps > PN_XNUM, maps
        core = tmp_path / "xnum.core"
        layout = capture_file(agent.address, t.pid, core)
        assert_thawed_and_undisturbed(t)
        with open(core, "rb") as f:
            elf = ELFFile(f)
            assert elf["e_phnum"] == PN_XNUM
            # As the kernel's fill_extnum_info: one SHT_NULL section holding the count.
            assert elf["e_shnum"] == 1 and elf["e_shoff"] > 0
            assert elf.get_section(0)["sh_type"] == "SHT_NULL"
            phnum = elf.get_section(0)["sh_info"]
            assert phnum == elf.num_segments() == len(layout.segments) + 1   # + PT_NOTE
            loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        # Every mapping is one PT_LOAD (as the kernel writes: one per VMA).
        assert len(loads) == maps, (len(loads), maps)
        page, addr = int(t.ready["page_size"]), int(t.ready["addr"])
        last = PAGES - 1
        # gdb finds the last page's word through the extended header count.
        word = gdb_read_memory(core, exe, addr + last * page, 8)
        assert int.from_bytes(word, "little") == 0x4D4150000000 | last
        # eu-readelf reads the same number of program headers.
        text = subprocess.run(["eu-readelf", "-l", str(core)], capture_output=True, text=True,
                              timeout=120, check=True).stdout
        assert sum(line.split()[0] == "LOAD" for line in text.splitlines()
                   if line.split()) == len(loads)
