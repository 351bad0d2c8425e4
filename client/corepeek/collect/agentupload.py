"""The collector's use of an agent's own storage: ``collect --upload`` (each
agent writes its full core straight to S3 with the Upload RPC; the collector
only orchestrates and records the result, so no core byte passes through it)
and ``collect --stored`` (entries of the agents' stores instead of live
processes)."""

from __future__ import annotations

import grpc

from ..errors import CaptureError
from ..v1 import capture_pb2 as pb
from ..v1 import capture_pb2_grpc as pb_grpc
from .manifest import CaptureRecord
from .plan import Match


def upload_one(channel: grpc.Channel, m: Match, url: str, rec: CaptureRecord, *,
               freeze_timeout_ms: int = 0, snapshot: bool | None = None) -> None:
    """Ask the agent to upload ``m``'s core (a live pid, or with ``collect --stored``
    an entry of its store) to ``url``; fills ``rec`` (raises CaptureError)."""
    mode = {None: pb.FREEZE_MODE_DEFAULT, True: pb.FREEZE_MODE_SNAPSHOT,
            False: pb.FREEZE_MODE_LIVE}[snapshot]
    opts = pb.CaptureOptions(mode=pb.CAPTURE_MODE_FULL, freeze_timeout_ms=freeze_timeout_ms,
                             snapshot=bool(snapshot), freeze_mode=mode)
    what = f"stored capture {m.capture_id}" if m.capture_id else f"pid {m.pid}"
    target = (pb.OpenCapture(capture_id=m.capture_id, options=opts) if m.capture_id
              else pb.OpenCapture(pid=m.pid, start_time=m.start_time, options=opts))
    req = pb.UploadRequest(open=target, destination=url)
    done = None
    try:
        for msg in pb_grpc.CoreCaptureServiceStub(channel).Upload(req):
            if msg.HasField("layout"):
                lay = msg.layout
                rec.comm, rec.exe = lay.comm or m.comm, lay.exe or m.exe
                rec.threads = len(lay.threads)
                rec.unfrozen_threads = [t.tid for t in lay.threads if not t.frozen]
                rec.freeze_micros = int(lay.freeze_micros)
            if msg.done:
                done = msg
    except grpc.RpcError as exc:
        raise CaptureError.from_rpc(exc, f"upload of {what} to {url}") from None
    if done is None:
        raise CaptureError(f"upload of {what} to {url}: the agent ended without "
                           "completing it")
    rec.path, rec.bytes, rec.sha256 = done.url, done.size, done.sha256
    rec.core_bytes, rec.wire_bytes = done.size, 0


def stored_matches(endpoint_address: str, host: str, resp: pb.ListCapturesResponse, *,
                   since: float, now: float, comm: str = "", exe_glob: str = "",
                   pid: int = 0, full_only: bool = False) -> list[Match]:
    """``collect --stored``: the entries of an agent's store taken since ``now -
    since`` seconds that match the selection (corrupt ones are left out; with
    ``full_only``, for ``--upload``, so are notes and stacks captures)."""
    import fnmatch

    return [Match(agent=endpoint_address, host=host, pid=c.pid, comm=c.comm, exe=c.exe,
                  start_time=c.start_time, capture_id=c.id)
            for c in resp.captures
            if not c.corrupt and c.time >= now - since
            and (not comm or c.comm == comm)
            and (not exe_glob or fnmatch.fnmatchcase(c.exe, exe_glob))
            and (not pid or c.pid == pid)
            and (not full_only or c.mode in (pb.CAPTURE_MODE_FULL,
                                             pb.CAPTURE_MODE_UNSPECIFIED))]
