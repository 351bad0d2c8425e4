"""`corepeek debug`: mount a live process privately, run a debugger on it, unmount.

The mount runs as a child `corepeek mount` process (FUSE wants its own main
thread and signal handlers); this process waits until the mount serves, runs
the debugger in the foreground with the mount's sysroot, then unmounts,
which ends the capture and lets the target run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from .errors import CaptureError

DEBUGGERS = ("gdb", "lldb", "drgn")
MOUNT_WAIT = 60.0


def debugger_command(debugger: str, mnt: Path, extra: Sequence[str]) -> list[str]:
    """The debugger's command line on the mounted core."""
    if debugger == "gdb":
        return ["gdb", "-q", "-x", str(mnt / "gdbinit"), *extra]
    if debugger == "lldb":
        return ["lldb", "-s", str(mnt / "lldbinit"), *extra]
    if debugger == "drgn":              # finds the files in MNT/.build-id by build-id
        return ["drgn", "-c", str(mnt / "core"), "--debug-directory", str(mnt), *extra]
    raise CaptureError(f"unknown debugger {debugger!r} (one of {', '.join(DEBUGGERS)})")


def wait_mounted(mnt: Path, child: subprocess.Popen[bytes], timeout: float = MOUNT_WAIT) -> None:
    """Until ``mnt`` serves its gdbinit; fails if the mount process exits first."""
    deadline = time.monotonic() + timeout
    while not (os.path.ismount(mnt) and (mnt / "gdbinit").exists()):
        if child.poll() is not None:
            raise CaptureError("the mount failed (see above)")
        if time.monotonic() > deadline:
            raise CaptureError(f"the mount did not appear within {timeout:.0f} s")
        time.sleep(0.05)


def unmount(mnt: Path, child: subprocess.Popen[bytes]) -> None:
    """Unmount (the capture ends, the target runs) and reap the mount process."""
    if os.path.ismount(mnt):
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    try:
        child.wait(timeout=15)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def run_debug(mount_argv: list[str], debugger: str, extra: Sequence[str]) -> int:
    """Mount with ``corepeek mount <mount_argv> MNT``, debug, unmount; the debugger's status."""
    if shutil.which(debugger) is None:
        raise CaptureError(f"{debugger} is not installed")
    tmp = Path(tempfile.mkdtemp(prefix="corepeek-debug-"))
    mnt = tmp / "mnt"
    mnt.mkdir(mode=0o700)
    child = subprocess.Popen([sys.executable, "-m", "corepeek", "mount", *mount_argv, str(mnt)],
                             stdin=subprocess.DEVNULL)
    try:
        wait_mounted(mnt, child)
        return subprocess.run(debugger_command(debugger, mnt, extra)).returncode
    finally:
        unmount(mnt, child)
        shutil.rmtree(tmp, ignore_errors=True)
