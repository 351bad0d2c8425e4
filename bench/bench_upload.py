"""Full cores from a fleet, through the collector or uploaded by the agents.

    python bench/bench_upload.py [--hosts 8 32] [--mib 32] [--repeat 2] [--quick]
                                 [--out bench/results/upload.json]

Every host is a network namespace with its own agent (mutual TLS, pid 1 of
its own pid namespace; tests/harness/netns.py) and one ``growmem`` target
that has touched ``--mib`` MiB.  An S3-compatible server (moto's server
mode, in this process) listens on the root namespace, which every host
reaches through its veth gateway.  For each host count, ``corepeek collect
--only full`` runs ``--repeat`` times each way:

* ``pull``: the cores come through the collector into a local directory;
* ``upload``: ``--upload s3://bench/...``: each agent writes its core to S3
  with its own credentials; the collector writes only the manifest.

Measured on the collector process: bytes it read (``rchar`` of
/proc/PID/io at its exit: sockets and files, so the Python start-up's own
reads are in both columns), bytes it wrote (``wchar``), its CPU time
(rusage user + system from wait4) and wall time; and the load average of
the machine when the run started (other work shares it).  ``--quick``: 4
hosts, 16 MiB, one run.  Needs root, ip, unshare, nsenter, moto, boto3.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import use_this_checkout  # noqa: E402

use_this_checkout()
sys.path.insert(0, str(ROOT / "tests" / "integration"))

import grpc  # noqa: E402

from harness import netns  # noqa: E402
from harness.targets import build_target  # noqa: E402
from bench_fleet import collector_pki  # noqa: E402
from security_pki import CA  # noqa: E402

PORT = 7443
BUCKET = "bench"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1"}
# Runs the CLI, then leaves its /proc/self/io and rusage (at exit) in the file named by $1.
WRAPPER = """import atexit, json, resource, sys
out = sys.argv.pop(1)
def done():
    io = dict(l.split(": ") for l in open("/proc/self/io").read().splitlines())
    ru = resource.getrusage(resource.RUSAGE_SELF)
    json.dump({"io": {k: int(v) for k, v in io.items()}, "user": ru.ru_utime,
               "system": ru.ru_stime, "maxrss_kib": ru.ru_maxrss}, open(out, "w"))
atexit.register(done)
from corepeek.cli import main
sys.exit(main())
"""


def start_s3(ip: str) -> tuple[object, int]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)     # one line per request
    server = ThreadedMotoServer(ip_address=ip, port=0, verbose=False)
    server.start()
    return server, server.get_host_and_port()[1]


def start_fleet(tmp: Path, n: int, mib: int, ca: CA, creds: grpc.ChannelCredentials,
                policy: Path) -> tuple[netns.Fleet, object, str]:
    """``n`` hosts with an agent and a target each, and the S3 server they upload
    to: listening only on the first host's gateway address (in the root
    namespace), which every host reaches through its own veth."""
    fleet = netns.Fleet(tmp, n)
    exe = build_target("growmem", tmp)
    server = None
    try:
        s3_ip = fleet.hosts[0].gateway
        server, port = start_s3(s3_ip)
        endpoint = f"http://{s3_ip}:{port}"
        for h in fleet.hosts[1:]:
            subprocess.run(["ip", "-n", h.netns, "route", "add", f"{s3_ip}/32", "via",
                            h.gateway], check=True)

        def up(h: netns.Host) -> None:
            pair = ca.issue(f"agent-{h.hostname}", ips=(h.ip,), server=True)
            h.start_agent(PORT, "--tls-cert", str(pair.cert), "--tls-key", str(pair.key),
                          "--tls-ca", str(ca.path), "--policy", str(policy),
                          "--s3-endpoint-url", endpoint,
                          "--audit-log", str(tmp / f"audit-{h.hostname}.jsonl"),
                          credentials=creds, timeout=120)
            t = h.spawn(exe)
            t.command(f"grow {mib}", timeout=60)
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(up, fleet.hosts))
    except BaseException:
        if server is not None:
            server.stop()  # type: ignore[attr-defined]
        fleet.close()
        raise
    return fleet, server, endpoint


def run_once(fleet: netns.Fleet, tmp: Path, ca: CA, client, s3, endpoint: str, comm: str,
             how: str, run: int) -> dict:
    n = len(fleet.hosts)
    agents = ",".join(h.address(PORT) for h in fleet.hosts)
    prefix = f"{n}/{run}/"
    dest = (["--upload", f"s3://{BUCKET}/{prefix}", "--s3-endpoint-url", endpoint]
            if how == "upload" else ["--out", str(tmp / f"out-{n}-{run}")])
    io_file = tmp / f"io-{n}-{how}-{run}"
    load = os.getloadavg()
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-c", WRAPPER, str(io_file), "collect", "--agents", agents,
         "--comm", comm, "--only", "full", *dest, "--concurrency", "8",
         "--tls-ca", str(ca.path), "--tls-cert", str(client.cert), "--tls-key", str(client.key),
         "--no-progress", "--json"],
        capture_output=True, text=True, env={**os.environ, **S3_ENV}, timeout=1800)
    wall = time.monotonic() - t0
    if res.returncode != 0:
        raise RuntimeError(f"collect {how} failed ({res.returncode}):\n{res.stderr[-4000:]}")
    me = json.loads(io_file.read_text())
    cores = core_bytes(res.stdout, n)
    if how == "upload":               # every core is in the bucket, complete
        sizes = [o["Size"] for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix=prefix) for o in page.get("Contents", [])
            if o["Key"].endswith(".core")]
        if len(sizes) != n or sum(sizes) != cores:
            raise RuntimeError(f"expected {n} cores ({cores} bytes) in S3, found {sizes}")
    return {"hosts": n, "how": how, "run": run, "wall_seconds": wall, "load_avg_1m": load[0],
            "cpu_seconds": me["user"] + me["system"], "user_seconds": me["user"],
            "system_seconds": me["system"], "maxrss_kib": me["maxrss_kib"],
            "rchar": me["io"]["rchar"], "wchar": me["io"]["wchar"],
            "core_bytes": cores}


def core_bytes(stdout: str, n: int) -> int:
    """Sum of the cores' sizes the manifest (``--json`` on stdout) reports, once
    it says that all ``n`` captures succeeded."""
    caps = json.loads(stdout)["captures"]
    if len(caps) != n or any(c["status"] != "ok" for c in caps):
        raise RuntimeError(f"expected {n} good captures: {caps}")
    return sum(int(c["bytes"]) for c in caps)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--mib", type=int, default=32, help="MiB each target touches")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="4 hosts, 16 MiB, one run")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "upload.json"))
    args = ap.parse_args()
    if args.quick:
        args.hosts, args.mib, args.repeat = [4], 16, 1
    ok, why = netns.available()
    if not ok:
        print(f"cannot make test hosts: {why}", file=sys.stderr)
        return 2
    os.environ.update(S3_ENV)                # the agents' own credentials (their environment)
    import boto3

    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-upload-") as d:
        tmp = Path(d)
        ca, client, creds, policy = collector_pki(tmp, f'modes: [full], '
                                                  f'uploads: ["s3://{BUCKET}/*"]')
        comm = build_target("growmem", tmp).name[:15]
        for n in args.hosts:
            t0 = time.monotonic()
            (tmp / f"fleet{n}").mkdir()
            fleet, server, endpoint = start_fleet(tmp / f"fleet{n}", n, args.mib, ca, creds,
                                                  policy)
            print(f"{n} hosts up in {time.monotonic() - t0:.1f} s", file=sys.stderr)
            try:
                s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
                try:
                    s3.create_bucket(Bucket=BUCKET)
                except s3.exceptions.BucketAlreadyOwnedByYou:     # moto's state is global
                    pass
                for r in range(args.repeat):
                    for how in ("pull", "upload"):
                        row = run_once(fleet, tmp / f"fleet{n}", ca, client, s3, endpoint,
                                       comm, how, r)
                        runs.append(row)
                        print(f"  hosts={n} {how} run={r}: rchar {row['rchar'] >> 20} MiB, "
                              f"cpu {row['cpu_seconds']:.2f} s, wall "
                              f"{row['wall_seconds']:.1f} s, load {row['load_avg_1m']:.1f}",
                              file=sys.stderr)
                        shutil.rmtree(tmp / f"fleet{n}" / f"out-{n}-{r}", ignore_errors=True)
                    clear_bucket(s3)
            finally:
                server.stop()  # type: ignore[attr-defined]
                fleet.close()
    summary = summarise(runs, args.hosts)
    print(f"\n{'hosts':>5} {'how':>6} {'cores MiB':>9} {'rchar MiB':>9} {'wchar MiB':>9} "
          f"{'cpu s':>6} {'wall s':>6} {'load':>5}")
    for row in summary:
        print(f"{row['hosts']:>5} {row['how']:>6} {row['core_mib']:>9.0f} "
              f"{row['rchar_mib']:>9.1f} {row['wchar_mib']:>9.1f} {row['cpu_seconds']:>6.2f} "
              f"{row['wall_seconds']:>6.1f} {row['load_avg_1m']:>5.1f}")
    doc = {"machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                       "python": platform.python_version()},
           "setup": {"mib_per_target": args.mib, "targets_per_host": 1, "target": "growmem",
                     "concurrency": 8, "per_host": 2, "s3": "moto server mode, in-process",
                     "hosts_are": "network + pid + mount + UTS namespaces, one agent each "
                     "(mutual TLS on the host's own 10.x address)",
                     "measured": "the collector process: rchar/wchar of /proc/PID/io and "
                     "rusage at its exit; medians of the runs"},
           "summary": summary, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


def clear_bucket(s3) -> None:
    """Moto keeps objects in memory: drop the run's cores."""
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for obj in page.get("Contents", []):
            s3.delete_object(Bucket=BUCKET, Key=obj["Key"])


def summarise(runs: list[dict], hosts: list[int]) -> list[dict]:
    out = []
    for n in hosts:
        for how in ("pull", "upload"):
            rs = [r for r in runs if r["hosts"] == n and r["how"] == how]
            med = {k: statistics.median(r[k] for r in rs)
                   for k in ("rchar", "wchar", "cpu_seconds", "wall_seconds", "load_avg_1m",
                             "core_bytes")}
            out.append({"hosts": n, "how": how, "runs": len(rs),
                        "core_mib": med["core_bytes"] / 2**20, "rchar_mib": med["rchar"] / 2**20,
                        "wchar_mib": med["wchar"] / 2**20, "cpu_seconds": med["cpu_seconds"],
                        "wall_seconds": med["wall_seconds"], "load_avg_1m": med["load_avg_1m"]})
    return out


if __name__ == "__main__":
    sys.exit(main())
