"""One capture through an agent into a file, as ``corepeek dump`` does; prints JSON.

    python bench/client_main.py --agent ADDR --pid PID --out FILE [--chunk-bytes N]
                                [--mallopt] [--option KEY=VALUE ...] [--mode full]

A fresh process per capture, like the CLI.  Times are taken inside, from
``open_capture`` to the end of ``close`` (interpreter start-up excluded).
``--no-mallopt`` keeps glibc's malloc defaults (write_full_core raises them);
``--option`` adds gRPC channel options (values that look like integers are
passed as integers); ``--no-writer-thread`` makes write_full_core write from
the receiving thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--agent", required=True)
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--chunk-bytes", type=int, default=0)
    p.add_argument("--mode", default="full")
    p.add_argument("--mallopt", action="store_true", help="(the default now; kept for old runs)")
    p.add_argument("--no-mallopt", action="store_true",
                   help="do not let write_full_core raise glibc's malloc thresholds")
    p.add_argument("--option", action="append", default=[])
    p.add_argument("--no-writer-thread", action="store_true")
    p.add_argument("--write-piece", type=int, default=0, help="largest pwrite (bytes)")
    args = p.parse_args(argv)
    import grpc

    from corepeek.channel import CHANNEL_OPTIONS
    from corepeek.dump import write_full_core
    from corepeek.remote import open_capture

    if args.write_piece:
        import corepeek.dump
        corepeek.dump.WRITE_PIECE = args.write_piece
    extra: list[tuple[str, object]] = []
    for item in args.option:
        key, _, value = item.partition("=")
        extra.append((key, int(value) if value.lstrip("-").isdigit() else value))
    channel = grpc.insecure_channel(args.agent, options=list(CHANNEL_OPTIONS) + extra)
    cpu0 = time.process_time()
    t0 = time.monotonic()
    try:
        with open_capture(channel, args.pid, chunk_bytes=args.chunk_bytes, mode=args.mode) as core:
            t_open = time.monotonic()
            if args.mode == "full":
                write_full_core(core, args.out, writer_thread=not args.no_writer_thread,
                                tune_malloc=not args.no_mallopt)
            t_written = time.monotonic()
            stats, lay = core.stats, core.layout
            t_close = time.monotonic()
        t1 = time.monotonic()
    finally:
        channel.close()
    json.dump({
        "wall_s": t1 - t0, "open_s": t_open - t0, "written_s": t_written - t0,
        "close_s": t1 - t_close, "client_cpu_s": time.process_time() - cpu0,
        "wire_bytes": stats.data_bytes, "hole_bytes": stats.hole_bytes,
        "messages": stats.messages, "requests": stats.requests,
        "freeze_s": lay.freeze_micros / 1e6, "threads": len(lay.threads),
        "threads_frozen": sum(1 for t in lay.threads if t.frozen),
        "segments": len(lay.segments), "core_size": lay.total_size,
    }, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
