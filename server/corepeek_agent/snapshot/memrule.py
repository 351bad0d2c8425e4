"""Could the host pay for the snapshot's copy-on-write copies?  (the memory rule)

While the clone lives, every private page the target writes for the first
time is copied and charged to the target's memory cgroup.  Most targets
rewrite little of their memory during a transfer, but the worst case is every
private anonymous page (resident or swapped): ``worst`` below.  The rule
refuses the snapshot (live capture instead) when that worst case does not fit:

* the host: ``worst > MemAvailable - margin``, margin = max(256 MiB, 1/32 of
  MemTotal) — what is left for everyone else if the target rewrote it all;
* the target's memory cgroup (v1 or v2, and every ancestor with a limit):
  ``worst > limit - usage`` — the copies would push the target towards its
  cgroup's OOM killer;
* strict overcommit (``vm.overcommit_memory = 2``): ``fork()`` charges every
  accountable (``ac``) private writable mapping at once, so the clone would
  take ``commit`` bytes of CommitLimit from the target's own future
  allocations: refused when ``commit > (CommitLimit - Committed_AS) / 2``.

:func:`memory_obstacle` is pure; :func:`host_memory` reads the facts (procfs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .. import procfs
from ..elfcore.model import Mapping

MIB = 1 << 20
HOST_MARGIN_MIN = 256 * MIB
HOST_MARGIN_FRACTION = 32


@dataclass(frozen=True)
class HostMemory:
    """What the memory rule needs of the host and the target's cgroups."""

    mem_total: int
    mem_available: int
    overcommit: int                       # vm.overcommit_memory
    commit_limit: int
    committed: int                        # Committed_AS
    cgroup_room: int | None = None        # tightest memory cgroup: limit - usage
    cgroup_path: str = ""


def worst_case_copy(mappings: Sequence[Mapping]) -> int:
    """Bytes the copy-on-write copies could reach: private anonymous pages
    (smaps Anonymous + Swap of every private mapping)."""
    return sum(m.anon_bytes for m in mappings if not m.shared)


def commit_charge(mappings: Sequence[Mapping]) -> int:
    """Bytes a fork charges under strict overcommit: accountable mappings."""
    return sum(m.size for m in mappings if "ac" in m.vm_flags and not m.shared)


def memory_obstacle(mappings: Sequence[Mapping], host: HostMemory) -> str:
    """Why the snapshot's worst-case copies would not fit ("" if they would)."""
    worst = worst_case_copy(mappings)
    margin = max(HOST_MARGIN_MIN, host.mem_total // HOST_MARGIN_FRACTION)
    if worst > host.mem_available - margin:
        return (f"its {worst // MIB} MiB of private memory could be copied while the "
                f"snapshot lives, and the host has {host.mem_available // MIB} MiB available "
                f"(keeping {margin // MIB} MiB free)")
    if host.cgroup_room is not None and worst > host.cgroup_room:
        return (f"its {worst // MIB} MiB of private memory could be copied while the "
                f"snapshot lives, charged to its memory cgroup {host.cgroup_path}, which "
                f"has {host.cgroup_room // MIB} MiB left under its limit")
    if host.overcommit == 2:
        commit = commit_charge(mappings)
        room = host.commit_limit - host.committed
        if commit > room // 2:
            return (f"strict overcommit: the clone would commit {commit // MIB} MiB of the "
                    f"{max(room, 0) // MIB} MiB left under CommitLimit")
    return ""


def host_memory(pid: int) -> HostMemory:
    """The host's and ``pid``'s cgroups' memory facts, now."""
    info = procfs.meminfo()
    cg = procfs.memory_cgroup_headroom(pid)
    return HostMemory(
        mem_total=info.get("MemTotal", 0), mem_available=info.get("MemAvailable", 0),
        overcommit=procfs.overcommit_memory(), commit_limit=info.get("CommitLimit", 0),
        committed=info.get("Committed_AS", 0),
        cgroup_room=cg[0] if cg else None, cgroup_path=cg[1] if cg else "")
