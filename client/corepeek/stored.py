"""CLI commands for an agent's triggers and store: ``corepeek triggers add|list|rm``
and ``corepeek captures`` (``corepeek dump --capture ID`` reads an entry)."""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable

import grpc
from google.protobuf.json_format import MessageToDict

from .channel import TLSOptions, open_channel
from .errors import CaptureError
from .textsafe import safe
from .v1 import capture_pb2 as pb
from .v1 import capture_pb2_grpc as pb_grpc

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_MODES = {"full": pb.CAPTURE_MODE_FULL, "stacks": pb.CAPTURE_MODE_STACKS,
          "notes": pb.CAPTURE_MODE_NOTES}
_MODE_NAMES = {v: k for k, v in _MODES.items()}


def parse_size(text: str) -> int:
    """Bytes from ``2GiB``, ``512M``, ``1048576`` (binary units)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"cannot read {text!r} as a size (e.g. 512MiB, 2GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _tls(args: argparse.Namespace) -> TLSOptions | None:
    opts = TLSOptions(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key,
                      server_name=args.tls_server_name)
    return opts if opts.enabled else None


def _stub(args: argparse.Namespace) -> pb_grpc.CoreCaptureServiceStub:
    return pb_grpc.CoreCaptureServiceStub(open_channel(args.agent, _tls(args)))


def _call(what: str, args: argparse.Namespace, fn: Callable[[], object]) -> object:
    try:
        return fn()
    except grpc.RpcError as exc:
        raise CaptureError.from_rpc(exc, f"cannot {what} on {args.agent}") from None


def _triggers_add(args: argparse.Namespace) -> int:
    conditions = [c for c in ("rss_above", "cpu_above", "threads_above", "fds_above", "every")
                  if getattr(args, c) is not None]
    if len(conditions) != 1:
        raise CaptureError("give exactly one of --rss-above, --cpu-above (with --for), "
                           "--threads-above, --fds-above, --every")
    if (args.cpu_above is None) != (args.for_ is None):
        raise CaptureError("--cpu-above and --for go together")
    spec = pb.TriggerSpec(
        selector=pb.TriggerSelector(pid=args.pid or 0, comm=args.comm or [], exe=args.exe or [],
                                    cgroup=args.cgroup or [], container=args.container or []),
        rss_above_bytes=args.rss_above or 0, cpu_above_percent=args.cpu_above or 0,
        cpu_for_seconds=args.for_ or 0, threads_above=args.threads_above or 0,
        fds_above=args.fds_above or 0, every_seconds=args.every or 0,
        mode=_MODES[args.only], count=args.count, cooldown_seconds=args.cooldown,
        name=args.name or "")
    info = _call("add a trigger", args, lambda: _stub(args).AddTrigger(
        pb.AddTriggerRequest(spec=spec), timeout=args.timeout))
    if args.json:
        print(json.dumps(MessageToDict(info, preserving_proto_field_name=True), indent=2))
    else:
        print(info.id)                                          # type: ignore[attr-defined]
    return 0


def _condition(s: pb.TriggerSpec) -> str:
    if s.rss_above_bytes:
        return f"rss>{s.rss_above_bytes >> 20}MiB"
    if s.cpu_above_percent:
        return f"cpu>{s.cpu_above_percent:g}%/{s.cpu_for_seconds:g}s"
    if s.threads_above:
        return f"threads>{s.threads_above}"
    if s.fds_above:
        return f"fds>{s.fds_above}"
    return f"every {s.every_seconds:g}s"


def _selector(sel: pb.TriggerSelector) -> str:
    parts = [f"pid={sel.pid}"] if sel.pid else []
    for key in ("comm", "exe", "cgroup", "container"):
        parts += [f"{key}={v}" for v in getattr(sel, key)]
    return " ".join(parts).encode("unicode_escape").decode()     # control characters escaped


def _triggers_list(args: argparse.Namespace) -> int:
    resp = _call("list triggers", args, lambda: _stub(args).ListTriggers(
        pb.ListTriggersRequest(), timeout=args.timeout))
    if args.json:
        print(json.dumps(MessageToDict(resp, preserving_proto_field_name=True), indent=2))
        return 0
    print(f"{'ID':<12} {'SOURCE':<6} {'MODE':<6} {'FIRED':>7} {'COOLDOWN':>8}  CONDITION  SELECTOR")
    for t in resp.triggers:                                   # type: ignore[attr-defined]
        print(f"{t.id:<12} {t.source:<6} {_MODE_NAMES.get(t.spec.mode, 'full'):<6} "
              f"{t.fired:>3}/{t.spec.count:<3} {t.spec.cooldown_seconds:>7g}s  "
              f"{_condition(t.spec)}  {safe(_selector(t.spec.selector))}"
              + (f"  (last error: {safe(t.last_error)})" if t.last_error else ""))
    return 0


def _triggers_rm(args: argparse.Namespace) -> int:
    resp = _call("remove a trigger", args, lambda: _stub(args).RemoveTrigger(
        pb.RemoveTriggerRequest(id=args.id), timeout=args.timeout))
    if not resp.removed:                                      # type: ignore[attr-defined]
        raise CaptureError(f"no trigger {args.id!r} on {args.agent}")
    return 0


def _captures(args: argparse.Namespace) -> int:
    resp = _call("list stored captures", args, lambda: _stub(args).ListCaptures(
        pb.ListCapturesRequest(), timeout=args.timeout))
    if args.json:
        print(json.dumps(MessageToDict(resp, preserving_proto_field_name=True), indent=2))
        return 0
    print(f"{'ID':<16} {'TIME (UTC)':<19} {'PID':>7} {'MODE':<6} {'SIZE':>9} {'STORED':>9}  "
          "COMM / EXE")
    for c in resp.captures:                                   # type: ignore[attr-defined]
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(c.time))
        name = f"{safe(c.comm)}  {safe(c.exe)}"
        print(f"{c.id:<16} {when:<19} {c.pid:>7} {_MODE_NAMES.get(c.mode, 'full'):<6} "
              f"{c.core_size >> 20:>7}Mi {c.stored_bytes >> 20:>7}Mi  {name}"
              + ("  CORRUPT (not served)" if c.corrupt else ""))
    return 0


def add_store_parsers(add: Callable[..., argparse.ArgumentParser],
                      agent_arg: Callable[[argparse.ArgumentParser], None], *,
                      parents: list[argparse.ArgumentParser]) -> None:
    """``triggers add|list|rm`` and ``captures``; ``add`` makes a subcommand
    parser, ``parents`` carry the global flags into the nested ones."""
    t = add("triggers", help="captures the agent makes itself when a process "
                       "crosses a condition (into its store)")
    tsub = t.add_subparsers(dest="triggers_command", required=True)
    a = tsub.add_parser("add", parents=parents, help="add a trigger (the policy rule needs triggers: true)")
    agent_arg(a)
    a.add_argument("--pid", type=int, help="watch this process only")
    a.add_argument("--comm", action="append", help="glob on /proc/PID/comm (repeatable)")
    a.add_argument("--exe", action="append", help="glob on the executable path")
    a.add_argument("--cgroup", action="append", help="glob on the cgroup v2 path")
    a.add_argument("--container", action="append", help="glob on the container id")
    a.add_argument("--rss-above", type=parse_size, metavar="SIZE",
                   help="fire when resident memory passes SIZE (e.g. 2GiB)")
    a.add_argument("--cpu-above", type=float, metavar="PCT", help="percent of one CPU ...")
    a.add_argument("--for", dest="for_", type=float, metavar="SECONDS",
                   help="... held this long")
    a.add_argument("--threads-above", type=int, metavar="N",
                   help="fire when the thread count passes N")
    a.add_argument("--fds-above", type=int, metavar="N",
                   help="fire when the open file descriptors pass N")
    a.add_argument("--every", type=float, metavar="SECONDS", help="a capture every SECONDS")
    a.add_argument("--only", choices=("full", "stacks", "notes"), default="full",
                   help="what each firing captures (default full)")
    a.add_argument("--count", type=int, default=1, help="captures in all (default 1)")
    a.add_argument("--cooldown", type=float, default=0.0, metavar="SECONDS",
                   help="seconds between two captures of this trigger")
    a.add_argument("--name", help="a name for the trigger (shown by triggers list)")
    a.add_argument("--json", action="store_true", help="the new trigger as JSON")
    a.set_defaults(func=_triggers_add)
    ls = tsub.add_parser("list", parents=parents, help="the triggers you set (and the configured ones)")
    agent_arg(ls)
    ls.add_argument("--json", action="store_true", help="the triggers as JSON, strings exact")
    ls.set_defaults(func=_triggers_list)
    rm = tsub.add_parser("rm", parents=parents, help="remove a trigger you set")
    agent_arg(rm)
    rm.add_argument("id", help="the trigger's id (from triggers list)")
    rm.set_defaults(func=_triggers_rm)

    c = add("captures", help="captures kept in an agent's store "
                       "(read one with dump --capture ID)")
    agent_arg(c)
    c.add_argument("--json", action="store_true", help="the captures as JSON, strings exact")
    c.set_defaults(func=_captures)
