"""collect --stored: which entries of an agent's store become captures."""

from __future__ import annotations

from corepeek.collect.agentupload import stored_matches
from corepeek.v1 import capture_pb2 as pb


def listing() -> pb.ListCapturesResponse:
    c = pb.StoredCapture
    return pb.ListCapturesResponse(captures=[
        c(id="full1", pid=10, comm="app", exe="/srv/app", time=1000, mode=pb.CAPTURE_MODE_FULL),
        c(id="notes1", pid=10, comm="app", exe="/srv/app", time=1000,
          mode=pb.CAPTURE_MODE_NOTES),
        c(id="bad1", pid=10, comm="app", exe="/srv/app", time=1000, corrupt=True),
        c(id="old1", pid=10, comm="app", exe="/srv/app", time=10),
        c(id="other1", pid=11, comm="db", exe="/srv/db", time=1000)])


def ids(**kw: object) -> list[str]:
    return [m.capture_id for m in stored_matches("a:1", "h", listing(), since=100, now=1050,
                                                 **kw)]  # type: ignore[arg-type]


def test_recent_uncorrupted_matching_entries() -> None:
    assert ids() == ["full1", "notes1", "other1"]
    assert ids(comm="app") == ["full1", "notes1"]
    assert ids(exe_glob="/srv/d*") == ["other1"]
    assert ids(pid=11) == ["other1"]


def test_uploads_take_only_full_entries() -> None:
    assert ids(full_only=True) == ["full1", "other1"]
