"""Time and bytes to a full `thread apply all bt` of a remote live process (issue 13).

    python bench/bench_debug.py [--mib 4096] [--threads 50] [--reps 1]
                                [--readahead 32768,131072,524288] [--json FILE]

Needs root, gcc, gdb, gdbserver and FUSE (fuse3).  One agent on a Unix
socket; one ``bigmem`` target (MIB touched, THREADS idle threads); then, side
by side in one run:

* ``mount``      ``corepeek mount`` + ``gdb -x MNT/gdbinit -ex 'thread apply
                 all bt'`` + unmount, once per --readahead (the default
                 DEFAULT_READAHEAD of corepeek.mount is chosen from this);
                 files fetched into an empty cache each time;
* ``dump+gdb``   ``corepeek dump`` of the full core, then gdb on it;
* ``gdbserver``  ``gdbserver --attach`` on loopback, ``gdb -ex 'target
                 remote'`` through a byte-counting TCP relay.

Columns: wall time from the start until the backtraces are printed (and the
session ended); bytes moved (core + files for corepeek; the remote protocol
both ways for gdbserver); how long the target was stopped (its longest
heartbeat gap, reset before each case); the frames printed (a check that
every case saw the same stacks).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
import benchlib as bl  # noqa: E402

bl.use_this_checkout()

from harness.agents import start_agent, stop_agent  # noqa: E402
from harness.relay import Relay  # noqa: E402
from harness.targets import Target, build_target  # noqa: E402

GDB = ["gdb", "-batch", "-nx", "-iex", "set debuginfod enabled off", "-ex", "set pagination off"]
BT = "thread apply all bt"


def _frames(text: str) -> int:
    return sum(1 for line in text.splitlines() if re.match(r"^#\d+ ", line))


def _stopped(t: Target) -> float:
    return int(t.status()["maxgap_us"]) / 1e6


def case_mount(agent: str, t: Target, work: Path, readahead: int) -> dict:
    mnt, cache = work / f"mnt-{readahead}", work / f"cache-{readahead}"
    mnt.mkdir()
    t.command("resetgap")
    t0 = time.monotonic()
    m = subprocess.Popen([sys.executable, "-m", "corepeek", "mount", "--agent", agent,
                          str(t.pid), str(mnt), "--readahead", str(readahead)],
                         stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "XDG_CACHE_HOME": str(cache)})
    while not (mnt / "gdbinit").exists():
        if m.poll() is not None:
            raise SystemExit(f"mount failed: {m.communicate()[1]}")
        time.sleep(0.01)
    mounted = time.monotonic() - t0
    out = subprocess.run([*GDB, "-x", str(mnt / "gdbinit"), "-ex", BT], capture_output=True,
                         text=True).stdout
    bt_done = time.monotonic() - t0
    subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
    err = m.communicate(timeout=60)[1]
    total = time.monotonic() - t0
    got = re.search(r"unmounted: (\d+) bytes of core and (\d+) bytes of files fetched in (\d+)",
                    err)
    assert got, err
    shutil.rmtree(cache)
    return {"case": f"mount ra={readahead // 1024}K", "seconds_to_bt": bt_done,
            "mounted_seconds": mounted,
            "seconds": total, "core_bytes": int(got.group(1)), "file_bytes": int(got.group(2)),
            "bytes": int(got.group(1)) + int(got.group(2)), "requests": int(got.group(3)),
            "stopped_seconds": _stopped(t), "frames": _frames(out)}


def case_dump(agent: str, t: Target, work: Path, exe: Path) -> dict:
    core = work / "core"
    t.command("resetgap")
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "corepeek", "dump", "--agent", agent,
                          str(t.pid), "-o", str(core)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    dumped = time.monotonic() - t0
    out = subprocess.run([*GDB, "-ex", BT, str(exe), str(core)], capture_output=True,
                         text=True).stdout
    total = time.monotonic() - t0
    moved = int(re.search(r"(\d+) bytes transferred", res.stderr).group(1))
    core.unlink()
    return {"case": "dump+gdb", "seconds_to_bt": total, "seconds": total, "dump_seconds": dumped,
            "bytes": moved, "core_bytes": moved, "file_bytes": 0,
            "stopped_seconds": _stopped(t), "frames": _frames(out)}


def case_gdbserver(t: Target, exe: Path) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t.command("resetgap")
    gs = subprocess.Popen(["gdbserver", "--attach", f"127.0.0.1:{port}", str(t.pid)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert gs.stderr is not None
    for line in gs.stderr:                  # it listens once it has attached
        if "Listening on port" in line:
            break
    else:
        raise SystemExit("gdbserver did not start")
    threading.Thread(target=gs.stderr.read, daemon=True).start()
    relay = Relay.tcp(("127.0.0.1", port))          # counts both ways
    t0 = time.monotonic()
    out = subprocess.run([*GDB, "-ex", f"target remote 127.0.0.1:{relay.port}", "-ex", BT,
                          "-ex", "detach", str(exe)], capture_output=True, text=True).stdout
    total = time.monotonic() - t0
    try:
        gs.wait(timeout=30)
    except subprocess.TimeoutExpired:
        gs.kill()
        gs.wait()
    relay.join(timeout=10)
    return {"case": "gdbserver", "seconds_to_bt": total, "seconds": total,
            "bytes": relay.up + relay.down,
            "core_bytes": 0, "file_bytes": 0, "stopped_seconds": _stopped(t),
            "frames": _frames(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=50)
    ap.add_argument("--readahead", default="32768,131072,524288")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="corepeek-bench-debug-", dir=args.workdir))
    exe = build_target("bigmem", work)
    agent = start_agent(work, "--sessions-per-minute", "0", "--max-freeze", "600")
    rows = []
    try:
        with Target(exe, ["-m", str(args.mib), "-t", str(args.threads)],
                    ready_timeout=600) as t:
            for ra in (int(x) for x in args.readahead.split(",")):
                rows.append(case_mount(agent.address, t, work, ra))
            rows.append(case_dump(agent.address, t, work, exe))
            rows.append(case_gdbserver(t, exe))
            core_size = rows[-2]["bytes"]
    finally:
        stop_agent(agent)
        shutil.rmtree(work, ignore_errors=True)
    headers = ["case", "ready", "to bt", "total", "moved", "of the dump", "stopped", "frames"]
    table = [[r["case"], bl.fmt_seconds(r.get("mounted_seconds", r.get("dump_seconds"))),
              bl.fmt_seconds(r["seconds_to_bt"]), bl.fmt_seconds(r["seconds"]),
              bl.fmt_bytes(r["bytes"]), f"{r['bytes'] / core_size:.4f}",
              bl.fmt_seconds(r["stopped_seconds"]), str(r["frames"])] for r in rows]
    print(f"bigmem -m {args.mib} -t {args.threads}: `thread apply all bt`")
    print(bl.format_table(headers, table))
    out = args.json or HERE / "results" / "debug.json"
    out.write_text(json.dumps({"mib": args.mib, "threads": args.threads, "rows": rows},
                              indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
