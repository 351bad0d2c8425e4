"""What the client subcommands share: TLS flags, a process listing, the
target named by pid or by ``--comm``/``--exe``."""

from __future__ import annotations

import argparse
import sys

import grpc

from .channel import TLSOptions, open_channel
from .errors import CaptureError
from .targeting import UsageError, pick_process
from .textsafe import safe
from .v1 import capture_pb2 as pb
from .v1 import capture_pb2_grpc as pb_grpc


def tls_options(args: argparse.Namespace) -> TLSOptions | None:
    """The client's TLS flags (the COREPEEK_TLS_* environment fills in when absent)."""
    opts = TLSOptions(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key,
                      server_name=args.tls_server_name)
    return opts if opts.enabled else None


def list_processes(args: argparse.Namespace, comm: str, exe_glob: str) -> pb.ListProcessesResponse:
    with open_channel(args.agent, tls_options(args)) as channel:
        stub = pb_grpc.CoreCaptureServiceStub(channel)
        try:
            return stub.ListProcesses(pb.ListProcessesRequest(comm=comm, exe_glob=exe_glob),
                                      timeout=args.timeout)
        except grpc.RpcError as exc:
            raise CaptureError.from_rpc(exc, f"cannot list processes on {args.agent}") from None


def resolve_target(args: argparse.Namespace) -> None:
    """Fill in ``args.pid`` (and pin ``args.start_time``) from ``--comm``/``--exe``."""
    if args.pid is not None:
        if args.comm or args.exe:
            raise UsageError("give a pid or --comm/--exe, not both")
        return
    if not (args.comm or args.exe):
        raise UsageError("give the pid to capture, or --comm NAME / --exe GLOB")
    resp = list_processes(args, args.comm or "", args.exe or "")
    proc = pick_process(resp.processes, args.comm or "", args.exe or "", args.agent)
    args.pid = proc.pid
    args.start_time = args.start_time or int(proc.start_time)
    if not args.quiet:
        print(f"capturing pid {proc.pid} ({safe(proc.comm)}, {safe(proc.exe)})",
              file=sys.stderr)


def freeze_mode_args(sp: argparse.ArgumentParser) -> None:
    """``--snapshot`` / ``--live``; neither leaves it to the agent (a snapshot for
    full and stacks captures, docs/snapshot.md): ``args.snapshot`` None/True/False."""
    frz = sp.add_mutually_exclusive_group()
    frz.add_argument("--snapshot", dest="snapshot", action="store_const", const=True,
                     default=None, help="the default for full and stacks captures: freeze "
                     "the target only while a copy-on-write clone of it is made, then read "
                     "memory from the clone (falls back to live, saying why)")
    frz.add_argument("--live", dest="snapshot", action="store_const", const=False,
                     help="keep the target frozen for the whole transfer (no clone)")
