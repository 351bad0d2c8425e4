"""Throw-away hosts for fleet tests: namespaces with their own address, agent and targets.

A :class:`Host` is a network namespace (``ip netns add``) joined to the root
namespace by a veth pair with a /30 of its own (10.B.i.1 root side, 10.B.i.2
inside, ``B`` picked so that no existing address or route on the machine, and
no concurrent fleet on it, uses ``10.B.0.0/16``).  Its agent runs as pid 1 of a
fresh pid + mount + UTS namespace inside it (``unshare --pid --mount-proc
--uts``, hostname ``fleet-<i>``), so it lists only that host's processes and
reports its own hostname, as an agent on a real host would.  Targets are
spawned straight into that pid and network namespace (the spawning thread
switches ``pid_for_children`` and its network namespace for the fork and
back), so they are ordinary children of the test process: :class:`Target`
keeps working, with their root-namespace pids.

A host may be *down* (no agent: connections are refused) or *slow*: this
kernel has no ``netem`` qdisc (``tc`` says "Specified qdisc kind is
unknown"), so a slow host gets a token-bucket (``tbf``) rate limit on both
ends of its veth — a slow link by bandwidth, not a fixed latency.

:class:`Fleet` makes hosts and removes everything in ``close()`` (and at
start, leftovers of earlier runs whose creating process is gone): agents,
targets, namespaces and veths.  Needs root, ``ip`` (iproute2), ``unshare``
(util-linux) and, for slow hosts, ``tc``.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from .agents import wait_healthy
from .targets import Target

PREFIX = "cpkf"                      # namespaces: cpkf<creator pid hex>-<i>
VETH_PREFIX = "cf"                   # root-side veths: cf<pid hex><i hex>
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
_libc = ctypes.CDLL(None, use_errno=True)
_spawn_lock = threading.Lock()


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def _setns(fd: int, nstype: int) -> None:
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def available() -> tuple[bool, str]:
    """Can this machine make fleet hosts? (ok, why not)."""
    if os.geteuid() != 0:
        return False, "needs root"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return False, f"needs {tool}"
    name = f"{PREFIX}probe{os.getpid():x}"
    res = _run("ip", "netns", "add", name, check=False)
    if res.returncode != 0:
        return False, f"ip netns add failed: {res.stderr.strip()}"
    _run("ip", "netns", "del", name, check=False)
    return True, ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def cleanup_stale() -> list[str]:
    """Remove namespaces (and their processes) of earlier runs whose creator died."""
    removed = []
    for line in _run("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        m = re.fullmatch(rf"{PREFIX}([0-9a-f]+)-\d+", name)
        if not m or _alive(int(m.group(1), 16)):
            continue
        for pid in _run("ip", "netns", "pids", name, check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        _run("ip", "netns", "del", name, check=False)
        removed.append(name)
    return removed


def _used_10_octets() -> set[int]:
    text = _run("ip", "-4", "-o", "addr", check=False).stdout + \
        _run("ip", "-4", "route", "show", "table", "all", check=False).stdout
    return {int(b) for b in re.findall(r"\b10\.(\d+)\.\d+\.\d+", text)}


class _SubnetLock:
    """10.B.0.0/16 for this fleet: unused on the machine, and flock'ed so that a
    concurrent fleet (another test run) picks another B."""

    def __init__(self) -> None:
        used = _used_10_octets()
        start = 200 + os.getpid() % 50
        for k in range(55):
            b = 200 + (start - 200 + k) % 55
            if b in used:
                continue
            path = f"/tmp/corepeek-fleet-10.{b}.lock"
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self.octet, self._fd = b, fd
            return
        raise RuntimeError("no free 10.B.0.0/16 (B in 200..254) for test hosts")

    def release(self) -> None:
        os.close(self._fd)


@dataclass
class Host:
    """One test host: a network namespace, its veth, maybe an agent, its targets."""

    index: int
    netns: str
    veth: str               # root-namespace end
    ip: str                 # the host's address (inside the namespace)
    gateway: str            # the root namespace's address on the veth
    hostname: str
    tmp: Path
    proc: subprocess.Popen[bytes] | None = None   # `unshare` (parent of the agent)
    agent_pid: int = 0                             # root-namespace pid of the agent
    port: int = 0
    log_path: Path | None = None
    targets: list[Target] = field(default_factory=list)
    shaped: bool = False

    def address(self, port: int | None = None) -> str:
        return f"{self.ip}:{port or self.port}"

    @property
    def up(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- the agent -----------------------------------------------------------------

    def start_agent(self, port: int, *extra: str,
                    credentials: grpc.ChannelCredentials | None = None,
                    timeout: float = 30.0,
                    before_serving: Callable[[], object] | None = None) -> str:
        """Start ``corepeek agent --listen IP:PORT EXTRA...`` as pid 1 of a new pid,
        mount and UTS namespace inside this host; wait until its health check
        (over TLS with ``credentials``) serves.  Returns its address.

        ``before_serving`` runs once the namespaces exist (the agent process has
        exec'd Python) but before the agent can have answered anyone: a test
        spawns targets there that a waiting client must find at its first
        successful listing.
        """
        if self.up:
            raise RuntimeError(f"{self.hostname}: agent already running")
        self.port = port
        self.log_path = self.tmp / f"agent-{self.hostname}-{time.monotonic_ns()}.log"
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.netns,
                 "unshare", "--pid", "--mount-proc", "--uts", "--kill-child=SIGTERM", "--",
                 "sh", "-c", 'hostname "$0" && exec "$@"', self.hostname,
                 sys.executable, "-m", "corepeek", "-v", "agent", "--listen",
                 self.address(), *extra],
                stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            self.agent_pid = self._child_of(self.proc.pid, timeout=10)
            if before_serving is not None:
                self._wait_exec(self.agent_pid, timeout=10)
                before_serving()
            wait_healthy(self.address(), self.proc, self.log_path, timeout=timeout,
                         credentials=credentials)
        except BaseException:
            self.stop_agent()
            raise
        return self.address()

    @staticmethod
    def _wait_exec(pid: int, timeout: float) -> None:
        """Until ``pid`` runs this Python (``unshare`` mounted /proc and ``sh``
        set the hostname before that exec); it has not imported grpc yet."""
        deadline = time.monotonic() + timeout
        want = os.path.realpath(sys.executable)
        while time.monotonic() < deadline:
            try:
                if os.path.realpath(f"/proc/{pid}/exe") == want:
                    return
            except OSError:
                pass
            time.sleep(0.005)
        raise RuntimeError(f"agent {pid} did not exec {want} within {timeout}s")

    @staticmethod
    def _child_of(pid: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except FileNotFoundError:
                raise RuntimeError(f"unshare {pid} exited before starting the agent") from None
            if kids:
                return int(kids[0])
            time.sleep(0.01)
        raise RuntimeError(f"unshare {pid} started no child within {timeout}s")

    def stop_agent(self, timeout: float = 15.0) -> None:
        """SIGTERM the agent (it thaws its targets and exits); the kernel then ends
        every process of its pid namespace, so this host's targets die with it."""
        if self.proc is None:
            return
        if self.agent_pid and self.proc.poll() is None:
            try:
                os.kill(self.agent_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for pid in (self.agent_pid, self.proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait(timeout=10)
        self.proc = None
        self.agent_pid = 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    # -- targets -----------------------------------------------------------------------

    @contextmanager
    def inside(self) -> Iterator[None]:
        """Processes forked by this thread meanwhile start in this host's network
        namespace and (if its agent runs) its pid namespace."""
        pid_ns = os.open(f"/proc/{self.agent_pid}/ns/pid", os.O_RDONLY) if self.agent_pid \
            else -1
        net_ns = os.open(f"/run/netns/{self.netns}", os.O_RDONLY)
        with _spawn_lock:
            saved_pid = os.open("/proc/thread-self/ns/pid_for_children", os.O_RDONLY)
            saved_net = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
            try:
                if pid_ns >= 0:
                    _setns(pid_ns, CLONE_NEWPID)
                _setns(net_ns, CLONE_NEWNET)
                yield
            finally:
                _setns(saved_net, CLONE_NEWNET)
                _setns(saved_pid, CLONE_NEWPID)
                for fd in (saved_pid, saved_net, net_ns, pid_ns):
                    if fd >= 0:
                        os.close(fd)

    def spawn(self, exe: Path, args: Sequence[str] = (), **kwargs: object) -> Target:
        """A :class:`Target` running inside this host (its pid is the root-namespace pid).

        The child also needs the host's mount namespace (its /proc shows the host's
        pids), which a multi-threaded process cannot enter (setns(CLONE_NEWNS) wants
        an unshared fs_struct): ``nsenter --mount`` enters it in the child and
        execs the program, keeping the pid.
        """
        if self.agent_pid:
            argv = [f"--mount=/proc/{self.agent_pid}/ns/mnt", "--", str(exe), *args]
            t = Target(Path(shutil.which("nsenter") or "/usr/bin/nsenter"), argv,
                       **kwargs)  # type: ignore[arg-type]
        else:
            t = Target(exe, args, **kwargs)  # type: ignore[arg-type]
        with self.inside():
            t.start()
        self.targets.append(t)
        return t

    def ns_pid(self, pid: int) -> int:
        """The pid the host's agent sees for root-namespace ``pid``."""
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
        raise RuntimeError(f"pid {pid} has no NSpid line")

    # -- the link -------------------------------------------------------------------------

    def shape(self, rate: str = "256kbit", burst: str = "4kb", latency: str = "5s") -> None:
        """Make this host slow: a tbf rate limit on both ends of its veth."""
        spec = ["tbf", "rate", rate, "burst", burst, "latency", latency]
        _run("tc", "qdisc", "replace", "dev", self.veth, "root", *spec)
        _run("ip", "netns", "exec", self.netns, "tc", "qdisc", "replace", "dev", "eth0",
             "root", *spec)
        self.shaped = True


class Fleet:
    """``n`` hosts; ``close()`` (or leaving the ``with``) removes everything."""

    def __init__(self, tmp: Path, n: int) -> None:
        cleanup_stale()
        self.tmp = Path(tmp)
        self.hosts: list[Host] = []
        self._subnet = _SubnetLock()
        try:
            for i in range(n):
                self._add_host(i)
        except BaseException:
            self.close()
            raise

    @property
    def octet(self) -> int:
        return self._subnet.octet

    def _add_host(self, i: int) -> Host:
        me = f"{os.getpid():x}"
        netns, veth = f"{PREFIX}{me}-{i}", f"{VETH_PREFIX}{me}x{i:x}"[:15]
        b = self._subnet.octet
        gw, ip = f"10.{b}.{i}.1", f"10.{b}.{i}.2"
        host = Host(i, netns, veth, ip, gw, f"fleet-{i}", self.tmp)
        self.hosts.append(host)        # close() removes it even if a step below fails
        _run("ip", "netns", "add", netns)
        _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _run("ip", "addr", "add", f"{gw}/30", "dev", veth)
        _run("ip", "link", "set", veth, "up")
        _run("ip", "-n", netns, "addr", "add", f"{ip}/30", "dev", "eth0")
        _run("ip", "-n", netns, "link", "set", "eth0", "up")
        _run("ip", "-n", netns, "link", "set", "lo", "up")
        return host

    def close(self) -> None:
        errors = []
        for h in self.hosts:
            for t in h.targets:
                try:
                    t.close()
                except Exception as exc:  # noqa: BLE001 - keep cleaning up
                    errors.append(f"{h.hostname} target {t.pid}: {exc}")
            try:
                h.stop_agent()
            except Exception as exc:  # noqa: BLE001
                errors.append(f"{h.hostname} agent: {exc}")
        for h in self.hosts:
            _run("ip", "link", "del", h.veth, check=False)
            _run("ip", "netns", "del", h.netns, check=False)
        self.hosts.clear()
        self._subnet.release()
        if errors:
            raise RuntimeError("fleet cleanup: " + "; ".join(errors))

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def namespaces_left() -> list[str]:
    """Namespaces of this process still present (for tests that check cleanup)."""
    me = f"{PREFIX}{os.getpid():x}-"
    return [ln.split()[0] for ln in _run("ip", "netns", "list", check=False).stdout.splitlines()
            if ln.startswith(me)]
