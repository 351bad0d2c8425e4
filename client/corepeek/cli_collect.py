"""``corepeek collect``: many agents at once (docs/fleet.md); its options."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from .cliargs import freeze_mode_args, tls_options
from .errors import CaptureError
from .textsafe import safe

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


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
    stored_since = _duration(args.since) if args.stored else 0.0
    if args.since and not args.stored:
        raise CaptureError("--since goes with --stored")
    if selection.empty and not args.all and not args.stored:
        print("corepeek: give --comm, --exe or --pid (or --all to capture every process "
              "the agents list)", file=sys.stderr)
        return EXIT_USAGE
    show = sys.stderr.isatty() and not args.quiet and not args.no_progress
    if args.upload:
        if args.out:
            raise CaptureError("--upload is where the cores and the manifest go: no --out")
        args.out = args.upload
    cfg = CollectConfig(endpoints=endpoints, selection=selection, mode=args.only,
                        out=args.out or "", compress=args.compress,
                        compress_level=args.compress_level,
                        wire_compression=args.wire_compression, concurrency=args.concurrency,
                        per_host=args.per_host, retries=args.retries,
                        list_timeout=args.timeout, freeze_timeout_ms=args.freeze_timeout_ms,
                        stack_bytes=args.stack_bytes, tls=tls_options(args),
                        s3_endpoint_url=args.s3_endpoint_url, upload=bool(args.upload),
                        snapshot=args.snapshot,
                        stored_since=stored_since, with_files=args.with_files)
    result = collect(cfg, progress=Progress(show))
    summary = result.manifest["summary"]
    if args.json:
        print(json.dumps(result.manifest, indent=2))
    if not args.quiet:
        print(f"collected {summary['ok']} of {summary['captures']} capture(s) from "
              f"{summary['agents'] - summary['agents_unreachable']} of {summary['agents']} "
              f"agent(s): {summary['bytes']} bytes in {result.manifest['seconds']:.2f} s; "
              f"manifest {safe(result.manifest_path)}", file=sys.stderr)
        for c in result.manifest["captures"]:
            if c["status"] != "ok":
                what = f"pid {c['pid']} ({c['comm']})" if c["pid"] is not None else "agent"
                print("error: " + safe(f"{c['host'] or c['agent']}: {what}: {c['error']}"),
                      file=sys.stderr)
    return EXIT_OK if result.ok else EXIT_ERROR


def _duration(text: str | None) -> float:
    """Seconds from ``90``, ``90s``, ``30m``, ``1h``, ``2d`` (default: a day)."""
    if not text:
        return 86400.0
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    num, unit = (text[:-1], text[-1]) if text[-1] in units else (text, "s")
    try:
        value = float(num) * units[unit]
    except ValueError:
        raise CaptureError(f"cannot read {text!r} as a duration (e.g. 90s, 30m, 1h)") from None
    if not 0 < value < float("inf"):
        raise CaptureError(f"--since must be positive, got {text!r}")
    return value


def add_collect_parser(add: Callable[..., argparse.ArgumentParser]) -> None:
    from .collect import DEFAULT_K8S_NAMESPACE, DEFAULT_K8S_SELECTOR

    c = add(
        "collect", help="capture matching processes on many agents (a fleet)",
        description="List matching processes on every agent, capture them concurrently "
        "and write one file per capture plus the run's manifest-UTCTIME.json, an entry in "
        "runs.json and manifest.json, a copy of the newest (docs/fleet.md). Exit status 1 "
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
    c.add_argument("--with-files", action="store_true",
                   help="also store the ELF files the targets map, once per build-id per run "
                   "(files/BUILD-ID; the manifest's files maps build-ids to them)")
    c.add_argument("--compress-level", type=int, default=3,
                   help="zstd level with --compress (default 3)")
    c.add_argument("--wire-compression", choices=("none", "zstd"), default="none",
                   help="compress memory on the wire (for slow links; costs agent CPU)")
    c.add_argument("--s3-endpoint-url", help="S3-compatible endpoint (default: AWS, or "
                   "AWS_ENDPOINT_URL)")
    c.add_argument("--stored", action="store_true",
                   help="collect the entries of the agents' stores (triggered or kept "
                   "captures) instead of live processes; --comm/--exe/--pid filter them")
    c.add_argument("--since", metavar="DURATION",
                   help="with --stored: entries of the last DURATION (90s, 30m, 1h; default 1d)")
    c.add_argument("--upload", metavar="s3://BUCKET/PREFIX",
                   help="each agent writes its full cores straight to S3 with its own "
                   "credentials (the policy's `uploads` must allow it); the collector writes "
                   "only the manifest there")
    c.add_argument("--concurrency", type=int, default=8, help="captures at once (default 8)")
    c.add_argument("--per-host", type=int, default=2,
                   help="captures at once on one agent (default 2)")
    c.add_argument("--retries", type=int, default=3,
                   help="retries of UNAVAILABLE (and ABORTED) with backoff (default 3)")
    c.add_argument("--timeout", type=float, default=30.0, help="listing deadline, seconds")
    c.add_argument("--freeze-timeout-ms", type=int, default=0,
                   help="wait per thread before giving up on it (agent default 500)")
    freeze_mode_args(c)
    c.add_argument("--stack-bytes", type=int, default=0,
                   help="cap on stack bytes per thread for --only stacks")
    c.add_argument("--tls-ca", help="CA the agents' certificates chain to (PEM)")
    c.add_argument("--tls-cert", help="this client's certificate (PEM)")
    c.add_argument("--tls-key", help="this client's private key (PEM)")
    c.add_argument("--tls-server-name", help="name expected in the agents' certificates "
                   "(for pod IPs not in the certificate)")
    c.add_argument("--json", action="store_true", help="also print the manifest on stdout")
    c.add_argument("--no-progress", action="store_true",
                   help="no progress bars, even on a terminal")
    c.set_defaults(func=_collect)
