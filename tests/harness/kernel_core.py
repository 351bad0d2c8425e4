"""The kernel's own core of a test target, however the host is configured.

``core_pattern`` and ``core_uses_pid`` are machine-global. For the duration of
:func:`kernel_cores` they point at a directory the test owns (an absolute
``DIR/core.%p``, so a systemd-coredump or apport pipe, a relative pattern or
``core_uses_pid=1`` on the host do not matter), under an exclusive flock that
every corepeek suite takes, and both are restored afterwards: keep it around
the crash only.  RLIMIT_CORE, ``coredump_filter`` and dumpability belong to
the target: :func:`allow_core_dump` sets or checks them before the capture.

A kernel-equality claim that cannot be checked skips, except under ``CI=true``
where it fails the run (:func:`cannot_check`): CI must never pass unproven.

:func:`xsave_size` is what the kernel would write per thread as NT_X86_XSTATE
on this CPU, from CPUID leaf 0xD read by a C probe (not by corepeek's code).
"""

from __future__ import annotations

import fcntl
import os
import resource
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import NoReturn

import pytest

LOCK_PATH = Path("/run/lock/corepeek-tests-core_pattern.lock")
CORE_PATTERN = Path("/proc/sys/kernel/core_pattern")
CORE_USES_PID = Path("/proc/sys/kernel/core_uses_pid")
CORENAME_MAX_SIZE = 128           # include/linux/binfmts.h: longer patterns are cut
DEFAULT_COREDUMP_FILTER = 0x33    # the kernel's default (MMF_DUMP_FILTER_DEFAULT)
LOCK_TIMEOUT = 300.0              # other suites hold the lock for one crash each


def cannot_check(why: str) -> NoReturn:
    """Skip a kernel-equality claim that cannot be checked here; fail under CI=true."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true, and this cannot be checked here: {why}", pytrace=False)
    pytest.skip(why)


def allow_core_dump(pid: int) -> None:
    """Let the kernel dump pid: unlimited RLIMIT_CORE, the default coredump_filter,
    and check it is dumpable.  Call it before the capture: corepeek honours the
    same filter, so both cores are cut by the same rules."""
    resource.prlimit(pid, resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    Path(f"/proc/{pid}/coredump_filter").write_text(f"{DEFAULT_COREDUMP_FILTER:#x}")
    if not _dumpable(pid):
        raise AssertionError(f"pid {pid} is not dumpable (PR_SET_DUMPABLE 0 or setuid "
                             "with suid_dumpable=0): the kernel would write no core")


class KernelCores:
    """Where the kernel writes cores while :func:`kernel_cores` is active."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def core_of(self, pid: int) -> Path:
        """The core the kernel wrote for pid.  Call it after reaping pid: the kernel
        writes a file core before the task exits, so it is complete by then."""
        path = self.directory / f"core.{pid}"
        if not path.is_file():
            raise AssertionError(f"the kernel wrote no core for pid {pid} in {self.directory} "
                                 f"(core_pattern is {CORE_PATTERN.read_text().strip()!r})")
        return path


def _dumpable(pid: int) -> bool:
    """The kernel's dumpability of pid: PIDFD_INFO_COREDUMP where the kernel has it,
    else the /proc ownership rule (non-dumpable tasks' /proc entries belong to root)."""
    from corepeek_agent.authz import PIDFD_COREDUMP_SKIP, pidfd_info  # the agent's reader

    fd = os.pidfd_open(pid)
    try:
        mask = pidfd_info(fd).coredump_mask
    finally:
        os.close(fd)
    if mask:
        return not mask & PIDFD_COREDUMP_SKIP
    uid = int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                   if line.startswith("Uid:")).split()[1])
    return uid == 0 or os.stat(f"/proc/{pid}/status").st_uid == uid


def _write(path: Path, value: bytes) -> None:
    with open(path, "wb", buffering=0) as f:
        f.write(value)


@contextmanager
def _locked(timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    with open(LOCK_PATH, "a+") as lock:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{LOCK_PATH} still held after {timeout}s") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextmanager
def kernel_cores(directory: Path) -> Iterator[KernelCores]:
    """For its duration the kernel writes every core as ``directory/core.PID``."""
    if os.geteuid() != 0:
        cannot_check("setting core_pattern needs root")
    directory = directory.resolve()
    pattern = f"{directory}/core.%p".encode()
    if len(pattern) >= CORENAME_MAX_SIZE:
        raise ValueError(f"core_pattern {pattern!r} is longer than the kernel keeps")
    with _locked():
        saved = CORE_PATTERN.read_bytes().rstrip(b"\n"), CORE_USES_PID.read_bytes().strip()
        try:
            try:
                _write(CORE_PATTERN, pattern)
                _write(CORE_USES_PID, b"0")
            except OSError as exc:
                cannot_check(f"cannot set core_pattern (read-only /proc/sys?): {exc}")
            yield KernelCores(directory)
        finally:
            _write(CORE_PATTERN, saved[0])
            _write(CORE_USES_PID, saved[1])
            restored = CORE_PATTERN.read_bytes().rstrip(b"\n"), CORE_USES_PID.read_bytes().strip()
            assert restored == saved, f"core_pattern/core_uses_pid not restored: {restored}"


# -- what the kernel writes per thread on this CPU ---------------------------------------------

_XSAVE_PROBE = r"""
#include <cpuid.h>
#include <stdio.h>
int main(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(0xd, 0, &a, &b, &c, &d)) return 1;
    printf("%u %u %u\n", b, c, a);   /* size for XCR0, size for all supported, XCR0 mask lo */
    return 0;
}
"""


@cache
def xsave_size() -> int:
    """CPUID(0xD, 0).EBX: the XSAVE area of the features XCR0 enables.

    Linux enables every user feature it supports in XCR0 and sizes the
    NT_X86_XSTATE regset (``fpu_user_cfg.max_size``) to exactly this, so it is
    the per-thread NT_X86_XSTATE size of the kernel's core here (11008 bytes
    with AMX, 2696 with AVX-512, 832 with AVX only).
    """
    with tempfile.TemporaryDirectory(prefix="corepeek-xsave-") as tmp:
        src, exe = Path(tmp) / "xsave.c", Path(tmp) / "xsave"
        src.write_text(_XSAVE_PROBE)
        subprocess.run(["gcc", "-O1", "-o", str(exe), str(src)], check=True, capture_output=True)
        out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return int(out.split()[0])
