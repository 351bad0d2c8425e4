"""The ceiling of the transport: a bare gRPC Python stream against gcore's whole job.

    sudo python bench/bench_transport.py [--mib 1024] [--reps 5] [--no-gcore]

Streams --mib 1 MiB messages of pre-framed bytes (the agent's message size)
from a sync gRPC server in one process to a client in another over a Unix
socket, with identity serializers, malloc thresholds raised on both sides
and the client discarding what it gets: no target memory is read and
nothing is written.  The server copies each message once from a template, as
the agent reads memory into a fresh message.  In the same run, ``gdb gcore``
writes a core of a bigmem target with the same amount of memory.

If the bare stream alone takes about as long as gcore's whole job, no
arrangement of the Python agent and client around gRPC can beat gcore for
that size on this machine (docs/performance.md).
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing as mp
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

import grpc

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT / "tests")]

MIB = 1024 * 1024
METHOD = "/bench.Transport/Pull"


def _mallopt() -> None:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 32 * MIB)        # M_MMAP_THRESHOLD
    libc.mallopt(-1, 128 * MIB)       # M_TRIM_THRESHOLD


def _identity(b: bytes) -> bytes:
    return b


def _serve(address: str, count: int, ready: mp.Queue) -> None:  # type: ignore[type-arg]
    _mallopt()
    template = os.urandom(MIB)

    def pull(request: bytes, context: grpc.ServicerContext):  # type: ignore[no-untyped-def]
        for _ in range(count):
            yield bytes(memoryview(template))       # a fresh message, like a memory read

    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Transport", {
        "Pull": grpc.unary_stream_rpc_method_handler(pull, _identity, _identity)}),))
    server.add_insecure_port(address)
    server.start()
    ready.put(os.getpid())
    server.wait_for_termination()


def _cpu(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def pull_once(address: str, server_pid: int) -> dict:
    ch = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 4 * MIB)])
    call = ch.unary_stream(METHOD, request_serializer=_identity, response_deserializer=_identity)
    s0, r0, t0 = _cpu(server_pid), resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    n = sum(len(m) for m in call(b""))
    t = time.perf_counter() - t0
    r1, s1 = resource.getrusage(resource.RUSAGE_SELF), _cpu(server_pid)
    ch.close()
    return {"bytes": n, "wall_s": t, "server_cpu_s": s1 - s0,
            "client_cpu_s": (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)}


def gcore_once(pid: int, out: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["gdb", "-batch", "-p", str(pid), "-ex", f"gcore {out}"],
                   capture_output=True, check=True, timeout=600)
    t = time.perf_counter() - t0
    out.unlink()
    return t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=1024)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-gcore", action="store_true")
    p.add_argument("--workdir", default="/var/tmp")
    args = p.parse_args(argv)
    _mallopt()
    with tempfile.TemporaryDirectory() as tmp:
        address = f"unix:{tmp}/transport.sock"
        ready: mp.Queue = mp.Queue()  # type: ignore[type-arg]
        server = mp.Process(target=_serve, args=(address, args.mib, ready), daemon=True)
        server.start()
        server_pid = ready.get(timeout=30)
        target = None
        if not args.no_gcore:
            from harness.targets import Target, build_target
            target = Target(build_target("bigmem", Path(tmp)), ["-m", str(args.mib)])
            target.__enter__()
        pulls, gcores = [], []
        try:
            pull_once(address, server_pid)                       # warm-up
            for _ in range(args.reps):
                pulls.append(pull_once(address, server_pid))
                if target is not None:
                    gcores.append(gcore_once(target.pid, Path(args.workdir) / "transport.core"))
        finally:
            if target is not None:
                target.__exit__(None, None, None)
            server.kill()
    gib = args.mib / 1024
    med = {k: statistics.median(r[k] for r in pulls) for k in pulls[0]}
    print(f"{args.mib} MiB, medians of {args.reps}, load {os.getloadavg()[0]:.1f}, "
          f"{os.cpu_count()} CPUs")
    print("| | wall | GB/s | sender CPU | receiver CPU |\n|---|---:|---:|---:|---:|")
    print(f"| bare gRPC stream, 1 MiB messages | {med['wall_s']:.3f} s | "
          f"{med['bytes'] / med['wall_s'] / 1e9:.2f} | {med['server_cpu_s'] / gib:.2f} s/GiB | "
          f"{med['client_cpu_s'] / gib:.2f} s/GiB |")
    if gcores:
        g = statistics.median(gcores)
        print(f"| gdb gcore, whole core of the same memory | {g:.3f} s | "
              f"{args.mib * MIB / g / 1e9:.2f} | - | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
