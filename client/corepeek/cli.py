"""The ``corepeek`` command: agent, ps, dump, notes, collect.

Exit codes: 0 success, 1 capture/agent error (one line on stderr), 2 usage
(and several processes matching ``--comm``/``--exe``), 130 interrupted.
Remote strings are escaped in human output (:mod:`corepeek.textsafe`);
``--json`` is exact.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import signal
import sys
import time
from pathlib import Path


from .cli_collect import add_collect_parser
from .cli_debug import add_mount_parsers, dump_with_files
from .cliargs import freeze_mode_args, list_processes, resolve_target, tls_options
from .errors import CaptureError, Interrupted
from .targeting import (AGENT_ENV, LOCAL_SOCKET, AmbiguousTarget, UsageError,
                        resolve_agent)
from .textsafe import safe
from .v1 import capture_pb2 as pb

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _agent(args: argparse.Namespace) -> int:
    # The one place the client package reaches into the agent: this command runs it.
    from corepeek_agent.policy import parse_size
    from corepeek_agent.server import serve
    from corepeek_agent.service import AgentConfig
    from corepeek_agent.store.limits import StoreLimits
    from corepeek_agent.tls import TLSFiles

    config = AgentConfig(max_sessions=args.max_sessions,
                         max_freeze_seconds=args.max_freeze,
                         default_thread_timeout=args.thread_timeout_ms / 1000,
                         keepalive_seconds=args.keepalive,
                         keepalive_timeout_seconds=args.keepalive_timeout,
                         max_streams_per_client=args.max_streams_per_client,
                         first_request_seconds=args.first_request_timeout,
                         idle_timeout_seconds=args.idle_timeout,
                         max_lifetime_seconds=args.max_session_lifetime,
                         s3_endpoint_url=args.s3_endpoint_url or "")
    serve(args.listen, insecure=args.insecure, config=config,
          socket_mode=int(args.socket_mode, 8), socket_group=args.socket_group,
          tls=TLSFiles.from_args(args.tls_cert, args.tls_key, args.tls_ca),
          policy_path=args.policy, audit_log=args.audit_log,
          sessions_per_minute=args.sessions_per_minute,
          metrics_address=args.metrics_address, health_address=args.health_address,
          log_format=args.log_format, store_path=args.store,
          store_limits=StoreLimits(parse_size(args.store_max_use, "--store-max-use"),
                                   parse_size(args.store_keep_free, "--store-keep-free"),
                                   args.store_max_per_program),
          triggers_path=args.triggers, trigger_interval=args.trigger_interval)
    return EXIT_OK


def _ps(args: argparse.Namespace) -> int:
    resp = list_processes(args, args.comm or "", args.exe or "")
    if args.json:
        from google.protobuf.json_format import MessageToDict
        print(json.dumps(MessageToDict(resp, preserving_proto_field_name=True), indent=2))
        return EXIT_OK
    print(f"{'PID':>7} {'PPID':>7} {'UID':>6} {'THR':>4} {'RSS':>9} {'BITS':>4}  "
          f"{'START':>10}  COMM / EXE")
    for p in resp.processes:
        print(f"{p.pid:>7} {p.ppid:>7} {p.uid:>6} {p.threads:>4} {p.rss_bytes >> 20:>7}Mi "
              f"{p.elf_class or '-':>4}  {p.start_time:>10}  {safe(p.comm)}  {safe(p.exe)}")
    return EXIT_OK


def _progress_bar(total: int, enabled: bool):  # type: ignore[no-untyped-def]
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                desc="core", file=sys.stderr, dynamic_ncols=True)


def _dump(args: argparse.Namespace) -> int:
    from .outfile import AtomicOutput

    if args.capture:
        if args.pid is not None or args.comm or args.exe:
            raise UsageError("give a pid (or --comm/--exe) or --capture ID, not both")
        out = Path(args.output or f"core.{args.capture}")
    else:
        resolve_target(args)
        if args.with_files:
            return dump_with_files(args)          # a directory, built and renamed whole
        out = Path(args.output or f"core.{args.pid}")
    # Created before the target is frozen: a bad -o fails without a capture.
    with AtomicOutput(out, keep_partial=args.keep_partial) as dest:
        try:
            report = _capture_into(args, dest.fd, out)
        except (CaptureError, OSError, KeyboardInterrupt) as exc:
            kept = dest.abort()
            note = (f"; the incomplete core is kept as {kept}" if kept
                    else f"; no core written to {out}")
            if isinstance(exc, KeyboardInterrupt):
                raise Interrupted(f"interrupted{note}") from None
            what = str(exc) if isinstance(exc, CaptureError) else \
                f"writing {out}: {exc.strerror or exc}"
            raise CaptureError(what + note, getattr(exc, "code", None)) from None
        dest.commit()
    if not args.quiet:
        for line in report:
            print(line, file=sys.stderr)
    return EXIT_OK


def _capture_into(args: argparse.Namespace, fd: int, out: Path) -> list[str]:
    """Capture ``args.pid`` into the open file ``fd``; returns the summary lines
    (printed once the core has its name ``out``)."""
    from .dump import write_full_core
    from .remote import open_capture

    t0 = time.monotonic()
    with open_capture(args.agent, args.pid or 0, tls=tls_options(args), start_time=args.start_time,
                      mode=args.only, capture_id=args.capture or "", keep=args.keep,
                      freeze_timeout_ms=args.freeze_timeout_ms,
                      stack_bytes=args.stack_bytes, snapshot=args.snapshot,
                      compression=args.wire_compression, wait_exclusive=args.wait) as core:
        lay = core.layout
        # A snapshot is the default: say so only when asked for (--snapshot, -v);
        # a fallback to live is always one line (the summary says the stop time).
        if lay.snapshot and (args.snapshot or args.verbose) and not args.quiet:
            print(f"snapshot: target thawed after the clone, memory served from it "
                  f"({sum(1 for s in lay.segments if s.read_after_thaw)} segments read "
                  "after the thaw)", file=sys.stderr)
        elif lay.snapshot_status and not args.quiet and (args.only != "notes" or args.verbose):
            print(f"snapshot: {lay.snapshot_status}" if args.only == "notes" else
                  f"warning: {lay.snapshot_status}", file=sys.stderr)
        unfrozen = [t.tid for t in lay.threads if not t.frozen]
        if lay.stored_capture_id and not args.quiet:
            print(f"kept in the agent's store as {lay.stored_capture_id}", file=sys.stderr)
        bar = _progress_bar(lay.total_size if args.only == "full" else 0,
                            sys.stderr.isatty() and not args.quiet)
        try:
            if args.only == "full":
                size = write_full_core(core, fd, progress=bar.update if bar else None)
            else:
                from .partial import write_partial_core
                size = write_partial_core(core, fd).file_size
        finally:
            if bar is not None:
                bar.close()
        stats = core.stats
    elapsed = time.monotonic() - t0
    report = [f"wrote {out}: {size} "
              f"bytes core of pid {lay.pid} ({safe(lay.comm)}, {lay.arch}, "
              f"{len(lay.threads)} threads), "
              f"{stats.data_bytes} bytes transferred"
              + (f" ({stats.wire_bytes} compressed)" if stats.wire_bytes != stats.data_bytes
                 else "")
              + f", {stats.hole_bytes} bytes of holes, "
              + _stopped_summary(lay, core.stopped_seconds(), elapsed)]
    if unfrozen:
        report.append(f"warning: threads {unfrozen} did not stop in time; their registers "
                      "are zero in the core")
    return report


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

    resolve_target(args)
    with open_capture(args.agent, args.pid, tls=tls_options(args), start_time=args.start_time,
                      mode="notes",
                      freeze_timeout_ms=args.freeze_timeout_ms) as core:
        summary = summarize(core)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(render_text(summary))
    return EXIT_OK


def _global_args(p: argparse.ArgumentParser, default: object) -> None:
    """-v/-q: on the main parser (real defaults) and on every subcommand
    (``SUPPRESS``: given there, they override; absent, the main one's stand)."""
    p.add_argument("-v", "--verbose", action="count", default=default,
                   help="more log output (repeat for debug)")
    p.add_argument("-q", "--quiet", action="store_true", default=default,
                   help="no summary or progress, errors only")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="corepeek", description=__doc__)
    _global_args(p, None)
    p.set_defaults(verbose=0, quiet=False)
    globals_ = argparse.ArgumentParser(add_help=False)
    _global_args(globals_, argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = functools.partial(sub.add_parser, parents=[globals_])

    a = add("agent", help="run the capture agent (as root)")
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
    a.add_argument("--max-sessions", type=int, default=16,
                   help="captures served at once; more are refused (default 16)")
    a.add_argument("--max-freeze", type=float, default=300.0,
                   help="seconds after which a session is ended and its target thawed")
    a.add_argument("--keepalive", type=float, default=10.0,
                   help="seconds between HTTP/2 pings to clients (cut links are noticed "
                   "within keepalive + keepalive-timeout, and their targets thawed)")
    a.add_argument("--keepalive-timeout", type=float, default=5.0,
                   help="seconds to wait for a ping's answer (default 5)")
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
    a.add_argument("--store", metavar="DIR",
                   help="keep triggered captures in DIR (created 0700; enables triggers)")
    a.add_argument("--store-max-use", default="unlimited",
                   help="most bytes the store may use, e.g. 10GiB (default unlimited)")
    a.add_argument("--store-keep-free", default="1GiB",
                   help="free space the store leaves on its file system (default 1GiB)")
    a.add_argument("--store-max-per-program", type=int, default=None,
                   help="stored captures kept per executable (oldest go first)")
    a.add_argument("--triggers", metavar="FILE",
                   help="triggers file (YAML, see docs/fleet.md); needs --store")
    a.add_argument("--s3-endpoint-url", help="S3-compatible endpoint for Upload (default: "
                   "AWS, or AWS_ENDPOINT_URL); credentials are the agent's own environment")
    a.add_argument("--trigger-interval", type=float, default=None,
                   help="seconds between two samples of /proc (default: the file's, 1)")
    a.set_defaults(func=_agent)

    def agent_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--agent", help="unix:PATH or HOST:PORT of the agent (default "
                        f"${AGENT_ENV}, else unix:{LOCAL_SOCKET} if it exists)")
        sp.add_argument("--timeout", type=float, default=30.0,
                        help="deadline of a process listing, seconds (default 30)")
        sp.add_argument("--tls-ca", help="CA the agent's certificate chains to (PEM)")
        sp.add_argument("--tls-cert", help="this client's certificate (PEM)")
        sp.add_argument("--tls-key", help="this client's private key (PEM)")
        sp.add_argument("--tls-server-name", help="name expected in the agent's certificate")

    s = add("ps", help="list processes on an agent's host")
    agent_arg(s)
    s.add_argument("--comm", help="only processes whose /proc/PID/comm is exactly this")
    s.add_argument("--exe", help="only processes whose executable path matches this glob")
    s.add_argument("--json", action="store_true",
                   help="the listing as JSON, strings exact (the table escapes them)")
    s.set_defaults(func=_ps)

    def capture_args(sp: argparse.ArgumentParser) -> None:
        agent_arg(sp)
        sp.add_argument("pid", type=int, nargs="?",
                        help="process to capture (or name it with --comm/--exe)")
        sp.add_argument("--comm", help="capture the one process with this exact "
                        "/proc/PID/comm (several: they are listed, exit status 2)")
        sp.add_argument("--exe", metavar="GLOB", help="capture the one process whose "
                        "executable path matches GLOB (several: listed, exit status 2)")
        sp.add_argument("--start-time", type=int, default=0,
                        help="refuse unless the process has this start time (from ps)")
        sp.add_argument("--freeze-timeout-ms", type=int, default=0,
                        help="wait per thread before giving up on it (agent default 500)")

    d = add("dump", help="capture a core into a file")
    capture_args(d)
    d.add_argument("-o", "--output", help="core file to write (default core.PID); it appears "
                   "only when complete, mode 0600, replacing (never following) what is there")
    d.add_argument("--keep-partial", action="store_true",
                   help="if the capture fails, keep what was written as OUTPUT.partial")
    d.add_argument("--capture", metavar="ID",
                   help="a capture kept in the agent's store (corepeek captures) instead of a pid")
    d.add_argument("--keep", action="store_true",
                   help="also keep the capture in the agent's store (corepeek captures)")
    d.add_argument("--with-files", action="store_true",
                   help="-o names a directory: the core, the files the target maps "
                        "(root/), and gdbinit/lldbinit")
    d.add_argument("--only", choices=("full", "stacks", "notes"), default="full",
                   help="notes: threads, registers, mappings; stacks: notes + thread stacks")
    d.add_argument("--stack-bytes", type=int, default=0,
                   help="stack bytes per thread for --only stacks (default and maximum: the "
                   "policy rule's cap, 1 MiB unless it says otherwise)")
    freeze_mode_args(d)
    d.add_argument("--wire-compression", choices=("none", "zstd"), default="none",
                   help="compress memory on the wire (for slow links; costs agent CPU, "
                   "see docs/performance.md)")
    d.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="want a freeze of its own: if another capture holds the pid, wait up "
                   "to SECONDS for it to end (default: join that capture's freeze)")
    d.set_defaults(func=_dump)

    n = add("notes", help="summarise threads, registers and mappings")
    capture_args(n)
    n.add_argument("--json", action="store_true",
                   help="the summary as JSON, strings exact (the text escapes them)")
    n.set_defaults(func=_notes)

    add_collect_parser(add)
    from .stored import add_store_parsers
    add_store_parsers(add, agent_arg, parents=[globals_])
    add_mount_parsers(add, capture_args)
    return p


# -- mount, debug (docs/remote-debugging.md) ----------------------------------------------

class _SafeFormatter(logging.Formatter):
    """Log lines with remote strings escaped (one record, one line)."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self._inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return safe(self._inner.format(record))


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM ends a client command like Ctrl-C: outputs removed, target thawed."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * args.verbose if not args.quiet else logging.ERROR
    logging.basicConfig(level=max(level, logging.DEBUG),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command != "agent":                   # client logs quote remote names
        for handler in logging.getLogger().handlers:
            handler.setFormatter(_SafeFormatter(handler.formatter))
    if args.command != "agent":                   # the agent handles SIGTERM itself
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        if hasattr(args, "agent"):
            args.agent = resolve_agent(args.agent)
        return int(args.func(args))
    except AmbiguousTarget as exc:                # a table of candidates, escaped
        print(f"corepeek: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"corepeek: {safe(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except Interrupted as exc:
        print(f"corepeek: {safe(exc)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except CaptureError as exc:                   # agent text may quote remote strings
        print(f"corepeek: {safe(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        print(f"corepeek: {safe(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("corepeek: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - one line for the operator, not a traceback
        if type(exc).__module__.startswith("corepeek_agent"):
            details = exc.details() if hasattr(exc, "details") else str(exc)
            print(f"corepeek: {safe(details)}", file=sys.stderr)
            return EXIT_ERROR
        raise


if __name__ == "__main__":
    sys.exit(main())
