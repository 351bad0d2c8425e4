"""Whether a snapshot can be made, and what the clone will lack (pure).

Owns the fallback decision: :func:`obstacle` says why no clone should be
injected into a frozen target (the session then captures live,
:class:`SnapshotUnavailable`), :func:`pick_injector` which thread may run the
call; and the mappings a clone does not get (MADV_DONTFORK/WIPEONFORK), how
much of them is pre-read while frozen, and what is read after the thaw.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..arch import ArchSpec
from ..elfcore.model import DumpedMapping, Mapping
from ..errors import CorepeekError
from ..freezer import FrozenThread
from .abi import ABIS

PREREAD_BUDGET = 64 * 1024 * 1024   # MADV_DONTFORK/WIPEONFORK bytes held per session


class SnapshotUnavailable(CorepeekError):
    """No snapshot could be made; the session falls back to live mode.

    ``reason`` is the short code of the layout's ``snapshot_reason`` and of the
    agent's fallback counter (docs/snapshot.md lists them).
    """

    def __init__(self, message: str, reason: str = "other") -> None:
        super().__init__(message)
        self.reason = reason


UFFD_FLAGS = frozenset({"um", "uw", "ui"})   # userfaultfd missing / wp / minor


def obstacle(arch: ArchSpec, threads: Sequence[FrozenThread],
             mappings: Sequence[Mapping]) -> str:
    """Why no clone should be injected into this frozen target ("" if none)."""
    return obstacle_reason(arch, threads, mappings)[1]


def obstacle_reason(arch: ArchSpec, threads: Sequence[FrozenThread],
                    mappings: Sequence[Mapping]) -> tuple[str, str]:
    """(reason code, why) no clone should be injected; ("", "") if none."""
    if arch.name not in ABIS:
        return "unsupported_arch", f"snapshot mode does not support {arch.name} targets"
    unfrozen = [t.tid for t in threads if not t.stopped]
    if unfrozen:
        return "not_frozen", f"threads {unfrozen} did not freeze"
    if any(t.group_stop for t in threads):
        return ("job_control",
                "the target is stopped by job control (a live capture costs it nothing)")
    if not pick_injector(threads):
        return "no_thread", "no thread is in a state where a system call can be injected"
    uffd = [m for m in mappings if m.vm_flags & UFFD_FLAGS]
    if uffd:
        return "userfaultfd", (f"userfaultfd-registered memory at {uffd[0].start:#x} (a fork "
                               "would be reported to, and may wait for, the userfaultfd monitor)")
    return "", ""


def pick_injector(threads: Sequence[FrozenThread], leader: int = 0) -> list[FrozenThread]:
    """Threads a system call may be injected into, best first.

    Only a plain interrupt stop will do (not a signal-delivery-stop whose signal
    is handed back at detach, nor a group stop).  The thread-group leader comes
    first: it is the parent of the clone, and the thread least likely to exit.
    """
    ok = [t for t in threads if t.stopped and not t.pending_signal and not t.group_stop
          and not t.exited and t.gpregs]
    return sorted(ok, key=lambda t: t.tid != leader)


# Special mappings /proc/CLONE/mem reads as nothing (measured on 6.18: the
# clone's [vdso] reads as zeros); a few pages, held like the private copies.
SPECIAL_UNCOPIED = frozenset({"[vdso]"})


def private_copies(dumped: Sequence[DumpedMapping]) -> list[int]:
    """Indexes of dumped mappings the clone does not get (MADV_DONTFORK, ``dc``)
    or gets zeroed (MADV_WIPEONFORK, ``wf``), and the ``[vdso]``; MAP_SHARED
    ones excluded (they are read from the clone like any shared mapping: same
    pages)."""
    return [i for i, d in enumerate(dumped) if d.dump_size and not d.mapping.shared
            and (d.mapping.vm_flags & {"dc", "wf"} or d.mapping.path in SPECIAL_UNCOPIED)]


def read_after_thaw(dumped: Sequence[DumpedMapping], from_original: Sequence[int]) -> set[int]:
    """Segments whose bytes may be newer than the frozen moment: MAP_SHARED
    mappings, and private copies read from the running original."""
    return {i for i, d in enumerate(dumped) if d.mapping.shared} | set(from_original)


def plan_preread(sizes: Sequence[int], budget: int = PREREAD_BUDGET) -> tuple[list[int], list[int]]:
    """Split regions (by index) into those held in memory (in order, while they
    fit in ``budget``) and those read from the original after the thaw."""
    held, later, used = [], [], 0
    for i, n in enumerate(sizes):
        if used + n <= budget:
            held.append(i)
            used += n
        else:
            later.append(i)
    return held, later
