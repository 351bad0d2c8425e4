"""Full vs stacks vs notes captures of one big target, measured in one run.

    python bench/bench_partial.py [--touch-mib 1024] [--threads 200] [--repeat 3]
                                  [--out bench/results/partial.json]

Starts its own agent (a subprocess on a Unix socket) and the `bigmem` test
target (``--touch-mib`` MiB written, ``--threads`` idle threads, a 1 ms
heartbeat thread), then for each mode, ``--repeat`` times, opens a capture,
writes the core to a temporary file and closes the capture.  Per run:

* bytes: payload bytes received (``core.stats.data_bytes``), hole bytes the
  agent described without sending, and the written file's size on disk;
* wall: from before the channel is opened until the file is written and the
  capture closed;
* freeze: from sending ``open`` to the end of ``close`` as the client sees it
  (an upper bound of the target's freeze), the agent's own stop time
  (``freeze_micros``), and the target's longest heartbeat gap (``maxgap``),
  which is how long the target itself was kept from running.

Prints a table of medians and writes every run to a JSON file.  Needs root.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from corepeek.dump import write_full_core  # noqa: E402
from corepeek.partial import write_partial_core  # noqa: E402
from corepeek.remote import open_capture  # noqa: E402
from harness.agents import stop_process  # noqa: E402
from harness.targets import Target, build_target  # noqa: E402

MODES = ("full", "stacks", "notes")


def start_agent(sock: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "corepeek", "agent", "--listen",
                                 f"unix:{sock}"], stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"agent exited:\n{log.read_text()}")
        try:
            with grpc.insecure_channel(f"unix:{sock}") as ch:
                status = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return proc
        except grpc.RpcError:
            time.sleep(0.1)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"agent not healthy:\n{log.read_text()}")


def one_capture(address: str, target: Target, mode: str, out: Path) -> dict[str, object]:
    target.command("resetgap")
    t0 = time.monotonic()
    core = open_capture(address, target.pid, mode=mode)
    t_open = time.monotonic()
    try:
        if mode == "full":
            write_full_core(core, out)
        else:
            write_partial_core(core, out)
        t_written = time.monotonic()
    finally:
        core.close()
    t_closed = time.monotonic()
    status = target.status()
    st = out.stat()
    lay = core.layout
    return {
        "mode": mode,
        "core_size": lay.total_size,
        "threads": len(lay.threads),
        "data_bytes": core.stats.data_bytes,
        "hole_bytes": core.stats.hole_bytes,
        "requests": core.stats.requests,
        "file_bytes": st.st_size,
        "disk_bytes": st.st_blocks * 512,
        "wall_s": t_closed - t0,
        "open_s": t_open - t0,
        "transfer_s": t_written - t_open,
        "freeze_client_s": t_closed - t0,
        "agent_stop_ms": lay.freeze_micros / 1000,
        "target_maxgap_ms": int(status["maxgap_us"]) / 1000,
        "eintr": status["eintr"],
        "unexpected": status["unexpected"],
    }


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def table(runs: list[dict[str, object]]) -> str:
    cols = [("mode", "mode"), ("data_bytes", "bytes sent"), ("hole_bytes", "holes"),
            ("disk_bytes", "on disk"), ("wall_s", "wall"), ("freeze_client_s", "freeze"),
            ("agent_stop_ms", "stop"), ("target_maxgap_ms", "max gap")]
    lines = [" ".join(f"{title:>12}" for _, title in cols)]
    for mode in MODES:
        mine = [r for r in runs if r["mode"] == mode]
        if not mine:
            continue
        cells = []
        for key, _ in cols:
            if key == "mode":
                cells.append(f"{mode:>12}")
                continue
            med = statistics.median(float(r[key]) for r in mine)  # type: ignore[arg-type]
            if key.endswith("bytes"):
                cells.append(f"{fmt_bytes(med):>12}")
            elif key.endswith("_s"):
                cells.append(f"{med * 1000:>10.1f}ms")
            else:
                cells.append(f"{med:>10.1f}ms")
        lines.append(" ".join(cells))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--touch-mib", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "partial.json")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_partial needs root (the agent ptraces the target)", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="bench-partial-") as tmp_name:
        tmp = Path(tmp_name)
        exe = build_target("bigmem", tmp)
        agent = start_agent(tmp / "agent.sock", tmp / "agent.log")
        address = f"unix:{tmp / 'agent.sock'}"
        runs: list[dict[str, object]] = []
        try:
            with Target(exe, ["-m", str(args.touch_mib), "-t", str(args.threads), "-H", "1000"],
                        ready_timeout=120) as target:
                for i in range(args.repeat):
                    for mode in MODES:
                        out = tmp / f"{mode}.core"
                        run = one_capture(address, target, mode, out)
                        run["repeat"] = i
                        runs.append(run)
                        out.unlink()
                        print(f"  {mode:6} #{i}: {fmt_bytes(float(run['data_bytes']))} sent, "
                              f"{float(run['wall_s']) * 1000:.1f} ms", file=sys.stderr)
                states = target.thread_states()
                assert not any(s in "tT" for s in states.values()), states
                assert not any(target.tracer_pids().values())
        finally:
            stop_process(agent)

    result = {
        "benchmark": "bench_partial",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"kernel": platform.release(), "machine": platform.machine(),
                 "cpus": os.cpu_count(), "python": platform.python_version()},
        "target": {"program": "bigmem", "touch_mib": args.touch_mib, "threads": args.threads,
                   "heartbeat_us": 1000},
        "repeat": args.repeat,
        "runs": runs,
        "medians": {mode: {k: statistics.median(float(r[k]) for r in runs if r["mode"] == mode)
                           for k in ("data_bytes", "hole_bytes", "disk_bytes", "wall_s",
                                     "freeze_client_s", "agent_stop_ms", "target_maxgap_ms")}
                    for mode in MODES},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"bigmem: {args.touch_mib} MiB touched, {args.threads} idle threads; "
          f"medians of {args.repeat} (freeze = open..close seen by the client, "
          f"stop = agent's stop time, max gap = target's longest heartbeat gap)")
    print(table(runs))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
