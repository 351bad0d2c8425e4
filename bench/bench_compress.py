"""When does compression on the wire pay?  corepeek with and without
``--wire-compression zstd``, side by side, over links of several speeds.

    sudo python bench/bench_compress.py [--mib 128] [--rates none,1gbit,100mbit]
                                        [--reps 2] [--json FILE]

Needs root, ``ip`` and ``tc``.  For each rate a fresh network namespace gets
its loopback shaped by a token bucket (``tc qdisc ... tbf``; this kernel has
no netem, so a link by bandwidth, not latency; ``none`` leaves it unshaped);
the agent listens on 127.0.0.1 inside it (plaintext TCP, loopback only) and
each capture runs as a fresh client process inside it too
(``bench/client_main.py``, the code of ``corepeek dump``), writing the core
to --workdir.  Targets (pid namespace shared, so the agent sees them):

* ``heap``: a Python process holding --mib MiB of ordinary objects (dicts of
  ints, floats, short strings, lists, a little random bytes): what a service's
  heap looks like;
* ``random``: --mib MiB from os.urandom (encrypted or compressed data): the
  worst case, where compression only costs.

Columns (medians): wall from open to close (= how long the target was
frozen), payload bytes on the wire, the compression ratio, agent and client
CPU seconds.  ``--json`` writes every run (default
bench/results/compress-<time>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
import benchlib as bl  # noqa: E402

bl.use_this_checkout()      # this checkout's code, in the agent and client subprocesses too

from harness.agents import stop_process  # noqa: E402

CLK = os.sysconf("SC_CLK_TCK")

HEAP_TARGET = r"""
import random, sys
random.seed(7)
goal = int(sys.argv[1]) << 20
words = [random.choice("abcdefghijklmnopqrstuvwxyz") * random.randint(3, 9) for _ in range(500)]
keep, size, i = [], 0, 0
while size < goal:
    rec = {"id": i, "name": f"user{i:08d}", "email": f"user{i}@{random.choice(words)}.example",
           "score": random.random() * 1000, "tags": [random.choice(words) for _ in range(4)],
           "counts": list(range(i % 17)), "token": random.randbytes(16)}
    keep.append(rec)
    size += 600
    i += 1
print("ready", flush=True)
sys.stdin.read()
"""
RANDOM_TARGET = r"""
import os, sys
blob = os.urandom(int(sys.argv[1]) << 20)
print("ready", flush=True)
sys.stdin.read()
"""


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


class ShapedNetns:
    """A network namespace whose loopback is limited to ``rate`` (tc tbf)."""

    def __init__(self, rate: str) -> None:
        self.name = f"cpcomp{os.getpid():x}"
        sh("ip", "netns", "add", self.name)
        sh("ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up")
        if rate != "none":
            sh("ip", "netns", "exec", self.name, "tc", "qdisc", "add", "dev", "lo", "root",
               "tbf", "rate", rate, "burst", "1mb", "latency", "100ms")

    def argv(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def wait_ready(ns: ShapedNetns, address: str, agent: subprocess.Popen[bytes], log: Path,
               timeout: float = 30.0) -> None:
    """Until ``corepeek ps``, run inside the namespace, gets an answer."""
    deadline = time.monotonic() + timeout
    probe = ns.argv(sys.executable, "-m", "corepeek", "ps", "--agent", address,
                    "--timeout", "2", "--comm", "-")
    while time.monotonic() < deadline:
        if agent.poll() is not None:
            raise RuntimeError(f"agent exited:\n{log.read_text()}")
        if subprocess.run(probe, capture_output=True).returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"agent not answering after {timeout}s:\n{log.read_text()}")


def start_target(kind: str, mib: int) -> subprocess.Popen[str]:
    code = HEAP_TARGET if kind == "heap" else RANDOM_TARGET
    p = subprocess.Popen([sys.executable, "-c", code, str(mib)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    if p.stdout.readline().strip() != "ready":
        raise RuntimeError(f"{kind} target did not start")
    return p


def cpu_seconds(pid: int) -> float:
    return bl.proc_cpu_seconds(Path(f"/proc/{pid}/stat").read_text(), CLK)


def capture(ns: ShapedNetns, agent_pid: int, address: str, pid: int, out: Path,
            compression: str) -> dict:
    cpu0 = cpu_seconds(agent_pid)
    res = subprocess.run(ns.argv(sys.executable, str(HERE / "client_main.py"), "--agent", address,
                                 "--pid", str(pid), "--out", str(out),
                                 "--compression", compression),
                         capture_output=True, text=True, timeout=1800)
    cpu1 = cpu_seconds(agent_pid)
    out.unlink(missing_ok=True)
    if res.returncode != 0:
        raise RuntimeError(f"client failed: {res.stderr[-2000:]}")
    run = json.loads(res.stdout)
    run["agent_cpu_s"] = cpu1 - cpu0
    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=128)
    p.add_argument("--rates", default="none,1gbit,100mbit")
    p.add_argument("--targets", default="heap,random")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--workdir", default="/var/tmp")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_compress.py needs root (network namespaces, ptrace)", file=sys.stderr)
        return 2
    work = Path(args.workdir) / f"corepeek-bench-compress-{os.getpid()}"
    work.mkdir(parents=True)
    targets = {k: start_target(k, args.mib) for k in args.targets.split(",")}
    results: list[dict] = []
    try:
        for rate in args.rates.split(","):
            ns = ShapedNetns(rate)
            agent = None
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                address = f"127.0.0.1:{port}"
                log = work / f"agent-{rate}.log"
                with open(log, "wb") as logf:
                    agent = subprocess.Popen(
                        ns.argv(sys.executable, "-m", "corepeek", "agent", "--listen", address,
                                "--insecure", "--max-freeze", "600",
                                "--sessions-per-minute", "0",
                                "--audit-log", str(work / "audit.log")),
                        stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                wait_ready(ns, address, agent, log)
                for kind, tp in targets.items():
                    for comp in ("none", "zstd"):
                        runs = []
                        for rep in range(args.reps):
                            run = capture(ns, agent.pid, address, tp.pid,
                                          work / "core", comp)
                            run.update(rate=rate, target=kind, compression=comp, rep=rep)
                            runs.append(run)
                            print(f"[{time.strftime('%H:%M:%S')}] {rate:>8} {kind:6} {comp:4} "
                                  f"wall {run['wall_s']:.2f}s wire "
                                  f"{bl.fmt_bytes(run['wire_bytes'])}", flush=True)
                        results.extend(runs)
            finally:
                if agent is not None:
                    stop_process(agent, timeout=15)
                ns.close()
    finally:
        for tp in targets.values():
            tp.kill()
            tp.wait()
        for f in work.iterdir():
            f.unlink()
        work.rmdir()
    print()
    print(table(results, args.mib))
    out = Path(args.json) if args.json else (
        HERE / "results" / f"compress-{time.strftime('%Y%m%dT%H%M%S')}.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"mib": args.mib, "load": os.getloadavg(), "runs": results},
                              indent=1))
    print(f"\nall runs: {out}")
    return 0


def table(results: list[dict], mib: int) -> str:
    rows = []
    keys = sorted({(r["rate"], r["target"]) for r in results},
                  key=lambda k: (["none", "10gbit", "1gbit", "300mbit", "100mbit"].index(k[0])
                                 if k[0] in ("none", "10gbit", "1gbit", "300mbit", "100mbit")
                                 else 9, k[1]))
    for rate, kind in keys:
        base = None
        for comp in ("none", "zstd"):
            runs = [r for r in results if (r["rate"], r["target"], r["compression"]) ==
                    (rate, kind, comp)]
            if not runs:
                continue
            m = bl.medians(runs)
            base = base or m["wall_s"]
            ratio = (m["data_bytes"] or 0) / m["wire_bytes"] if m["wire_bytes"] else None
            rows.append([rate if comp == "none" else "", kind if comp == "none" else "", comp,
                         bl.fmt_seconds(m["wall_s"]), bl.fmt_ratio(m["wall_s"], base),
                         bl.fmt_bytes(m["wire_bytes"]),
                         f"{ratio:.2f}" if ratio else "-",
                         bl.fmt_seconds(m["agent_cpu_s"]), bl.fmt_seconds(m["client_cpu_s"])])
    head = (f"corepeek full core of a {mib} MiB target, loopback shaped with tc tbf; "
            f"medians; load {os.getloadavg()[0]:.1f}; {os.cpu_count()} CPUs")
    return head + "\n" + bl.format_table(
        ["link", "target", "wire compression", "wall (= frozen)", "vs none", "wire",
         "ratio", "agent CPU", "client CPU"], rows)


if __name__ == "__main__":
    sys.exit(main())
