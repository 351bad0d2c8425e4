"""Run ``corepeek agent`` with optional variations, for A/B measurements.

    python bench/agent_main.py [--variant NAME ...] -- agent --listen ... [agent options]

Variants switch one optimisation off (or an alternative on) by patching the
agent in this process only; the shipped code is unchanged:

* ``no-mallopt``   skip ``server.raise_malloc_thresholds()`` (glibc defaults)
* ``pb-chunks``    register Capture with the generated protobuf serializer:
                   chunks are built as messages (data copied by protobuf)
* ``procmem``      read target memory with ``os.preadv`` on /proc/PID/mem
                   instead of process_vm_readv
* ``prefetch``     read each chunk on a separate thread, two chunks ahead of
                   the gRPC send
* ``legacy``       the transfer path before issue 7 (commit c95ae15): chunks
                   read into a bytearray and copied to bytes, built as protobuf
                   messages, one message per populated run (no packing); use
                   with ``client_main.py --legacy``
* ``sopt:KEY=VALUE`` set a gRPC server option (integers passed as integers)
* ``sockbuf=BYTES`` socket send buffer of accepted connections (sockbuf.py;
                   0: the kernel's default) instead of the agent's 4 MiB
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("no-mallopt", "pb-chunks", "procmem", "prefetch", "legacy")


def _no_mallopt() -> None:
    from corepeek_agent import server
    server.raise_malloc_thresholds = lambda: None


def _pb_chunks() -> None:
    from corepeek.v1 import capture_pb2_grpc

    from corepeek_agent import server
    server.add_capture_service = capture_pb2_grpc.add_CoreCaptureServiceServicer_to_server


def _procmem() -> None:
    import errno

    from corepeek_agent import memory
    from corepeek_agent.errors import ProcessGone

    fds: dict[int, int] = {}

    def read_into(self: memory.MemoryReader, vaddr: int, buf: bytearray | memoryview) -> int:
        fd = fds.get(self.tid)
        if fd is None:
            fd = fds[self.tid] = os.open(f"/proc/{self.tid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        view = memoryview(buf)
        done = 0
        while done < len(view):
            try:
                n = os.preadv(fd, [view[done:]], vaddr + done)
            except OSError as exc:
                if exc.errno in (errno.EIO, errno.EFAULT):
                    break
                if exc.errno == errno.ESRCH:
                    raise ProcessGone(f"thread {self.tid} exited") from None
                raise
            if n <= 0:
                break
            done += n
        return done

    memory.MemoryReader.read_into = read_into  # type: ignore[method-assign]


def _prefetch() -> None:
    import queue
    import threading

    from corepeek_agent import session

    original = session.CaptureSession._memory_chunks

    def memory_chunks(self, offset, piece, frame=None):  # type: ignore[no-untyped-def]
        q: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()
        done = object()

        def produce() -> None:
            try:
                for c in original(self, offset, piece, frame):
                    while not stop.is_set():
                        try:
                            q.put(c, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(done)
            except BaseException as exc:  # handed to the consumer
                q.put(exc)

        t = threading.Thread(target=produce, daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            t.join()

    session.CaptureSession._memory_chunks = memory_chunks  # type: ignore[method-assign]


def _legacy() -> None:
    from corepeek_agent import session

    _pb_chunks()

    def memory_chunks(self, offset, piece, frame=None):  # type: ignore[no-untyped-def]
        # session.CaptureSession._memory_chunks as of commit c95ae15
        runs = (self._reader.populated_runs(piece.vaddr, piece.length)
                if self._anon_private[piece.segment] else iter([(piece.vaddr, piece.length, True)]))
        step = self.options.chunk_size
        for vaddr, length, populated in runs:
            file_off = offset + (vaddr - piece.vaddr)
            if not populated:
                yield session.Chunk(file_off, None, length)
                continue
            for i in range(0, length, step):
                n = min(step, length - i)
                data, _gaps = self._reader.read(vaddr + i, n)
                yield session.Chunk(file_off + i, bytes(data))

    session.CaptureSession._memory_chunks = memory_chunks  # type: ignore[method-assign]


def _sockbuf(size: int) -> None:
    from corepeek_agent import server, sockbuf
    server.buffer_options = (  # type: ignore[assignment]
        lambda *_a, **_k: sockbuf.buffer_options(size))


def _server_option(item: str) -> None:
    from corepeek_agent import server
    key, _, value = item.partition("=")
    server.SERVER_OPTIONS = [o for o in server.SERVER_OPTIONS if o[0] != key] + [
        (key, int(value) if value.lstrip("-").isdigit() else value)]


PATCHES = {"no-mallopt": _no_mallopt, "pb-chunks": _pb_chunks, "procmem": _procmem,
           "prefetch": _prefetch, "legacy": _legacy}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", default=[])
    p.add_argument("rest", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    for v in args.variant:
        if v.startswith("sopt:"):
            _server_option(v[len("sopt:"):])
        elif v.startswith("sockbuf="):
            _sockbuf(int(v[len("sockbuf="):]))
        elif v in PATCHES:
            PATCHES[v]()
        else:
            p.error(f"unknown variant {v!r}: one of {', '.join(VARIANTS)}, "
                    "sopt:KEY=VALUE or sockbuf=BYTES")
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    from corepeek.cli import main as cli_main
    return cli_main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
