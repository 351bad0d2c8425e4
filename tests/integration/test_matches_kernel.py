"""For one process state, corepeek writes the core the kernel writes (x86_64).

GIVEN a running multi-threaded x86_64 target WHEN corepeek captures it, the
target runs on undisturbed, and is then killed by SIGSEGV (the kernel dumps it
from the same state: threads parked in the same system calls) THEN the ELF
header, the notes (owner, type, size, order) and the PT_LOAD table are equal,
the deterministic notes (NT_AUXV, NT_FILE, NT_X86_XSAVE_LAYOUT) are equal byte
for byte, and so are the NT_PRPSINFO and per-thread fields the crash does not
change; ``harness.kernel_compare`` lists the fields that differ by design and
why.  The i386 (compat) comparison lives in test_compat32.py.

The kernel's core lands in this test's directory whatever the host's
core_pattern (``harness.kernel_core``); under CI=true the claim never skips.
"""

from __future__ import annotations

import signal
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import checks
from harness.capture import capture_file
from harness.kernel_compare import (NT_PRSTATUS, NT_X86_XSAVE_LAYOUT, NT_X86_XSTATE,
                                    CoreFile, assert_same_as_kernel)
from harness.kernel_core import (CORE_PATTERN, CORE_USES_PID, allow_core_dump, cannot_check,
                                 kernel_cores, xsave_size)
from harness.targets import Target

RIP, RSP = 16, 19                      # word indexes in the x86_64 user_regs_struct
PARKED_ROLES = ("tid_main", "tid_signals", "tid_sleeper", "tid_reader", "tid_waiter")


@pytest.fixture(autouse=True)
def no_leftovers(require_root: None) -> Iterator[None]:
    before = checks.descendants()        # the session agent and its helpers
    yield
    checks.assert_no_leftover_processes(ignore=before)


def _pc_sp(prstatus: bytes) -> tuple[int, int]:
    regs = struct.unpack_from("<27Q", prstatus, 112)
    return regs[RIP], regs[RSP]


def test_same_headers_notes_and_loads_as_the_kernel(agent, build, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    exe = build("threads")
    ours = tmp_path / "ours.corepeek"
    with Target(exe) as target:                  # __exit__ kills and reaps it
        allow_core_dump(target.pid)
        capture_file(agent.address, target.pid, ours)
        checks.assert_thawed_and_undisturbed(target)
        # The undisturbed check talks to the target: wait until every parked thread
        # is back in the system call it was captured in (same rsp) before the crash.
        captured = CoreFile.read(ours).threads()
        checks.wait_parked_at(target.pid, {
            int(target.ready[r]): _pc_sp(captured[int(target.ready[r])][NT_PRSTATUS])[1]
            for r in PARKED_ROLES})
        with kernel_cores(tmp_path) as cores:
            target.send_signal(signal.SIGSEGV)
            target.wait_exit(timeout=30)
            kernel = cores.core_of(target.pid)
    assert target.exit_code == -signal.SIGSEGV

    mine, theirs = assert_same_as_kernel(ours, kernel)
    assert mine.elfclass == 64 and mine.header["e_machine"] == "EM_X86_64"
    # Every thread carries the XSAVE area this CPU defines, and the layout note
    # that describes it was compared byte for byte (an x86-64 CPU has XSAVE).
    threads = mine.threads()
    assert all(len(n[NT_X86_XSTATE]) == xsave_size() for n in threads.values())
    assert len(theirs.all_of(NT_X86_XSAVE_LAYOUT)) == 1
    for role in PARKED_ROLES:
        tid = int(target.ready[role])
        assert _pc_sp(threads[tid][NT_PRSTATUS]) == _pc_sp(theirs.threads()[tid][NT_PRSTATUS]), role


def test_given_a_failure_while_the_kernel_writes_here_then_core_pattern_is_restored(
        tmp_path: Path) -> None:
    """kernel_cores() asserts on the way out that both sysctls read back as saved
    (under the lock, so no other suite can have changed them meanwhile); an error
    inside must not skip that."""
    with pytest.raises(RuntimeError, match="inside"):
        with kernel_cores(tmp_path):
            assert CORE_PATTERN.read_text().strip() == f"{tmp_path.resolve()}/core.%p"
            assert CORE_USES_PID.read_text().strip() == "0"
            raise RuntimeError("inside")


@pytest.mark.parametrize("ci", ["true", ""])
def test_given_ci_then_an_unverifiable_kernel_claim_fails_instead_of_skipping(
        monkeypatch: pytest.MonkeyPatch, ci: str) -> None:
    monkeypatch.setenv("CI", ci)
    expected = pytest.fail.Exception if ci == "true" else pytest.skip.Exception
    with pytest.raises(expected, match="no core_pattern"):
        cannot_check("no core_pattern")
