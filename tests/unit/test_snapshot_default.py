"""Snapshot by default: the freeze-mode choice and the memory rule (pure)."""

from __future__ import annotations

import pytest

from corepeek.v1 import capture_pb2 as pb
from corepeek_agent.elfcore.model import Mapping
from corepeek_agent.errors import InvalidRequest
from corepeek_agent.service import wants_snapshot
from corepeek_agent.snapshot.memrule import (HostMemory, commit_charge, memory_obstacle,
                                             worst_case_copy)

MIB = 1 << 20
GIB = 1 << 30


def _opts(**kw: object) -> pb.CaptureOptions:
    return pb.CaptureOptions(**kw)  # type: ignore[arg-type]


def test_the_default_is_a_snapshot_for_full_and_stacks_and_live_for_notes() -> None:
    assert wants_snapshot(_opts())                                   # an old client, too
    assert wants_snapshot(_opts(mode=pb.CAPTURE_MODE_FULL))
    assert wants_snapshot(_opts(mode=pb.CAPTURE_MODE_STACKS))
    assert not wants_snapshot(_opts(mode=pb.CAPTURE_MODE_NOTES))


def test_explicit_choices_and_the_old_flag() -> None:
    assert not wants_snapshot(_opts(freeze_mode=pb.FREEZE_MODE_LIVE))
    assert wants_snapshot(_opts(freeze_mode=pb.FREEZE_MODE_SNAPSHOT, mode=pb.CAPTURE_MODE_NOTES))
    assert wants_snapshot(_opts(snapshot=True, mode=pb.CAPTURE_MODE_NOTES))
    with pytest.raises(InvalidRequest, match="contradicts"):
        wants_snapshot(_opts(freeze_mode=pb.FREEZE_MODE_LIVE, snapshot=True))
    with pytest.raises(InvalidRequest, match="freeze_mode"):
        wants_snapshot(_opts(freeze_mode=7))


def _m(size: int, anon: int, *, shared: bool = False, flags: str = "ac") -> Mapping:
    return Mapping(start=0x1000, end=0x1000 + size, perms="rw-s" if shared else "rw-p",
                   offset=0, inode=0, path="", vm_flags=frozenset(flags.split()),
                   anon_bytes=anon)


HOST = HostMemory(mem_total=16 * GIB, mem_available=8 * GIB, overcommit=0,
                  commit_limit=8 * GIB, committed=2 * GIB)


def test_worst_case_is_private_anonymous_memory_only() -> None:
    maps = [_m(GIB, GIB), _m(GIB, GIB, shared=True), _m(GIB, 0)]
    assert worst_case_copy(maps) == GIB
    assert commit_charge(maps) == 2 * GIB


def test_the_host_must_keep_a_margin() -> None:
    assert memory_obstacle([_m(7 * GIB, 7 * GIB)], HOST) == ""         # 8 GiB - 512 MiB
    why = memory_obstacle([_m(8 * GIB, 8 * GIB - 256 * MIB)], HOST)
    assert "8192 MiB available" in why and "keeping 512 MiB" in why


def test_the_cgroup_headroom_counts() -> None:
    host = HostMemory(**{**HOST.__dict__, "cgroup_room": 100 * MIB, "cgroup_path": "/cg"})
    assert memory_obstacle([_m(GIB, 99 * MIB)], host) == ""
    assert "memory cgroup /cg" in memory_obstacle([_m(GIB, 101 * MIB)], host)


def test_strict_overcommit_counts_the_commit_charge() -> None:
    strict = HostMemory(**{**HOST.__dict__, "overcommit": 2})
    assert memory_obstacle([_m(2 * GIB, MIB)], strict) == ""            # 6 GiB left / 2
    assert "strict overcommit" in memory_obstacle([_m(4 * GIB, MIB)], strict)
    assert memory_obstacle([_m(4 * GIB, MIB, flags="")], strict) == ""  # not accountable
