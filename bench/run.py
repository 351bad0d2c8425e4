"""corepeek vs gdb gcore, side by side on the same targets in the same run.

    python bench/run.py [--quick] [--sizes 256,1024,4096] [--reps 3]
                        [--transport unix|tcp] [--json FILE]
                        [--gcore-sparse capped|proxy|full] [--configs A,B,...]

Needs root, gcc and gdb.  Starts one agent (``python -m corepeek agent`` as a
subprocess, on a Unix socket or loopback TCP with --insecure) and, for each
case, the ``bigmem`` test target; then, ``--reps`` times, alternating which
goes first, captures the target through the agent (this process is the
client and writes the file: ``open_capture`` + ``write_full_core``) and with
``gdb -batch -p PID -ex 'gcore FILE'``.  Cases:

* ``dense-<N>M``  N MiB touched (--sizes), 2 idle threads
* ``sparse``      64 GiB reserved (MAP_NORESERVE), 100 MiB touched spread
                  evenly over it (one page in 655)
* ``threads``     200 idle threads, 64 MiB touched

Columns (medians over the reps): wall time from ``open`` until the file is
written and the capture closed (gcore: the gdb command); the target's
longest heartbeat gap (how long it was frozen); payload bytes on the wire;
bytes allocated on disk (st_blocks); agent CPU seconds and peak RSS during
the capture (from /proc/AGENT/stat and VmHWM, reset before each capture
through /proc/AGENT/clear_refs); gdb's CPU and peak RSS (wait4 rusage).

gcore on the sparse target reads and writes all 64 GiB (about two minutes
and ~69 GB of disk), so by default it is not run to the end: gdb runs on the
real target for --gcore-cap seconds (15), the core file's growth over the
second half of that gives its write rate, and the time for the whole core is
extrapolated from it (``--gcore-sparse capped``).  ``proxy`` (the --quick
default) measures gcore on the same 100 MiB spread over smaller reservations
(--sparse-proxy) and extrapolates linearly -- optimistic, because small
cores stay in the page cache; ``full`` runs it for real.  The table marks
these rows "gcore ESTIMATE".

--configs measures several client/agent configurations side by side on the
same targets (A/B runs, see benchlib.parse_config and bench/agent_main.py).

A freeze/thaw table follows for the 200-thread target: the agent's own stop
time (``layout.freeze_micros``), the client's ``close()`` (thaw and stream
end), the target's heartbeat gap for an open+close NOTES capture, and the
freezer run in this process (``Freezer.freeze()`` then ``thaw()``, which
joins the tracer thread after its PTRACE_DETACHes).

Every run is written to --json (default bench/results/run-<time>.json) so
commits can be compared.  Core files go to --workdir (default /var/tmp) and
are deleted right after they are measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
import benchlib as bl  # noqa: E402

bl.use_this_checkout()      # this checkout's code, in the agent and client subprocesses too

import grpc  # noqa: E402

import corepeek  # noqa: E402
import corepeek_agent  # noqa: E402
from harness.agents import stop_process, wait_healthy  # noqa: E402
from harness.targets import Target, build_target  # noqa: E402

MIB = bl.MIB
GIB = 1024 * MIB
CLK = os.sysconf("SC_CLK_TCK")
SPARSE_RESERVE_MIB = 65536
SPARSE_TOUCH_MIB = 100


# -- agent -------------------------------------------------------------------------


class Agent:
    """The agent subprocess, its address and its /proc counters."""

    def __init__(self, workdir: Path, transport: str, variants: list[str],
                 max_freeze: float) -> None:
        workdir.mkdir(exist_ok=True)
        self.log_path = workdir / "agent.log"
        if transport == "unix":
            self.address = f"unix:{workdir / 'agent.sock'}"
            listen = [self.address]
        else:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            self.address = f"127.0.0.1:{port}"
            listen = [self.address, "--insecure"]
        argv = [sys.executable, str(HERE / "agent_main.py")]
        for v in variants:
            argv += ["--variant", v]
        argv += ["--", "agent", "--listen", *listen, "--max-freeze", str(max_freeze),
                 "--audit-log", str(workdir / "audit.log"), "--sessions-per-minute", "100000"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        self._wait_healthy()

    def _wait_healthy(self, timeout: float = 30.0) -> None:
        wait_healthy(self.address, self.proc, self.log_path, timeout=timeout)

    def cpu(self) -> float:
        return bl.proc_cpu_seconds(Path(f"/proc/{self.proc.pid}/stat").read_text(), CLK)

    def status(self, field: str) -> int | None:
        return bl.proc_status_bytes(Path(f"/proc/{self.proc.pid}/status").read_text(), field)

    def reset_peak(self) -> None:
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")   # VmHWM := VmRSS

    def stop(self) -> None:
        stop_process(self.proc, timeout=15)


# -- one capture each way ----------------------------------------------------------------


def disk_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def capture_agent(agent: Agent, target: Target, out: Path, cfg: dict,
                  mode: str = "full") -> dict:
    """One capture by a fresh client process (bench/client_main.py) into out."""
    argv = [sys.executable, str(HERE / "client_main.py"), "--agent", agent.address,
            "--pid", str(target.pid), "--out", str(out), "--chunk-bytes", str(cfg["chunk_bytes"]),
            "--mode", mode]
    argv += [] if cfg["mallopt"] else ["--no-mallopt"]
    argv += {True: ["--writer-thread"], False: ["--no-writer-thread"]}.get(cfg.get("writer"), [])
    argv += ["--write-piece", str(cfg["write_piece"])] if cfg.get("write_piece") else []
    argv += ["--legacy"] if cfg.get("legacy") else []
    argv += ["--no-direct"] if cfg.get("no_direct") or cfg.get("legacy") else []
    argv += ["--no-spill"] if cfg.get("no_spill") else []
    for o in cfg["options"]:
        argv += ["--option", o]
    target.command("resetgap")
    agent.reset_peak()
    rss0 = agent.status("VmRSS")
    cpu0 = agent.cpu()
    res = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    cpu1 = agent.cpu()
    if res.returncode != 0:
        out.unlink(missing_ok=True)
        raise RuntimeError(f"client failed ({res.returncode}): {res.stderr[-3000:]}")
    run = json.loads(res.stdout)
    run.update({
        "gap_s": int(target.status()["maxgap_us"]) / 1e6,
        "agent_cpu_s": cpu1 - cpu0, "agent_peak_rss": agent.status("VmHWM"),
        "agent_rss_before": rss0,
    })
    if mode == "full":
        run.update({"core_bytes": os.stat(out).st_size, "disk_bytes": disk_bytes(out)})
        out.unlink()
    return run


def capture_gcore(target: Target, out: Path, timeout: float) -> dict:
    target.command("resetgap")
    argv = ["gdb", "-batch", "-nx", "-iex", "set debuginfod enabled off",
            "-p", str(target.pid), "-ex", f"gcore {out}"]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = t0 + timeout
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            pid, status, ru = os.wait4(proc.pid, 0)
            break
        time.sleep(0.002)
    t1 = time.monotonic()
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0 or not out.exists():
        out.unlink(missing_ok=True)
        raise RuntimeError(f"gcore failed ({proc.returncode}): {err[-2000:]}")
    run = {
        "wall_s": t1 - t0, "gap_s": int(target.status()["maxgap_us"]) / 1e6,
        "core_bytes": os.stat(out).st_size, "disk_bytes": disk_bytes(out),
        "gdb_cpu_s": ru.ru_utime + ru.ru_stime, "gdb_peak_rss": ru.ru_maxrss * 1024,
    }
    out.unlink()
    return run


# -- cases ---------------------------------------------------------------------------------


def free_disk(path: Path) -> int:
    return shutil.disk_usage(path).free


def available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def run_case(name: str, args: list[str], *, exe: Path, agents: dict, configs: list[dict],
             workdir: Path, reps: int, gcore: bool, need_bytes: int,
             log: Callable[[str], None]) -> dict:
    """reps x (every configuration through its agent, and gcore), alternating the order."""
    result: dict = {"name": name, "target_args": args, "configs": {}, "gcore": []}
    if available_memory() < need_bytes + 2 * GIB or free_disk(workdir) < need_bytes + GIB:
        log(f"{name}: skipped (not enough free memory or disk for {bl.fmt_bytes(need_bytes)})")
        result["skipped"] = "not enough free memory or disk"
        return result
    slug = "".join(ch if ch.isalnum() else "_" for ch in name)
    runs: dict[str, list[dict]] = {c["name"]: [] for c in configs}
    with Target(exe, args, ready_timeout=300) as target:
        for rep in range(reps):
            order: list[dict | None] = [*configs, None] if gcore else [*configs]
            if rep % 2:
                order.reverse()
            for cfg in order:
                if cfg is None:
                    r = capture_gcore(target, workdir / f"{slug}.gcore.core", timeout=1800)
                    result["gcore"].append(r)
                    who = "gcore"
                else:
                    r = capture_agent(agents[cfg["variants"]], target,
                                      workdir / f"{slug}.agent.core", cfg)
                    runs[cfg["name"]].append(r)
                    who = f"corepeek[{cfg['name']}]" if len(configs) > 1 else "corepeek"
                log(f"{name} rep {rep + 1}/{reps} {who}: wall {bl.fmt_seconds(r['wall_s'])} "
                    f"gap {bl.fmt_seconds(r['gap_s'])} disk {bl.fmt_bytes(r['disk_bytes'])}")
    for cfg in configs:
        result["configs"][cfg["name"]] = {"runs": runs[cfg["name"]],
                                          "median": bl.medians(runs[cfg["name"]])}
    result["gcore_median"] = bl.medians(result["gcore"]) if result["gcore"] else {}
    return result


def gcore_capped(target: Target, out: Path, cap_s: float, total_bytes: int,
                 log: Callable[[str], None]) -> dict:
    """gcore on the real target, stopped after cap_s: its write rate, extrapolated.

    The file's size is sampled as gdb writes it; the rate over the second half
    of the run (after the page cache stopped absorbing the writes as fast)
    predicts the rest.  gdb is then killed: the kernel detaches its tracees,
    and a target left stopped gets SIGCONT.
    """
    argv = ["gdb", "-batch", "-nx", "-iex", "set debuginfod enabled off",
            "-p", str(target.pid), "-ex", f"gcore {out}"]
    target.command("resetgap")
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples: list[tuple[float, int]] = []
    finished = None
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        now = time.monotonic() - t0
        if pid:
            finished = (now, status, ru)
            break
        try:
            samples.append((now, os.stat(out).st_size))
        except FileNotFoundError:
            pass
        if now >= cap_s:
            proc.kill()
            _, status, ru = os.wait4(proc.pid, 0)
            break
        time.sleep(0.25)
    proc.returncode = 0
    written = os.stat(out).st_size if out.exists() else 0
    blocks = disk_bytes(out) if out.exists() else 0
    out.unlink(missing_ok=True)
    time.sleep(0.05)
    stopped = [t for t, st in target.thread_states().items() if st == "T"]
    if stopped:
        log(f"gcore killed: threads {stopped[:5]}... left stopped; sending SIGCONT")
        target.send_signal(signal.SIGCONT)
    gap = int(target.status()["maxgap_us"]) / 1e6
    cpu = ru.ru_utime + ru.ru_stime
    if finished is not None:
        return {"capped": False, "wall_s": finished[0], "gap_s": gap, "core_bytes": written,
                "disk_bytes": blocks, "gdb_cpu_s": cpu, "gdb_peak_rss": ru.ru_maxrss * 1024}
    half = [(t, n) for t, n in samples if t >= cap_s / 2] or samples[-2:]
    (ta, na), (tb, nb) = half[0], samples[-1]
    rate = (nb - na) / (tb - ta) if tb > ta and nb > na else written / cap_s
    elapsed = samples[-1][0]
    est = elapsed + max(0, total_bytes - nb) / rate
    return {"capped": True, "cap_s": cap_s, "bytes_at_cap": written, "rate_Bps": rate,
            "wall_s": est, "gap_s": est, "core_bytes": total_bytes,
            "disk_bytes": total_bytes * (blocks / written if written else 1.0),
            "gdb_cpu_s": cpu * est / elapsed, "gdb_peak_rss": ru.ru_maxrss * 1024,
            "measured_gap_s": gap}


def sparse_gcore_proxy(exe: Path, workdir: Path, reserves: list[int], reps: int,
                       log: Callable[[str], None]) -> dict:
    """gcore on 100 MiB spread over smaller reservations, extrapolated to 64 GiB."""
    points: dict[int, list[dict]] = {}
    for reserve in reserves:
        args = ["-m", str(SPARSE_TOUCH_MIB), "-r", str(reserve), "-s", "-t", "2"]
        with Target(exe, args, ready_timeout=300) as target:
            for rep in range(reps):
                r = capture_gcore(target, workdir / "proxy.gcore.core", timeout=1800)
                points.setdefault(reserve, []).append(r)
                log(f"sparse gcore proxy {reserve} MiB rep {rep + 1}/{reps}: "
                    f"wall {bl.fmt_seconds(r['wall_s'])} disk {bl.fmt_bytes(r['disk_bytes'])}")
    med = {res: bl.medians(runs) for res, runs in points.items()}
    est: dict = {"extrapolated_from_reserve_mib": reserves}
    for key in ("wall_s", "gap_s", "core_bytes", "disk_bytes", "gdb_cpu_s", "gdb_peak_rss"):
        pts = [(float(res), float(m[key])) for res, m in med.items() if m.get(key) is not None]
        if len(pts) >= 2:
            est[key] = bl.extrapolate(pts, SPARSE_RESERVE_MIB)
    return {"proxy_runs": {str(k): v for k, v in points.items()}, "estimate": est}


def freeze_thaw(exe: Path, agent: Agent, threads: int, reps: int,
                log: Callable[[str], None]) -> dict:
    """Freeze and thaw of a many-thread target: through the agent and in process."""
    from bench_freeze import freeze_once

    out: dict = {"threads": threads, "agent": [], "in_process": []}
    with Target(exe, ["-m", "16", "-t", str(threads)], ready_timeout=120) as target:
        for _ in range(reps):
            out["agent"].append(capture_agent(agent, target, Path("/dev/null"),
                                              bl.parse_config("base"), mode="notes"))
            time.sleep(0.05)
        for _ in range(reps):
            out["in_process"].append(freeze_once(target))
    out["agent_median"] = bl.medians(out["agent"])
    out["in_process_median"] = bl.medians(out["in_process"])
    a, p = out["agent_median"], out["in_process_median"]
    log(f"freeze/thaw {threads} threads: agent freeze {bl.fmt_seconds(a['freeze_s'])}, "
        f"in-process freeze {bl.fmt_seconds(p['freeze_s'])} thaw {bl.fmt_seconds(p['thaw_s'])}")
    return out


# -- report -----------------------------------------------------------------------------------


def table(cases: list[dict]) -> str:
    headers = ["case", "who", "wall", "vs gcore", "frozen (gap)", "wire", "disk",
               "CPU", "client CPU", "peak RSS"]
    rows: list[list[str]] = []
    for c in cases:
        if c.get("skipped"):
            rows.append([c["name"], "skipped: " + c["skipped"], *["-"] * 8])
            continue
        g = c.get("gcore_median") or {}
        est = c.get("gcore_estimate") or {}
        ref = g.get("wall_s") or est.get("wall_s")
        for i, (cname, cres) in enumerate(c["configs"].items()):
            a = cres["median"]
            who = "corepeek" if len(c["configs"]) == 1 else f"corepeek {cname}"
            rows.append([c["name"] if i == 0 else "", who, bl.fmt_seconds(a.get("wall_s")),
                         bl.fmt_ratio(a.get("wall_s"), ref), bl.fmt_seconds(a.get("gap_s")),
                         bl.fmt_bytes(a.get("wire_bytes")), bl.fmt_bytes(a.get("disk_bytes")),
                         bl.fmt_seconds(a.get("agent_cpu_s")),
                         bl.fmt_seconds(a.get("client_cpu_s")),
                         bl.fmt_bytes(a.get("agent_peak_rss"))])
        if g:
            rows.append(["", "gcore", bl.fmt_seconds(g["wall_s"]), "1.00",
                         bl.fmt_seconds(g["gap_s"]), "-", bl.fmt_bytes(g["disk_bytes"]),
                         bl.fmt_seconds(g["gdb_cpu_s"]), "-", bl.fmt_bytes(g["gdb_peak_rss"])])
        elif est:
            src = est.get("extrapolated_from") or "the same 100MiB in " + " and ".join(
                bl.fmt_bytes(r * MIB) for r in est["extrapolated_from_reserve_mib"])
            rows.append(["", f"gcore ESTIMATE from {src}",
                         "~" + bl.fmt_seconds(est.get("wall_s")), "1.00",
                         "~" + bl.fmt_seconds(est.get("gap_s")), "-",
                         "~" + bl.fmt_bytes(est.get("disk_bytes")),
                         "~" + bl.fmt_seconds(est.get("gdb_cpu_s")), "-",
                         bl.fmt_bytes(est.get("gdb_peak_rss"))])
    return bl.format_table(headers, rows)


def freeze_table(ft: dict) -> str:
    a, p = ft["agent_median"], ft["in_process_median"]
    headers = [f"{ft['threads']}-thread target", "freeze", "thaw", "freeze+thaw",
               "target gap"]
    rows = [
        ["agent: NOTES capture, open then close", bl.fmt_seconds(a["freeze_s"]),
         bl.fmt_seconds(a["close_s"]) + " (client close)", "-", bl.fmt_seconds(a["gap_s"])],
        ["Freezer in process", bl.fmt_seconds(p["freeze_s"]), bl.fmt_seconds(p["thaw_s"]),
         bl.fmt_seconds(p["total_s"]), bl.fmt_seconds(p["gap_s"])],
    ]
    return bl.format_table(headers, rows)


def git_state() -> dict:
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True,
                                  text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "-uno"))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="256 MiB and 1 GiB dense, 2 reps, sparse gcore proxy at 1+2 GiB")
    p.add_argument("--sizes", default=None, help="dense sizes in MiB (default 256,1024,4096)")
    p.add_argument("--reps", type=int, default=None, help="runs per case and tool (default 3)")
    p.add_argument("--threads", type=int, default=200, help="threads of the thread case")
    p.add_argument("--cases", default="dense,sparse,threads,freeze",
                   help="which of dense,sparse,threads,freeze to run")
    p.add_argument("--transport", choices=("unix", "tcp"), default="unix")
    p.add_argument("--configs", default="base",
                   help="comma-separated client/agent configurations measured side by side, "
                        "each item+item: base, chunk=3M, variant=NAME (bench/agent_main.py), "
                        "client-no-mallopt, no-writer, opt:GRPC_CHANNEL_OPTION=VALUE")
    p.add_argument("--no-gcore", action="store_true", help="skip gcore entirely")
    p.add_argument("--gcore-sparse", choices=("capped", "proxy", "full"), default=None,
                   help="gcore on the 64 GiB sparse target: capped (default: the real run "
                        "stopped after --gcore-cap seconds, its write rate extrapolated), "
                        "proxy (smaller reservations, --sparse-proxy, extrapolated; the "
                        "--quick default), full (minutes, ~69 GB of disk)")
    p.add_argument("--gcore-cap", type=float, default=15.0,
                   help="seconds the capped sparse gcore runs (default 15)")
    p.add_argument("--sparse-proxy", default=None,
                   help="reservations (MiB) gcore is measured on to extrapolate the sparse "
                        "case (default 2048,4096; --quick 1024,2048)")
    p.add_argument("--workdir", default="/var/tmp", help="where core files are written")
    p.add_argument("--json", default=None, help="write all runs here")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/run.py needs root (ptrace of other processes)", file=sys.stderr)
        return 2
    sizes = [int(s) for s in (args.sizes or ("256,1024" if args.quick else "256,1024,4096"))
             .split(",") if s]
    reps = args.reps or (2 if args.quick else 3)
    proxy = [int(s) for s in (args.sparse_proxy or ("1024,2048" if args.quick else "2048,4096"))
             .split(",")]
    cases = set(args.cases.split(","))
    args.gcore_sparse = args.gcore_sparse or ("proxy" if args.quick else "capped")
    configs = [bl.parse_config(c) for c in args.configs.split(",")]
    json_path = Path(args.json) if args.json else (
        HERE / "results" / f"run-{datetime.datetime.now():%Y%m%d-%H%M%S}.json")

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    base = Path(args.workdir)
    work = Path(tempfile.mkdtemp(prefix="corepeek-bench-", dir=base))
    meta = {
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "argv": sys.argv, "host": platform.node(), "kernel": platform.release(),
        "cpus": os.cpu_count(), "mem_total": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"),
        "python": platform.python_version(), "grpc": grpc.__version__, "git": git_state(),
        "code": {m.__name__: m.__file__ for m in (corepeek, corepeek_agent)},
        "transport": args.transport, "configs": configs, "reps": reps,
        "loadavg_start": os.getloadavg(),
    }
    results: dict = {"meta": meta, "cases": []}
    agents: dict[tuple[str, ...], Agent] = {}
    try:
        exe = build_target("bigmem", work)
        for cfg in configs:
            if cfg["variants"] not in agents:
                sub = work / f"agent{len(agents)}"
                agents[cfg["variants"]] = a = Agent(sub, args.transport, list(cfg["variants"]),
                                                    max_freeze=3600)
                log(f"agent {'+'.join(cfg['variants']) or 'default'}: pid {a.proc.pid} "
                    f"on {a.address}")
        agent = agents[configs[0]["variants"]]
        common = dict(exe=exe, agents=agents, configs=configs, workdir=work, reps=reps, log=log)
        if "dense" in cases:
            for mib in sizes:
                results["cases"].append(run_case(
                    f"dense {bl.fmt_bytes(mib * MIB)}", ["-m", str(mib), "-t", "2"],
                    gcore=not args.no_gcore, need_bytes=2 * mib * MIB, **common))
        if "sparse" in cases:
            mode = "none" if args.no_gcore else args.gcore_sparse
            if mode == "full" and free_disk(work) < 80 * GIB:
                log("--gcore-sparse full needs ~69 GB of free disk in the workdir; capping")
                mode = "capped"
            if mode == "capped" and free_disk(work) < 40 * GIB:
                log("--gcore-sparse capped needs ~40 GB of free disk in the workdir; proxy")
                mode = "proxy"
            sparse_args = ["-m", str(SPARSE_TOUCH_MIB), "-r", str(SPARSE_RESERVE_MIB), "-s",
                           "-t", "2"]
            c = run_case("sparse 64G/100M", sparse_args, gcore=(mode == "full"),
                         need_bytes=(70 * GIB if mode == "full" else SPARSE_TOUCH_MIB * MIB),
                         **common)
            if not c.get("skipped") and mode == "proxy":
                proxy_res = sparse_gcore_proxy(exe, work, proxy, reps, log)
                c["gcore_proxy"] = proxy_res["proxy_runs"]
                c["gcore_estimate"] = proxy_res["estimate"]
            elif not c.get("skipped") and mode == "capped":
                total = int(c["configs"][configs[0]["name"]]["median"]["core_size"])
                with Target(exe, sparse_args, ready_timeout=300) as target:
                    est = gcore_capped(target, work / "sparse.gcore.core", args.gcore_cap,
                                       total, log)
                log(f"sparse gcore capped at {args.gcore_cap:.0f}s: "
                    f"{bl.fmt_bytes(est.get('bytes_at_cap'))} written, "
                    f"~{bl.fmt_bytes(est.get('rate_Bps'))}/s -> ~{bl.fmt_seconds(est['wall_s'])}")
                if est.get("capped"):
                    est["extrapolated_from"] = (f"{args.gcore_cap:.0f}s of the real run, "
                                                f"{bl.fmt_bytes(est['bytes_at_cap'])} written")
                    c["gcore_estimate"] = est
                else:
                    c["gcore"] = [est]
                    c["gcore_median"] = bl.medians([est])
            results["cases"].append(c)
        if "threads" in cases:
            results["cases"].append(run_case(
                f"{args.threads} threads", ["-m", "64", "-t", str(args.threads)],
                gcore=not args.no_gcore, need_bytes=128 * MIB, **common))
        if "freeze" in cases:
            results["freeze_thaw"] = freeze_thaw(exe, agent, args.threads, max(reps, 5), log)
    finally:
        for a in agents.values():
            a.stop()
        meta["loadavg_end"] = os.getloadavg()
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=1))
        shutil.rmtree(work, ignore_errors=True)
    print(f"\ncorepeek {args.transport} vs gdb gcore; medians of {reps} runs; "
          f"load average {meta['loadavg_start'][0]:.1f} -> {meta['loadavg_end'][0]:.1f}; "
          f"{meta['cpus']} CPUs; kernel {meta['kernel']}")
    print(table(results["cases"]))
    if results.get("freeze_thaw"):
        print()
        print(freeze_table(results["freeze_thaw"]))
    print(f"\nall runs: {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
