"""What does watching processes cost the agent?  The trigger sampler and
evaluator (server/corepeek_agent/triggers/) over N extra processes.

    sudo python bench/bench_triggers.py [--procs 0,1000,2000] [--sweeps 20] [--json FILE]

For each N, N ``sleep`` processes are started; then the agent's own code runs
``--sweeps`` sweeps (sample /proc, evaluate) in this process and the thread
CPU time of each sweep is measured.  Three trigger sets, from cheap to dear:

* ``stat``: comm glob + RSS threshold (one /proc/PID/stat read per process);
* ``exe+fds``: + exe glob and an fd-count condition (readlink + listdir each);
* ``cpu``: comm glob + CPU window (stat, plus the window state).

Every process on the host is read whatever N is (the selectors match only
after /proc/PID/stat is parsed); the cost per 1,000 processes is the slope
between the N points.  At the default interval of 1 s the agent's CPU use
is that cost per second.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
import benchlib as bl  # noqa: E402

bl.use_this_checkout()

from corepeek_agent import procfs  # noqa: E402
from corepeek_agent.triggers import sampler  # noqa: E402
from corepeek_agent.triggers.evaluate import Evaluator  # noqa: E402
from corepeek_agent.triggers.spec import Selector, Trigger, TriggerSpec, validate  # noqa: E402

SETS = {
    "stat": [TriggerSpec(Selector(comm=("sleep*",)), rss_above=1 << 40)],
    "exe+fds": [TriggerSpec(Selector(comm=("sleep*",), exe=("*sleep*",)), fds_above=10_000)],
    "cpu": [TriggerSpec(Selector(comm=("sleep*",)), cpu_above=99, cpu_for=60)],
}


def measure(specs: list[TriggerSpec], sweeps: int) -> dict[str, float]:
    triggers = [Trigger(f"b{i}", validate(s), ("bench",), "config") for i, s in enumerate(specs)]
    ev = Evaluator(procfs.CLK_TCK)
    cpu: list[float] = []
    seen = 0
    for _ in range(sweeps):
        t0 = time.thread_time()
        samples = sampler.sample(triggers)
        ev.sweep(triggers, samples, time.monotonic())
        cpu.append(time.thread_time() - t0)
        seen = len(samples)
    return {"sweep_cpu_s": bl.median(cpu), "matched": seen, "processes": len(procfs.pids())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", default="0,1000,2000")
    ap.add_argument("--sweeps", type=int, default=20)
    ap.add_argument("--json", type=Path,
                    default=HERE / "results" / f"triggers-{time.strftime('%Y%m%dT%H%M%S')}.json")
    args = ap.parse_args()
    rows = []
    for n in (int(x) for x in args.procs.split(",")):
        procs = [subprocess.Popen(["sleep", "600"]) for _ in range(n)]
        try:
            time.sleep(0.5)
            for name, specs in SETS.items():
                r = measure(specs, args.sweeps)
                rows.append({"extra": n, "set": name, **r})
                print(f"{n:>5} extra {r['processes']:>5} processes  {name:<8} "
                      f"{r['sweep_cpu_s'] * 1000:7.2f} ms CPU per sweep ({r['matched']} matched)")
        finally:
            for p in procs:
                p.kill()
            for p in procs:
                p.wait()
    per_k = {}
    for name in SETS:
        pts = [(float(r["processes"]), r["sweep_cpu_s"]) for r in rows if r["set"] == name]
        if len(pts) >= 2:
            per_k[name] = bl.fit_line(pts)[1] * 1000
            print(f"{name:<8}: {per_k[name] * 1000:.2f} ms CPU per sweep per 1,000 processes "
                  f"({per_k[name] * 100:.2f}% of a CPU at a 1 s interval)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows, "per_1000_s": per_k,
                                     "host_cpus": os.cpu_count()}, indent=2))
    print(f"results: {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
