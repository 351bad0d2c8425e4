"""One capture through an agent into a file, as ``corepeek dump`` does; prints JSON.

    python bench/client_main.py --agent ADDR --pid PID --out FILE [--chunk-bytes N] [--tls-*]
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
    p.add_argument("--compression", default="none", choices=("none", "zstd"),
                   help="CaptureOptions.compression (on the wire)")
    p.add_argument("--mallopt", action="store_true", help="(the default now; kept for old runs)")
    p.add_argument("--no-mallopt", action="store_true",
                   help="do not let write_full_core raise glibc's malloc thresholds")
    p.add_argument("--option", action="append", default=[])
    p.add_argument("--no-writer-thread", action="store_true")
    p.add_argument("--tls-ca", help="mutual TLS (TCP agents): CA of the agent's certificate")
    p.add_argument("--tls-cert", help="this client's certificate")
    p.add_argument("--tls-key", help="this client's key")
    p.add_argument("--writer-thread", action="store_true",
                   help="a writer thread even with direct I/O (default: only without)")
    p.add_argument("--write-piece", type=int, default=0, help="largest buffered pwrite (bytes)")
    p.add_argument("--no-direct", action="store_true", help="write through the page cache only")
    p.add_argument("--no-spill", action="store_true",
                   help="wait for a staging buffer rather than writing through the page cache")
    p.add_argument("--legacy", action="store_true",
                   help="the client before issue 7 (commit c95ae15): protobuf-decoded chunks, "
                        "64 MiB requests one at a time, pwrite of each chunk")
    args = p.parse_args(argv)
    import grpc

    from corepeek.channel import CHANNEL_OPTIONS, TLSOptions
    from corepeek.dump import write_full_core
    from corepeek.remote import open_capture

    import corepeek.diskwriter
    if args.write_piece:
        corepeek.diskwriter.BUFFERED_PIECE = args.write_piece
    extra: list[tuple[str, object]] = []
    for item in args.option:
        key, _, value = item.partition("=")
        extra.append((key, int(value) if value.lstrip("-").isdigit() else value))
    if args.tls_ca:
        creds = TLSOptions(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key).credentials()
        channel = grpc.secure_channel(args.agent, creds, options=list(CHANNEL_OPTIONS) + extra)
    else:
        channel = grpc.insecure_channel(args.agent, options=list(CHANNEL_OPTIONS) + extra)
    from corepeek.diskwriter import WriteStats
    disk_stats = WriteStats()
    cpu0 = time.process_time()
    t0 = time.monotonic()
    try:
        if args.legacy:
            legacy_client(channel)
        with open_capture(channel, args.pid, chunk_bytes=args.chunk_bytes, mode=args.mode,
                          compression=args.compression) as core:
            t_open = time.monotonic()
            if args.mode == "full" and args.legacy:
                legacy_write_full_core(core, args.out)
            elif args.mode == "full":
                write_full_core(core, args.out, writer_thread=(
                                    False if args.no_writer_thread else
                                    True if args.writer_thread else None),
                                tune_malloc=not args.no_mallopt, direct=not args.no_direct,
                                spill=not args.no_spill, stats=disk_stats)
            t_written = time.monotonic()
            stats, lay = core.stats, core.layout
            t_close = time.monotonic()
        t1 = time.monotonic()
    finally:
        channel.close()
    json.dump({
        "wall_s": t1 - t0, "open_s": t_open - t0, "written_s": t_written - t0,
        "close_s": t1 - t_close, "client_cpu_s": time.process_time() - cpu0,
        "wire_bytes": stats.wire_bytes or stats.data_bytes, "data_bytes": stats.data_bytes,
        "hole_bytes": stats.hole_bytes,
        "messages": stats.messages, "requests": stats.requests,
        "freeze_s": lay.freeze_micros / 1e6, "threads": len(lay.threads),
        "threads_frozen": sum(1 for t in lay.threads if t.frozen),
        "segments": len(lay.segments), "core_size": lay.total_size,
        "direct_bytes": disk_stats.direct_bytes, "buffered_bytes": disk_stats.buffered_bytes,
        "direct_fallback": disk_stats.direct_fallback,
    }, sys.stdout)
    return 0


def legacy_client(channel: object) -> None:
    """Make RemoteCore behave as at commit c95ae15 for this process."""
    from corepeek import remote
    from corepeek.errors import CaptureError
    from corepeek.v1 import capture_pb2 as pb
    from corepeek.v1 import capture_pb2_grpc as pb_grpc

    stub = pb_grpc.CoreCaptureServiceStub(channel)

    class LegacyCall:
        """The generated stub's call (protobuf-decoded responses)."""

        def __init__(self, requests, metadata=()):  # type: ignore[no-untyped-def]
            self._it = iter(requests)
            first = next(self._it)
            first.open.options.packed_chunks = False   # the old client did not know them

            def gen():  # type: ignore[no-untyped-def]
                yield first
                yield from self._it
            self.call = stub.Capture(gen(), metadata=metadata)
            self.first = True

        def __iter__(self):  # type: ignore[no-untyped-def]
            return self

        def __next__(self):  # type: ignore[no-untyped-def]
            resp = next(self.call)
            if self.first:               # RemoteCore.__init__ decodes the layout itself
                self.first = False
                return resp.SerializeToString()
            return resp

    channel.stream_stream = lambda *a, **k: LegacyCall  # type: ignore[attr-defined]

    def read_range(self, offset, length, *, views=False):  # type: ignore[no-untyped-def]
        # RemoteCore.read_range as of commit c95ae15
        with self._lock:
            if self._closed:
                raise CaptureError("the capture is closed")
            rid = next(self._ids)
            self.stats.requests += 1
            self._requests.put(pb.CaptureRequest(read=pb.ReadRange(
                offset=offset, length=length, request_id=rid)))
            for resp in self._call:
                chunk = resp.chunk
                self.stats.messages += 1
                if chunk.request_id != rid:
                    raise CaptureError("protocol error")
                if chunk.data:
                    self.stats.data_bytes += len(chunk.data)
                    self.stats.record(chunk.offset, len(chunk.data))
                    yield remote.Piece(chunk.offset, chunk.data)
                elif chunk.hole_length:
                    self.stats.hole_bytes += chunk.hole_length
                    self.stats.record(chunk.offset, chunk.hole_length)
                    yield remote.Piece(chunk.offset, None, chunk.hole_length)
                if chunk.last:
                    return
            raise CaptureError("the agent ended the capture stream unexpectedly")

    remote.RemoteCore.read_range = read_range  # type: ignore[method-assign]


def legacy_write_full_core(core, out, request_bytes: int = 64 * 1024 * 1024) -> int:  # type: ignore[no-untyped-def]
    """dump.write_full_core as of commit c95ae15."""
    import os
    size = core.size
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for start in range(0, size, request_bytes):
            for piece in core.read_range(start, min(request_bytes, size - start)):
                if piece.data is not None:
                    os.pwrite(fd, piece.data, piece.offset)
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    return size


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
