"""The data path against its floor: corepeek vs a bare gRPC stream vs gcore, in one run.

    sudo python bench/bench_datapath.py [--quick] [--sizes 256,1024,4096] [--reps 3]
                                        [--json FILE] [--no-gcore] [--bare-default-buffers]

For each dense bigmem target (--sizes MiB touched; --quick: 256 and 1024 MiB,
2 reps) and each rep, in an order that alternates from rep to rep:

* ``bare unix``: a bare gRPC Python stream of the same number of bytes in
  1 MiB messages (the agent's chunk) over a Unix socket: sync server,
  identity serializers, malloc thresholds raised, the agent's socket
  buffers (server/corepeek_agent/sockbuf.py), a fresh client process that
  discards what it gets.  No memory is read, nothing is written.
* ``corepeek unix``: a full dump through the agent (``corepeek agent`` on a
  Unix socket) by a fresh client process (bench/client_main.py, the code path
  of ``corepeek dump``) into --workdir.
* ``bare mTLS``: the bare stream over loopback TCP with mutual TLS.
* ``corepeek mTLS``: the dump through an agent on loopback TCP with mutual
  TLS and a policy naming the client's certificate.
* ``gcore``: ``gdb -batch -p PID -ex 'gcore FILE'`` on the same target.

Columns: wall (from open to closed; gcore: the gdb command), GB/s, CPU
seconds per GiB of the sender (agent or bare server; gdb for gcore) and of
the receiver (client), and the ratios of the medians: corepeek/bare (same
transport) and x/gcore.  Certificates are made on the fly (cryptography).
``--bare-default-buffers`` adds the bare streams with the kernel's default
socket buffers, to show what sockbuf.py buys.  Every run goes to --json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import benchlib as bl  # noqa: E402

bl.use_this_checkout()
sys.path.insert(0, str(ROOT / "tests" / "integration"))

import grpc  # noqa: E402

from corepeek_agent.sockbuf import DEFAULT_BUFFER_BYTES  # noqa: E402
from harness.agents import stop_process, wait_healthy  # noqa: E402
from harness.targets import Target, build_target  # noqa: E402

MIB = bl.MIB
GIB = 1024 * MIB
CLK = os.sysconf("SC_CLK_TCK")
METHOD = "/bench.Datapath/Pull"
ONCALL = "spiffe://corepeek.bench/oncall"
PATHS = ("bare unix", "corepeek unix", "bare mTLS", "corepeek mTLS", "gcore")


def _cpu(pid: int) -> float:
    return bl.proc_cpu_seconds(Path(f"/proc/{pid}/stat").read_text(), CLK)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- certificates ---------------------------------------------------------------------------


class Certs:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (SAN URI)."""

    def __init__(self, directory: Path) -> None:
        from security_pki import CA
        ca = CA(directory)
        self.ca = ca.path
        self.server = ca.issue("server", ips=("127.0.0.1",), dns=("localhost",), server=True)
        self.client = ca.issue("client", uris=(ONCALL,))

    def channel_credentials(self) -> grpc.ChannelCredentials:
        cert, key = self.client.read()
        return grpc.ssl_channel_credentials(self.ca.read_bytes(), key, cert)

    def client_args(self) -> list[str]:
        return ["--tls-ca", str(self.ca), "--tls-cert", str(self.client.cert),
                "--tls-key", str(self.client.key)]


# -- the bare stream ------------------------------------------------------------------------


def _identity(b: bytes) -> bytes:
    return b


def _bare_server(address: str, tls: tuple[bytes, bytes, bytes] | None, sndbuf: int,
                 ready: mp.Queue) -> None:  # type: ignore[type-arg]
    from corepeek_agent.server import raise_malloc_thresholds
    from corepeek_agent.sockbuf import buffer_options
    raise_malloc_thresholds()
    template = os.urandom(MIB)

    def pull(request: bytes, context: grpc.ServicerContext):  # type: ignore[no-untyped-def]
        for _ in range(int(request)):
            yield bytes(memoryview(template))       # a fresh message, like a memory read

    server = grpc.server(futures.ThreadPoolExecutor(4),
                         options=buffer_options(sndbuf))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Datapath", {
        "Pull": grpc.unary_stream_rpc_method_handler(pull, _identity, _identity)}),))
    if tls is None:
        server.add_insecure_port(address)
    else:
        ca, key, cert = tls
        server.add_secure_port(address, grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=True))
    server.start()
    ready.put(os.getpid())
    server.wait_for_termination()


class BareServer:
    def __init__(self, address: str, certs: Certs | None,
                 sndbuf: int = DEFAULT_BUFFER_BYTES) -> None:
        self.address = address
        tls = None
        if certs is not None:
            cert, key = certs.server.read()
            tls = (certs.ca.read_bytes(), key, cert)
        ready: mp.Queue = mp.Queue()  # type: ignore[type-arg]
        self.proc = mp.Process(target=_bare_server, args=(address, tls, sndbuf, ready),
                               daemon=True)
        self.proc.start()
        self.pid = ready.get(timeout=60)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.join()


def bare_pull(server: BareServer, mib: int, certs: Certs | None) -> dict:
    """One bare pull by a fresh client process (this script, ``--pull``)."""
    argv = [sys.executable, __file__, "--pull", server.address, "--pull-mib", str(mib)]
    argv += certs.client_args() if certs is not None else []
    s0 = _cpu(server.pid)
    res = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    s1 = _cpu(server.pid)
    if res.returncode != 0:
        raise RuntimeError(f"bare pull failed: {res.stderr[-3000:]}")
    run = json.loads(res.stdout)
    run["sender_cpu_s"] = s1 - s0
    return run


def pull_main(args: argparse.Namespace) -> int:
    """The bare client: pull, discard, print JSON (timed from the call to its end)."""
    from corepeek.channel import CHANNEL_OPTIONS, TLSOptions
    from corepeek.dump import raise_malloc_thresholds
    raise_malloc_thresholds()
    if args.tls_ca:
        creds = TLSOptions(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key).credentials()
        ch = grpc.secure_channel(args.pull, creds, options=CHANNEL_OPTIONS)
    else:
        ch = grpc.insecure_channel(args.pull, options=CHANNEL_OPTIONS)
    call = ch.unary_stream(METHOD, request_serializer=_identity, response_deserializer=_identity)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    n = sum(len(m) for m in call(str(args.pull_mib).encode()))
    t = time.monotonic() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    ch.close()
    json.dump({"wall_s": t, "bytes": n,
               "client_cpu_s": (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)},
              sys.stdout)
    return 0


# -- the agents -----------------------------------------------------------------------------


class Agent:
    """``corepeek agent`` as a subprocess: Unix socket, or loopback TCP with mutual TLS."""

    def __init__(self, workdir: Path, certs: Certs | None, exe: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "agent.log"
        self.certs = certs
        argv = [sys.executable, "-m", "corepeek", "agent", "--max-freeze", "600",
                "--audit-log", str(workdir / "audit.log"), "--sessions-per-minute", "100000"]
        creds = None
        if certs is None:
            self.address = f"unix:{workdir / 'agent.sock'}"
            argv += ["--listen", self.address]
        else:
            self.address = f"127.0.0.1:{_free_port()}"
            policy = workdir / "policy.json"      # JSON is YAML
            policy.write_text(json.dumps({"version": 1, "rules": [{
                "name": "bench", "clients": [ONCALL], "targets": {"exe": [str(exe)]},
                "modes": ["full"]}]}))
            argv += ["--listen", self.address, "--tls-cert", str(certs.server.cert),
                     "--tls-key", str(certs.server.key), "--tls-ca", str(certs.ca),
                     "--policy", str(policy)]
            creds = certs.channel_credentials()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        wait_healthy(self.address, self.proc, self.log_path, timeout=30, credentials=creds)

    def dump(self, target: Target, out: Path) -> dict:
        argv = [sys.executable, str(HERE / "client_main.py"), "--agent", self.address,
                "--pid", str(target.pid), "--out", str(out)]
        argv += self.certs.client_args() if self.certs is not None else []
        cpu0 = _cpu(self.proc.pid)
        res = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
        cpu1 = _cpu(self.proc.pid)
        if res.returncode != 0:
            out.unlink(missing_ok=True)
            raise RuntimeError(f"client failed ({res.returncode}): {res.stderr[-3000:]}\n"
                               f"agent log:\n{self.log_path.read_text()[-3000:]}")
        run = json.loads(res.stdout)
        run["sender_cpu_s"] = cpu1 - cpu0
        run["core_bytes"] = os.stat(out).st_size
        out.unlink()
        return run

    def stop(self) -> None:
        stop_process(self.proc, timeout=15)


def gcore(target: Target, out: Path) -> dict:
    argv = ["gdb", "-batch", "-nx", "-iex", "set debuginfod enabled off",
            "-p", str(target.pid), "-ex", f"gcore {out}"]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(proc.pid, 0)
    t = time.monotonic() - t0
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0 or not out.exists():
        out.unlink(missing_ok=True)
        raise RuntimeError(f"gcore failed: {err[-2000:]}")
    size = os.stat(out).st_size
    out.unlink()
    return {"wall_s": t, "sender_cpu_s": ru.ru_utime + ru.ru_stime, "core_bytes": size}


# -- the table ------------------------------------------------------------------------------


def summarize(mib: int, runs: dict[str, list[dict]]) -> list[list[str]]:
    gib = mib / 1024
    med = {k: bl.medians(v) for k, v in runs.items() if v}
    rows = []
    extra = ("bare unix, default buffers", "bare mTLS, default buffers")
    for path in [p for p in (*PATHS, *extra) if p in med]:
        m = med[path]
        wall = m["wall_s"]
        walls = sorted(r["wall_s"] for r in runs[path])
        bare = ("bare unix" if path == "corepeek unix" else
                "bare mTLS" if path == "corepeek mTLS" else None)
        rows.append([
            f"{mib} MiB" if not rows else "", path, bl.fmt_seconds(wall),
            f"{bl.fmt_seconds(walls[0])}-{bl.fmt_seconds(walls[-1])}",
            f"{mib * MIB / wall / 1e9:.2f}" if wall else "-",
            f"{m['sender_cpu_s'] / gib:.2f}" if m.get("sender_cpu_s") is not None else "-",
            f"{m['client_cpu_s'] / gib:.2f}" if m.get("client_cpu_s") is not None else "-",
            f"**{bl.fmt_ratio(wall, med[bare]['wall_s'])}**" if bare in med else "-",
            bl.fmt_ratio(wall, med["gcore"]["wall_s"]) if "gcore" in med else "-",
        ])
    return rows


HEADERS = ["target", "path", "wall", "range", "GB/s", "sender CPU s/GiB",
           "client CPU s/GiB", "vs bare", "vs gcore"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="256 MiB and 1 GiB, 2 reps")
    p.add_argument("--sizes", default="256,1024,4096", help="MiB touched, comma-separated")
    p.add_argument("--reps", type=int, default=None, help="runs per path (3; --quick: 2)")
    p.add_argument("--paths", default=",".join(PATHS),
                   help=f"comma-separated subset of: {', '.join(PATHS)}")
    p.add_argument("--no-gcore", action="store_true")
    p.add_argument("--bare-default-buffers", action="store_true")
    p.add_argument("--workdir", default="/var/tmp")
    p.add_argument("--json", default="")
    p.add_argument("--pull", help=argparse.SUPPRESS)
    p.add_argument("--pull-mib", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--tls-ca", help=argparse.SUPPRESS)
    p.add_argument("--tls-cert", help=argparse.SUPPRESS)
    p.add_argument("--tls-key", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.pull:
        return pull_main(args)
    sizes = [256, 1024] if args.quick else [int(s) for s in args.sizes.split(",")]
    reps = args.reps or (2 if args.quick else 3)
    paths = [s.strip() for s in args.paths.split(",") if s.strip()]
    if args.no_gcore and "gcore" in paths:
        paths.remove("gcore")
    if args.bare_default_buffers:
        paths += ["bare unix, default buffers", "bare mTLS, default buffers"]
    workdir = Path(args.workdir)
    results: dict = {"time": datetime.datetime.now().isoformat(timespec="seconds"),
                     "sizes": {}, "load": [], "cpus": os.cpu_count()}

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {msg}",
              file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="corepeek-datapath-") as tmp_s:
        tmp = Path(tmp_s)
        exe = build_target("bigmem", tmp)
        certs = Certs(tmp / "pki")
        servers: dict[str, object] = {}
        try:
            if "bare unix" in paths:
                servers["bare unix"] = BareServer(f"unix:{tmp}/bare.sock", None)
            if "bare unix, default buffers" in paths:
                servers["bare unix, default buffers"] = BareServer(
                    f"unix:{tmp}/bare-default.sock", None, sndbuf=0)
            if "bare mTLS" in paths:
                servers["bare mTLS"] = BareServer(f"127.0.0.1:{_free_port()}", certs)
            if "bare mTLS, default buffers" in paths:
                servers["bare mTLS, default buffers"] = BareServer(
                    f"127.0.0.1:{_free_port()}", certs, sndbuf=0)
            if "corepeek unix" in paths:
                servers["corepeek unix"] = Agent(tmp / "agent-unix", None, exe)
            if "corepeek mTLS" in paths:
                servers["corepeek mTLS"] = Agent(tmp / "agent-tls", certs, exe)
            for mib in sizes:
                runs: dict[str, list[dict]] = {k: [] for k in paths}
                with Target(exe, ["-m", str(mib)], ready_timeout=300) as target:
                    for rep in range(reps):
                        order = paths if rep % 2 == 0 else paths[::-1]
                        for path in order:
                            results["load"].append(os.getloadavg()[0])
                            out = workdir / f"datapath-{os.getpid()}.core"
                            srv = servers.get(path)
                            if path == "gcore":
                                r = gcore(target, out)
                            elif isinstance(srv, BareServer):
                                r = bare_pull(srv, mib, certs if "mTLS" in path else None)
                            else:
                                assert isinstance(srv, Agent)
                                r = srv.dump(target, out)
                            r["load"] = os.getloadavg()[0]
                            runs[path].append(r)
                            log(f"{mib} MiB rep {rep + 1}/{reps} {path}: "
                                f"{bl.fmt_seconds(r['wall_s'])}")
                results["sizes"][mib] = runs
        finally:
            for s in servers.values():
                s.stop()  # type: ignore[attr-defined]
    rows = [row for mib in sizes for row in summarize(mib, results["sizes"][mib])]
    load = results["load"]
    print(f"\nmedians of {reps} runs; load average {min(load):.1f}-{max(load):.1f} "
          f"(median {bl.median(load):.1f}); {os.cpu_count()} CPUs; sender = agent, bare "
          "server or gdb; ratios of medians\n")
    print(bl.format_table(HEADERS, rows))
    out = Path(args.json) if args.json else (
        HERE / "results" / f"datapath-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\nruns: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
