"""The ``corepeek`` command: agent, ps, dump, notes, collect.

Exit codes: 0 success, 1 capture/agent error (one line on stderr), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import grpc

from .channel import TLSOptions, open_channel
from .errors import CaptureError
from .v1 import capture_pb2 as pb
from .v1 import capture_pb2_grpc as pb_grpc

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def _agent(args: argparse.Namespace) -> int:
    # The one place the client package reaches into the agent: this command runs it.
    from corepeek_agent.server import serve
    from corepeek_agent.service import AgentConfig
    from corepeek_agent.tls import TLSFiles

    config = AgentConfig(max_sessions=args.max_sessions,
                         max_freeze_seconds=args.max_freeze,
                         default_thread_timeout=args.thread_timeout_ms / 1000,
                         keepalive_seconds=args.keepalive,
                         keepalive_timeout_seconds=args.keepalive_timeout,
                         max_streams_per_client=args.max_streams_per_client,
                         first_request_seconds=args.first_request_timeout,
                         idle_timeout_seconds=args.idle_timeout,
                         max_lifetime_seconds=args.max_session_lifetime)
    serve(args.listen, insecure=args.insecure, config=config,
          socket_mode=int(args.socket_mode, 8), socket_group=args.socket_group,
          tls=TLSFiles.from_args(args.tls_cert, args.tls_key, args.tls_ca),
          policy_path=args.policy, audit_log=args.audit_log,
          sessions_per_minute=args.sessions_per_minute,
          metrics_address=args.metrics_address, health_address=args.health_address,
          log_format=args.log_format)
    return EXIT_OK


def _tls(args: argparse.Namespace) -> TLSOptions | None:
    """The client's TLS flags (the COREPEEK_TLS_* environment fills in when absent)."""
    opts = TLSOptions(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key,
                      server_name=args.tls_server_name)
    return opts if opts.enabled else None


def _ps(args: argparse.Namespace) -> int:
    stub = pb_grpc.CoreCaptureServiceStub(open_channel(args.agent, _tls(args)))
    try:
        resp = stub.ListProcesses(pb.ListProcessesRequest(comm=args.comm or "",
                                                          exe_glob=args.exe or ""),
                                  timeout=args.timeout)
    except grpc.RpcError as exc:
        raise CaptureError.from_rpc(exc, f"cannot list processes on {args.agent}") from None
    if args.json:
        from google.protobuf.json_format import MessageToDict
        print(json.dumps(MessageToDict(resp, preserving_proto_field_name=True), indent=2))
        return EXIT_OK
    print(f"{'PID':>7} {'PPID':>7} {'UID':>6} {'THR':>4} {'RSS':>9} {'BITS':>4}  "
          f"{'START':>10}  COMM / EXE")
    for p in resp.processes:
        print(f"{p.pid:>7} {p.ppid:>7} {p.uid:>6} {p.threads:>4} {p.rss_bytes >> 20:>7}Mi "
              f"{p.elf_class or '-':>4}  {p.start_time:>10}  {p.comm}  {p.exe}")
    return EXIT_OK


def _progress_bar(total: int, enabled: bool):  # type: ignore[no-untyped-def]
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                desc="core", file=sys.stderr, dynamic_ncols=True)


def _dump(args: argparse.Namespace) -> int:
    from .dump import write_full_core
    from .remote import open_capture

    out = Path(args.output or f"core.{args.pid}")
    t0 = time.monotonic()
    with open_capture(args.agent, args.pid, tls=_tls(args), start_time=args.start_time,
                      mode=args.only,
                      freeze_timeout_ms=args.freeze_timeout_ms,
                      stack_bytes=args.stack_bytes, snapshot=args.snapshot,
                      compression=args.wire_compression, wait_exclusive=args.wait) as core:
        lay = core.layout
        if (lay.snapshot or lay.snapshot_status) and not args.quiet:
            print(f"snapshot: target thawed after the clone, memory served from it "
                  f"({sum(1 for s in lay.segments if s.read_after_thaw)} segments read "
                  "after the thaw)" if lay.snapshot else
                  f"snapshot: {lay.snapshot_status}" if args.only == "notes" else
                  f"warning: {lay.snapshot_status}", file=sys.stderr)
        unfrozen = [t.tid for t in lay.threads if not t.frozen]
        bar = _progress_bar(lay.total_size if args.only == "full" else 0,
                            sys.stderr.isatty() and not args.quiet)
        try:
            if args.only == "full":
                write_full_core(core, out, progress=bar.update if bar else None)
            else:
                from .partial import write_partial_core
                write_partial_core(core, out)
        finally:
            if bar is not None:
                bar.close()
        stats = core.stats
    elapsed = time.monotonic() - t0
    if not args.quiet:
        print(f"wrote {out}: {lay.total_size if args.only == 'full' else out.stat().st_size} "
              f"bytes core of pid {lay.pid} ({lay.comm}, {lay.arch}, {len(lay.threads)} threads), "
              f"{stats.data_bytes} bytes transferred"
              + (f" ({stats.wire_bytes} compressed)" if stats.wire_bytes != stats.data_bytes
                 else "")
              + f", {stats.hole_bytes} bytes of holes, "
              + _stopped_summary(lay, core.stopped_seconds(), elapsed), file=sys.stderr)
        if unfrozen:
            print(f"warning: threads {unfrozen} did not stop in time; their registers are "
                  "zero in the core", file=sys.stderr)
    return EXIT_OK


def _stopped_summary(lay: pb.CoreLayout, stopped: float, elapsed: float) -> str:
    """How long the target was stopped for this dump, the figure a user cares about."""
    shared = " (shared with another capture)" if lay.joined else ""
    if lay.snapshot:
        return (f"target stopped for {stopped:.3f} s{shared} while its snapshot was made, "
                f"snapshot served for {elapsed:.3f} s")
    if lay.target_running:
        return f"target stopped for {stopped:.3f} s{shared}, thawed once the notes were built"
    return f"target stopped for {stopped:.3f} s{shared} (the whole transfer)"


def _notes(args: argparse.Namespace) -> int:
    from .notes_summary import render_text, summarize
    from .remote import open_capture

    with open_capture(args.agent, args.pid, tls=_tls(args), start_time=args.start_time,
                      mode="notes",
                      freeze_timeout_ms=args.freeze_timeout_ms) as core:
        summary = summarize(core)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(render_text(summary))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="corepeek", description=__doc__)
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("-q", "--quiet", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("agent", help="run the capture agent (as root)")
    a.add_argument("--listen", required=True, help="unix:PATH or HOST:PORT")
    a.add_argument("--insecure", action="store_true",
                   help="allow plaintext TCP (loopback addresses only)")
    a.add_argument("--socket-mode", default="600", help="octal mode of a unix socket (600)")
    a.add_argument("--socket-group", help="group owning the unix socket (with --socket-mode 660)")
    a.add_argument("--tls-cert", help="agent certificate (PEM); TCP needs all three --tls-*")
    a.add_argument("--tls-key", help="agent private key (PEM)")
    a.add_argument("--tls-ca", help="CA bundle client certificates must chain to (PEM)")
    a.add_argument("--policy", help="policy file (YAML/TOML): who may capture what; default: "
                   "local peers everything dumpable, TLS clients nothing")
    a.add_argument("--audit-log", default="-",
                   help="file for the JSON-lines audit log (default -: stderr)")
    a.add_argument("--sessions-per-minute", type=int, default=None,
                   help="per-client session rate limit (default: the policy's, 60)")
    a.add_argument("--max-sessions", type=int, default=16)
    a.add_argument("--max-freeze", type=float, default=300.0,
                   help="seconds after which a session is ended and its target thawed")
    a.add_argument("--keepalive", type=float, default=10.0,
                   help="seconds between HTTP/2 pings to clients (cut links are noticed "
                   "within keepalive + keepalive-timeout, and their targets thawed)")
    a.add_argument("--keepalive-timeout", type=float, default=5.0)
    a.add_argument("--max-streams-per-client", type=int, default=4,
                   help="streams one TLS identity may hold open at once (default 4); the "
                   "agent serves --max-sessions plus this many in all")
    a.add_argument("--first-request-timeout", type=float, default=5.0,
                   help="seconds a new capture stream may wait before its open request")
    a.add_argument("--idle-timeout", type=float, default=60.0,
                   help="seconds a session may go without a request (any mode)")
    a.add_argument("--max-session-lifetime", type=float, default=900.0,
                   help="seconds after which any session ends, whatever it is doing")
    a.add_argument("--thread-timeout-ms", type=int, default=500,
                   help="default wait for each thread to stop")
    a.add_argument("--metrics-address", metavar="HOST:PORT",
                   help="serve Prometheus metrics on http://HOST:PORT/metrics (docs/fleet.md)")
    a.add_argument("--health-address", metavar="HOST:PORT",
                   help="plaintext gRPC health service only, for kubelet grpc probes")
    a.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="agent log lines as text (default) or one JSON object per line")
    a.set_defaults(func=_agent)

    def agent_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--agent", required=True, help="unix:PATH or HOST:PORT of the agent")
        sp.add_argument("--timeout", type=float, default=30.0)
        sp.add_argument("--tls-ca", help="CA the agent's certificate chains to (PEM)")
        sp.add_argument("--tls-cert", help="this client's certificate (PEM)")
        sp.add_argument("--tls-key", help="this client's private key (PEM)")
        sp.add_argument("--tls-server-name", help="name expected in the agent's certificate")

    s = sub.add_parser("ps", help="list processes on an agent's host")
    agent_arg(s)
    s.add_argument("--comm")
    s.add_argument("--exe", help="glob on the executable path")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_ps)

    def capture_args(sp: argparse.ArgumentParser) -> None:
        agent_arg(sp)
        sp.add_argument("pid", type=int)
        sp.add_argument("--start-time", type=int, default=0,
                        help="refuse unless the process has this start time (from ps)")
        sp.add_argument("--freeze-timeout-ms", type=int, default=0,
                        help="wait per thread before giving up on it (agent default 500)")

    d = sub.add_parser("dump", help="capture a core into a file")
    capture_args(d)
    d.add_argument("-o", "--output", help="core file to write (default core.PID)")
    d.add_argument("--only", choices=("full", "stacks", "notes"), default="full",
                   help="notes: threads, registers, mappings; stacks: notes + thread stacks")
    d.add_argument("--stack-bytes", type=int, default=0,
                   help="cap on stack bytes per thread for --only stacks (default 8 MiB)")
    frz = d.add_mutually_exclusive_group()
    frz.add_argument("--snapshot", dest="snapshot", action="store_const", const=True,
                     default=None, help="the default for full and stacks captures: freeze "
                     "the target only while a copy-on-write clone of it is made, then read "
                     "memory from the clone (falls back to live, saying why)")
    frz.add_argument("--live", dest="snapshot", action="store_const", const=False,
                     help="keep the target frozen for the whole transfer (no clone)")
    d.add_argument("--wire-compression", choices=("none", "zstd"), default="none",
                   help="compress memory on the wire (for slow links; costs agent CPU, "
                   "see docs/performance.md)")
    d.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="want a freeze of its own: if another capture holds the pid, wait up "
                   "to SECONDS for it to end (default: join that capture's freeze)")
    d.set_defaults(func=_dump)

    n = sub.add_parser("notes", help="summarise threads, registers and mappings")
    capture_args(n)
    n.add_argument("--json", action="store_true")
    n.set_defaults(func=_notes)

    _add_collect_parser(sub)
    return p


# -- collect (docs/fleet.md) ------------------------------------------------------------

def _collect(args: argparse.Namespace) -> int:
    from .collect import (CollectConfig, Endpoint, Progress, Selection,
                          collect, discover_kubernetes, parse_agent_list, read_agents_file)

    if args.kubernetes:
        endpoints = discover_kubernetes(args.namespace, args.selector, port=args.port)
        if not endpoints:
            raise CaptureError(f"no agent pods in namespace {args.namespace!r} match "
                               f"{args.selector!r}")
    else:
        if args.agents_file:
            try:
                text = Path(args.agents_file).read_text()
            except OSError as exc:
                raise CaptureError(f"cannot read {args.agents_file}: {exc.strerror}") from None
            addresses = read_agents_file(text)
        else:
            addresses = parse_agent_list(args.agents)
        if not addresses:
            raise CaptureError("no agent addresses given")
        endpoints = [Endpoint(a) for a in addresses]
    selection = Selection(comm=args.comm or "", exe_glob=args.exe or "", pid=args.pid or 0)
    if selection.empty and not args.all:
        print("corepeek: give --comm, --exe or --pid (or --all to capture every process "
              "the agents list)", file=sys.stderr)
        return EXIT_USAGE
    show = sys.stderr.isatty() and not args.quiet and not args.no_progress
    cfg = CollectConfig(endpoints=endpoints, selection=selection, mode=args.only,
                        out=args.out or "", compress=args.compress,
                        compress_level=args.compress_level,
                        wire_compression=args.wire_compression, concurrency=args.concurrency,
                        per_host=args.per_host, retries=args.retries,
                        list_timeout=args.timeout, freeze_timeout_ms=args.freeze_timeout_ms,
                        stack_bytes=args.stack_bytes, tls=_tls(args),
                        s3_endpoint_url=args.s3_endpoint_url)
    result = collect(cfg, progress=Progress(show))
    summary = result.manifest["summary"]
    if args.json:
        print(json.dumps(result.manifest, indent=2))
    if not args.quiet:
        print(f"collected {summary['ok']} of {summary['captures']} capture(s) from "
              f"{summary['agents'] - summary['agents_unreachable']} of {summary['agents']} "
              f"agent(s): {summary['bytes']} bytes in {result.manifest['seconds']:.2f} s; "
              f"manifest {result.manifest_path}", file=sys.stderr)
        for c in result.manifest["captures"]:
            if c["status"] != "ok":
                what = f"pid {c['pid']} ({c['comm']})" if c["pid"] is not None else "agent"
                print(f"error: {c['host'] or c['agent']}: {what}: {c['error']}", file=sys.stderr)
    return EXIT_OK if result.ok else EXIT_ERROR


def _add_collect_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from .collect import DEFAULT_K8S_NAMESPACE, DEFAULT_K8S_SELECTOR

    c = sub.add_parser(
        "collect", help="capture matching processes on many agents (a fleet)",
        description="List matching processes on every agent, capture them concurrently "
        "and write one file per capture plus manifest.json (docs/fleet.md). Exit status 1 "
        "if any agent or capture failed (the manifest says which).")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--agents", action="append", metavar="ADDR[,ADDR...]",
                     help="agent addresses (HOST:PORT or unix:PATH); repeatable")
    src.add_argument("--agents-file", metavar="FILE",
                     help="file of agent addresses, one per line (# comments)")
    src.add_argument("--kubernetes", action="store_true",
                     help="the pods of the agent DaemonSet, through the Kubernetes API "
                     "(in-cluster service account, else kubeconfig)")
    c.add_argument("--namespace", default=DEFAULT_K8S_NAMESPACE,
                   help=f"with --kubernetes (default {DEFAULT_K8S_NAMESPACE})")
    c.add_argument("--selector", default=DEFAULT_K8S_SELECTOR,
                   help=f"label selector of the agent pods (default {DEFAULT_K8S_SELECTOR})")
    c.add_argument("--port", type=int, default=None,
                   help="agent port with --kubernetes (default: the pod's port named grpc)")
    c.add_argument("--comm", help="exact /proc/PID/comm")
    c.add_argument("--exe", help="glob on the executable path")
    c.add_argument("--pid", type=int, help="this pid on every agent")
    c.add_argument("--all", action="store_true",
                   help="no filter: every process each agent lists (its policy decides)")
    c.add_argument("--only", choices=("full", "stacks", "notes"), default="full",
                   help="what to capture (default full)")
    c.add_argument("--out", help="directory (default ./corepeek-collect-UTCTIME) or "
                   "s3://bucket/prefix")
    c.add_argument("--compress", action="store_true", help="zstd-compress each core (.zst)")
    c.add_argument("--compress-level", type=int, default=3)
    c.add_argument("--wire-compression", choices=("none", "zstd"), default="none",
                   help="compress memory on the wire (for slow links; costs agent CPU)")
    c.add_argument("--s3-endpoint-url", help="S3-compatible endpoint (default: AWS, or "
                   "AWS_ENDPOINT_URL)")
    c.add_argument("--concurrency", type=int, default=8, help="captures at once (default 8)")
    c.add_argument("--per-host", type=int, default=2,
                   help="captures at once on one agent (default 2)")
    c.add_argument("--retries", type=int, default=3,
                   help="retries of UNAVAILABLE (and ABORTED) with backoff (default 3)")
    c.add_argument("--timeout", type=float, default=30.0, help="listing deadline, seconds")
    c.add_argument("--freeze-timeout-ms", type=int, default=0,
                   help="wait per thread before giving up on it (agent default 500)")
    c.add_argument("--stack-bytes", type=int, default=0,
                   help="cap on stack bytes per thread for --only stacks")
    c.add_argument("--tls-ca", help="CA the agents' certificates chain to (PEM)")
    c.add_argument("--tls-cert", help="this client's certificate (PEM)")
    c.add_argument("--tls-key", help="this client's private key (PEM)")
    c.add_argument("--tls-server-name", help="name expected in the agents' certificates "
                   "(for pod IPs not in the certificate)")
    c.add_argument("--json", action="store_true", help="also print the manifest on stdout")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(func=_collect)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * args.verbose if not args.quiet else logging.ERROR
    logging.basicConfig(level=max(level, logging.DEBUG),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except CaptureError as exc:
        print(f"corepeek: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        print(f"corepeek: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for the operator, not a traceback
        if type(exc).__module__.startswith("corepeek_agent"):
            details = exc.details() if hasattr(exc, "details") else str(exc)
            print(f"corepeek: {details}", file=sys.stderr)
            return EXIT_ERROR
        raise


if __name__ == "__main__":
    sys.exit(main())
