"""For one process state, corepeek writes the core the kernel writes.

GIVEN a target frozen by corepeek WHEN it is then killed by SIGSEGV (the kernel
dumps it from the same state: a stopped, untouched process) THEN the ELF
header, the notes (owner, type, size, order) and the PT_LOAD table are equal.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from harness.capture import capture_file
from harness.targets import Target


def _shape(core: Path) -> tuple[dict, list, list]:  # type: ignore[type-arg]
    with open(core, "rb") as f:
        elf = ELFFile(f)
        notes, loads = [], []
        for seg in elf.iter_segments():
            if seg["p_type"] == "PT_NOTE":
                notes = [(n["n_name"], n["n_type"], n["n_descsz"]) for n in seg.iter_notes()]
            elif seg["p_type"] == "PT_LOAD":
                loads.append((seg["p_vaddr"], seg["p_memsz"], seg["p_filesz"], seg["p_flags"]))
        header = {k: v for k, v in elf.header.items() if k != "e_ident"}
        return header, notes, loads


@pytest.mark.parametrize("m32", [False, True], ids=["x86_64", "i386"])
def test_same_headers_notes_and_loads_as_the_kernel(agent, build, require_root, tmp_path: Path,
                                                     m32: bool) -> None:
    if Path("/proc/sys/kernel/core_pattern").read_text().strip() != "core":
        pytest.skip("core_pattern is not the plain 'core' file; the kernel core goes elsewhere")
    exe = build("threads", m32=m32)
    os.chdir(tmp_path)
    ours = tmp_path / "ours.core"
    proc = subprocess.Popen(["sh", "-c", f"ulimit -c unlimited; exec {exe}"], cwd=tmp_path,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        # Stop it first: the stopped state is what both dumps see.
        line = proc.stdout.readline()
        assert line.startswith(b"ready"), line
        os.kill(proc.pid, signal.SIGSTOP)
        capture_file(agent.address, proc.pid, ours)
        os.kill(proc.pid, signal.SIGSEGV)
        os.kill(proc.pid, signal.SIGCONT)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    kernel = tmp_path / "core"
    assert kernel.exists(), "the kernel wrote no core (ulimit -c or core_pattern?)"
    a, b = _shape(ours), _shape(kernel)
    assert a[0] == b[0]
    assert a[1] == b[1]
    assert a[2] == b[2]
