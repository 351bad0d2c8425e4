"""Helpers shared by the security and fuzz tests: TLS clients, audit log,
world-readable target copies and a non-dumpable preload."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import yaml

from corepeek.channel import CHANNEL_OPTIONS, TLSOptions
from harness.targets import Target, proc_status_field

from security_pki import KeyPair, PKI

NODUMP_SOURCE = r"""
#include <sys/prctl.h>
__attribute__((constructor)) static void corepeek_test_nodump(void)
{
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
}
"""


def tls_options(pki: PKI, pair: KeyPair | None) -> TLSOptions:
    return TLSOptions(ca=str(pki.ca.path), cert=str(pair.cert) if pair else None,
                      key=str(pair.key) if pair else None)


def credentials(pki: PKI, pair: KeyPair | None) -> grpc.ChannelCredentials:
    if pair is None:
        return grpc.ssl_channel_credentials(pki.ca.path.read_bytes())
    cert, key = pair.read()
    return grpc.ssl_channel_credentials(pki.ca.path.read_bytes(), key, cert)


@contextmanager
def tls_channel(address: str, pki: PKI, pair: KeyPair | None) -> Iterator[grpc.Channel]:
    with grpc.secure_channel(address, credentials(pki, pair), options=CHANNEL_OPTIONS) as ch:
        yield ch


def write_policy(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# -- audit log ------------------------------------------------------------------------

def audit_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_audit(path: Path, timeout: float = 5.0, **match: Any) -> dict[str, Any]:
    """The last audit line whose fields equal ``match`` (waits for it to appear)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [d for d in audit_lines(path) if all(d.get(k) == v for k, v in match.items())]
        if found:
            return found[-1]
        if time.monotonic() > deadline:
            raise AssertionError(f"no audit line with {match} in {path}:\n"
                                 + "\n".join(json.dumps(d) for d in audit_lines(path)[-10:]))
        time.sleep(0.05)


# -- targets ---------------------------------------------------------------------------

class PublicBin:
    """A world-readable directory for binaries other uids must execute (pytest's
    temporary directories are 0700)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="corepeek-sec-"))
        self.dir.chmod(0o755)

    def copy(self, exe: Path, name: str) -> Path:
        out = self.dir / name
        shutil.copy2(exe, out)
        out.chmod(0o755)
        return out

    def nodump_preload(self) -> Path:
        src = self.dir / "nodump.c"
        src.write_text(NODUMP_SOURCE)
        out = self.dir / "libnodump.so"
        subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(out), str(src)], check=True)
        out.chmod(0o755)
        return out

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def as_user(exe: Path, uid: int, *args: str) -> tuple[Path, list[str]]:
    """(exe, args) for Target that run ``exe`` under ``uid`` (setpriv execs in place,
    so the pid and the control pipes stay the target's)."""
    return Path(shutil.which("setpriv") or "/usr/bin/setpriv"), [
        f"--reuid={uid}", f"--regid={uid}", "--clear-groups", str(exe), *args]


def assert_untouched(t: Target) -> None:
    """A target the agent refused: never stopped, never traced, still running."""
    states = t.thread_states()
    assert states and not {s for s in states.values() if s in "tT"}, states
    assert not any(t.tracer_pids().values()), t.tracer_pids()
    assert t.status()["reply"] == "status"


def proc_dumpable_owner(pid: int) -> int:
    return os.stat(f"/proc/{pid}/status").st_uid


def traced_or_stopped(pid: int) -> dict[int, str]:
    """Threads of ``pid`` that are ptrace-stopped, job-stopped or traced ({} = clean)."""
    bad = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return {}
    for tid in tids:
        path = Path(f"/proc/{pid}/task/{tid}/status")
        state = (proc_status_field(path, "State") or " ")[0]
        tracer = int(proc_status_field(path, "TracerPid") or 0)
        if state in "tT" or tracer:
            bad[int(tid)] = f"{state} tracer={tracer}"
    return bad


def wait_clean(pid: int, timeout: float = 5.0) -> None:
    """Wait until no thread of ``pid`` is stopped or traced (a cancel thaws asynchronously)."""
    deadline = time.monotonic() + timeout
    while (bad := traced_or_stopped(pid)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not bad, f"pid {pid} still frozen/traced: {bad}"
