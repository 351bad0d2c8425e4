"""Default (snapshot) vs live vs gdb gcore vs a bare fork: how long the target is stopped.

    python bench/bench_snapshot.py [--sizes 1,4] [--threads 200] [--repeat 3]
                                   [--no-gcore] [--fds 0,19000] [--json FILE]

Needs root.  Standalone: builds the ``bigmem`` test target (SIZE GiB written
with 4 KiB pages, a 1 ms heartbeat thread; and a 64 MiB one with ``--threads``
idle threads) and starts its own agent (a subprocess on a Unix socket).  For
each target and method, ``--repeat`` times:

* default: ``open_capture`` with no freeze option (the agent's default, a
  snapshot), pull the whole core (discarded), close;
* live: the same with ``snapshot=False``: the target is frozen throughout;
* gcore: ``gdb -batch -p PID -ex "gcore FILE"`` (file deleted afterwards);
* fork: the target forks once (command ``fork``; the child exits at once) and
  times the ``fork()`` call itself: the page-table copy, the floor of the
  snapshot's ``clone()``.  Only the forking thread waits (the heartbeat runs on),
  so its figure is ``fork ms``, not the heartbeat gap.

The target's longest heartbeat gap (``maxgap``) is the time it was kept from
running.  Also printed: the wall time of the whole capture, and for snapshot
captures the agent's own split (from its log): stop, total frozen, clone().

``--fds`` then compares the two fd-table choices in-process (CaptureSession,
agent-internal option): CLONE_FILES (shared table) vs a copied table closed
with close_range() in the clone, for a ``snapshot_probe`` target holding that
many extra descriptors.

Prints tables of medians; ``--json`` also writes every run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from corepeek.remote import RemoteCore, open_capture  # noqa: E402
from harness.agents import AgentProcess, start_agent, stop_agent  # noqa: E402
from harness.targets import Target, build_target  # noqa: E402

READ = 64 * 1024 * 1024
_LOG_SNAP = re.compile(r"pid (\d+): snapshot clone \d+ made; target frozen ([\d.]+) ms "
                       r"\(clone\(\) ([\d.]+) ms\)")


def pull(core: RemoteCore) -> int:
    """Read the whole core and throw it away; returns payload bytes."""
    got = 0
    for off in range(0, core.size, READ):
        for piece in core.read_range(off, min(READ, core.size - off)):
            got += piece.length
    return got


def one_capture(agent: AgentProcess, t: Target, method: str, tmp: Path) -> dict[str, float]:
    t.command("resetgap")
    t0 = time.monotonic()
    row: dict[str, float] = {}
    if method == "fork":
        row["fork_ms"] = int(t.command("fork")["fork_us"]) / 1000
    elif method == "gcore":
        out = tmp / "gcore.core"
        subprocess.run(["gdb", "-batch", "-nx", "-p", str(t.pid), "-ex", f"gcore {out}"],
                       check=True, capture_output=True, timeout=600)
        out.unlink(missing_ok=True)
    else:
        log_before = len(agent.log())
        kw = {"snapshot": False} if method == "live" else {}
        with open_capture(agent.address, t.pid, **kw) as core:
            if method == "default" and not core.layout.snapshot:
                raise RuntimeError(core.layout.snapshot_status)
            row["stop_ms"] = core.layout.freeze_micros / 1000
            pull(core)
        if method == "default":
            for m in _LOG_SNAP.finditer(agent.log()[log_before:]):
                if int(m.group(1)) == t.pid:
                    row["frozen_ms"], row["clone_ms"] = float(m.group(2)), float(m.group(3))
    row["wall_ms"] = (time.monotonic() - t0) * 1000
    time.sleep(0.05)
    row["maxgap_ms"] = int(t.status()["maxgap_us"]) / 1000
    return row


def med(rows: list[dict[str, float]], key: str) -> str:
    vals = [r[key] for r in rows if key in r]
    return f"{statistics.median(vals):10.1f}" if vals else f"{'-':>10}"


def bench_sizes(args: argparse.Namespace, tmp: Path, agent: AgentProcess) -> list[dict]:
    exe = build_target("bigmem", tmp)
    methods = ["default", "live"] + ([] if args.no_gcore else ["gcore"]) + ["fork"]
    runs: list[dict] = []
    targets = [(f"{gib} GiB", ["-m", str(gib * 1024)]) for gib in args.sizes]
    if args.threads:
        targets.append((f"{args.threads} thr", ["-m", "64", "-t", str(args.threads)]))
    print(f"{'target':>8} {'method':>8} {'maxgap ms':>10} {'fork ms':>10} {'wall ms':>10} "
          f"{'stop ms':>10} {'frozen ms':>10} {'clone ms':>10}   (medians of {args.repeat}, "
          f"load {os.getloadavg()[0]:.1f})")
    for name, targs in targets:
        with Target(exe, targs + ["-H", "1000"], ready_timeout=300) as t:
            for method in methods:
                rows = [one_capture(agent, t, method, tmp) for _ in range(args.repeat)]
                runs += [{"target": name, "method": method, "load": os.getloadavg()[0], **r}
                         for r in rows]
                print(f"{name:>8} {method:>8} {med(rows, 'maxgap_ms')} {med(rows, 'fork_ms')} "
                      f"{med(rows, 'wall_ms')} {med(rows, 'stop_ms')} {med(rows, 'frozen_ms')} "
                      f"{med(rows, 'clone_ms')}   load {os.getloadavg()[0]:.1f}", flush=True)
    return runs


def bench_fds(args: argparse.Namespace, tmp: Path) -> list[dict]:
    from corepeek_agent.session import CaptureSession, SessionOptions

    exe = build_target("snapshot_probe", tmp)
    runs: list[dict] = []
    print(f"\n{'fds':>7} {'fd table':>22} {'maxgap ms':>10} {'frozen ms':>10} {'clone ms':>10}")
    for fds in args.fds:
        with Target(exe, ["-F", str(fds), "-m", "64"], ready_timeout=120) as t:
            for share in (True, False):
                rows = []
                for _ in range(args.repeat):
                    t.command("resetgap")
                    s = CaptureSession(t.pid, options=SessionOptions(
                        snapshot=True, snapshot_share_files=share))
                    s.open()
                    try:
                        assert s.snapshot is not None, s.snapshot_status
                        rows.append({"frozen_ms": s.frozen_seconds * 1000,
                                     "clone_ms": s.snapshot.clone_seconds * 1000})
                    finally:
                        s.close()
                    time.sleep(0.05)
                    rows[-1]["maxgap_ms"] = int(t.status()["maxgap_us"]) / 1000
                name = "CLONE_FILES (shared)" if share else "copied + close_range"
                runs += [{"fds": fds, "share_files": share, **r} for r in rows]
                print(f"{fds:>7} {name:>22} {med(rows, 'maxgap_ms')} {med(rows, 'frozen_ms')} "
                      f"{med(rows, 'clone_ms')}", flush=True)
    return runs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1,4", help="GiB of the bigmem target, comma-separated")
    p.add_argument("--threads", type=int, default=200,
                   help="idle threads of the many-threads target (0: none)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-gcore", action="store_true")
    p.add_argument("--fds", default="0,19000",
                   help="extra descriptors for the fd-table comparison ('' to skip)")
    p.add_argument("--json", help="write every run to this file")
    args = p.parse_args()
    args.sizes = [int(x) for x in args.sizes.split(",") if x]
    args.fds = [int(x) for x in args.fds.split(",") if x]
    if os.geteuid() != 0:
        print("bench_snapshot needs root (ptrace)", file=sys.stderr)
        return 2
    print(f"kernel {os.uname().release}, {os.cpu_count()} CPUs, "
          f"THP {Path('/sys/kernel/mm/transparent_hugepage/enabled').read_text().strip()}, "
          f"load {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="bench-snapshot-") as d:
        tmp = Path(d)
        agent = start_agent(tmp)
        try:
            runs = bench_sizes(args, tmp, agent) if args.sizes else []
        finally:
            stop_agent(agent)
        if args.fds:
            runs += bench_fds(args, tmp)
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
