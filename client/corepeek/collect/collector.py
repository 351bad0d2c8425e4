"""One collection, start to end: list every agent, capture every match, store, write the manifest.

Owns the orchestration (:class:`Collector`): the shared gRPC channel per
agent and its renewal after ``UNAVAILABLE``, one capture with its retries, and
the order of the phases.  The decisions it applies live in the pure modules
beside it (plan, runner, manifest); the bytes go to a sink.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc

from ..channel import TLSOptions, open_channel
from ..errors import CaptureError
from ..v1 import capture_pb2 as pb
from ..v1 import capture_pb2_grpc as pb_grpc
from .agentupload import stored_matches, upload_one
from .endpoints import Endpoint
from .manifest import MANIFEST_NAME, CaptureRecord, build_manifest, iso_utc
from .plan import (MODES, AgentResult, Match, NameClaims, Selection, capture_name,
                   default_out_dir, host_of, matches_from_listing, plan_captures,
                   progress_hosts)
from .progress import Progress
from .runner import LIST_RETRYABLE, RETRYABLE, backoff_delays, run_bounded
from .sinks import DirSink, S3Sink, Sink

log = logging.getLogger(__name__)


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
    snapshot: bool | None = None          # None: the agent's default (a snapshot)
    upload: bool = False                  # agents write cores to `out` (s3://) themselves
    stored_since: float = 0.0             # > 0: collect --stored, entries of the last N s
    backoff_base: float = 0.5
    backoff_cap: float = 8.0
    # Also store the ELF files the targets map, each build-id once per run
    # (files/<build-id>), for debuggers and debuginfod-style stores.
    with_files: bool = False


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
        self._closed = False

    def get(self, address: str) -> grpc.Channel:
        with self._lock:
            if self._closed:                  # the run was interrupted: no new capture
                raise CaptureError("interrupted", grpc.StatusCode.CANCELLED)
            ch = self._channels.get(address)
            if ch is None:
                ch = self._channels[address] = open_channel(address, self._tls)
            return ch

    def renew(self, address: str, failed: grpc.Channel) -> None:
        with self._lock:
            if self._channels.get(address) is failed:
                self._retired.append(self._channels.pop(address))

    def close(self) -> None:
        """Close every channel (cancelling its RPCs); no channel is opened after."""
        with self._lock:
            self._closed = True
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
        if cfg.upload and (cfg.mode != "full" or cfg.compress or not cfg.out.startswith("s3://")):
            raise CaptureError("--upload s3://bucket/prefix uploads full, uncompressed cores "
                               "(no --only, --compress or --out with it)")
        self.cfg = cfg
        self.now = now
        self.sleep = sleep
        self.progress = progress or Progress(False)
        self.sink = sink or self._make_sink()
        self.channels = _Channels(cfg.tls)
        self.names = NameClaims([MANIFEST_NAME])
        self._stopping = threading.Event()     # Ctrl-C: end the captures, store nothing more
        self._done: list[CaptureRecord] = []   # finished captures, kept if the run is cut
        self._files_lock = threading.Lock()
        self._files_claimed: set[str] = set()
        self.stored_files: dict[str, dict[str, Any]] = {}     # build-id -> where it is

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
                if self.cfg.stored_since > 0:
                    stored = stub.ListCaptures(pb.ListCapturesRequest(),
                                               timeout=self.cfg.list_timeout)
                    res.host = host_of(ep, stored)           # type: ignore[arg-type]
                    sel = self.cfg.selection
                    res.matches = stored_matches(ep.address, res.host, stored,
                                                 since=self.cfg.stored_since, now=time.time(),
                                                 comm=sel.comm, exe_glob=sel.exe_glob,
                                                 pid=sel.pid, full_only=self.cfg.upload)
                    res.error, res.code = "", None
                    break
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
        from ..dump import write_full_core
        from ..partial import write_partial_core
        from ..remote import RemoteCore

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
                if cfg.upload:
                    upload_one(channel, m, self.sink.destination + name, rec,
                               freeze_timeout_ms=cfg.freeze_timeout_ms, snapshot=cfg.snapshot)
                    rec.seconds = time.monotonic() - t0
                    rec.status, rec.error, rec.code = "ok", None, None
                    return rec
                with RemoteCore(channel, m.pid, start_time=m.start_time, capture_id=m.capture_id,
                                mode=cfg.mode, freeze_timeout_ms=cfg.freeze_timeout_ms,
                                stack_bytes=cfg.stack_bytes, snapshot=cfg.snapshot,
                                compression=cfg.wire_compression) as core:
                    lay = core.layout
                    rec.comm, rec.exe = lay.comm or m.comm, lay.exe or m.exe
                    rec.threads = len(lay.threads)
                    rec.unfrozen_threads = [t.tid for t in lay.threads if not t.frozen]
                    rec.freeze_micros = int(lay.freeze_micros)
                    rec.files = [{"path": f.path, "size": f.size, "build_id": f.build_id or None}
                                 for f in lay.files if f.elf]
                    if cfg.mode == "full":
                        write_full_core(core, scratch.fd,
                                        progress=lambda n: self.progress.received(m.agent, n))
                    else:
                        write_partial_core(core, scratch.fd, stack_bytes=cfg.stack_bytes)
                        self.progress.received(m.agent, core.stats.data_bytes)
                    rec.wire_bytes = core.stats.wire_bytes
                    if cfg.with_files:
                        self._store_files(core)
                rec.seconds = time.monotonic() - t0      # closed: the target is thawed
                rec.core_bytes = os.fstat(scratch.fd).st_size
                if self._stopping.is_set():
                    raise CaptureError("interrupted before the core was stored")
                t1 = time.monotonic()
                stored = self.sink.store(scratch, name, cfg.compress, cfg.compress_level)
                rec.store_seconds = time.monotonic() - t1
                rec.path, rec.bytes, rec.sha256 = stored.path, stored.bytes, stored.sha256
                rec.status, rec.error, rec.code = "ok", None, None
                return rec
            except CaptureError as exc:
                rec.seconds = time.monotonic() - t0
                rec.error, rec.code = _error_text(exc)
                if exc.code in RETRYABLE and rec.attempts <= len(delays) \
                        and not self._stopping.is_set():
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

    def _store_files(self, core: Any) -> None:
        """Store the ELF files ``core``'s target maps that no capture of this run
        stored yet (one per build-id); a failure loses the file, not the capture."""
        from ..files import FileCache, debug_files, obtain

        for f in debug_files(core.layout):
            bid = f.build_id
            with self._files_lock:
                if not bid or bid in self._files_claimed:
                    continue
                self._files_claimed.add(bid)
            scratch = self.sink.scratch(f"file-{bid}")
            try:
                with tempfile.TemporaryDirectory(prefix="corepeek-file-") as tmp:
                    fetched = Path(tmp) / bid               # private: 0700 directory
                    obtain(core, f, FileCache(), fetched)
                    with open(fetched, "rb") as src, open(os.dup(scratch.fd), "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                stored = self.sink.store(scratch, f"files/{bid}", False)
            except (CaptureError, OSError) as exc:
                log.warning("mapped file %s (%s) not stored: %s", f.path, bid, exc)
                self.sink.discard(scratch)
                with self._files_lock:
                    self._files_claimed.discard(bid)
                if isinstance(exc, CaptureError):
                    raise                       # the stream is over: the capture failed
                continue
            with self._files_lock:
                self.stored_files[bid] = {"path": stored.path, "size": f.size,
                                          "bytes": stored.bytes, "sha256": stored.sha256,
                                          "name": f.path}

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
                self._done.append(rec)
                return rec

            try:
                records = run_bounded(plan, capture_one, key=lambda m: m.agent,
                                      concurrency=cfg.concurrency, per_key=cfg.per_host,
                                      on_error=self._failed, on_abort=self._interrupt)
            except KeyboardInterrupt:
                # Cores already stored keep their record: the run's manifest
                # lists what finished (the rest never started or was cut).
                self._write(started, cfg, agents, list(self._done))
                raise
        finally:
            self.progress.close()
            self.channels.close()
        return self._write(started, cfg, agents, records)

    def _interrupt(self) -> None:
        """Ctrl-C: cancel every open capture (closing a channel cancels its RPCs;
        the agent thaws), and let none store its core."""
        self._stopping.set()
        self.channels.close()

    def _write(self, started: datetime, cfg: CollectConfig, agents: list[AgentResult],
               records: list[CaptureRecord]) -> CollectResult:
        manifest = build_manifest(started=started, finished=self.now(),
                                  selection=cfg.selection, mode=cfg.mode,
                                  compress=cfg.compress, destination=self.sink.destination,
                                  agents=agents, captures=records,
                                  files=self.stored_files if cfg.with_files else None)
        try:
            path = self.sink.write_manifest(manifest, started)
        finally:
            self.sink.close()
        return CollectResult(manifest, path)


def collect(cfg: CollectConfig, **kwargs: Any) -> CollectResult:
    """Run one collection; see :class:`Collector`."""
    return Collector(cfg, **kwargs).run()
