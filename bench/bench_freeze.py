"""Freeze and thaw of a many-threaded target, and where the freeze's time goes.

    sudo python bench/bench_freeze.py [--threads 200] [--reps 9] [--phases] [--json FILE]

Needs root and gcc.  Builds the ``bigmem`` test target with --threads idle
threads (plus its main, heartbeat and signal threads), then --reps times runs
the agent's ``Freezer`` in this process: ``freeze()`` (thread states read,
every thread seized, interrupted and waited for, register sets read) and
``thaw()`` (every thread detached, the tracer thread gone), and reads the
target's longest heartbeat gap.  Prints medians and minimums.

``--phases`` also wraps the freezer's /proc and ptrace calls with timers
(which adds a little overhead of its own) and prints the time each kind of
call took in the median run.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "client"), str(ROOT / "server")]

from corepeek_agent import freezer, procfs, ptrace_ops  # noqa: E402
from corepeek_agent.session import choose_arch  # noqa: E402
from harness.targets import Target, build_target  # noqa: E402

PHASES = ((procfs, ("thread_state", "task_ids")),
          (ptrace_ops, ("seize", "interrupt", "wait_nohang", "getregset", "detach")))


def _timed(acc: dict[str, list[float]], name: str, fn: Callable[..., object]) -> Callable[..., object]:
    @functools.wraps(fn)
    def wrapper(*a: object, **k: object) -> object:
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            acc[name][-1] += time.perf_counter() - t
    return wrapper


def freeze_once(target: Target) -> dict:
    """One ``freeze()`` + ``thaw()`` of ``target`` in this process, and the
    target's longest heartbeat gap around it (also bench/run.py's table)."""
    target.command("resetgap")
    f = freezer.Freezer(target.pid, choose_arch=choose_arch, thread_timeout=0.5, max_freeze=30)
    t0 = time.perf_counter()
    res = f.freeze()
    t1 = time.perf_counter()
    f.thaw()
    t2 = time.perf_counter()
    time.sleep(0.05)                             # a few heartbeats after the thaw
    return {"freeze_s": res.freeze_seconds, "freeze_call_s": t1 - t0, "thaw_s": t2 - t1,
            "total_s": t2 - t0, "gap_s": int(target.status()["maxgap_us"]) / 1e6,
            "threads": len(res.threads),
            "threads_frozen": sum(1 for x in res.threads if x.stopped)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=200)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--phases", action="store_true")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_freeze.py needs root (ptrace of another user's process)", file=sys.stderr)
        return 2
    acc: dict[str, list[float]] = {}
    if args.phases:
        for mod, names in PHASES:
            for name in names:
                acc[name] = []
                setattr(mod, name, _timed(acc, name, getattr(mod, name)))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        exe = build_target("bigmem", Path(tmp))
        with Target(exe, ["-m", "64", "-t", str(args.threads)]) as t:
            for _ in range(args.reps):
                for v in acc.values():
                    v.append(0.0)
                runs.append(freeze_once(t))
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    low = {k: min(r[k] for r in runs) for k in runs[0]}
    print(f"{med['threads']:.0f} threads, {len(runs)} runs, load {os.getloadavg()[0]:.1f}")
    print("| | median | min |\n|---|---:|---:|")
    for key, label in (("freeze_call_s", "freeze() (states, seize, wait, registers)"),
                       ("freeze_s", "of which from the first seize (freeze_micros)"),
                       ("thaw_s", "thaw() (detach, tracer thread gone)"),
                       ("total_s", "freeze() + thaw()"),
                       ("gap_s", "target's longest heartbeat gap")):
        print(f"| {label} | {med[key] * 1000:.1f} ms | {low[key] * 1000:.1f} ms |")
    if acc:
        print("\n| call (all threads, one run) | median ms |\n|---|---:|")
        for name, v in acc.items():
            print(f"| {name} | {statistics.median(v) * 1000:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "phases": acc}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
