"""Fleet-wide collection: list processes on many agents, capture every match, write a manifest.

``corepeek collect`` (see docs/fleet.md) does, for a set of agents:

1. **discover** the agents: an address list, a file of addresses, or the pods
   of the agent DaemonSet found through the Kubernetes API;
2. **list** the processes that match ``--comm/--exe/--pid`` on every agent
   (filtered server-side by ``ListProcesses``), concurrently, retrying
   ``UNAVAILABLE`` with exponential backoff and jitter;
3. **capture** every match (pinned to its start time), at most
   ``concurrency`` at once and ``per_host`` per agent, again retrying
   ``UNAVAILABLE`` (and ``ABORTED``: another session holds the pid);
4. **store** each core — a sparse file (uncompressed), a zstd file, or an S3
   object — *after* its capture is closed, so compression and upload never
   prolong a freeze;
5. write the run's manifest (``manifest-UTCSTAMP.json``, never replaced; see
   :mod:`corepeek.runindex`): one entry per capture and one per agent that
   could not be listed, each with a status; append the run to ``runs.json``
   and copy the manifest to ``manifest.json`` (the newest run's).

Every file appears under its final name only when complete, and never
replaces another (:mod:`corepeek.outfile`); an S3 object appears only when
its upload completed (:mod:`corepeek.s3upload`).

The module is layered so the decisions are unit-testable without I/O: the
pure part (addresses, naming, planning, scheduling limits, backoff, the
manifest, S3 URLs, pod to endpoint) comes first; the I/O part (channels,
captures, sinks, progress) after it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
import logging
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc

from . import runindex
from .channel import TLSOptions, open_channel
from .errors import CaptureError
from .outfile import create_new, fsync_dir, link_new
from .s3upload import upload_complete
from .v1 import capture_pb2 as pb
from .v1 import capture_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
MANIFEST_NAME = runindex.LATEST_NAME
DEFAULT_PORT = 7443                  # the agent's TCP port in deploy/
DEFAULT_K8S_NAMESPACE = "corepeek"
DEFAULT_K8S_SELECTOR = "app.kubernetes.io/name=corepeek-agent"
MODES = ("full", "stacks", "notes")
# Transient failures worth another attempt: the transport (agent restarting,
# connection refused, network blip) and a pid another session is capturing.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED})
LIST_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})

T = TypeVar("T")
R = TypeVar("R")


# =====================================================================================
# pure: agents
# =====================================================================================

@dataclass(frozen=True)
class Endpoint:
    """One agent to collect from.

    ``address`` is what :func:`corepeek.channel.open_channel` dials; ``label``
    names it for people (``node/pod``, or the address).  ``host``, when set,
    is the host name the manifest uses instead of the hostname the agent
    reports: a DaemonSet pod's hostname is the pod's name, its node is the
    host.  An endpoint with ``error`` set is not dialled: it is reported in the
    manifest as it is (a pod without an IP, say).
    """

    address: str
    label: str = ""
    error: str = ""
    host: str = ""

    @property
    def name(self) -> str:
        return self.label or self.address


def parse_agent_list(values: Iterable[str]) -> list[str]:
    """``--agents a,b --agents c`` -> ``[a, b, c]``: split on commas and whitespace,
    drop empties and duplicates, keep the order."""
    out: list[str] = []
    for value in values:
        for item in re.split(r"[,\s]+", value):
            if item and item not in out:
                out.append(item)
    return out


def read_agents_file(text: str) -> list[str]:
    """An agents file: addresses separated by newlines or commas; ``#`` starts a comment."""
    return parse_agent_list(line.split("#", 1)[0] for line in text.splitlines())


def format_host_port(host: str, port: int) -> str:
    """``10.0.0.1:7443``, ``[fd00::1]:7443``."""
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


# =====================================================================================
# pure: selection and planning
# =====================================================================================

@dataclass(frozen=True)
class Selection:
    """Which processes to capture; applied by every agent's ``ListProcesses``."""

    comm: str = ""
    exe_glob: str = ""
    pid: int = 0

    def request(self) -> pb.ListProcessesRequest:
        return pb.ListProcessesRequest(comm=self.comm, exe_glob=self.exe_glob, pid=self.pid)

    @property
    def empty(self) -> bool:
        return not (self.comm or self.exe_glob or self.pid)

    def to_json(self) -> dict[str, Any]:
        return {"comm": self.comm or None, "exe": self.exe_glob or None, "pid": self.pid or None}


@dataclass(frozen=True)
class Match:
    """A process an agent listed: one capture to make."""

    agent: str          # the endpoint's address
    host: str           # the hostname the agent reported (or the endpoint's label)
    pid: int
    comm: str
    exe: str
    start_time: int = 0
    threads: int = 0
    rss_bytes: int = 0


@dataclass
class AgentResult:
    """The listing of one agent: its matches, or why it could not be listed."""

    endpoint: Endpoint
    host: str = ""
    matches: list[Match] = field(default_factory=list)
    error: str = ""
    code: str | None = None
    attempts: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.error

    def to_json(self) -> dict[str, Any]:
        return {"agent": self.endpoint.address, "label": self.endpoint.label or None,
                "host": self.host or None, "status": "ok" if self.ok else "error",
                "error": self.error or None, "code": self.code, "matched": len(self.matches),
                "attempts": self.attempts, "seconds": round(self.seconds, 6)}


def host_of(endpoint: Endpoint, resp: pb.ListProcessesResponse) -> str:
    return endpoint.host or resp.hostname or endpoint.name


def matches_from_listing(endpoint: Endpoint, resp: pb.ListProcessesResponse) -> list[Match]:
    host = host_of(endpoint, resp)
    return [Match(agent=endpoint.address, host=host, pid=p.pid, comm=p.comm, exe=p.exe,
                  start_time=p.start_time, threads=p.threads, rss_bytes=p.rss_bytes)
            for p in resp.processes]


def plan_captures(listings: Sequence[AgentResult]) -> list[Match]:
    """Every match of every listed agent, interleaved across agents (round robin)
    so that the first captures started are spread over the fleet."""
    queues = [deque(sorted(r.matches, key=lambda m: m.pid)) for r in listings if r.ok]
    out: list[Match] = []
    while any(queues):
        for q in queues:
            if q:
                out.append(q.popleft())
    return out


def progress_hosts(plan: Sequence[Match]) -> tuple[dict[str, int], dict[str, str]]:
    """Captures per agent, and each agent's display name: its host, or
    ``host (address)`` when several agents report the same host name."""
    counts: dict[str, int] = {}
    hosts: dict[str, str] = {}
    for m in plan:
        counts[m.agent] = counts.get(m.agent, 0) + 1
        hosts[m.agent] = m.host
    dup = {h for h in hosts.values() if list(hosts.values()).count(h) > 1}
    return counts, {a: f"{h} ({a})" if h in dup else h for a, h in hosts.items()}


# =====================================================================================
# pure: naming
# =====================================================================================

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_component(text: str, limit: int = 64) -> str:
    """A file-name component: runs of anything but ``[A-Za-z0-9._-]`` become ``-``;
    never empty, never hidden, never ``.``/``..``."""
    s = _UNSAFE.sub("-", text).strip("-.")[:limit].strip("-.")
    return s or "unknown"


def utc_stamp(when: datetime) -> str:
    """``20261126T132700Z`` (UTC, second resolution)."""
    return when.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def capture_name(host: str, comm: str, pid: int, when: datetime, mode: str = "full",
                 compress: bool = False) -> str:
    """``HOST_COMM_PID_UTCTIME[.MODE].core[.zst]``: a full core has no mode part."""
    mode_part = "" if mode == "full" else f".{mode}"
    return (f"{safe_component(host)}_{safe_component(comm)}_{pid}_{utc_stamp(when)}"
            f"{mode_part}.core{'.zst' if compress else ''}")


class NameClaims:
    """Hands out unique names: a taken one gets ``-2``, ``-3``... before its suffixes."""

    def __init__(self, taken: Iterable[str] = ()) -> None:
        self._taken = set(taken)
        self._lock = threading.Lock()

    def claim(self, name: str) -> str:
        with self._lock:
            if name not in self._taken:
                self._taken.add(name)
                return name
            stem, dot, rest = name.partition(".")
            n = 2
            while f"{stem}-{n}{dot}{rest}" in self._taken:
                n += 1
            unique = f"{stem}-{n}{dot}{rest}"
            self._taken.add(unique)
            return unique


def default_out_dir(now: datetime) -> str:
    return f"corepeek-collect-{utc_stamp(now)}"


# =====================================================================================
# pure: limits and retries
# =====================================================================================

def backoff_delays(retries: int, *, base: float = 0.5, cap: float = 8.0,
                   rng: Callable[[], float] = random.random) -> list[float]:
    """Delays before retry 1..``retries``: exponential from ``base``, capped at
    ``cap``, each scaled by a random factor in [0.5, 1) ("equal jitter") so
    that many collectors do not retry in step."""
    return [min(cap, base * 2 ** i) * (0.5 + rng() / 2) for i in range(max(0, retries))]


def run_bounded(tasks: Sequence[T], fn: Callable[[T], R], *, key: Callable[[T], str],
                concurrency: int, per_key: int,
                on_error: Callable[[T, BaseException], R] | None = None) -> list[R]:
    """Run ``fn`` over ``tasks`` on threads: at most ``concurrency`` at once and at
    most ``per_key`` at once for any one ``key`` (host).  A task starts as soon
    as both limits allow it; among the hosts that may start one, they take
    turns (round robin), so one big host cannot starve the others.  Results
    come back in task order; an exception becomes ``on_error(task, exc)`` (or
    is re-raised after every task finished when there is no ``on_error``).
    """
    if concurrency < 1 or per_key < 1:
        raise ValueError("concurrency and per-host limits must be at least 1")
    pending: OrderedDict[str, deque[int]] = OrderedDict()
    for i, task in enumerate(tasks):
        pending.setdefault(key(task), deque()).append(i)
    results: list[Any] = [None] * len(tasks)
    errors: list[BaseException] = []
    running: dict[str, int] = {k: 0 for k in pending}
    total = 0
    cond = threading.Condition()

    def work(i: int, k: str) -> None:
        nonlocal total
        try:
            results[i] = fn(tasks[i])
        except BaseException as exc:  # noqa: BLE001 - reported per task, never lost
            if on_error is None:
                errors.append(exc)
            else:
                results[i] = on_error(tasks[i], exc)
        finally:
            with cond:
                running[k] -= 1
                total -= 1
                cond.notify_all()

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="collect") as pool:
        remaining = len(tasks)
        while remaining:
            with cond:
                while True:
                    ready = [k for k, q in pending.items() if q and running[k] < per_key]
                    if ready and total < concurrency:
                        break
                    cond.wait()
                k = ready[0]
                i = pending[k].popleft()
                pending.move_to_end(k)           # round robin among the hosts
                running[k] += 1
                total += 1
            pool.submit(work, i, k)
            remaining -= 1
    if errors:
        raise errors[0]
    return results


# =====================================================================================
# pure: the manifest
# =====================================================================================

@dataclass
class CaptureRecord:
    """One line of the manifest's ``captures`` list."""

    agent: str
    host: str | None
    pid: int | None
    comm: str | None
    exe: str | None
    status: str                      # "ok" | "error"
    error: str | None = None
    code: str | None = None          # gRPC status name of the failure
    path: str | None = None          # relative to the manifest's directory, or s3://...
    bytes: int | None = None         # size of the stored object (compressed if .zst)
    sha256: str | None = None        # of the stored object
    seconds: float | None = None     # the capture: open .. close, without storing
    mode: str | None = None
    start_time: int | None = None    # the process's start time (clock ticks), pinned
    time: str | None = None          # UTC start of the capture
    core_bytes: int | None = None    # size of the core file before compression
    compressed: bool = False
    wire_bytes: int | None = None    # memory payload received (compressed on the wire)
    threads: int | None = None
    unfrozen_threads: list[int] | None = None
    freeze_micros: int | None = None   # the agent's time to stop every thread
    store_seconds: float | None = None
    attempts: int = 0

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.seconds is not None:
            d["seconds"] = round(self.seconds, 6)
        if self.store_seconds is not None:
            d["store_seconds"] = round(self.store_seconds, 6)
        return d


def unreachable_record(result: AgentResult) -> CaptureRecord:
    """The manifest entry of an agent that could not be listed."""
    return CaptureRecord(agent=result.endpoint.address,
                         host=result.host or result.endpoint.host or None, pid=None,
                         comm=None, exe=None, status="error",
                         error=result.error or "unknown error", code=result.code,
                         seconds=result.seconds, attempts=result.attempts)


def iso_utc(when: datetime) -> str:
    return when.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def build_manifest(*, started: datetime, finished: datetime, selection: Selection, mode: str,
                   compress: bool, destination: str, agents: Sequence[AgentResult],
                   captures: Sequence[CaptureRecord]) -> dict[str, Any]:
    """The manifest document: the captures (unreachable agents first), the agents, a summary."""
    entries = [unreachable_record(a) for a in agents if not a.ok] + list(captures)
    entries.sort(key=lambda r: (r.status != "error" or r.pid is not None, r.host or "",
                                r.agent, r.pid or 0))
    ok = [r for r in entries if r.status == "ok"]
    return {
        "version": MANIFEST_VERSION,
        "tool": f"corepeek collect {_version()}",
        "started": iso_utc(started),
        "finished": iso_utc(finished),
        "seconds": round((finished - started).total_seconds(), 6),
        "destination": destination,
        "selection": {**selection.to_json(), "mode": mode, "compress": "zstd" if compress else None},
        "summary": {
            "agents": len(agents), "agents_unreachable": sum(1 for a in agents if not a.ok),
            "captures": len(entries), "ok": len(ok), "error": len(entries) - len(ok),
            "bytes": sum(r.bytes or 0 for r in ok),
            "core_bytes": sum(r.core_bytes or 0 for r in ok),
        },
        "agents": [a.to_json() for a in agents],
        "captures": [r.to_json() for r in entries],
    }


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("corepeek")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "dev"


# =====================================================================================
# pure: destinations
# =====================================================================================

@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str          # "" or ends with "/"

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def url(self, name: str) -> str:
        return f"s3://{self.bucket}/{self.key(name)}"


def parse_s3_url(url: str) -> S3Location:
    """``s3://bucket/some/prefix`` -> bucket ``bucket``, prefix ``some/prefix/``."""
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {url!r}")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
        raise ValueError(f"invalid S3 bucket name {bucket!r} in {url!r}")
    prefix = prefix.strip("/")
    return S3Location(bucket, f"{prefix}/" if prefix else "")


# =====================================================================================
# pure: Kubernetes pods -> endpoints
# =====================================================================================

def pod_endpoint(pod: Any, port: int | None = None, port_name: str = "grpc") -> Endpoint | None:
    """The agent endpoint of one pod (a ``kubernetes.client.V1Pod``).

    ``port``: explicit, else the container port named ``port_name``, else
    :data:`DEFAULT_PORT`.  Pods being deleted, and pods that finished
    (Succeeded/Failed), are skipped (None); a pod without an IP yet (Pending) is
    an endpoint with ``error`` set, so the manifest shows its node has no agent.
    """
    meta, spec, status = pod.metadata, pod.spec, pod.status
    if meta is not None and meta.deletion_timestamp is not None:
        return None
    phase = getattr(status, "phase", None) or "Unknown"
    if phase in ("Succeeded", "Failed"):
        return None
    name = meta.name if meta is not None else "?"
    node = getattr(spec, "node_name", None) or ""
    label = f"{node}/{name}" if node else name
    if port is None:
        port = DEFAULT_PORT
        for c in (getattr(spec, "containers", None) or []):
            for p in (c.ports or []):
                if p.name == port_name:
                    port = int(p.container_port)
    ip = getattr(status, "pod_ip", None)
    if not ip:
        return Endpoint(address=f"pod/{name}", label=label, host=node or name,
                        error=f"pod {name} on node {node or '(unscheduled)'} is {phase} "
                              "and has no IP yet")
    return Endpoint(address=format_host_port(ip, port), label=label, host=node or name)


class PodLister(Protocol):
    def list_namespaced_pod(self, namespace: str, **kwargs: Any) -> Any: ...


def discover_kubernetes(namespace: str = DEFAULT_K8S_NAMESPACE,
                        selector: str = DEFAULT_K8S_SELECTOR, *, port: int | None = None,
                        api: PodLister | None = None) -> list[Endpoint]:
    """The agent pods of the DaemonSet: ``list_namespaced_pod(namespace,
    label_selector=selector)`` through the official client's ``CoreV1Api``.

    Without ``api``, the ``kubernetes`` package (the ``[kubernetes]`` extra) is
    imported here, and the configuration is the in-cluster service account or,
    outside a cluster, the kubeconfig.  The collector's service account needs
    ``list`` on ``pods`` in the namespace (deploy/kubernetes/collector-rbac.yaml).
    """
    if api is None:
        try:
            from kubernetes import client, config
        except ImportError:
            raise CaptureError("--kubernetes needs the kubernetes package: "
                               "pip install 'corepeek[kubernetes]'") from None
        try:
            config.load_incluster_config()
        except config.ConfigException:
            try:
                config.load_kube_config()
            except Exception as exc:  # noqa: BLE001 - any config failure is one line
                raise CaptureError(f"no Kubernetes configuration: {exc}") from None
        api = client.CoreV1Api()
    try:
        pods = api.list_namespaced_pod(namespace, label_selector=selector)
    except Exception as exc:  # noqa: BLE001 - ApiException, urllib3 errors
        reason = getattr(exc, "reason", None) or exc
        raise CaptureError(f"cannot list pods in namespace {namespace!r} with selector "
                           f"{selector!r}: {reason}") from None
    out = [e for e in (pod_endpoint(p, port) for p in pods.items) if e is not None]
    return sorted(out, key=lambda e: e.label)


# =====================================================================================
# I/O: storing cores
# =====================================================================================

CHUNK = 1 << 20


def file_digest(f: Any) -> tuple[int, str]:
    """(size, sha256) of an open binary file from its start; holes read as zeros."""
    h = hashlib.sha256()
    size = 0
    f.seek(0)
    while chunk := f.read(CHUNK):
        h.update(chunk)
        size += len(chunk)
    return size, h.hexdigest()


class _HashingWriter:
    """A binary file wrapper that hashes and counts what goes through it."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()


def zstd_compress(src: Scratch, dst_dir: Path, level: int = 3) -> tuple[Path, int, str]:
    """Compress ``src`` into a new file in ``dst_dir`` (0600, never through a link);
    returns its path, size and sha256."""
    import zstandard

    cctx = zstandard.ZstdCompressor(level=level, write_content_size=True)
    fd, dst = create_new(dst_dir, ".zst.")
    try:
        with open(fd, "wb") as raw, open(os.dup(src.fd), "rb") as inp:
            inp.seek(0)
            hw = _HashingWriter(raw)
            cctx.copy_stream(inp, hw, size=os.fstat(src.fd).st_size, read_size=CHUNK,
                             write_size=CHUNK)
            raw.flush()
            os.fsync(raw.fileno())
    except BaseException:
        dst.unlink(missing_ok=True)
        raise
    return dst, hw.size, hw.sha.hexdigest()


@dataclass
class Scratch:
    """A capture's file while it is written: created new (0600) and kept open, so
    it is written through this descriptor and never reopened by name."""

    path: Path
    fd: int

    @classmethod
    def create(cls, directory: Path, name: str) -> Scratch:
        fd, path = create_new(directory, f".{name}.")
        return cls(path, fd)

    def digest(self) -> tuple[int, str]:
        """(size, sha256) of what was written; holes read as zeros."""
        os.fsync(self.fd)
        with open(os.dup(self.fd), "rb") as f:
            return file_digest(f)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Stored:
    path: str
    bytes: int
    sha256: str


class Sink(Protocol):
    destination: str

    def scratch(self, name: str) -> Scratch: ...
    def store(self, scratch: Scratch, name: str, compress: bool, level: int) -> Stored: ...
    def discard(self, scratch: Scratch) -> None: ...
    def write_manifest(self, doc: dict[str, Any], started: datetime | None = None) -> str: ...
    def close(self) -> None: ...


class DirSink:
    """Cores as files in a directory (created 0700: cores hold process memory).

    A core is written sparse to a new ``.NAME.RANDOM.tmp`` (:class:`Scratch`)
    and linked to its name only once its capture is closed and it is complete,
    never replacing a file (a clash takes ``-2``...); with ``compress`` the
    zstd file is linked instead and the scratch removed.
    """

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.destination = str(self.dir)

    def scratch(self, name: str) -> Scratch:
        return Scratch.create(self.dir, name.removesuffix(".zst"))

    def store(self, scratch: Scratch, name: str, compress: bool, level: int = 3) -> Stored:
        if compress:
            done, size, sha = zstd_compress(scratch, self.dir, level)
            scratch.discard()
        else:
            size, sha = scratch.digest()
            scratch.close()
            done = scratch.path
        try:
            final = link_new(done, self.dir, name, unique=_numbered_name)
        except BaseException:
            done.unlink(missing_ok=True)
            raise
        fsync_dir(self.dir)
        return Stored(final, size, sha)

    def discard(self, scratch: Scratch) -> None:
        scratch.discard()

    def write_manifest(self, doc: dict[str, Any], started: datetime | None = None) -> str:
        """The run's own manifest, the index entry, and manifest.json (see runindex)."""
        body = (json.dumps(doc, indent=2) + "\n").encode()
        name = link_new(self._new_file(body), self.dir,
                        runindex.run_manifest_name(started or datetime.now(timezone.utc)),
                        unique=runindex.numbered)
        os.replace(self._new_file(body), self.dir / runindex.LATEST_NAME)
        self._append_index(runindex.index_entry(doc, name))
        fsync_dir(self.dir)
        return str(self.dir / name)

    def _new_file(self, body: bytes) -> Path:
        fd, path = create_new(self.dir, ".manifest.")
        with open(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        return path

    def _append_index(self, entry: dict[str, Any]) -> None:
        """Append to runs.json under an exclusive lock of the directory (runs at once)."""
        import fcntl

        dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(dfd, fcntl.LOCK_EX)
            path = self.dir / runindex.INDEX_NAME
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                with open(fd, "rb") as f:
                    old: bytes | None = f.read()
            except FileNotFoundError:
                old = None
            except OSError as exc:             # ELOOP: a planted symlink is not read
                old = f"(unreadable: {exc.strerror})".encode()
            os.replace(self._new_file(runindex.append_entry(old, entry)), path)
        finally:
            os.close(dfd)                     # releases the lock

    def close(self) -> None:
        pass


def _numbered_name(name: str, n: int) -> str:
    """``h_x_1_T.notes.core`` -> ``h_x_1_T-2.notes.core`` (as :class:`NameClaims`)."""
    stem, dot, rest = name.partition(".")
    return f"{stem}-{n}{dot}{rest}"


def _s3_missing(exc: Exception) -> bool:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code")
    return code in ("404", "NoSuchKey", "NotFound")


class S3Sink:
    """Cores as objects under ``s3://bucket/prefix/`` (any S3-compatible store).

    Each core is written to a private local scratch directory first (the
    capture is closed, and the target thawed, before the upload starts), then
    uploaded so that its key appears only when complete
    (:func:`corepeek.s3upload.upload_complete`: one PUT, or a multipart upload
    aborted on any failure).  The object's metadata carries its sha256.  Needs
    the ``[s3]`` extra (boto3); credentials and region come from the usual AWS
    environment / config files.
    """

    def __init__(self, url: str, *, endpoint_url: str | None = None, client: Any = None,
                 scratch_dir: str | None = None) -> None:
        self.location = parse_s3_url(url)
        self.destination = f"s3://{self.location.bucket}/{self.location.prefix}"
        if client is None:
            try:
                import boto3
            except ImportError:
                raise CaptureError("--out s3://... needs boto3: pip install 'corepeek[s3]'") \
                    from None
            client = boto3.client("s3", endpoint_url=endpoint_url)
        self.client = client
        self._tmp = Path(tempfile.mkdtemp(prefix="corepeek-collect-", dir=scratch_dir))
        os.chmod(self._tmp, 0o700)

    def scratch(self, name: str) -> Scratch:
        return Scratch.create(self._tmp, name.removesuffix(".zst"))

    def store(self, scratch: Scratch, name: str, compress: bool, level: int = 3) -> Stored:
        if compress:
            upload, size, sha = zstd_compress(scratch, self._tmp, level)
            scratch.discard()
        else:
            size, sha = scratch.digest()
            scratch.close()
            upload = scratch.path
        try:
            name = self._free_name(name, _numbered_name)
            key = self.location.key(name)
            upload_complete(self.client, upload, self.location.bucket, key, extra={
                "ContentType": "application/zstd" if compress else "application/octet-stream",
                "Metadata": {"sha256": sha}})
        except Exception as exc:  # noqa: BLE001 - botocore/boto3 errors: one line
            raise CaptureError(f"upload to {self.location.url(name)} failed: {exc}") from None
        finally:
            upload.unlink(missing_ok=True)
        return Stored(self.location.url(name), size, sha)

    def discard(self, scratch: Scratch) -> None:
        scratch.discard()

    def write_manifest(self, doc: dict[str, Any], started: datetime | None = None) -> str:
        """The run's own manifest object, the index entry, and manifest.json.

        S3 has no lock: two runs finishing at the same instant into one prefix
        may each append to runs.json and one entry be lost; both runs' own
        manifests remain (docs/fleet.md).
        """
        body = (json.dumps(doc, indent=2) + "\n").encode()
        loc = self.location
        try:
            name = self._free_name(runindex.run_manifest_name(
                started or datetime.now(timezone.utc)), runindex.numbered)
            for key in (name, runindex.LATEST_NAME):
                self.client.put_object(Bucket=loc.bucket, Key=loc.key(key), Body=body,
                                       ContentType="application/json")
            try:
                old = self.client.get_object(Bucket=loc.bucket,
                                             Key=loc.key(runindex.INDEX_NAME))["Body"].read()
            except Exception as exc:  # noqa: BLE001
                if not _s3_missing(exc):
                    raise
                old = None
            self.client.put_object(Bucket=loc.bucket, Key=loc.key(runindex.INDEX_NAME),
                                   Body=runindex.append_entry(old, runindex.index_entry(doc, name)),
                                   ContentType="application/json")
        except Exception as exc:  # noqa: BLE001
            raise CaptureError(f"cannot write the manifest to {loc.url(runindex.LATEST_NAME)}: "
                               f"{exc}") from None
        return loc.url(name)

    def _free_name(self, name: str, numbered: Callable[[str, int], str]) -> str:
        """``name``, or the first numbered variant no object has (another run's
        object is never replaced; S3 has no create-exclusive, so two runs at
        the same instant could still race)."""
        candidate, n = name, 1
        while self._exists(self.location.key(candidate)):
            n += 1
            candidate = numbered(name, n)
        return candidate

    def _exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.location.bucket, Key=key)
            return True
        except Exception as exc:  # noqa: BLE001
            if _s3_missing(exc):
                return False
            raise

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)


# =====================================================================================
# I/O: progress
# =====================================================================================

class Progress:
    """Live progress on a terminal: one overall bar, and one bar per host (up to
    ``max_host_bars``; beyond that the overall bar counts hosts done)."""

    def __init__(self, enabled: bool, file: Any = None, max_host_bars: int = 16) -> None:
        self.enabled = enabled
        self.file = file if file is not None else sys.stderr
        self.max_host_bars = max_host_bars
        self._lock = threading.Lock()
        self._overall: Any = None
        self._hosts: dict[str, Any] = {}
        self._left: dict[str, int] = {}
        self._host_errors: dict[str, int] = {}
        self._host_bytes: dict[str, int] = {}
        self._bytes = 0
        self._ok = 0
        self._err = 0

    def _bar(self, **kw: Any) -> Any:
        from tqdm import tqdm
        return tqdm(file=self.file, dynamic_ncols=True, **{"leave": True, **kw})

    def listing(self, agents: int) -> Callable[[], None]:
        """A bar for the listing phase; returns its ``tick`` (call once per agent)."""
        if not self.enabled:
            return lambda: None
        bar = self._bar(total=agents, desc="listing", unit="agent", leave=False)
        self._overall = bar

        def tick() -> None:
            with self._lock:
                bar.update(1)
        return tick

    def start(self, per_host: dict[str, int], labels: dict[str, str] | None = None) -> None:
        """Bars for the captures: ``per_host`` maps a host key (the agent's address)
        to its number of captures, ``labels`` a key to the name shown."""
        if not self.enabled:
            return
        if self._overall is not None:
            self._overall.close()
        labels = labels or {}
        total = sum(per_host.values())
        self._left = dict(per_host)
        self._overall = self._bar(total=total, desc="captures", unit="core", position=0)
        if len(per_host) <= self.max_host_bars:
            names = {k: labels.get(k, k) for k in per_host}
            width = max((len(n) for n in names.values()), default=4)
            for i, key in enumerate(sorted(per_host, key=lambda k: names[k]), start=1):
                self._hosts[key] = self._bar(total=per_host[key], desc=names[key].ljust(width),
                                             unit="core", position=i)
        self._postfix()

    def _postfix(self) -> None:
        hosts_done = sum(1 for n in self._left.values() if n == 0)
        self._overall.set_postfix_str(
            f"ok={self._ok} err={self._err} {self._bytes / 1048576:.1f}MiB "
            f"hosts {hosts_done}/{len(self._left)}", refresh=True)

    def received(self, host: str, n: int) -> None:
        if not self.enabled or self._overall is None:
            return
        with self._lock:
            self._bytes += n
            self._host_bytes[host] = self._host_bytes.get(host, 0) + n

    def done(self, host: str, ok: bool) -> None:
        if not self.enabled or self._overall is None:
            return
        with self._lock:
            if ok:
                self._ok += 1
            else:
                self._err += 1
            self._left[host] = self._left.get(host, 1) - 1
            if not ok:
                self._host_errors[host] = self._host_errors.get(host, 0) + 1
            bar = self._hosts.get(host)
            if bar is not None:
                errors = self._host_errors.get(host, 0)
                bar.set_postfix_str(f"{self._host_bytes.get(host, 0) / 1048576:.1f}MiB"
                                    + (f" errors={errors}" if errors else ""), refresh=False)
                bar.update(1)
            self._overall.update(1)
            self._postfix()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._overall is not None:          # top line first: tqdm keeps the order
            self._overall.close()
        for bar in self._hosts.values():
            bar.close()
        self._hosts.clear()
        self._overall = None


# =====================================================================================
# I/O: the collection
# =====================================================================================

@dataclass
class CollectConfig:
    endpoints: list[Endpoint]
    selection: Selection
    mode: str = "full"
    out: str = ""                         # directory or s3://bucket/prefix
    compress: bool = False
    compress_level: int = 3
    wire_compression: str = "none"        # CaptureOptions.compression: "none" or "zstd"
    concurrency: int = 8
    per_host: int = 2
    retries: int = 3
    list_timeout: float = 30.0
    freeze_timeout_ms: int = 0
    stack_bytes: int = 0
    tls: TLSOptions | None = None
    s3_endpoint_url: str | None = None
    backoff_base: float = 0.5
    backoff_cap: float = 8.0


@dataclass
class CollectResult:
    manifest: dict[str, Any]
    manifest_path: str

    @property
    def ok(self) -> bool:
        return self.manifest["summary"]["error"] == 0


class _Channels:
    """One gRPC channel per agent, shared by its listing and captures.

    After an ``UNAVAILABLE`` the caller renews the agent's channel (:meth:`renew`)
    before retrying: a channel that failed to connect waits out gRPC's own
    reconnect backoff (1 s, growing 1.6x) and fails RPCs fast meanwhile, which
    would make our backoff meaningless.  The old channel is kept open (other
    captures may still stream on it) and closed at the end.
    """

    def __init__(self, tls: TLSOptions | None) -> None:
        self._tls = tls
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._retired: list[grpc.Channel] = []

    def get(self, address: str) -> grpc.Channel:
        with self._lock:
            ch = self._channels.get(address)
            if ch is None:
                ch = self._channels[address] = open_channel(address, self._tls)
            return ch

    def renew(self, address: str, failed: grpc.Channel) -> None:
        with self._lock:
            if self._channels.get(address) is failed:
                self._retired.append(self._channels.pop(address))

    def close(self) -> None:
        with self._lock:
            for ch in [*self._channels.values(), *self._retired]:
                ch.close()
            self._channels.clear()
            self._retired.clear()


def _error_text(exc: BaseException) -> tuple[str, str | None]:
    if isinstance(exc, CaptureError):
        return str(exc), exc.code.name if exc.code is not None else None
    if isinstance(exc, grpc.RpcError):
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        return f"{code.name if code else 'UNKNOWN'}: {details}", code.name if code else None
    return f"{type(exc).__name__}: {exc}", None


class Collector:
    """Runs one collection (see the module docstring); ``sleep`` is injectable for tests."""

    def __init__(self, cfg: CollectConfig, *, sink: Sink | None = None,
                 progress: Progress | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 now: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> None:
        if cfg.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.cfg = cfg
        self.now = now
        self.sleep = sleep
        self.progress = progress or Progress(False)
        self.sink = sink or self._make_sink()
        self.channels = _Channels(cfg.tls)
        self.names = NameClaims([MANIFEST_NAME])

    def _make_sink(self) -> Sink:
        out = self.cfg.out or default_out_dir(self.now())
        if out.startswith("s3://"):
            return S3Sink(out, endpoint_url=self.cfg.s3_endpoint_url)
        return DirSink(Path(out))

    def _delays(self) -> list[float]:
        return backoff_delays(self.cfg.retries, base=self.cfg.backoff_base,
                              cap=self.cfg.backoff_cap)

    # -- listing ------------------------------------------------------------------

    def list_agent(self, ep: Endpoint) -> AgentResult:
        res = AgentResult(endpoint=ep)
        if ep.error:
            res.error = ep.error
            return res
        t0 = time.monotonic()
        delays = self._delays()
        while True:
            res.attempts += 1
            channel = None
            try:
                channel = self.channels.get(ep.address)
                stub = pb_grpc.CoreCaptureServiceStub(channel)
                resp = stub.ListProcesses(self.cfg.selection.request(),
                                          timeout=self.cfg.list_timeout)
                res.host = host_of(ep, resp)
                res.matches = matches_from_listing(ep, resp)
                res.error, res.code = "", None
                break
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                res.error = f"cannot list processes: {_error_text(exc)[0]}"
                res.code = code.name if code else None
                if code in LIST_RETRYABLE and res.attempts <= len(delays):
                    log.info("agent %s: %s; retry %d in %.2f s", ep.name, res.error,
                             res.attempts, delays[res.attempts - 1])
                    self.channels.renew(ep.address, channel)
                    self.sleep(delays[res.attempts - 1])
                    continue
                break
            except CaptureError as exc:          # bad address, TLS files ...
                res.error, res.code = _error_text(exc)
                break
        res.seconds = time.monotonic() - t0
        return res

    # -- capturing ----------------------------------------------------------------

    def capture(self, m: Match) -> CaptureRecord:
        from .dump import write_full_core
        from .partial import write_partial_core
        from .remote import RemoteCore

        cfg = self.cfg
        when = self.now()
        name = self.names.claim(capture_name(m.host, m.comm, m.pid, when, cfg.mode,
                                             cfg.compress))
        rec = CaptureRecord(agent=m.agent, host=m.host, pid=m.pid, comm=m.comm, exe=m.exe,
                            status="error", mode=cfg.mode, start_time=m.start_time,
                            time=iso_utc(when), compressed=cfg.compress)
        scratch = self.sink.scratch(name)
        delays = self._delays()
        while True:
            rec.attempts += 1
            t0 = time.monotonic()
            channel = None
            try:
                channel = self.channels.get(m.agent)
                with RemoteCore(channel, m.pid, start_time=m.start_time,
                                mode=cfg.mode, freeze_timeout_ms=cfg.freeze_timeout_ms,
                                stack_bytes=cfg.stack_bytes,
                                compression=cfg.wire_compression) as core:
                    lay = core.layout
                    rec.comm, rec.exe = lay.comm or m.comm, lay.exe or m.exe
                    rec.threads = len(lay.threads)
                    rec.unfrozen_threads = [t.tid for t in lay.threads if not t.frozen]
                    rec.freeze_micros = int(lay.freeze_micros)
                    if cfg.mode == "full":
                        write_full_core(core, scratch.fd,
                                        progress=lambda n: self.progress.received(m.agent, n))
                    else:
                        write_partial_core(core, scratch.fd, stack_bytes=cfg.stack_bytes)
                        self.progress.received(m.agent, core.stats.data_bytes)
                    rec.wire_bytes = core.stats.wire_bytes
                rec.seconds = time.monotonic() - t0      # closed: the target is thawed
                rec.core_bytes = os.fstat(scratch.fd).st_size
                t1 = time.monotonic()
                stored = self.sink.store(scratch, name, cfg.compress, cfg.compress_level)
                rec.store_seconds = time.monotonic() - t1
                rec.path, rec.bytes, rec.sha256 = stored.path, stored.bytes, stored.sha256
                rec.status, rec.error, rec.code = "ok", None, None
                return rec
            except CaptureError as exc:
                rec.seconds = time.monotonic() - t0
                rec.error, rec.code = _error_text(exc)
                if exc.code in RETRYABLE and rec.attempts <= len(delays):
                    log.info("%s pid %d: %s; retry %d in %.2f s", m.host, m.pid, rec.error,
                             rec.attempts, delays[rec.attempts - 1])
                    os.ftruncate(scratch.fd, 0)           # the next attempt starts afresh
                    if exc.code == grpc.StatusCode.UNAVAILABLE and channel is not None:
                        self.channels.renew(m.agent, channel)
                    self.sleep(delays[rec.attempts - 1])
                    continue
            except Exception as exc:  # noqa: BLE001 - OSError, bad core, ...: one entry
                rec.seconds = time.monotonic() - t0
                rec.error, rec.code = _error_text(exc)
            except BaseException:                 # Ctrl-C: no scratch file stays behind
                self.sink.discard(scratch)
                raise
            self.sink.discard(scratch)
            return rec

    def _failed(self, m: Match, exc: BaseException) -> CaptureRecord:
        text, code = _error_text(exc)
        return CaptureRecord(agent=m.agent, host=m.host, pid=m.pid, comm=m.comm, exe=m.exe,
                             status="error", error=text, code=code, mode=self.cfg.mode)

    # -- the whole run ----------------------------------------------------------------

    def run(self) -> CollectResult:
        cfg = self.cfg
        started = self.now()
        try:
            tick = self.progress.listing(len(cfg.endpoints))

            def list_one(ep: Endpoint) -> AgentResult:
                try:
                    return self.list_agent(ep)
                finally:
                    tick()

            agents = run_bounded(cfg.endpoints, list_one, key=lambda e: e.address,
                                 concurrency=max(1, min(cfg.concurrency, len(cfg.endpoints)
                                                        or 1)),
                                 per_key=1,
                                 on_error=lambda e, exc: AgentResult(
                                     endpoint=e, error=_error_text(exc)[0]))
            for a in agents:
                if not a.ok:
                    log.info("agent %s: %s", a.endpoint.name, a.error)
            plan = plan_captures(agents)
            self.progress.start(*progress_hosts(plan))

            def capture_one(m: Match) -> CaptureRecord:
                rec = self.capture(m)
                self.progress.done(m.agent, rec.status == "ok")
                return rec

            records = run_bounded(plan, capture_one, key=lambda m: m.agent,
                                  concurrency=cfg.concurrency, per_key=cfg.per_host,
                                  on_error=self._failed)
        finally:
            self.progress.close()
            self.channels.close()
        manifest = build_manifest(started=started, finished=self.now(),
                                  selection=cfg.selection, mode=cfg.mode,
                                  compress=cfg.compress, destination=self.sink.destination,
                                  agents=agents, captures=records)
        try:
            path = self.sink.write_manifest(manifest, started)
        finally:
            self.sink.close()
        return CollectResult(manifest, path)


def collect(cfg: CollectConfig, **kwargs: Any) -> CollectResult:
    """Run one collection; see :class:`Collector`."""
    return Collector(cfg, **kwargs).run()
