"""Notes from a fleet: `corepeek collect --only notes` against N test hosts.

    python bench/bench_fleet.py [--hosts 8 32] [--targets-per-host 2] [--concurrency 8 32]
                                [--repeat 3] [--out bench/results/fleet.json]

Every host is a real network namespace with its own address, its own agent
(mutual TLS, pid 1 of the host's own pid namespace, as in
tests/integration/test_fleet.py) and ``--targets-per-host`` copies of the
``threads`` test target (9 threads each).  For each host count and each
``--concurrency`` (``--per-host 2``), ``--repeat`` runs of the CLI measure:

* wall: the whole ``corepeek collect`` process, Python start-up included;
* collect: the manifest's own duration (listing + captures + manifest);
* per capture: the client's open..close time, and from each agent's audit log
  the time the target was frozen (``freeze_seconds``) and the time to stop all
  its threads (``stop_micros``).

Prints a table of medians and writes every run to a JSON file.  Needs root,
ip, unshare, nsenter.  Cleans up every namespace and process it made.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "integration"))

import grpc  # noqa: E402

from harness import netns  # noqa: E402
from harness.targets import build_target  # noqa: E402
from security_pki import CA  # noqa: E402

COLLECTOR = "spiffe://corepeek.bench/collector"
PORT = 7443


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def collector_pki(tmp: Path, rule: str) -> tuple[CA, object, grpc.ChannelCredentials, Path]:
    """The bench's CA, the collector's certificate and mTLS credentials, and a
    policy with one rule (``rule``: its modes and the like) naming the collector."""
    ca = CA(tmp / "pki", name="bench-ca")
    client = ca.issue("collector", uris=(COLLECTOR,))
    cert, key = client.read()
    creds = grpc.ssl_channel_credentials(ca.path.read_bytes(), key, cert)
    policy = tmp / "policy.yaml"
    policy.write_text(f'version: 1\nlimits: {{sessions_per_minute: 0}}\nrules:\n'
                      f'  - {{name: bench, clients: ["{COLLECTOR}"], {rule}}}\n')
    return ca, client, creds, policy


def start_fleet(tmp: Path, n: int, per_host: int, threads_exe: Path, ca: CA,
                client_creds: grpc.ChannelCredentials, policy: Path) -> netns.Fleet:
    fleet = netns.Fleet(tmp, n)
    try:
        def up(h: netns.Host) -> None:
            pair = ca.issue(f"agent-{h.hostname}", ips=(h.ip,), server=True)
            h.start_agent(PORT, "--tls-cert", str(pair.cert), "--tls-key", str(pair.key),
                          "--tls-ca", str(ca.path), "--policy", str(policy),
                          "--audit-log", str(tmp / f"audit-{h.hostname}.jsonl"),
                          "--max-sessions", "8", credentials=client_creds, timeout=120)
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(up, fleet.hosts))
        for h in fleet.hosts:
            for _ in range(per_host):
                h.spawn(threads_exe)
    except BaseException:
        fleet.close()
        raise
    return fleet


def audit_captures(tmp: Path, hosts: list[netns.Host], seen: set[str]) -> list[dict]:
    """Capture lines of the hosts' audit logs not returned before."""
    out = []
    for h in hosts:
        path = tmp / f"audit-{h.hostname}.jsonl"
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            d = json.loads(line)
            if d.get("kind") == "capture" and d["session"] not in seen:
                seen.add(d["session"])
                out.append({**d, "host": h.hostname})
    return out


def run_once(fleet: netns.Fleet, tmp: Path, ca: CA, client, comm: str, concurrency: int,
             run: int, seen: set[str]) -> dict:
    out = tmp / f"out-{len(fleet.hosts)}-{concurrency}-{run}"
    agents = ",".join(h.address(PORT) for h in fleet.hosts)
    audit_captures(tmp, fleet.hosts, seen)
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "corepeek", "collect", "--agents", agents,
                          "--comm", comm, "--only", "notes", "--out", str(out),
                          "--concurrency", str(concurrency), "--per-host", "2",
                          "--tls-ca", str(ca.path), "--tls-cert", str(client.cert),
                          "--tls-key", str(client.key), "--no-progress"],
                         capture_output=True, text=True, timeout=600)
    wall = time.monotonic() - t0
    if res.returncode != 0:
        raise RuntimeError(f"collect failed ({res.returncode}):\n{res.stderr}")
    manifest = json.loads((out / "manifest.json").read_text())
    caps = [c for c in manifest["captures"] if c["status"] == "ok"]
    sessions = {d["session"]: d for d in audit_captures(tmp, fleet.hosts, seen)
                if d["outcome"] == "ok" and d["mode"] == "notes"}
    return {
        "hosts": len(fleet.hosts), "concurrency": concurrency, "run": run,
        "captures": len(caps), "errors": manifest["summary"]["error"],
        "wall_seconds": wall, "collect_seconds": manifest["seconds"],
        "client_seconds": [c["seconds"] for c in caps],
        "freeze_seconds": [d["freeze_seconds"] for d in sessions.values()],
        "stop_micros": [d["stop_micros"] for d in sessions.values()],
        "bytes": manifest["summary"]["bytes"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--targets-per-host", type=int, default=2)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "fleet.json"))
    args = ap.parse_args()
    ok, why = netns.available()
    if not ok:
        print(f"cannot make test hosts: {why}", file=sys.stderr)
        return 2
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as d:
        tmp = Path(d)
        ca, client, creds, policy = collector_pki(tmp, "modes: [notes]")
        threads_exe = build_target("threads", tmp)
        comm = threads_exe.name[:15]
        for n in args.hosts:
            t0 = time.monotonic()
            (tmp / f"fleet{n}").mkdir()
            fleet = start_fleet(tmp / f"fleet{n}", n, args.targets_per_host, threads_exe, ca,
                                creds, policy)
            seen: set[str] = set()
            print(f"{n} hosts up in {time.monotonic() - t0:.1f} s", file=sys.stderr)
            try:
                for conc in args.concurrency:
                    for r in range(args.repeat):
                        runs.append(run_once(fleet, tmp / f"fleet{n}", ca, client, comm, conc, r,
                                             seen))
                        last = runs[-1]
                        print(f"  hosts={n} concurrency={conc} run={r}: {last['captures']} "
                              f"captures, wall {last['wall_seconds']:.2f} s", file=sys.stderr)
                        if last["captures"] != n * args.targets_per_host or last["errors"]:
                            raise RuntimeError(f"expected {n * args.targets_per_host} captures: "
                                               f"{last}")
            finally:
                fleet.close()
    print(f"\n{'hosts':>5} {'conc':>4} {'cores':>5} {'wall s':>7} {'collect s':>9} "
          f"{'client s p50/max':>17} {'frozen ms p50/p95/max':>22} {'stop us p50/max':>16}")
    summary = []
    for n in args.hosts:
        for conc in args.concurrency:
            rs = [r for r in runs if r["hosts"] == n and r["concurrency"] == conc]
            cl = [x for r in rs for x in r["client_seconds"]]
            fz = [x * 1000 for r in rs for x in r["freeze_seconds"]]
            st = [x for r in rs for x in r["stop_micros"]]
            row = {"hosts": n, "concurrency": conc, "captures": rs[0]["captures"],
                   "wall_seconds": statistics.median(r["wall_seconds"] for r in rs),
                   "collect_seconds": statistics.median(r["collect_seconds"] for r in rs),
                   "client_seconds_p50": pct(cl, 0.5), "client_seconds_max": max(cl),
                   "frozen_ms_p50": pct(fz, 0.5), "frozen_ms_p95": pct(fz, 0.95),
                   "frozen_ms_max": max(fz), "stop_us_p50": pct(st, 0.5), "stop_us_max": max(st)}
            summary.append(row)
            print(f"{n:>5} {conc:>4} {row['captures']:>5} {row['wall_seconds']:>7.2f} "
                  f"{row['collect_seconds']:>9.2f} "
                  f"{row['client_seconds_p50']:>8.3f}/{row['client_seconds_max']:<8.3f} "
                  f"{row['frozen_ms_p50']:>7.1f}/{row['frozen_ms_p95']:.1f}/{row['frozen_ms_max']:<7.1f} "
                  f"{row['stop_us_p50']:>7.0f}/{row['stop_us_max']:<7.0f}")
    doc = {"machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                       "python": platform.python_version()},
           "setup": {"targets_per_host": args.targets_per_host, "target": "threads (9 threads)",
                     "per_host": 2, "hosts_are": "network + pid + mount + UTS namespaces, "
                     "one agent each (mutual TLS on the host's own 10.x address)"},
           "summary": summary, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
